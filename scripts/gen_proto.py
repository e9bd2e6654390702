"""Generate the Python gRPC stubs from proto/ into edgemesh/ (one command: `make proto`).

The include path is `proto/`, so the generated modules import each other as
`edgemesh.v1.*` with no rewriting.
"""

from __future__ import annotations

import pathlib
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"


def main() -> int:
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    well_known = pathlib.Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={ROOT}",
        f"--pyi_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        *protos,
    ]
    code = protoc.main(args)
    if code != 0:
        print(f"protoc failed with exit code {code}", file=sys.stderr)
        return code
    for package in {ROOT / pathlib.Path(p).parent for p in protos}:
        while package != ROOT:
            (package / "__init__.py").touch()
            package = package.parent
    print(f"generated stubs for {len(protos)} proto file(s) into {ROOT / 'edgemesh'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
