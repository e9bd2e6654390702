"""The health check's wire format, read back with grpc's own protobuf classes, and its imports."""

from __future__ import annotations

import struct
import subprocess
import sys

import pytest
from grpc_health.v1 import health_pb2

from mesh.sim import healthcheck
from mesh.sim.healthcheck import HealthCheckError, health_request, serving_status

pytestmark = pytest.mark.unit


def _framed(message: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(message)) + message


def _frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    frames = []
    while data:
        length = int.from_bytes(data[:3], "big")
        kind, flags, stream = data[3], data[4], int.from_bytes(data[5:9], "big")
        frames.append((kind, flags, stream, data[9 : 9 + length]))
        data = data[9 + length :]
    return frames


@pytest.mark.parametrize("status", [0, 1, 2, 3])
def test_reads_every_status_protobuf_writes(status: int) -> None:
    reply = health_pb2.HealthCheckResponse(status=status).SerializeToString()
    assert serving_status(_framed(reply)) == status


def test_skips_fields_it_does_not_know() -> None:
    unknown = b"\x12\x03abc" + b"\x18\x96\x01"  # field 2 (bytes), field 3 (varint 150)
    assert serving_status(_framed(unknown + b"\x08\x01")) == 1


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\x01\x00\x00\x00\x00", "not an uncompressed gRPC message"),
        (b"\x00\x00\x00\x00\x05\x08", "ended inside its message"),
        (_framed(b"\x08\x81"), "ended inside a number"),
        (_framed(b"\x0d\x00\x00\x00\x00"), "wire type 5"),
    ],
)
def test_a_reply_that_is_not_a_health_reply_is_an_error(body: bytes, message: str) -> None:
    with pytest.raises(HealthCheckError, match=message):
        serving_status(body)


def test_the_request_is_a_preface_settings_headers_and_one_message() -> None:
    data = health_request("127.0.0.1:50051", service="edgemesh.v1.NodeService")
    assert data.startswith(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    settings, headers, body = _frames(data[24:])
    assert settings == (0x4, 0, 0, b"")
    kind, flags, stream, block = headers
    assert (kind, flags & 0x4, stream) == (0x1, 0x4, 1)  # HEADERS, END_HEADERS, stream 1
    for name, value in [(b":path", b"/grpc.health.v1.Health/Check"), (b"te", b"trailers")]:
        assert bytes([len(name)]) + name + bytes([len(value)]) + value in block
    assert body[:3] == (0x0, 0x1, 1)  # DATA, END_STREAM, stream 1
    request = health_pb2.HealthCheckRequest.FromString(body[3][5:])
    assert request.service == "edgemesh.v1.NodeService"
    assert _frames(health_request("h:1")[24:])[2][3] == b"\x00\x00\x00\x00\x00"  # service ""


def test_a_long_header_value_gets_a_multi_byte_length() -> None:
    authority = "a" * 300 + ":1"
    block = _frames(health_request(authority)[24:])[1][3]
    # RFC 7541 5.1: 127 in the 7-bit prefix, then 302 - 127 = 175 in 7-bit groups, low first
    assert bytes([0x7F, 175 % 128 | 0x80, 175 // 128]) + authority.encode() in block


def test_imports_neither_grpc_nor_protobuf() -> None:
    """It runs every few seconds in every container: the standard library only."""
    code = (
        "import sys, mesh.sim.healthcheck; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'google', 'yaml', "
        "'pydantic')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert result.stdout.strip() == "[]"


def test_bad_arguments_say_what_is_expected(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        healthcheck.main(["localhost"])
    assert "expected HOST:PORT" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        healthcheck.main(["--http", "v1/mesh/info", "127.0.0.1:8000"])
    assert "expected a path starting with /" in capsys.readouterr().err
