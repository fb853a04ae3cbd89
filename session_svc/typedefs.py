"""Typed application keys: the only way handlers reach shared resources."""

from __future__ import annotations

from aiohttp import web

from session_svc.consul import Registration
from session_svc.resources import Backend
from session_svc.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
BACKEND = web.AppKey("backend", Backend)
CONSUL = web.AppKey("consul", Registration)  # only when CONSUL_HOST is set
