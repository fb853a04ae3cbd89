"""The API docs page at ``/docs``: Swagger UI from the swagger-ui-py package, served by the service itself.

The fast tests read the page and its assets with the test client: every URL the page loads is on this
service, answers with its content type and may be cached. The browser test starts ``python -m
session_svc`` and drives a headless Chromium over the DevTools protocol: the page renders every
operation of ``/openapi.json``, "Try it out" then "Execute" on GET /health shows the service's own 200,
and nothing is fetched from another origin. Chromium is one of the suite's tools (``scripts/tools.sh``
installs it): without it the browser test fails, it is not skipped.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests import servers, support
from tests.helpers import ok_json

CONTENT_TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}


def _page_urls(page: str) -> list[str]:
    return re.findall(r"""(?:src|href)=["']([^"']+)["']""", page)


async def test_docs_page_loads_swagger_ui_from_this_service(client: Any) -> None:
    resp = await client.get("/docs")
    assert resp.status == 200 and resp.content_type == "text/html"
    page = await resp.text()
    assert "SwaggerUIBundle(" in page and '"url": "/openapi.json"' in page
    assert not re.search(r"https?://|//[a-z]", page, re.IGNORECASE), "the page must not leave this service"
    urls = _page_urls(page)
    assert {Path(u).name for u in urls} >= {"swagger-ui-bundle.js", "swagger-ui.css"}
    for url in urls:
        asset = await client.get(url)
        assert asset.status == 200, url
        assert asset.content_type == CONTENT_TYPES[Path(url).suffix], url
        assert "max-age=" in asset.headers["Cache-Control"] and asset.headers["ETag"], url
        body = await asset.read()
        assert body, url
        if url.endswith("swagger-ui-bundle.js"):
            assert b"SwaggerUIBundle" in body
        again = await client.get(url, headers={"If-None-Match": asset.headers["ETag"]})
        assert again.status == 304, url


async def test_docs_assets_are_only_the_files_the_page_loads(client: Any) -> None:
    bundle = next(u for u in _page_urls(await (await client.get("/docs")).text()) if u.endswith(".js"))
    folder, _, _ = bundle.rpartition("/")
    other_version = re.sub(r"/[^/]+$", "/0.0.0", folder)
    for url in (f"{folder}/LICENSE", f"{folder}/..%2Fcore.py", f"{other_version}/swagger-ui-bundle.js"):
        resp = await client.get(url)
        assert resp.status == 404, url
        assert await resp.json() == {"detail": "Not Found"}


async def test_try_it_out_calls_the_service_that_served_the_page(client: Any) -> None:
    """Without ``servers`` (or with relative ones) Swagger UI sends requests to the page's own origin."""
    doc = await ok_json(await client.get("/openapi.json"))
    assert all(s["url"].startswith("/") for s in doc.get("servers", []))


# The browser --------------------------------------------------------------------------------------------


@pytest.fixture
def service(test_urls: Any, db_schema: str, key_prefix: str, tmp_path: Path) -> Iterator[str]:
    """``python -m session_svc`` on a free port, this test's key prefix and the run's schema; its URL."""
    port = servers.free_port()
    settings = support.api_settings(test_urls.redis_url, test_urls.database_url, db_schema, key_prefix, port)
    with servers.running_api(settings, tmp_path, "service") as api:
        yield api.url


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[str]:
    """A headless Chromium with a private profile; the DevTools websocket URL of its blank page."""
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("chromium is not installed: scripts/tools.sh installs it (apt-get install chromium)")
    port = servers.free_port()
    args = [
        exe,
        "--headless=new",
        "--no-sandbox",  # the tests run as root
        "--disable-gpu",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        f"--remote-debugging-port={port}",
        "--remote-debugging-address=127.0.0.1",
        "--window-size=1280,2000",
        "--no-first-run",
        "--no-default-browser-check",
        # Nothing but the page under test goes on the network.
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-extensions",
        "about:blank",
    ]
    log = tmp_path / "chromium.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=out, start_new_session=True)
    try:
        targets: list[dict[str, Any]] = []

        def page_listed() -> bool:
            if proc.poll() is not None:
                return True
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=1) as resp:
                    targets[:] = json.load(resp)
            except OSError:
                return False
            return any(t["type"] == "page" for t in targets)

        support.wait_sync(page_listed, "chromium's DevTools endpoint", 20)
        assert proc.poll() is None, log.read_text()
        yield next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: the browser and its helper processes
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


class DevTools:
    """The few Chrome DevTools Protocol calls the test needs: a command waits for its own reply, and
    the events that arrive meanwhile are kept in ``events``."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.last_id = 0
        self.events: list[dict[str, Any]] = []

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        self.last_id += 1
        await self.ws.send_json({"id": self.last_id, "method": method, "params": params})
        while True:
            message = await self.ws.receive_json(timeout=15)
            if message.get("id") == self.last_id:
                assert "error" not in message, (method, message["error"])
                result: dict[str, Any] = message["result"]
                return result
            self.events.append(message)

    async def evaluate(self, expression: str) -> Any:
        reply = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in reply, (expression, reply["exceptionDetails"])
        return reply["result"].get("value")

    async def wait_for(self, expression: str, what: str) -> Any:
        try:
            return await support.eventually(lambda: self.evaluate(expression), what, within=15, interval=0.1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the page's failures: {self.failures()}") from None

    def failures(self) -> list[Any]:
        """Responses of 400 and above, requests that failed, and uncaught script errors, so far."""
        return [
            *[
                (r["response"]["url"], r["response"]["status"])
                for r in self.of("Network.responseReceived")
                if r["response"]["status"] >= 400
            ],
            *[(e["type"], e["errorText"]) for e in self.of("Network.loadingFailed")],
            *[e["exceptionDetails"]["text"] for e in self.of("Runtime.exceptionThrown")],
        ]

    async def click(self, selector: str, what: str) -> None:
        """Click the element once it is there (once: a click that toggles must not repeat)."""
        found = f"document.querySelector({json.dumps(selector)})"
        await self.wait_for(f"(e => e ? (e.click(), true) : false)({found})", what)

    def of(self, method: str) -> list[dict[str, Any]]:
        return [e["params"] for e in self.events if e.get("method") == method]


OPERATIONS_JS = """[...document.querySelectorAll('.opblock')].map(o => [
    o.querySelector('.opblock-summary-method').textContent,
    o.querySelector('.opblock-summary-path').textContent.replaceAll('\\u200b', ''),
    o.querySelector('.opblock-summary-description').textContent])"""


async def test_swagger_ui_renders_every_operation_and_tries_get_health(
    service: str, browser: str, tmp_path: Path
) -> None:
    async with aiohttp.ClientSession() as http:
        doc = await (await http.get(f"{service}/openapi.json")).json()
        async with http.ws_connect(browser, max_msg_size=0) as ws:
            cdp = DevTools(ws)
            for domain in ("Page", "Runtime", "Network"):
                await cdp.send(f"{domain}.enable")
            # deepLinking opens the operation named in the fragment: GET /health (operationId "health").
            await cdp.send("Page.navigate", url=f"{service}/docs#/default/health")

            # Every operation of the document is rendered, with its method, path and summary.
            expected = sorted(
                [method.upper(), path, op["summary"]]
                for path, ops in doc["paths"].items()
                for method, op in ops.items()
            )
            count = len(expected)
            await cdp.wait_for(f"document.querySelectorAll('.opblock').length === {count}", "the operations")
            assert sorted(await cdp.evaluate(OPERATIONS_JS)) == expected
            assert "/api/v1/sessions/{session_id}/messages" in {path for _, path, _ in expected}

            # An operation opens to its description (the one that says an ended session stays readable).
            await cdp.click("#operations-default-end_session .opblock-summary-control", "DELETE's summary")
            await cdp.wait_for(
                "document.querySelector('#operations-default-end_session .opblock-description-wrapper')"
                "?.innerText.includes('not 404')",
                "the DELETE operation's description",
            )

            # Try it out, Execute: the request goes to this service and its answer is shown.
            await cdp.click("#operations-default-health .try-out__btn", "Try it out")
            await cdp.click("#operations-default-health .btn.execute", "Execute")
            health = "document.querySelector('#operations-default-health')"
            shown = await cdp.wait_for(
                f"{health}.querySelector('.live-responses-table .response')?.innerText", "the response"
            )
            assert re.match(r"\s*200\b", shown), shown
            assert '"status": "healthy"' in shown and '"service": "session_service"' in shown
            request_url = await cdp.evaluate(f"{health}.querySelector('.request-url pre').innerText")
            assert request_url.strip() == f"{service}/health"

            await cdp.evaluate("window.scrollTo(0, 0)")  # the title, then the answer of GET /health
            png = base64.b64decode((await cdp.send("Page.captureScreenshot", format="png"))["data"])
            await cdp.send("Browser.close")

    # Nothing came from another origin, nothing failed, no script error.
    requested = {r["request"]["url"] for r in cdp.of("Network.requestWillBeSent")}
    elsewhere = {u for u in requested if not u.startswith((f"{service}/", "data:"))}
    assert elsewhere == set()
    assert {f"{service}/openapi.json", f"{service}/health"} <= requested
    assert any(u.endswith("/swagger-ui-bundle.js") for u in requested)
    assert cdp.failures() == []

    assert png.startswith(b"\x89PNG") and len(png) > 20_000
    screenshot = tmp_path / "docs.png"
    await asyncio.to_thread(screenshot.write_bytes, png)
    print(f"screenshot of /docs: {screenshot}")
