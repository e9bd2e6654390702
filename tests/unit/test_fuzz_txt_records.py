"""The hostile-input suite for mDNS (issue 10): Hypothesis over TXT records and addresses.

Anyone on the LAN can announce `_edgemesh._tcp`. For every record: parsing fails only with
MalformedRecordError (which the browser logs once), the browser never raises, and whatever it
accepts is safe to route to and to print: no loopback or unspecified address, no control or
bidi characters, within the DNS-SD budget, and the same record when announced again.
"""

from __future__ import annotations

import ipaddress
import os
import unicodedata

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mesh.core.ids import NodeId
from mesh.core.records import (
    MAX_TXT_TOTAL_BYTES,
    SERVICE_TYPE,
    MalformedRecordError,
    NodeRecord,
)
from mesh.discovery.browser import DiscoveryKind, MdnsBrowser

pytestmark = pytest.mark.unit

EXAMPLES = int(os.environ.get("MESH_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # pure functions; the budget is max_examples
    derandomize=EXAMPLES <= 300,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
KEYS = ["v", "id", "n", "c", "p", "inc", "m", "mt", "a", "at", "cpu", "ram", "acc", "ld", "cap"]
PORT = 50051


def good() -> dict[bytes, bytes | None]:
    record = NodeRecord(
        node_id=NodeId("n1"),
        name="kiosk",
        cluster="c",
        grpc_port=PORT,
        incarnation="ab",
        models=("smollm2",),
    )
    return dict(record.to_txt())


HOSTILE_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["\x1b[2J", "\u202egnp.exe", "\u200b", "kiosk\r\nREADY", "²", "٣", "nan"]),
)
VALUES = st.one_of(
    st.none(),
    st.binary(max_size=300),
    HOSTILE_TEXT.map(lambda text: text.encode("utf-8", "surrogatepass")),
    st.integers(-5, 70_000).map(lambda n: str(n).encode()),
)
ADDRESS = st.one_of(
    st.ip_addresses().map(str),
    st.sampled_from(
        [
            "127.0.0.1",
            "::1",
            "::ffff:127.0.0.1",
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "fe80::1%eth0",
            "198.18.0.2",
            "not-an-ip",
            "",
        ]
    ),
)


@st.composite
def records(draw: st.DrawFn) -> tuple[dict[bytes, bytes | None], list[str], int]:
    """A good record with some keys changed, removed or added; addresses; the SRV port."""
    txt = good()
    for key in draw(st.lists(st.sampled_from(KEYS), max_size=4, unique=True)):
        if draw(st.booleans()):
            txt.pop(key.encode(), None)
        else:
            txt[key.encode()] = draw(VALUES)
    if draw(st.booleans()):  # the values that are printed: name, cluster, lists
        key = draw(st.sampled_from(["n", "c", "m", "a", "acc"]))
        text = draw(st.text(max_size=10)) + draw(HOSTILE_TEXT) + draw(st.text(max_size=10))
        txt[key.encode()] = text.encode("utf-8", "surrogatepass")
    for key, value in draw(st.dictionaries(st.binary(max_size=20), VALUES, max_size=3)).items():
        txt[key] = value
    port = draw(st.one_of(st.just(PORT), st.integers(0, 70_000)))
    return txt, draw(st.lists(ADDRESS, max_size=4)), port


def unprintable(text: str) -> list[str]:
    return [ch for ch in text if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp")]


@FUZZ
@example(record=(good() | {b"n": "\u202egnp.exe".encode()}, ["198.18.0.2"], PORT))
@example(record=(good() | {b"c": "lab\x7f\u200b".encode()}, ["198.18.0.2"], PORT))
@given(record=records())
def test_a_txt_record_parses_or_is_malformed_and_what_parses_is_safe(record) -> None:
    txt, addresses, port = record
    try:
        parsed = NodeRecord.from_txt(txt, addresses=addresses, port=port)
    except MalformedRecordError:
        return
    for text in (parsed.name, parsed.cluster, parsed.node_id, *parsed.models, *parsed.agents):
        assert not unprintable(text), f"{text!r} accepted"
    for address in parsed.addresses:
        parsed_address = ipaddress.ip_address(address)
        assert not parsed_address.is_unspecified and not parsed_address.is_link_local
        assert not parsed_address.is_multicast
    again = NodeRecord.from_txt(parsed.to_txt(), addresses=parsed.addresses, port=port)
    assert again == parsed
    assert sum(1 + len(k) + 1 + len(v) for k, v in parsed.to_txt().items()) <= MAX_TXT_TOTAL_BYTES


@FUZZ
@example(record=(good(), ["127.0.0.1"], PORT))
@example(record=(good(), ["::ffff:127.0.0.1", "::1"], PORT))
@given(record=records())
def test_the_browser_never_raises_and_never_adds_a_loopback_node(record) -> None:
    txt, addresses, port = record
    browser = MdnsBrowser()
    browser.handle_resolved(f"rogue.{SERVICE_TYPE}", txt, addresses, port)
    while not browser._queue.empty():
        event = browser._queue.get_nowait()
        assert event.kind is DiscoveryKind.ADDED and event.record is not None
        assert event.record.addresses
        for address in event.record.addresses:
            assert not ipaddress.ip_address(address).is_loopback, event.record.addresses
