"""Every Lua script of the service and its workers, by audience, with one call contract.

``call.py`` declares, registers, times and guards a script and names the reply vocabulary (``Reply``);
``api.py`` holds the API's scripts and their typed calls, ``worker.py`` the workers'. ``Scripts``
registers both on one client: each wrapper builds its keys from ``record/keys.py`` and passes keys and
arguments by name, so a wrong order cannot happen.
"""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from session_svc.storage.coalesce import Coalescer
from session_svc.storage.scripts.api import ApiScripts
from session_svc.storage.scripts.call import FINGERPRINT_LEN, Arg, Guard, Lua, Reply, Script
from session_svc.storage.scripts.worker import GONE_TTL_S, WorkerScripts

__all__ = ["FINGERPRINT_LEN", "GONE_TTL_S", "Arg", "Guard", "Lua", "Reply", "Script", "Scripts"]


class Scripts(ApiScripts, WorkerScripts):
    """Every script, registered once on one client (no round trip: EVALSHA loads on NOSCRIPT)."""

    def __init__(
        self, redis: Redis | RedisCluster, coalesce: bool = False, wait: tuple[int, int] = (0, 0)
    ) -> None:
        """``coalesce``: direct calls made in the same loop turn share one pipeline (``coalesce.py``);
        ``wait``: (replicas, timeout ms) a durable write waits for (REDIS_WAIT_REPLICAS)."""
        self.coalescer = Coalescer(redis, *wait) if coalesce else None
        self._register_api(redis, self.coalescer)
        self._register_worker(redis, self.coalescer)
