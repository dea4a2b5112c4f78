"""The layers of docs/ARCHITECTURE (README "Where things are"): arrows point down only.

app (recsys.app: CLI, run, benches, eval wiring, the in-process cascade) imports everything below
and is imported by nothing; the services (gateway, recall_service, rank_service) never import the
app layer; the core (the rest of recsys) imports neither the services nor the app layer.
Checked on the source's import statements, including imports inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("gateway", "recall_service", "rank_service")
APP = "recsys.app"


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
            modules |= {f"{node.module}.{alias.name}" for alias in node.names}
    return modules


def sources(*packages: str) -> list[Path]:
    return [
        path
        for package in packages
        for path in sorted((ROOT / package).rglob("*.py"))
        if "recsys/v1" not in path.as_posix()
    ]


def is_app(module: str) -> bool:
    """The app layer: recsys.app and `python -m recsys` (an entry point that forwards to it)."""
    return module in (APP, "recsys.__main__") or module.startswith(APP + ".")


def is_service(module: str) -> bool:
    return module.split(".")[0] in SERVICES


CORE = [path for path in sources("recsys") if not is_app(module_name(path))]


@pytest.mark.parametrize("path", CORE, ids=lambda p: module_name(p))
def test_the_core_imports_neither_services_nor_the_app_layer(path: Path):
    name = module_name(path)
    wrong = sorted(m for m in imported_modules(path) if is_service(m) or is_app(m))
    assert not wrong, f"{name} (core) imports {wrong}"


@pytest.mark.parametrize("path", sources(*SERVICES), ids=lambda p: module_name(p))
def test_services_never_import_the_app_layer(path: Path):
    wrong = sorted(m for m in imported_modules(path) if is_app(m))
    assert not wrong, f"{module_name(path)} imports the app layer: {wrong}"


def test_plugin_targets_named_by_string_follow_the_same_rule():
    """Entry points named as "module:function" strings live in the app layer's tables only."""
    for path in [*CORE, *sources(*SERVICES)]:
        text = path.read_text(encoding="utf-8")
        assert '"recsys.app.' not in text, f"{module_name(path)} names an app-layer module"
