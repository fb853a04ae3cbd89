"""session_svc: a Redis-first session service for chat and AI applications.

The package's public surface: ``python -m session_svc`` (the API), ``python -m session_svc.migrate``,
the ``session-svc`` command, and the two names below. The layout, by layer, is in docs/architecture.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "1.0.0"
__all__ = ["Settings", "__version__", "create_app"]

if TYPE_CHECKING:
    from session_svc.http.app import create_app
    from session_svc.settings import Settings


def __getattr__(name: str) -> Any:
    # Loaded on first use, so that importing a submodule (the worker does) never loads the HTTP layer.
    if name == "create_app":
        from session_svc.http.app import create_app

        return create_app
    if name == "Settings":
        from session_svc.settings import Settings

        return Settings
    raise AttributeError(f"module 'session_svc' has no attribute {name!r}")
