"""The mDNS browser's handling of what it resolves, and its shutdown, without sockets."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from zeroconf import ServiceStateChange

from mesh.core.ids import NodeId
from mesh.core.records import SERVICE_TYPE, NodeRecord
from mesh.discovery.browser import DiscoveryEvent, DiscoveryKind, MdnsBrowser

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

NAME = f"kiosk-n1.{SERVICE_TYPE}"
ADDRESSES = ["198.18.0.2"]


def good_txt() -> dict[bytes, bytes | None]:
    record = NodeRecord(
        node_id=NodeId("n1"), name="kiosk", cluster="c", grpc_port=50051, incarnation="ab"
    )
    return dict(record.to_txt())


def drain(browser: MdnsBrowser) -> list[DiscoveryEvent]:
    events = []
    while not browser._queue.empty():
        events.append(browser._queue.get_nowait())
    return events


@pytest.mark.parametrize(
    "edit",
    [
        {b"cpu": "²".encode()},  # str.isdigit() says yes, int() says no
        {b"p": "５００５１".encode()},  # fullwidth digits
        {b"ld": "٣".encode()},  # Arabic-Indic digit
    ],
)
def test_a_known_node_whose_record_turns_bad_is_removed_and_logged_once(
    edit: dict[bytes, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="mesh.discovery")
    browser = MdnsBrowser()
    browser.handle_resolved(NAME, good_txt(), ADDRESSES, 50051)
    assert [e.kind for e in drain(browser)] == [DiscoveryKind.ADDED]
    bad = good_txt() | edit
    for _ in range(3):  # re-announced: no new warning, no traceback
        browser.handle_resolved(NAME, bad, ADDRESSES, 50051)
    assert drain(browser) == [DiscoveryEvent(kind=DiscoveryKind.REMOVED, name=NAME)]
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "not a small non-negative integer" in warnings[0].getMessage()
    assert all(r.exc_info is None for r in caplog.records)
    # Fixed again: it comes back.
    browser.handle_resolved(NAME, good_txt(), ADDRESSES, 50051)
    assert [e.kind for e in drain(browser)] == [DiscoveryKind.ADDED]


class LateServiceBrowser:
    """Stands in for AsyncServiceBrowser: zeroconf may still deliver a change while cancelling."""

    def __init__(self, browser: MdnsBrowser) -> None:
        self.browser = browser

    async def async_cancel(self) -> None:
        self.browser._on_change(
            zeroconf=None,  # type: ignore[arg-type]
            service_type=SERVICE_TYPE,
            name=f"late.{SERVICE_TYPE}",
            state_change=ServiceStateChange.Added,
        )


class FakeAsyncZeroconf:
    zeroconf: Any = None

    async def async_close(self) -> None:
        return None


def test_stop_leaves_no_resolve_task_behind() -> None:
    async def scenario() -> None:
        baseline = asyncio.all_tasks()
        browser = MdnsBrowser()
        browser._zeroconf = FakeAsyncZeroconf()  # type: ignore[assignment]
        browser._browser = LateServiceBrowser(browser)  # type: ignore[assignment]
        await browser.stop()
        assert browser._resolving == {}
        assert asyncio.all_tasks() == baseline

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_any_parse_failure_counts_as_a_malformed_record(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A gap in the parser (a ValueError it did not turn into MalformedRecordError) is still
    the peer's garbage: logged once, the node removed, no traceback."""
    browser = MdnsBrowser()
    browser.handle_resolved(NAME, good_txt(), ADDRESSES, 50051)
    drain(browser)

    def broken_parser(*args: object, **kwargs: object) -> NodeRecord:
        raise ValueError("a parser gap")

    monkeypatch.setattr(NodeRecord, "from_txt", broken_parser)
    caplog.set_level(logging.WARNING, logger="mesh.discovery")
    browser.handle_resolved(NAME, good_txt(), ADDRESSES, 50051)
    browser.handle_resolved(NAME, good_txt(), ADDRESSES, 50051)
    assert [e.kind for e in drain(browser)] == [DiscoveryKind.REMOVED]
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "a parser gap" in caplog.records[0].getMessage()
