"""Every Redis key the service and its workers use, built in one place.

Layout (``P`` is the key prefix, ``{bNN}`` the hash tag of a bucket of users):

    P:{bNN}:s:<sid>          HASH    session fields and counters
    P:{bNN}:m:<sid>          STREAM  messages, entry id ``<seq>-0`` (so a page is one XRANGE)
    P:{bNN}:y:<sid>          HASH    memories, field = memory seq, value = memory JSON
    P:{bNN}:yi:<sid>:<type>  ZSET    memory seqs of one type (``*`` = all types), score = seq
    P:{bNN}:u:<uid>          ZSET    a user's sessions, score = last activity (microseconds)
    P:{bNN}:ua:<uid>         ZSET    the same, active sessions only
    P:{bNN}:ut:<uid>         HASH    entries trimmed from ``u:<uid>``: ``n`` how many, ``w`` the latest
                                     last activity among them (older sessions are listed from Postgres)
    P:{bNN}:stats            HASH    exact service-wide counters of this bucket
    P:{bNN}:outbox           STREAM  change log drained into PostgreSQL by the workers
    P:{bNN}:dead             STREAM  outbox entries that kept failing (dead letters)
    P:{bNN}:hot              ZSET    sessions held in Redis, score = last write (microseconds)
    P:{bNN}:g:<sid>          STRING  version an evicted session left Redis with (expires after a day)
    P:{bNN}:i:<uid>/<key>    STRING  first answer to a write sent with Idempotency-Key <key>: request
                                     fingerprint + what rebuilds the answer (expires: IDEMPOTENCY_TTL)
    P:{bNN}:rl:<uid>         HASH    the user's write token bucket: tokens ``t``, time ``ts`` (expires
                                     once it would be full again)
    P:meta                   HASH    layout facts (bucket count) checked at start-up
    P:workers                HASH    worker heartbeats, field = consumer name, value = JSON
    P:trimmed_until          STRING  ``<us>/<sid>``: the trim of the user indexes has looked at every
                                     session up to this (last write in microseconds, session id)

The bucket is chosen by user id, so a session, its user's indexes, its bucket's stats and the outbox
shard it writes to all share one hash slot: every script touches one slot and Redis Cluster works.
A user id never contains ``/`` (it is a URL path segment), so ``i:<uid>/<key>`` names one (user, key)
pair whatever either contains.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from session_svc.record.fields import MEMORY_ALL

# Suffixes of the per-session keys. Scripts that find a session's keys from its bucket's prefix (the
# sweep, the user listing) have them generated into their source from here.
SESSION, MESSAGES, MEMORIES, MEMORY_INDEX, GONE = "s", "m", "y", "yi", "g"
# Suffixes of the per-user keys, for the same reason (the trim of the user indexes).
USER_INDEX, ACTIVE_INDEX, TRIMMED = "u", "ua", "ut"


def bucket_of(user_id: str, buckets: int) -> int:
    return zlib.crc32(user_id.encode()) % buckets


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str
    buckets: int

    def tag(self, bucket: int) -> str:
        return f"{self.prefix}:{{b{bucket:02d}}}"

    def for_user(self, user_id: str) -> UserKeys:
        return UserKeys(self.tag(bucket_of(user_id, self.buckets)), user_id)

    def stats(self, bucket: int) -> str:
        return f"{self.tag(bucket)}:stats"

    # A session's keys from its bucket alone (the workers know the bucket, not always the user).
    def prefix_of(self, bucket: int) -> str:
        """``P:{bNN}:``, to which scripts append ``<suffix>:<sid>``."""
        return f"{self.tag(bucket)}:"

    def session(self, bucket: int, sid: str) -> str:
        return f"{self.tag(bucket)}:{SESSION}:{sid}"

    def messages(self, bucket: int, sid: str) -> str:
        return f"{self.tag(bucket)}:{MESSAGES}:{sid}"

    def memories(self, bucket: int, sid: str) -> str:
        return f"{self.tag(bucket)}:{MEMORIES}:{sid}"

    def outbox(self, bucket: int) -> str:
        return f"{self.tag(bucket)}:outbox"

    def dead(self, bucket: int) -> str:
        return f"{self.tag(bucket)}:dead"

    def hot(self, bucket: int) -> str:
        return f"{self.tag(bucket)}:hot"

    @property
    def meta(self) -> str:
        return f"{self.prefix}:meta"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    @property
    def trimmed_until(self) -> str:
        return f"{self.prefix}:trimmed_until"


@dataclass(frozen=True, slots=True)
class UserKeys:
    """Keys of one user's bucket; all in the same hash slot."""

    tag: str
    user_id: str

    @property
    def sessions(self) -> str:
        return f"{self.tag}:{USER_INDEX}:{self.user_id}"

    @property
    def active(self) -> str:
        return f"{self.tag}:{ACTIVE_INDEX}:{self.user_id}"

    @property
    def trimmed(self) -> str:
        return f"{self.tag}:{TRIMMED}:{self.user_id}"

    @property
    def stats(self) -> str:
        return f"{self.tag}:stats"

    @property
    def outbox(self) -> str:
        return f"{self.tag}:outbox"

    @property
    def hot(self) -> str:
        return f"{self.tag}:hot"

    @property
    def prefix(self) -> str:
        """``P:{bNN}:``, to which scripts append ``<suffix>:<sid>``."""
        return f"{self.tag}:"

    def idempotency(self, key: str) -> str:
        return f"{self.tag}:i:{self.user_id}/{key}"

    @property
    def rate_limit(self) -> str:
        return f"{self.tag}:rl:{self.user_id}"

    def gone(self, sid: str) -> str:
        return f"{self.tag}:{GONE}:{sid}"

    def session(self, sid: str) -> str:
        return f"{self.tag}:{SESSION}:{sid}"

    def messages(self, sid: str) -> str:
        return f"{self.tag}:{MESSAGES}:{sid}"

    def memories(self, sid: str) -> str:
        return f"{self.tag}:{MEMORIES}:{sid}"

    def memory_index(self, sid: str, memory_type: str = MEMORY_ALL) -> str:
        return f"{self.tag}:{MEMORY_INDEX}:{sid}:{memory_type}"
