"""SERVICE_PROCESSES > 1: one supervisor and N API processes sharing the port.

Each API process is ``python -m session_svc`` with SERVICE_PROCESSES=1 and binds the port itself with
SO_REUSEPORT, so the kernel spreads new connections over them; the supervisor never touches a request.
It owns what must exist once per port:

- the metrics directory (``PROMETHEUS_MULTIPROC_DIR``, emptied at start, or a temporary one it removes
  at exit), so that any process's ``/metrics`` reports the sum of all of them (``telemetry``);
- the Consul registration (``consul.Registration``; the processes are started without CONSUL_HOST);
- the processes: one that exits is started again after a short backoff (its live gauges are marked
  dead first); SIGTERM/SIGINT deregister from Consul, then stop every process gracefully (each lets
  its requests in flight finish within SHUTDOWN_TIMEOUT) and SIGKILL what is left after that.

A process that exits before answering, several times in a row (a port taken by a foreign server, a
wrong setting), stops the supervisor with exit status 1 instead of restarting it forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from prometheus_client import multiprocess

from session_svc.ops.consul import Registration
from session_svc.process import EXIT_STARTUP_FAILED
from session_svc.settings import Settings

log = logging.getLogger("session_svc.ops.supervisor")

# A process alive this long after its start counts as started: a later exit is a crash to restart,
# unless it exits with EXIT_STARTUP_FAILED (it never served: a slow start on a loaded machine).
STARTED_AFTER_S = 3.0
# Consecutive exits before that point after which the supervisor gives up.
MOST_FAILED_STARTS = 3
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.2, 5.0
# Beyond SHUTDOWN_TIMEOUT, what a stopping process gets to close its connections before SIGKILL.
STOP_GRACE_S = 5.0


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it when the supervisor dies, however it dies (a SIGKILLed
    supervisor left its API processes serving on the port, orphaned). Linux only; elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Supervisor:
    def __init__(self, settings: Settings, processes: int, metrics_dir: Path) -> None:
        self.settings = settings
        self.processes = processes
        self.metrics_dir = metrics_dir
        self.children: dict[int, asyncio.subprocess.Process] = {}  # slot -> process
        self.stopping = asyncio.Event()
        self.failure: str | None = None

    def _env(self, slot: int) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            SERVICE_PROCESSES="1",
            PROMETHEUS_MULTIPROC_DIR=str(self.metrics_dir),
            CONSUL_HOST="",  # registered once, here
            SESSION_SVC_PROCESS=str(slot),
        )
        return env

    async def _spawn(self, slot: int) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "session_svc", env=self._env(slot), preexec_fn=_die_with_parent
        )
        self.children[slot] = proc
        log.info("API process %d started (pid %d)", slot, proc.pid)
        return proc

    async def _keep(self, slot: int) -> None:
        """Keep one process of ``slot`` running until the supervisor stops."""
        failed, backoff = 0, BACKOFF_MIN_S
        while not self.stopping.is_set():
            started = time.monotonic()
            proc = await self._spawn(slot)
            status = await proc.wait()
            if self.stopping.is_set():
                return
            multiprocess.mark_process_dead(proc.pid, str(self.metrics_dir))  # type: ignore[no-untyped-call]
            lived = time.monotonic() - started
            if lived < STARTED_AFTER_S or status == EXIT_STARTUP_FAILED:
                failed += 1
            else:
                failed, backoff = 0, BACKOFF_MIN_S
            if failed >= MOST_FAILED_STARTS:
                self.failure = (
                    f"API process {slot} failed to start {failed} times in a row (exited within "
                    f"{STARTED_AFTER_S:g}s of its start, or before serving)"
                )
                log.critical("%s (last status %s): giving up", self.failure, status)
                self.stopping.set()
                return
            log.error("API process %d (pid %d) exited with status %s; starting it again in %.1fs",
                      slot, proc.pid, status, backoff)  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), backoff)
            backoff = min(BACKOFF_MAX_S, backoff * 2)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        registration = Registration.from_settings(self.settings) if self.settings.consul_host else None
        keepers = [asyncio.create_task(self._keep(slot)) for slot in range(self.processes)]
        if registration is not None:
            await registration.start()
        log.info("supervising %d API processes on port %d", self.processes, self.settings.service_port)
        await self.stopping.wait()
        log.info("stopping %d API processes", len(self.children))
        if registration is not None:
            await registration.stop()  # out of Consul first, while the processes still answer
        await self._stop_children()
        for task in keepers:
            task.cancel()
        await asyncio.gather(*keepers, return_exceptions=True)
        return 1 if self.failure else 0

    async def _stop_children(self) -> None:
        running = [p for p in self.children.values() if p.returncode is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        waits = [asyncio.create_task(p.wait()) for p in running]
        if not waits:
            return
        _, late = await asyncio.wait(waits, timeout=self.settings.shutdown_timeout + STOP_GRACE_S)
        for proc in running:
            if proc.returncode is None:
                log.warning("API process pid %d still running after SIGTERM: killing it", proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        if late:
            await asyncio.gather(*late, return_exceptions=True)


def processes_of(settings: Settings) -> int:
    """SERVICE_PROCESSES, with 0 meaning one per core."""
    return settings.service_processes or os.cpu_count() or 1


def run(settings: Settings) -> int:
    """Supervise ``processes_of(settings)`` API processes until SIGTERM/SIGINT; the exit status."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    metrics_dir = Path(given) if given else Path(tempfile.mkdtemp(prefix="session_svc-metrics-"))
    metrics_dir.mkdir(parents=True, exist_ok=True)
    for stale in metrics_dir.glob("*.db"):  # a previous run's processes: not ours to sum
        stale.unlink()
    try:
        return asyncio.run(Supervisor(settings, processes_of(settings), metrics_dir).run())
    finally:
        if not given:
            shutil.rmtree(metrics_dir, ignore_errors=True)
