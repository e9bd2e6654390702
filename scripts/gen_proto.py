"""Generate the Python gRPC stubs from proto/ into edgemesh/ (one command: `make proto`).

The include path is `proto/`, so the generated modules import each other as
`edgemesh.v1.*` with no rewriting.

`--check` (`make proto-check`) regenerates into a temporary directory and fails, naming
each file, where the checked-in stubs differ; it never writes to the tree. protoc's output
is stable for one grpcio-tools version, which pyproject's dev extra pins for that reason.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
STUBS = "edgemesh"  # the package the protos generate, under ROOT


def generate(out_dir: pathlib.Path) -> int:
    """Run protoc over every proto into `out_dir`; 0, or protoc's exit code."""
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    well_known = pathlib.Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    code = protoc.main(args)
    if code != 0:
        print(f"protoc failed with exit code {code}", file=sys.stderr)
        return code
    for package in {out_dir / pathlib.Path(p).parent for p in protos}:
        while package != out_dir:
            (package / "__init__.py").touch()
            package = package.parent
    return 0


def _stub_files(root: pathlib.Path) -> dict[str, bytes]:
    """Every file of the stub package under `root` (bytecode aside), by path from `root`."""
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted((root / STUBS).rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }


def drift(expected: dict[str, bytes], actual: dict[str, bytes]) -> list[str]:
    """One line per stub file that `make proto` would add, change, or that no proto generates."""
    problems = []
    for name in sorted(expected.keys() | actual.keys()):
        if name not in actual:
            problems.append(f"{name}: missing (generated from proto/, not checked in)")
        elif name not in expected:
            problems.append(f"{name}: stale (no file in proto/ generates it)")
        elif name.endswith("__init__.py"):
            continue  # `make proto` only creates a package's __init__.py, never rewrites it
        elif expected[name] != actual[name]:
            problems.append(f"{name}: differs from what proto/ generates")
    return problems


def check() -> int:
    """0 when the checked-in stubs are exactly what proto/ generates, else 1 (files named)."""
    with tempfile.TemporaryDirectory(prefix="gen_proto-") as tmp:
        out_dir = pathlib.Path(tmp)
        code = generate(out_dir)
        if code != 0:
            return code
        expected = _stub_files(out_dir)
    problems = drift(expected, _stub_files(ROOT))
    if problems:
        print(f"{STUBS}/ is out of date with proto/:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        print("run `make proto` and commit the result", file=sys.stderr)
        return 1
    print(f"{STUBS}/ matches proto/ ({len(expected)} files)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate edgemesh/ from proto/.")
    parser.add_argument(
        "--check",
        action="store_true",
        help="regenerate into a temporary directory and fail if edgemesh/ differs",
    )
    args = parser.parse_args(argv)
    if args.check:
        return check()
    code = generate(ROOT)
    if code == 0:
        print(f"generated the stubs for proto/ into {ROOT / STUBS}")
    return code


if __name__ == "__main__":
    sys.exit(main())
