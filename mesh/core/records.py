"""The DNS-SD TXT record a node advertises, shared by the announcer and the browser.

The record is a small, versioned summary; everything larger comes from `Describe` over gRPC.
Keys are short to stay inside the DNS-SD budget (RFC 6763 section 6): every "key=value"
string is at most 255 bytes and the whole TXT record stays under `MAX_TXT_TOTAL_BYTES`.
Nothing secret is ever put here: the record is readable by anyone on the LAN.

    v    protocol version (must equal PROTOCOL_VERSION)
    id   node id                     n    node name             c    cluster name
    p    gRPC port (equals the SRV port)
    inc  incarnation: changes at every process start, so a restart is told from a stale record
    m    model ids, comma-separated  mt   "1" when the model list was truncated
    a    agent names, comma-separated at  "1" when the agent list was truncated
    cpu  cores                       ram  RAM in GB (one decimal)
    acc  accelerator kinds, comma-separated (e.g. "nvidia,openvino")
    ld   coarse load, 0..100 (percent of capacity in use, in steps of 10)
    cap  requests the node runs at once
    fp   the node's certificate fingerprint (mesh/core/pki.py) in a cluster; absent in an
         open mesh. A hint only: the coordinator trusts the TLS handshake, not this record.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import Field, ValidationError

from edgemesh.v1 import node_pb2
from mesh.core.errors import MeshError
from mesh.core.ids import NodeId
from mesh.core.model import FrozenModel
from mesh.core.version import PROTOCOL_VERSION

SERVICE_TYPE = "_edgemesh._tcp.local."

MAX_TXT_STRING_BYTES = 255  # one "key=value" string (RFC 6763 6.1)
MAX_TXT_TOTAL_BYTES = 900  # whole record; well under a 1300-byte mDNS packet with the SRV/A records
MAX_LIST_VALUE_BYTES = 200  # budget for each of the model/agent list values before truncation
MAX_NAME_CHARS = 63
LOAD_STEP_PERCENT = 10

_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
_ITEM_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/@+-]{0,99}$")
_SMALL_INT_PATTERN = re.compile(r"[0-9]{1,9}")  # ASCII digits only: str.isdigit() takes "²"
_REQUIRED_KEYS = ("v", "id", "n", "c", "p", "inc")
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")  # "this host on this network": never a peer


class MalformedRecordError(MeshError):
    """A TXT record could not be parsed into a NodeRecord (encoding, version, fields, size)."""

    grpc_code_name = "INVALID_ARGUMENT"


def served_models(models: Sequence[Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(every model served, those loaded now) from Describe's ModelInfo list: a model is
    served when it is ready or the node loads it when asked (`on_demand`)."""
    ready = [m.model_id for m in models if m.state == node_pb2.MODEL_STATE_READY]
    served = [m.model_id for m in models if m.model_id in ready or m.on_demand]
    return tuple(served), tuple(ready)


class NodeRecord(FrozenModel):
    """What one node advertises over mDNS, parsed and validated."""

    version: int = PROTOCOL_VERSION
    node_id: NodeId = Field(pattern=_ID_PATTERN.pattern)
    name: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    cluster: str = Field(default="default", max_length=MAX_NAME_CHARS)
    grpc_port: int = Field(ge=1, le=65535)
    incarnation: str = Field(pattern=r"^[0-9a-f]{1,16}$")
    models: tuple[str, ...] = ()  # every model it serves: loaded, or loaded when asked
    models_truncated: bool = False
    loaded_models: tuple[str, ...] = ()  # those resident now (the rest load on demand)
    agents: tuple[str, ...] = ()
    agents_truncated: bool = False
    cores: int = Field(default=0, ge=0, le=65535)
    ram_gb: float = Field(default=0.0, ge=0.0, le=1_000_000.0)
    accelerators: tuple[str, ...] = ()
    load_percent: int = Field(default=0, ge=0, le=100)
    capacity: int = Field(default=1, ge=0, le=1_000_000)
    cert_fingerprint: str = Field(default="", pattern=r"^([0-9a-f]{32})?$")
    # From the A/AAAA records, not the TXT record; empty on the announcing side.
    addresses: tuple[str, ...] = ()

    @property
    def address(self) -> str:
        """`host:port` of the node's gRPC server: the first advertised address, IPv4 first."""
        if not self.addresses:
            raise MalformedRecordError(f"node {self.node_id} advertises no address")
        return self.endpoints[0]

    @property
    def endpoints(self) -> tuple[str, ...]:
        """`host:port` for every advertised address, in order (a multi-homed node has several)."""
        return tuple(
            f"[{host}]:{self.grpc_port}" if ":" in host else f"{host}:{self.grpc_port}"
            for host in self.addresses
        )

    def to_txt(self) -> dict[bytes, bytes]:
        """The TXT properties, within the DNS-SD budget (long lists are truncated and flagged)."""
        models, models_cut = _fit_list(self.models, MAX_LIST_VALUE_BYTES)
        loaded, _ = _fit_list(self.loaded_models, MAX_LIST_VALUE_BYTES)
        agents, agents_cut = _fit_list(self.agents, MAX_LIST_VALUE_BYTES)
        accelerators, _ = _fit_list(self.accelerators, 100)
        txt: dict[str, str] = {
            "v": str(self.version),
            "id": self.node_id,
            "n": self.name,
            "c": self.cluster,
            "p": str(self.grpc_port),
            "inc": self.incarnation,
            "m": ",".join(models),
            "ml": ",".join(loaded),
            "a": ",".join(agents),
            "cpu": str(self.cores),
            "ram": f"{self.ram_gb:.1f}",
            "acc": ",".join(accelerators),
            "ld": str(self.load_percent),
            "cap": str(self.capacity),
        }
        if self.cert_fingerprint:
            txt["fp"] = self.cert_fingerprint
        if models_cut or self.models_truncated:
            txt["mt"] = "1"
        if agents_cut or self.agents_truncated:
            txt["at"] = "1"
        encoded = {k.encode(): v.encode() for k, v in txt.items()}
        check_txt_size(encoded)
        return encoded

    @classmethod
    def from_txt(
        cls, properties: Mapping[bytes, bytes | None], *, addresses: Sequence[str], port: int
    ) -> NodeRecord:
        """Parse TXT `properties` seen with SRV `port` and A/AAAA `addresses`.

        Raises MalformedRecordError on bad encoding, a wrong version, missing or invalid fields,
        oversized values, or a TXT port that differs from the SRV port. Unknown keys are ignored
        (newer nodes may add some).
        """
        check_txt_size(properties)
        txt = _decode(properties)
        missing = [key for key in _REQUIRED_KEYS if not txt.get(key)]
        if missing:
            raise MalformedRecordError(f"missing TXT keys: {', '.join(missing)}")
        version = _parse_int(txt, "v")
        if version != PROTOCOL_VERSION:
            raise MalformedRecordError(
                f"protocol version {version} is not {PROTOCOL_VERSION}", version=version
            )
        grpc_port = _parse_int(txt, "p")
        if grpc_port != port:
            raise MalformedRecordError(f"TXT port {grpc_port} differs from SRV port {port}")
        try:
            return cls(
                version=version,
                node_id=NodeId(txt["id"]),
                name=txt["n"],
                cluster=txt["c"],
                grpc_port=grpc_port,
                incarnation=txt["inc"],
                models=_parse_list(txt, "m"),
                models_truncated=txt.get("mt") == "1",
                loaded_models=_parse_list(txt, "ml") if "ml" in txt else _parse_list(txt, "m"),
                agents=_parse_list(txt, "a"),
                agents_truncated=txt.get("at") == "1",
                cores=_parse_int(txt, "cpu", default=0),
                ram_gb=_parse_float(txt, "ram"),
                accelerators=_parse_list(txt, "acc"),
                load_percent=_parse_int(txt, "ld", default=0),
                capacity=_parse_int(txt, "cap", default=1),
                cert_fingerprint=txt.get("fp", ""),
                addresses=_order_addresses(addresses),
            )
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise MalformedRecordError(f"invalid TXT field {where}: {first['msg']}") from None

    def summary(self) -> str:
        return f"{self.name} ({self.node_id}) at {self.address if self.addresses else '?'}"


def check_txt_size(properties: Mapping[bytes, bytes | None]) -> None:
    """Raise MalformedRecordError if a string or the whole record exceeds the DNS-SD budget."""
    total = 0
    for key, value in properties.items():
        if not isinstance(key, bytes) or not isinstance(value, bytes | None):
            raise MalformedRecordError(f"TXT entry {key!r} is not bytes")
        size = len(key) + (0 if value is None else 1 + len(value))
        if size > MAX_TXT_STRING_BYTES:
            raise MalformedRecordError(
                f"TXT string {key[:16]!r} is {size} bytes (max {MAX_TXT_STRING_BYTES})"
            )
        total += 1 + size
    if total > MAX_TXT_TOTAL_BYTES:
        raise MalformedRecordError(f"TXT record is {total} bytes (max {MAX_TXT_TOTAL_BYTES})")


def coarse_load_percent(in_flight: int, queued: int, max_concurrent: int) -> int:
    """Work in progress as a percent of capacity, clamped to 0..100 and rounded to steps of 10.

    Coarse on purpose: the TXT record changes (and is re-announced) only on real shifts.
    """
    percent = 100.0 * (in_flight + queued) / max(1, max_concurrent)
    stepped = int(percent / LOAD_STEP_PERCENT + 0.5) * LOAD_STEP_PERCENT  # half up
    return max(0, min(100, stepped))


def accelerator_kinds(gpu_vendors: Iterable[str], onnx_providers: Iterable[str]) -> tuple[str, ...]:
    """Coarse accelerator kinds, e.g. ("nvidia", "cuda") or ("cpu",) when there is none.

    GPU vendors plus ONNX Runtime execution providers other than CPU/Azure, as the node's
    hardware probe reports them.
    """
    kinds = {vendor.strip().lower() for vendor in gpu_vendors if vendor.strip()}
    for provider in onnx_providers:
        kind = provider.removesuffix("ExecutionProvider").lower()
        if kind not in ("cpu", "azure"):
            kinds.add(kind)
    return tuple(sorted(kind for kind in kinds if _ITEM_PATTERN.match(kind))) or ("cpu",)


def is_valid_item(item: str) -> bool:
    """Whether a browser accepts `item` in a model, agent or accelerator list."""
    return _ITEM_PATTERN.fullmatch(item) is not None


def _fit_list(items: Sequence[str], budget: int) -> tuple[tuple[str, ...], bool]:
    """The longest prefix of `items` whose comma-joined form fits in `budget` bytes."""
    kept: list[str] = []
    used = 0
    for item in items:
        cost = len(item.encode()) + (1 if kept else 0)
        if used + cost > budget:
            return tuple(kept), True
        kept.append(item)
        used += cost
    return tuple(kept), False


def _decode(properties: Mapping[bytes, bytes | None]) -> dict[str, str]:
    txt: dict[str, str] = {}
    for key, value in properties.items():
        try:
            name = key.decode("ascii").lower()
            txt[name] = "" if value is None else value.decode("utf-8")
        except (UnicodeDecodeError, AttributeError):
            # AttributeError: a key or value that is not bytes at all.
            raise MalformedRecordError(f"TXT key {key!r} is not valid ASCII/UTF-8") from None
        if not txt[name].isprintable():  # control, bidi, zero-width, separators: a name
            # that rewrites the terminal or reorders a table when printed
            raise MalformedRecordError(f"TXT value of {name[:16]!r} has unprintable characters")
    return txt


def _parse_int(txt: Mapping[str, str], key: str, *, default: int | None = None) -> int:
    raw = txt.get(key, "")
    if not raw and default is not None:
        return default
    if not _SMALL_INT_PATTERN.fullmatch(raw):
        raise MalformedRecordError(f"TXT key {key!r} is not a small non-negative integer: {raw!r}")
    return int(raw)


def _parse_float(txt: Mapping[str, str], key: str) -> float:
    raw = txt.get(key, "") or "0"
    try:
        value = float(raw)
    except ValueError:
        raise MalformedRecordError(f"TXT key {key!r} is not a number: {raw!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise MalformedRecordError(f"TXT key {key!r} is not a finite number: {raw!r}")
    return value


def _parse_list(txt: Mapping[str, str], key: str) -> tuple[str, ...]:
    raw = txt.get(key, "")
    items = tuple(item for item in raw.split(",") if item)
    for item in items:
        if not _ITEM_PATTERN.match(item):
            raise MalformedRecordError(f"TXT key {key!r} has an invalid item: {item[:40]!r}")
    return items


def _order_addresses(addresses: Sequence[str]) -> tuple[str, ...]:
    """Valid IP addresses, IPv4 first; link-local, multicast, unspecified ("this network",
    0.0.0.0/8) and reserved (240.0.0.0/4, broadcast) ones dropped; IPv4-mapped IPv6 addresses
    (::ffff:a.b.c.d) read as the IPv4 address they carry."""
    parsed = []
    for text in addresses:
        address = _parse_address(text)
        if address is None:
            continue
        if address.is_unspecified or address.is_link_local or address.is_multicast:
            continue
        if address.version == 4 and (address in _THIS_NETWORK or address.is_reserved):
            continue
        if address not in parsed:
            parsed.append(address)
    parsed.sort(key=lambda a: (a.version, a.is_loopback))
    return tuple(str(a) for a in parsed)


def is_loopback_address(text: str) -> bool:
    """Whether `text` is a loopback address (127.0.0.0/8, ::1, or one of them IPv4-mapped)."""
    address = _parse_address(text)
    return address is not None and address.is_loopback


def _parse_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
