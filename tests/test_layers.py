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


def _modules(package: str) -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for p in sorted((ROOT / package).rglob("*.py"))}


def _from_imports(path: Path) -> list[ast.ImportFrom]:
    return [node for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module]


def test_no_private_name_is_imported_from_another_module() -> None:
    wrong = [f"{path.relative_to(ROOT)}: {node.module}.{alias.name}"
             for package in ALLOWED for path in _modules(package).values() for node in _from_imports(path)
             if node.module.split(".")[0] in OURS
             for alias in node.names if alias.name.startswith("_")]
    assert not wrong, wrong


def test_core_modules_import_each_other_without_cycles() -> None:
    """Every import between core modules, lazy ones included, forms no cycle: each module has
    a place in one order (a package counts as importing its parent's __init__)."""
    modules = _modules("tokencompose_core")
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and getattr(node.test, "id", None) == "TYPE_CHECKING" for inner in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in typing_only:  # annotations only: never imported at run time
                continue
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
                targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                            for a in node.names}
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names if alias.name in modules}
        # A submodule's package __init__ runs first; that is not a cycle of ours.
        graph[name] = targets - {name} - {name.rsplit(".", 1)[0]}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1 and not cycle:
                cycle.extend(trail[trail.index(target):] + [node, target] if target in trail else [node, target])
            elif target not in state:
                visit(target, [*trail, node])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not cycle, " -> ".join(cycle)


def test_only_the_identity_module_hashes() -> None:
    hashing = [str(path.relative_to(ROOT)) for package in ALLOWED for path in _modules(package).values()
               if "hashlib" in _imports(path) and path != ROOT / "tokencompose_core" / "identity.py"]
    assert not hashing, hashing


def test_flows_only_compose() -> None:
    """No hashing, listing or deleting in the flow process: those run inside tasks."""
    forbidden = {"hashlib", "shutil", "glob"}
    calls = {"value_hash", "uri_identity", "bytes_hash", "file_digest", "keep_if_whole", "seal", "ls", "glob",
             "find", "rm", "remove", "unlink", "rmtree", "listdir", "iterdir"}
    wrong = []
    for path in _modules("flows").values():
        if path.name in ("cli.py", "local_server.py"):  # the command line and its server record, not a flow
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        wrong += [f"{path.name}: import {name}" for name in _imports(path) & forbidden]
        wrong += [f"{path.name}:{node.lineno}: {node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id}()"
                  for node in ast.walk(tree) if isinstance(node, ast.Call)
                  and (node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None))
                  in calls]
    assert not wrong, wrong
