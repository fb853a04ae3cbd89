"""Typed application keys: the only way handlers reach shared resources."""

from __future__ import annotations

from aiohttp import web

from session_svc.ops.consul import Registration
from session_svc.settings import Settings
from session_svc.storage.resources import Backend

SETTINGS = web.AppKey("settings", Settings)
BACKEND = web.AppKey("backend", Backend)
CONSUL = web.AppKey("consul", Registration)  # only when CONSUL_HOST is set
