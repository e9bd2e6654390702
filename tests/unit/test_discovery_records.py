"""The mDNS TXT record: round trip, size budget, and every way a record can be malformed."""

from __future__ import annotations

import pytest

from mesh.core.errors import MeshError
from mesh.core.ids import NodeId
from mesh.core.records import (
    MAX_TXT_STRING_BYTES,
    MAX_TXT_TOTAL_BYTES,
    PROTOCOL_VERSION,
    MalformedRecordError,
    NodeRecord,
    accelerator_kinds,
    coarse_load_percent,
)

pytestmark = pytest.mark.unit

ADDRESSES = ["198.18.0.2"]


def make_record(**changes: object) -> NodeRecord:
    values: dict[str, object] = {
        "node_id": NodeId("a1b2c3d4e5f6"),
        "name": "kiosk-1",
        "cluster": "store",
        "grpc_port": 50051,
        "incarnation": "0badf00d",
        "models": ("smollm2",),
        "agents": ("support",),
        "cores": 4,
        "ram_gb": 7.8,
        "accelerators": ("cpu",),
        "load_percent": 30,
        "capacity": 2,
    }
    values.update(changes)
    return NodeRecord(**values)  # type: ignore[arg-type]


def parse(txt: dict[bytes, bytes | None], port: int = 50051) -> NodeRecord:
    return NodeRecord.from_txt(txt, addresses=ADDRESSES, port=port)


def test_round_trip_keeps_every_field() -> None:
    record = make_record()
    parsed = parse(record.to_txt())
    assert parsed == record.model_copy(update={"addresses": tuple(ADDRESSES)})
    assert parsed.address == "198.18.0.2:50051"


def test_addresses_prefer_ipv4_and_drop_unusable_ones() -> None:
    parsed = NodeRecord.from_txt(
        make_record().to_txt(),
        addresses=["fe80::1", "2001:db8::5", "not-an-ip", "0.0.0.0", "192.168.1.9"],
        port=50051,
    )
    assert parsed.addresses == ("192.168.1.9", "2001:db8::5")


def test_ipv6_address_is_bracketed() -> None:
    parsed = NodeRecord.from_txt(make_record().to_txt(), addresses=["2001:db8::5"], port=50051)
    assert parsed.address == "[2001:db8::5]:50051"


def test_long_model_list_is_truncated_with_a_flag_and_fits_the_budget() -> None:
    models = tuple(f"model-with-a-long-name-{i:03d}" for i in range(60))
    agents = tuple(f"agent-with-a-long-name-{i:03d}" for i in range(60))
    txt = make_record(models=models, agents=agents).to_txt()
    assert all(len(k) + 1 + len(v) <= MAX_TXT_STRING_BYTES for k, v in txt.items())
    assert sum(1 + len(k) + 1 + len(v) for k, v in txt.items()) <= MAX_TXT_TOTAL_BYTES
    parsed = parse(txt)
    assert parsed.models_truncated and parsed.agents_truncated
    assert 0 < len(parsed.models) < 60
    assert parsed.models == models[: len(parsed.models)]


def test_short_lists_are_not_flagged() -> None:
    parsed = parse(make_record().to_txt())
    assert not parsed.models_truncated and not parsed.agents_truncated


def test_unknown_keys_are_ignored_for_forward_compatibility() -> None:
    txt = make_record().to_txt() | {b"future": b"thing"}
    assert parse(txt).node_id == "a1b2c3d4e5f6"


def test_malformed_record_error_is_a_mesh_error() -> None:
    assert issubclass(MalformedRecordError, MeshError)


def _broken(**edits: bytes | None) -> dict[bytes, bytes | None]:
    txt: dict[bytes, bytes | None] = dict(make_record().to_txt())
    for key, value in edits.items():
        if value is None:
            txt.pop(key.encode(), None)
        else:
            txt[key.encode()] = value
    return txt


@pytest.mark.parametrize(
    ("txt", "message"),
    [
        (_broken(v=b"2"), "protocol version 2"),
        (_broken(v=b"0"), "protocol version 0"),
        (_broken(v=b"one"), "not a small non-negative integer"),
        (_broken(v=None), "missing TXT keys: v"),
        (_broken(id=None), "missing TXT keys: id"),
        (_broken(n=None, c=None), "missing TXT keys: n, c"),
        (_broken(p=None), "missing TXT keys: p"),
        (_broken(inc=None), "missing TXT keys: inc"),
        (_broken(id=b""), "missing TXT keys: id"),
        (_broken(id=b"\xff\xfe"), "not valid ASCII/UTF-8"),
        (_broken(n=b"bad\x00name"), "unprintable characters"),
        (_broken(n="\u202egnp.exe".encode()), "unprintable characters"),
        (_broken(id=b"has space"), "invalid TXT field node_id"),
        (_broken(p=b"99999"), "TXT port 99999 differs"),
        (_broken(p=b"-1"), "not a small non-negative integer"),
        (_broken(cpu="²".encode()), "not a small non-negative integer"),  # isdigit() is True
        (_broken(v="١".encode()), "not a small non-negative integer"),  # Arabic-Indic one
        (_broken(cap=b"1234567890"), "not a small non-negative integer"),
        (_broken(ld=b" 5"), "not a small non-negative integer"),
        (_broken(ld=b"250"), "invalid TXT field load_percent"),
        (_broken(ram=b"nan"), "not a finite number"),
        (_broken(ram=b"lots"), "not a number"),
        (_broken(m=b"ok,bad model"), "invalid item"),
        (_broken(inc=b"XYZ"), "invalid TXT field incarnation"),
        (_broken(n=b"x" * 200), "invalid TXT field name"),
        (_broken(m=b"m" * 300), r"302 bytes \(max 255\)"),
        ({b"k%d" % i: b"v" * 240 for i in range(5)} | _broken(), "TXT record is"),
    ],
)
def test_malformed_records_raise_a_specific_error(
    txt: dict[bytes, bytes | None], message: str
) -> None:
    with pytest.raises(MalformedRecordError, match=message):
        parse(txt)


def test_srv_port_must_match_the_txt_port() -> None:
    with pytest.raises(MalformedRecordError, match="differs from SRV port"):
        parse(make_record().to_txt(), port=50052)


def test_non_bytes_key_is_malformed() -> None:
    txt: dict = dict(make_record().to_txt())  # type: ignore[type-arg]
    txt[7] = b"x"
    with pytest.raises(MalformedRecordError):
        parse(txt)


def test_key_without_value_counts_as_empty() -> None:
    txt = _broken(m=None) | {b"m": None}
    assert parse(txt).models == ()


def test_address_without_addresses_raises() -> None:
    with pytest.raises(MalformedRecordError, match="no address"):
        _ = make_record().address


def test_protocol_version_constant_matches_the_package() -> None:
    import mesh

    assert PROTOCOL_VERSION == mesh.PROTOCOL_VERSION


@pytest.mark.parametrize(
    ("in_flight", "queued", "capacity", "expected"),
    [(0, 0, 1, 0), (1, 0, 1, 100), (1, 0, 4, 30), (3, 5, 2, 100), (1, 0, 0, 100), (1, 2, 8, 40)],
)
def test_coarse_load_percent(in_flight: int, queued: int, capacity: int, expected: int) -> None:
    assert coarse_load_percent(in_flight, queued, capacity) == expected


def test_accelerator_kinds_match_the_hardware_probe() -> None:
    assert accelerator_kinds([], ["CPUExecutionProvider", "AzureExecutionProvider"]) == ("cpu",)
    assert accelerator_kinds(["NVIDIA"], ["CUDAExecutionProvider", "CPUExecutionProvider"]) == (
        "cuda",
        "nvidia",
    )
