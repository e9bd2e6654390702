"""The node and coordinator images a Docker simulation runs, built from this checkout.

    images = ensure_images(progress=print)     # Images(node="edgemesh-node:3f2a...", ...)

    python -m mesh.sim.images base|wheels|build [--rebuild] [--base IMAGE]   # make sim-*

One Dockerfile (deploy/docker/Dockerfile) makes both images: `EXTRA=node` (the `[node]` extra
and the bundled model, no Ray) and `EXTRA=coordinator` (`[coordinator]`, Ray Serve). Nothing in
the build touches a network: the wheels are built once on the host into a cached wheelhouse
(`build/wheelhouse/<extra>/`), so llama-cpp-python is compiled at most once, and the build
context is a small staging directory with the Dockerfile and exactly the wheels pip resolved.

The base is `python:3.11-slim` when the engine has it, else `edgemesh-base:bookworm`: a Debian
bookworm minbase with Python made here by debootstrap and `docker import` (no registry needed).
An image is tagged with a hash of what goes into it (the sources, pyproject.toml, the
Dockerfile, the pinned dependency versions, the base image's id), so an unchanged tree builds
nothing; it is also tagged `:latest`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence

from mesh.sim import wheelhouse
from mesh.sim.backend import Progress, SimError
from mesh.sim.engine import docker_env, ensure_engine, log_tail

BASE_IMAGE = "edgemesh-base:bookworm"
SLIM_IMAGE = "python:3.11-slim"
BASE_ENV = "EDGEMESH_BASE_IMAGE"  # a base of your own (must be in the engine already)
MIRROR_ENV = "MESH_SIM_DEBIAN_MIRROR"
EXTRAS = ("node", "coordinator")
# What the base holds besides minbase: Python, venv, and what the images need at run time
# (iproute2 for `ip`/`tc`, libgomp1 for llama.cpp's OpenMP threads).
BASE_PACKAGES = (
    "python3",
    "python3-venv",
    "python3-pip",
    "ca-certificates",
    "iproute2",
    "libgomp1",
)
_SOURCE_DIRS = ("mesh", "nodes", "edgemesh")
_DEFAULT_MIRROR = "http://deb.debian.org/debian"


@dataclasses.dataclass(frozen=True)
class Images:
    """The images of one tree: full tags (`edgemesh-node:<hash>`), each also tagged :latest."""

    node: str
    coordinator: str
    base: str


def image_name(extra: str) -> str:
    return f"edgemesh-{extra}"


CHECKOUT_LABEL = "edgemesh.checkout"  # on every image we build: which checkout built it


def checkout_id() -> str:
    """This checkout, as a short hash of its path: old builds of it may be removed, never the
    images of another checkout or worktree sharing the engine."""
    return hashlib.sha256(str(repo_root()).encode()).hexdigest()[:12]


def repo_root() -> pathlib.Path:
    """The checkout the images are built from (images need the sources, not an install)."""
    root = pathlib.Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file() or not dockerfile_path(root).is_file():
        raise SimError(
            f"{root} is not a source checkout of edge-agent-mesh (no pyproject.toml or "
            "deploy/docker/Dockerfile): images are built from a checkout"
        )
    return root


def dockerfile_path(root: pathlib.Path) -> pathlib.Path:
    return root / "deploy" / "docker" / "Dockerfile"


class _Clock:
    """Elapsed seconds for progress lines."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def __str__(self) -> str:
        return f"[{time.monotonic() - self.started:5.1f} s]"


def _docker(args: Sequence[str], *, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args],
        env=docker_env(),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
    )


def image_id(name: str) -> str | None:
    """The id of a local image, or None when the engine does not have it."""
    done = _docker(["image", "inspect", "--format", "{{.Id}}", name])
    return done.stdout.strip() if done.returncode == 0 else None


# ---------------------------------------------------------------------------------------------
# The base image


def debian_mirror(
    sources: Sequence[pathlib.Path] = (
        pathlib.Path("/etc/apt/sources.list"),
        *sorted(pathlib.Path("/etc/apt/sources.list.d").glob("*")),
    ),
) -> str:
    """The Debian mirror apt uses for bookworm (`MESH_SIM_DEBIAN_MIRROR` overrides it)."""
    override = os.environ.get(MIRROR_ENV)
    if override:
        return override
    for path in sources:
        try:
            text = path.read_text()
        except OSError:  # not there, or a directory
            continue
        if path.suffix == ".sources":
            for stanza in text.split("\n\n"):
                fields = dict(
                    line.split(":", 1)
                    for line in stanza.splitlines()
                    if ":" in line and line[0] != "#"
                )
                suites = fields.get("Suites", "").split()
                if "bookworm" in suites and "deb" in fields.get("Types", "").split():
                    return fields.get("URIs", "").split()[0]
        elif path.suffix == ".list":
            for line in text.splitlines():
                words = [w for w in line.split() if not w.startswith("[")]
                if len(words) >= 3 and words[0] == "deb" and words[2] == "bookworm":
                    return words[1]
    return _DEFAULT_MIRROR


def ensure_base(progress: Progress) -> str:
    """Make `edgemesh-base:bookworm` unless the engine has it (cached); returns its name."""
    if image_id(BASE_IMAGE):
        progress(f"base image {BASE_IMAGE}: cached")
        return BASE_IMAGE
    if os.geteuid() != 0:
        raise SimError(f"making {BASE_IMAGE} needs root (debootstrap): run as root")
    if shutil.which("debootstrap") is None:
        raise SimError(f"making {BASE_IMAGE} needs debootstrap: apt-get install debootstrap")
    root = repo_root()
    work = root / "build" / "sim-base"
    work.mkdir(parents=True, exist_ok=True)
    log = work / "debootstrap.log"
    mirror = debian_mirror()
    clock = _Clock()
    rootfs = pathlib.Path(tempfile.mkdtemp(prefix="rootfs-", dir=work))
    try:
        progress(f"{clock} making {BASE_IMAGE}: debootstrap bookworm from {mirror} (~1.5 min)")
        command = [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(BASE_PACKAGES)}",
            "bookworm",
            str(rootfs),
            mirror,
        ]
        _run_condensed(command, log, progress, clock, _debootstrap_phase, "debootstrap")
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (rootfs / leftover).glob("*"):
                if item.is_file():
                    item.unlink()
        progress(f"{clock} importing the root filesystem as {BASE_IMAGE}")
        _import_rootfs(rootfs, BASE_IMAGE)
        progress(f"{clock} {BASE_IMAGE} made")
    finally:
        _remove_rootfs(rootfs)
    return BASE_IMAGE


def _debootstrap_phase(line: str) -> str | None:
    """debootstrap's phase ("I: Retrieving", "I: Extracting", ...): one progress line each."""
    words = line.split()
    return " ".join(words[:2]) if len(words) >= 2 and words[0] in ("I:", "W:", "E:") else None


def _import_rootfs(rootfs: pathlib.Path, name: str) -> None:
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    try:
        done = subprocess.run(
            ["docker", "import", "--change", "ENV LANG=C.UTF-8", "-", name],
            stdin=tar.stdout,
            env=docker_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        if tar.stdout:
            tar.stdout.close()
        tar_code = tar.wait(timeout=600)
    if done.returncode != 0 or tar_code != 0:
        raise SimError(f"docker import of {rootfs} failed: {(done.stderr or done.stdout)[-800:]}")


def _remove_rootfs(rootfs: pathlib.Path) -> None:
    """Remove a debootstrap root, unmounting what debootstrap left mounted in it first (removing
    through a mounted /proc or /dev would reach the host's)."""
    for mount in sorted(_mounts_under(rootfs), key=len, reverse=True):
        subprocess.run(["umount", "-l", mount], capture_output=True)
    if _mounts_under(rootfs):
        raise SimError(
            f"{rootfs} still has mounts in it ({_mounts_under(rootfs)}): unmount, remove"
        )
    shutil.rmtree(rootfs, ignore_errors=True)


def _mounts_under(path: pathlib.Path) -> list[str]:
    prefix = str(path.resolve())
    with open("/proc/mounts") as mounts:
        points = [line.split()[1] for line in mounts if line.strip()]
    return [p for p in points if p == prefix or p.startswith(prefix + "/")]


# ---------------------------------------------------------------------------------------------
# Running long commands with condensed progress


def _run_condensed(
    command: Sequence[str],
    log: pathlib.Path,
    progress: Progress,
    clock: _Clock,
    phase_of: object,
    what: str,
    env: dict[str, str] | None = None,
) -> None:
    """Run `command`, its whole output into `log`; a progress line each time `phase_of(line)`
    names a phase not seen before. SimError with the log's tail when it fails."""
    seen: set[str] = set()
    with log.open("w") as out:
        process = subprocess.Popen(
            list(command),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        assert process.stdout is not None
        for line in process.stdout:
            out.write(line)
            phase = phase_of(line.rstrip())  # type: ignore[operator]
            if phase and phase not in seen:
                seen.add(phase)
                progress(f"{clock}   {phase}")
        code = process.wait()
    if code != 0:
        raise SimError(f"{what} failed (exit code {code}); the end of {log}:\n{log_tail(log, 30)}")


def _docker_step(line: str) -> str | None:
    """`docker build`'s step lines ("Step 3/12 : RUN ..."), shortened."""
    return line[:110] if line.startswith("Step ") else None


# ---------------------------------------------------------------------------------------------
# The images


def source_hash(root: pathlib.Path, extra: str, base_id: str, constraints: str) -> str:
    """A short hash of everything that goes into an image: an unchanged tree builds nothing."""
    digest = hashlib.sha256()
    paths: list[pathlib.Path] = [root / "pyproject.toml", dockerfile_path(root)]
    for folder in _SOURCE_DIRS:
        paths.extend(
            p
            for p in sorted((root / folder).rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
        )
    for path in paths:
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    for part in (extra, base_id, constraints):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:12]


def choose_base(base: str | None, progress: Progress) -> str:
    """The base to build on: the one asked for, else python:3.11-slim when the engine has it,
    else our own (made if missing)."""
    base = base or os.environ.get(BASE_ENV)
    if base:
        if not image_id(base):
            raise SimError(f"base image {base} is not in the engine: load or build it first")
        return base
    if image_id(SLIM_IMAGE):
        return SLIM_IMAGE
    return ensure_base(progress)


@contextlib.contextmanager
def _build_lock(root: pathlib.Path) -> Iterator[None]:
    """One build at a time per checkout (two `mesh sim up` must not fill one wheelhouse)."""
    path = root / "build" / "sim-images.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_images(*, progress: Progress, rebuild: bool = False, base: str | None = None) -> Images:
    """The node and coordinator images of this tree, built when missing (or `rebuild`)."""
    ensure_engine(progress)
    root = repo_root()
    clock = _Clock()
    with _build_lock(root):
        base = choose_base(base, progress)
        base_id = image_id(base) or ""
        constraints = wheelhouse.constraints_text()
        tags: dict[str, str] = {}
        for extra in EXTRAS:
            tag = f"{image_name(extra)}:{source_hash(root, extra, base_id, constraints)}"
            if not rebuild and image_id(tag):
                progress(f"{clock} image {tag}: cached")
            else:
                _build_image(root, extra, base, tag, progress, clock)
            _tag_latest(tag)
            tags[extra] = tag
    progress(f"{clock} images ready: {tags['node']}, {tags['coordinator']} (also :latest)")
    return Images(node=tags["node"], coordinator=tags["coordinator"], base=base)


def _build_image(
    root: pathlib.Path, extra: str, base: str, tag: str, progress: Progress, clock: _Clock
) -> None:
    """Build one image from a staging context: the Dockerfile and that extra's wheels."""
    house = wheelhouse.ensure_wheelhouse(extra, progress=progress)
    context = root / "build" / "docker-context" / extra
    shutil.rmtree(context, ignore_errors=True)
    for name in ("wheels", "project"):
        (context / name).mkdir(parents=True)
    shutil.copy2(dockerfile_path(root), context / "Dockerfile")
    (context / "wheels" / "requirements.txt").write_text(house.requirements())
    placed = [(w, context / "wheels") for w in (*house.dependencies, *house.no_deps)]
    for wheel, into in [*placed, (house.project, context / "project")]:
        try:
            os.link(wheel, into / wheel.name)
        except OSError:  # another file system: copy instead
            shutil.copy2(wheel, into / wheel.name)
    size_mb = sum(w.stat().st_size for w in house.wheels) / 1e6
    progress(f"{clock} building {tag} on {base} ({len(house.wheels)} wheels, {size_mb:.0f} MB)")
    log = root / "build" / f"docker-build-{extra}.log"
    command = [
        "docker",
        "build",
        "--tag",
        tag,
        "--build-arg",
        f"BASE={base}",
        "--build-arg",
        f"EXTRA={extra}",
        "--label",
        f"org.opencontainers.image.version={tag.split(':', 1)[1]}",
        "--label",
        f"{CHECKOUT_LABEL}={checkout_id()}",
        str(context),
    ]
    _run_condensed(
        command, log, progress, clock, _docker_step, f"docker build of {tag}", docker_env()
    )
    shutil.rmtree(context, ignore_errors=True)
    progress(f"{clock} built {tag}")


def _tag_latest(tag: str) -> None:
    """Tag `tag` as :latest, and remove this image's builds of older trees (their layers are
    mostly shared, but without this every edit leaves a 600 MB image behind). One that a
    container still uses, or that has a tag of someone else's, stays (docker refuses)."""
    name = tag.split(":", 1)[0]
    latest = f"{name}:latest"
    previous = image_id(latest)
    done = _docker(["tag", tag, latest])
    if done.returncode != 0:
        raise SimError(f"docker tag {tag} {latest} failed: {done.stderr.strip()}")
    listed = _docker(["images", name, "--format", "{{.Repository}}:{{.Tag}}"])
    for old in listed.stdout.split():
        if old in (tag, latest) or not re.fullmatch(r"[^:]+:[0-9a-f]{12}", old):
            continue  # only our own hash tags; a user's `:prod` is theirs
        label = _docker(
            [
                "image",
                "inspect",
                "--format",
                f'{{{{index .Config.Labels "{CHECKOUT_LABEL}"}}}}',
                old,
            ]
        )
        if label.stdout.strip() == checkout_id():  # built from this checkout, not another
            _docker(["rmi", old])  # in use: refused, and that is fine
    if previous and previous != image_id(tag):
        tags = _docker(["image", "inspect", "--format", "{{len .RepoTags}}", previous])
        if tags.stdout.strip() == "0":
            _docker(["rmi", previous])


def image_sizes(images: Images) -> dict[str, int]:
    """Bytes per image (for reports)."""
    sizes = {}
    for name in (images.base, images.node, images.coordinator):
        done = _docker(["image", "inspect", "--format", "{{.Size}}", name])
        sizes[name] = int(done.stdout.strip() or 0)
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mesh.sim.images", description="Build the images of `mesh sim`."
    )
    parser.add_argument("action", choices=["base", "wheels", "build"])
    parser.add_argument("--rebuild", action="store_true", help="build even when cached")
    parser.add_argument("--base", help=f"the base image (default: {SLIM_IMAGE} or {BASE_IMAGE})")
    args = parser.parse_args(argv)

    def progress(line: str) -> None:
        print(line, flush=True)

    try:
        if args.action == "base":
            ensure_engine(progress)
            ensure_base(progress)
        elif args.action == "wheels":
            for extra in EXTRAS:
                house = wheelhouse.ensure_wheelhouse(extra, progress=progress)
                print(f"{extra}: {len(house.wheels)} wheels in {wheelhouse.wheelhouse_dir(extra)}")
        else:
            images = ensure_images(progress=progress, rebuild=args.rebuild, base=args.base)
            for name, size in image_sizes(images).items():
                print(f"{name}: {size / 1e6:.0f} MB")
    except SimError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
