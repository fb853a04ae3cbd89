"""``scripts/run.sh``, the README's first command: it serves the API and keeps a worker behind it. A
worker killed outright (SIGKILL: none of its own code runs) is replaced within seconds while the API
goes on answering; SIGTERM to the script stops everything it started.

Runs against the shared Redis and PostgreSQL with this test's own key prefix and schema.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync

from session_svc.record.keys import Keys
from tests import servers, support

pytestmark = pytest.mark.fault


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:  # nothing listens (yet, or any more)
        return 0, None


def _worker_pids(r: redis_sync.Redis, keys: Keys, fresh_within: float = 2.0) -> set[int]:
    """Pids of workers whose heartbeat is recent."""
    now = time.time()
    beats = [json.loads(v) for v in r.hgetall(keys.workers).values()]
    return {int(b["pid"]) for b in beats if now - float(b["at"]) < fresh_within}


def test_run_sh_restarts_a_killed_worker_and_stops_on_sigterm(
    test_urls: Any, prefix_registry: Any, tmp_path: Any
) -> None:
    prefix = prefix_registry.new()
    schema = support.create_schema(test_urls.database_url)
    port = servers.free_port()
    env = support.service_env(
        **support.api_settings(test_urls.redis_url, test_urls.database_url, schema, prefix, port),
        WORKER_HEARTBEAT_INTERVAL="0.3",
        RUN_WORKER_RESTART_SECONDS="1",
    )
    log = (tmp_path / "run.log").open("wb")
    proc = subprocess.Popen(
        ["bash", "scripts/run.sh"], cwd=support.ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    keys = Keys(prefix, 16)
    r = redis_sync.Redis.from_url(test_urls.redis_url, decode_responses=True)
    try:
        support.wait_sync(lambda: _get(f"http://127.0.0.1:{port}/health")[0] == 200, "the API", 60)
        support.wait_sync(lambda: len(_worker_pids(r, keys)) == 1, "a worker heartbeat", 30)
        (first,) = _worker_pids(r, keys)
        os.kill(first, signal.SIGKILL)
        killed = time.monotonic()
        support.wait_sync(lambda: bool(_worker_pids(r, keys) - {first}), "a new worker", 15)
        replaced = time.monotonic() - killed
        print(f"\nrun.sh: worker replaced {replaced:.1f} s after SIGKILL")
        assert _get(f"http://127.0.0.1:{port}/health")[0] == 200  # the API never went away

        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) is not None
        (second,) = _worker_pids(r, keys, fresh_within=60) - {first}
        support.wait_sync(lambda: not os.path.exists(f"/proc/{second}"), "the worker to exit", 15)
        assert _get(f"http://127.0.0.1:{port}/health")[0] == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        r.close()
        support.drop_schema(test_urls.database_url, schema)
        print((tmp_path / "run.log").read_text(errors="replace")[-3000:])


def test_services_sh_starts_postgres_from_a_clone_only_root_can_enter(test_urls: Any, tmp_path: Path) -> None:
    """A fresh machine, as root, with the clone in a 0700 directory (root's home, anything mktemp -d
    makes): PostgreSQL runs as the postgres user, who cannot enter the clone's var/. The private cluster
    must still start (its data then lives where that user can reach it), answer, and stop again."""
    home = tmp_path / "private"
    home.mkdir(mode=0o700)
    clone = home / "clone"
    for part in ("scripts", "config"):
        shutil.copytree(support.ROOT / part, clone / part)
    port = servers.free_port()
    env = support.service_env(
        REDIS_URL=test_urls.redis_url,  # already running: only asked whether it answers
        DATABASE_URL=f"postgresql://postgres@127.0.0.1:{port}/test",
    )
    services = ["bash", str(clone / "scripts" / "services.sh")]
    up = subprocess.run([*services, "ensure"], env=env, capture_output=True, text=True, timeout=120)
    data = re.search(r"started \(data: ([^)]+)\)", up.stdout)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert data is not None, up.stdout
        ready = subprocess.run(["pg_isready", "-h", "127.0.0.1", "-p", str(port)], capture_output=True)
        assert ready.returncode == 0
        if os.geteuid() == 0:  # the postgres user cannot enter the clone: the data is elsewhere
            assert not data.group(1).startswith(str(home)), data.group(1)
        down = subprocess.run([*services, "stop"], env=env, capture_output=True, text=True, timeout=60)
        assert down.returncode == 0 and "stopped" in down.stdout, down.stdout + down.stderr
        gone = subprocess.run(["pg_isready", "-h", "127.0.0.1", "-p", str(port)], capture_output=True)
        assert gone.returncode != 0
    finally:
        subprocess.run([*services, "stop"], env=env, capture_output=True, timeout=60)
        if data is not None:
            shutil.rmtree(Path(data.group(1)).parent, ignore_errors=True)
