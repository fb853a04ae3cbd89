"""A session id in a path is accepted exactly when it is a UUID in the canonical form the service
issues (what ``str(uuid.UUID(raw))`` gives back unchanged); anything else is a 404, not a 400."""

from __future__ import annotations

import uuid
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from session_svc.http.validation import _CANONICAL_UUID
from session_svc.record.shapes import new_id


def canonical(raw: str) -> bool:
    try:
        return str(uuid.UUID(raw)) == raw
    except ValueError:
        return False


uuids = st.uuids()


@settings(max_examples=3000, deadline=None)
@given(
    st.one_of(
        st.text(),
        uuids.map(str),
        uuids.map(lambda u: str(u).upper()),
        uuids.map(lambda u: u.hex),
        uuids.map(lambda u: "{" + str(u) + "}"),
        uuids.map(lambda u: str(u) + "\n"),
        uuids.map(lambda u: "urn:uuid:" + str(u)),
    )
)
def test_the_pattern_accepts_exactly_the_canonical_form(raw: str) -> None:
    assert bool(_CANONICAL_UUID.fullmatch(raw)) == canonical(raw)


async def test_other_forms_of_a_real_id_are_404(client: Any) -> None:
    created = await client.post("/api/v1/sessions", json={"user_id": "ids"})
    sid = (await created.json())["session_id"]
    assert (await client.get(f"/api/v1/sessions/{sid}", params={"user_id": "ids"})).status == 200
    for other in (sid.upper(), sid.replace("-", ""), "{" + sid + "}"):
        resp = await client.get(f"/api/v1/sessions/{other}", params={"user_id": "ids"})
        assert resp.status == 404, other


def test_issued_ids_are_distinct_version_4_uuids_in_canonical_form() -> None:
    ids = [new_id() for _ in range(20000)]
    assert len(set(ids)) == len(ids)
    for raw in ids:
        parsed = uuid.UUID(raw)
        assert str(parsed) == raw and parsed.version == 4 and parsed.variant == uuid.RFC_4122
    # Random bits are random: each of the 122 free bits is set in about half of the ids.
    ones = [sum(uuid.UUID(raw).int >> bit & 1 for raw in ids[:4000]) for bit in range(128)]
    fixed = {76, 77, 78, 79, 62, 63}  # the version (bits 76-79) and variant (62-63) bits
    assert all(1700 < n < 2300 for bit, n in enumerate(ones) if bit not in fixed)
