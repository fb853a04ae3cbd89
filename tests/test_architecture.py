"""The package layering of docs/architecture.md, checked against the imports themselves.

Each subpackage of session_svc is a layer; a module may import its own package and the packages its
layer is allowed, never one above. The base modules at the top of the package (settings, errors,
process) import nothing of the service; the entry points (``__main__``, ``cli``, ``migrate``) may import
anything. The workers use the domain, the storage and below, never HTTP; the service never imports
``workers``. There is no import cycle between modules.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVICE = ROOT / "session_svc"

BASE = "base"  # session_svc/*.py that are not entry points
ENTRY = "entry"
ENTRY_POINTS = {"__main__", "cli", "migrate"}
# What each layer may import, besides itself. Read it bottom-up: the record knows only the base; the
# storage the record; the domain the storage; HTTP everything below it. ``ops`` (metrics recorder,
# supervisor, Consul) needs only the base, so every layer may record a metric.
ALLOWED: dict[str, set[str]] = {
    BASE: set(),
    "ops": {BASE},
    "record": {BASE},
    "storage": {BASE, "ops", "record"},
    "domain": {BASE, "ops", "record", "storage"},
    "http": {BASE, "ops", "record", "storage", "domain"},
    ENTRY: {BASE, "ops", "record", "storage", "domain", "http", ENTRY},
    "workers": {BASE, "ops", "record", "storage", "domain", "workers"},
}


def _layer(module: str) -> str:
    """``session_svc.http.views`` -> http; ``session_svc.settings`` -> base; ``workers.flush`` -> workers."""
    parts = module.split(".")
    if parts[0] == "workers":
        return "workers"
    if len(parts) == 2:  # a module at the top of session_svc, or a subpackage itself
        if (SERVICE / parts[1]).is_dir():
            return parts[1]
        return ENTRY if parts[1] in ENTRY_POINTS else BASE
    return parts[1]


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted([*SERVICE.rglob("*.py"), *(ROOT / "workers").glob("*.py")]):
        rel = path.relative_to(ROOT).with_suffix("")
        if "migrations" in rel.parts:  # alembic's revisions, loaded by alembic
            continue
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        if parts == ("session_svc",):  # its version, and its public names loaded lazily: not a layer
            continue
        out[".".join(parts)] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of session_svc and workers that ``path`` imports."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith(("session_svc", "workers")):
                for a in node.names:  # ``from package import module`` names the module
                    sub = f"{node.module}.{a.name}"
                    if sub in modules or node.module != "session_svc":
                        out.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith(("session_svc", "workers"))}
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) for name, path in modules.items()}


def test_every_module_belongs_to_a_known_layer() -> None:
    assert {_layer(m) for m in _graph()} <= set(ALLOWED)
    # the subpackages are exactly the layers named above: a new one must be given its place
    packages = {p.name for p in SERVICE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == set(ALLOWED) - {BASE, ENTRY, "workers"}


def test_imports_only_go_down_the_layers() -> None:
    wrong = []
    for module, imported in _graph().items():
        own = _layer(module)
        for target in imported:
            layer = _layer(target)
            if layer != own and layer not in ALLOWED[own]:
                wrong.append(f"{module} ({own}) -> {target} ({layer})")
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
        "print(sorted(m for m in sys.modules if m.startswith(('aiohttp.web', 'session_svc.http'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_each_handler_takes_exactly_the_models_its_route_declares() -> None:
    """The route table feeds the OpenAPI document and the one parsing adapter; a handler's ``Call[Q, B]``
    must name the same query and body models, so it cannot expect what the document does not say."""
    import typing

    from session_svc.http import views

    wrong = []
    for route in views.ROUTES:
        hint = typing.get_type_hints(route.handler)["c"]
        query, body = typing.get_args(hint)
        declared = (route.query or type(None), route.body or type(None))
        if (query, body) != declared:
            wrong.append(f"{route.method} {route.path}: handler {hint}, route {declared}")
    assert wrong == []


def test_no_test_module_imports_another() -> None:
    """What tests share lives in helper modules (``tests/rig.py``, ``tests/acked.py``, ...): a test module
    imported by another runs its module-level code and fixtures twice, and ties the two together."""
    tests = ROOT / "tests"
    wrong = []
    for path in sorted(tests.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                parts = name.split(".")
                if any(p.startswith("test_") for p in parts[1:] if parts[0] == "tests") or (
                    parts[0].startswith("test_") and (tests / f"{parts[0]}.py").exists()
                ):
                    wrong.append(f"{path.name}: {name}")
    assert wrong == []
