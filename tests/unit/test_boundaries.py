"""The roles install apart, so their imports must stay apart: checked in fresh interpreters.

A device runs the node without Ray; a client needs neither Ray nor zeroconf; `nodes/` uses only
`mesh.core` of `mesh`; and no module reaches into another package's underscore modules.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SOURCE_PACKAGES = ("mesh", "nodes")


def _modules_after_import(*modules: str) -> list[str]:
    """The names in sys.modules after importing `modules` in a fresh interpreter."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {list(modules)!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _top(names: list[str], package: str) -> list[str]:
    return [name for name in names if name == package or name.startswith(package + ".")]


def test_the_node_daemon_loads_no_ray_and_no_coordinator():
    loaded = _modules_after_import("nodes.daemon", "nodes.announcer", "mesh.cli.node")
    assert _top(loaded, "ray") == []
    assert _top(loaded, "mesh.coordinator") == []
    assert _top(loaded, "fastapi") == []


def test_nodes_use_only_the_shared_core_of_mesh():
    loaded = _modules_after_import("nodes.daemon", "nodes.announcer", "nodes.agents")
    of_mesh = [name for name in _top(loaded, "mesh") if name != "mesh"]
    assert of_mesh and all(name.startswith("mesh.core") for name in of_mesh), of_mesh


@pytest.mark.parametrize(
    "module",
    [
        "mesh.client",
        "mesh.coordinator_client",
        "mesh.agent_client",
        "mesh.core",
        "mesh.local_processes",
    ],
)
def test_the_client_library_loads_no_ray_and_no_zeroconf(module):
    loaded = _modules_after_import(module)
    assert _top(loaded, "ray") == [] and _top(loaded, "zeroconf") == []
    assert _top(loaded, "llama_cpp") == [] and _top(loaded, "onnxruntime") == []


def _imports(path: Path) -> list[str]:
    """Every module `path` imports by absolute name (including `from x import y` as x.y)."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names.extend(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _source_files() -> list[Path]:
    return [path for package in SOURCE_PACKAGES for path in (ROOT / package).rglob("*.py")]


def test_no_module_imports_another_packages_underscore_module():
    offences = []
    for path in _source_files():
        importer = _module_name(path)
        own_package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] not in SOURCE_PACKAGES:
                continue
            for i, part in enumerate(parts):
                if part.startswith("_") and not part.startswith("__"):
                    owner = ".".join(parts[:i])
                    if owner != own_package:
                        offences.append(f"{importer} imports {name}")
                    break
    assert offences == []


def test_node_sources_import_nothing_of_mesh_but_its_core():
    offences = [
        f"{_module_name(path)} imports {name}"
        for path in (ROOT / "nodes").rglob("*.py")
        for name in _imports(path)
        if name.startswith("mesh.") and not name.startswith("mesh.core") or name == "mesh"
    ]
    assert offences == []
