"""The layering of the code base: core never sees Prefect; tasks wrap core; flows compose tasks."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> top-level packages of ours it may import
ALLOWED = {
    "tokencompose_core": {"tokencompose_core"},
    "tasks": {"tasks", "tokencompose_core"},
    "flows": {"flows", "tasks", "tokencompose_core"},
    "deployments": {"deployments", "flows", "tasks", "tokencompose_core"},
}
OURS = set(ALLOWED)


def _imports(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, lazily imported ones included."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_layer_imports_only_the_layers_below(package: str) -> None:
    wrong = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        imported = _imports(path)
        bad = (imported & OURS) - ALLOWED[package]
        if package == "tokencompose_core" and {"prefect", "prefect_dask"} & imported:
            bad.add("prefect")
        if bad:
            wrong[str(path.relative_to(ROOT))] = sorted(bad)
    assert not wrong, f"imports across layers: {wrong}"


def test_core_imports_without_prefect_installed() -> None:
    """The GPU machines run the core without Prefect: every core module must import."""
    # rglob: subpackages (tokencompose_core.models.*) are core modules too.
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in (ROOT / "tokencompose_core").rglob("*.py")
    )
    script = ("import sys; sys.modules['prefect'] = None\n"
              f"import importlib\nfor name in {modules!r}:\n    importlib.import_module(name)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
