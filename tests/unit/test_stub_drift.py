"""The stub drift check (`make proto-check`) names each file `make proto` would change."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

pytestmark = pytest.mark.unit

_SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "gen_proto.py"
_spec = importlib.util.spec_from_file_location("gen_proto", _SCRIPT)
assert _spec is not None and _spec.loader is not None
gen_proto = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen_proto)

GENERATED = {
    "edgemesh/__init__.py": b"",
    "edgemesh/v1/__init__.py": b"",
    "edgemesh/v1/node_pb2.py": b"descriptor v2",
    "edgemesh/v1/node_pb2_grpc.py": b"stub",
}


def test_no_drift_when_every_file_matches() -> None:
    assert gen_proto.drift(GENERATED, dict(GENERATED)) == []


def test_names_changed_missing_and_stale_files() -> None:
    checked_in = dict(GENERATED)
    checked_in["edgemesh/v1/node_pb2.py"] = b"descriptor v1"
    del checked_in["edgemesh/v1/node_pb2_grpc.py"]
    checked_in["edgemesh/v1/old_pb2.py"] = b"from a deleted proto"

    assert gen_proto.drift(GENERATED, checked_in) == [
        "edgemesh/v1/node_pb2.py: differs from what proto/ generates",
        "edgemesh/v1/node_pb2_grpc.py: missing (generated from proto/, not checked in)",
        "edgemesh/v1/old_pb2.py: stale (no file in proto/ generates it)",
    ]


def test_a_package_init_with_content_is_not_drift() -> None:
    checked_in = dict(GENERATED)
    checked_in["edgemesh/__init__.py"] = b'"""The generated gRPC stubs."""\n'
    assert gen_proto.drift(GENERATED, checked_in) == []
