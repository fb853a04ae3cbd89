"""The module layering of docs/architecture.md, checked against the imports themselves.

HTTP layer -> domain operations -> storage -> record format and keys; workers use the domain and the
storage, never the HTTP layer. A module may import its own layer and the layers below, never above,
and there is no import cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Rank of each module of session_svc: lower ranks never import higher ones.
LAYERS: dict[str, int] = {
    # record format, keys, and what every layer needs
    "settings": 0, "errors": 0, "record": 0, "keys": 0, "process": 0, "__init__": 0, "telemetry": 0,
    # storage: Redis client and scripts, Postgres reads, outbox, heartbeats, resources, the Consul
    # registration; validated inputs
    "redis_client": 1, "scripts": 1, "cold": 1, "outbox": 1, "heartbeat": 1, "resources": 1,
    "shapes": 1, "models": 1, "migrate": 1, "consul": 1, "coalesce": 1,
    # domain operations
    "store": 2, "totals": 2,
    # HTTP
    "validation": 3, "middleware": 3, "openapi": 3, "typedefs": 3, "views": 3, "app": 3, "server": 3,
    "metrics": 3, "accesslog": 3, "supervisor": 3, "cli": 3, "__main__": 3, "auth": 3,
}  # fmt: skip
HTTP = 3


def _imports(path: Path) -> set[str]:
    """Modules of session_svc and workers that ``path`` imports."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "session_svc":  # a submodule, or a name of the package itself
                for a in node.names:
                    is_module = (ROOT / "session_svc" / f"{a.name}.py").exists()
                    out.add(f"session_svc.{a.name if is_module else '__init__'}")
            elif node.module.startswith(("session_svc.", "workers")):
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith(("session_svc", "workers"))}
    return out


def _graph() -> dict[str, set[str]]:
    graph = {}
    for package in ("session_svc", "workers"):
        for path in sorted((ROOT / package).glob("*.py")):
            graph[f"{package}.{path.stem}"] = _imports(path)
    return graph


def test_every_service_module_has_a_layer() -> None:
    assert {m.removeprefix("session_svc.") for m in _graph() if m.startswith("session_svc.")} == set(LAYERS)


def test_imports_only_go_down_the_layers() -> None:
    wrong = []
    for module, imported in _graph().items():
        for target in imported:
            if not target.startswith("session_svc."):
                continue
            rank = LAYERS[target.removeprefix("session_svc.")]
            if module.startswith("workers."):
                if rank >= HTTP:
                    wrong.append(f"{module} -> {target} (workers never use the HTTP layer)")
            elif rank > LAYERS[module.removeprefix("session_svc.")]:
                wrong.append(f"{module} -> {target}")
        if module.startswith("session_svc.") and any(t.startswith("workers") for t in imported):
            wrong.append(f"{module} imports workers")
    assert wrong == []


def test_no_import_cycles() -> None:
    graph = _graph()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError(" -> ".join([*path[path.index(module) :], module]))
        if module in done or module not in graph:
            return
        for target in graph[module]:
            visit(target, [*path, module])
        done.add(module)

    for module in graph:
        visit(module, [])


def test_the_worker_process_never_loads_the_http_layer() -> None:
    code = (
        "import sys, workers.main, workers.__main__; "
        "print(sorted(m for m in sys.modules if m.startswith(('aiohttp.web', 'session_svc.views', "
        "'session_svc.app', 'session_svc.openapi', 'session_svc.middleware'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_each_handler_takes_exactly_the_models_its_route_declares() -> None:
    """The route table feeds the OpenAPI document and the one parsing adapter; a handler's ``Call[Q, B]``
    must name the same query and body models, so it cannot expect what the document does not say."""
    import typing

    from session_svc import views

    wrong = []
    for route in views.ROUTES:
        hint = typing.get_type_hints(route.handler)["c"]
        query, body = typing.get_args(hint)
        declared = (route.query or type(None), route.body or type(None))
        if (query, body) != declared:
            wrong.append(f"{route.method} {route.path}: handler {hint}, route {declared}")
    assert wrong == []
