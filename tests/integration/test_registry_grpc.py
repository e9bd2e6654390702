"""The node registry against real node daemons on 127.0.0.1 (static addresses, no multicast):
ready only after Describe + health, suspect on NOT_SERVING, gone fast when the server vanishes,
load refreshed, and an address where nothing answers never ready."""

from __future__ import annotations

import asyncio
import io
import pathlib
import socket

import pytest

from mesh.node_table import EventKind, NodeEvent, RegistryTimings
from mesh.nodes_view import NodeState
from mesh.registry import NodeRegistry, wait_for_state
from nodes.config import NodeConfig
from nodes.daemon import NodeDaemon
from tests.fakes import FakeBackend

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

TIMINGS = RegistryTimings(
    health_interval_s=0.2,
    probe_timeout_s=1.0,
    retry_initial_s=0.1,
    retry_max_s=0.5,
    suspect_timeout_s=2.0,
    tick_interval_s=0.05,
)


async def start_node(tmp_path: pathlib.Path, name: str, *, delay_s: float = 0.0) -> NodeDaemon:
    config = NodeConfig(
        name=name,
        cluster="it",
        host="127.0.0.1",
        port=0,
        advertise=False,
        state_dir=str(tmp_path / name),
        max_concurrent=2,
        max_queued=1,
        grace_s=0.5,
    )
    daemon = NodeDaemon(
        config,
        backends={"smollm2": FakeBackend("smollm2", delay_s=delay_s)},
        progress=io.StringIO(),
    )
    await daemon.start()
    return daemon


def dead_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def run(coro: object, timeout_s: float = 45.0) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout_s))  # type: ignore[arg-type]


def test_static_nodes_become_ready_and_leave(tmp_path: pathlib.Path) -> None:
    async def scenario() -> None:
        a = await start_node(tmp_path, "a")
        b = await start_node(tmp_path, "b")
        nowhere = dead_address()
        events: list[NodeEvent] = []
        registry = NodeRegistry(
            cluster="it", timings=TIMINGS, static_addresses=[a.address, b.address, nowhere]
        )
        registry.subscribe(events.append)
        try:
            async with registry:
                await wait_for_state(registry, a.node_id, NodeState.READY, timeout_s=5)
                view = await wait_for_state(registry, b.node_id, NodeState.READY, timeout_s=5)
                assert view.models == ("smollm2",) and view.max_concurrent == 2
                assert view.name == "b" and view.cluster == "it" and view.cores >= 1

                # Graceful stop: NOT_SERVING first (suspect), then the server goes (gone).
                await a.stop()
                await wait_for_state(registry, a.node_id, NodeState.GONE, timeout_s=3)
                kinds = [e.kind for e in events if e.view.node_id == a.node_id]
                assert kinds == [EventKind.READY, EventKind.SUSPECT, EventKind.GONE]

                # The server vanishes without a word: gone within a second.
                loop = asyncio.get_running_loop()
                began = loop.time()
                await b._server.stop(None)
                await wait_for_state(registry, b.node_id, NodeState.GONE, timeout_s=3)
                assert loop.time() - began < 1.0

                # Nothing ever answered at `nowhere`: it never shows up, let alone ready.
                assert {v.address for v in registry.snapshot()} == {a.address, b.address}
                assert all(e.view.address != nowhere for e in events)
        finally:
            await b.stop()

    run(scenario())


def test_restarted_static_node_comes_back(tmp_path: pathlib.Path) -> None:
    async def scenario() -> None:
        node = await start_node(tmp_path, "r")
        address = node.address
        async with NodeRegistry(timings=TIMINGS, static_addresses=[address]) as registry:
            await wait_for_state(registry, node.node_id, NodeState.READY, timeout_s=5)
            await node._server.stop(None)
            await wait_for_state(registry, node.node_id, NodeState.GONE, timeout_s=3)
            port = int(address.rsplit(":", 1)[1])
            again = NodeDaemon(
                node.config.model_copy(update={"port": port}),
                backends={"smollm2": FakeBackend("smollm2")},
                progress=io.StringIO(),
            )
            await again.start()
            try:
                await wait_for_state(registry, node.node_id, NodeState.READY, timeout_s=5)
            finally:
                await again.stop()

    run(scenario())


def test_load_is_refreshed_while_ready(tmp_path: pathlib.Path) -> None:
    async def scenario() -> None:
        node = await start_node(tmp_path, "busy", delay_s=0.05)
        try:
            async with NodeRegistry(timings=TIMINGS, static_addresses=[node.address]) as registry:
                await wait_for_state(registry, node.node_id, NodeState.READY, timeout_s=5)
                updates = registry.events()
                from mesh.client import NodeClient

                async with NodeClient(node.address) as client:
                    generation = asyncio.ensure_future(client.generate("hi", max_tokens=40))
                    async with asyncio.timeout(5):
                        async for event in updates:
                            if event.kind is EventKind.UPDATED and event.view.in_flight == 1:
                                break
                    await asyncio.wait_for(generation, 10)
                await updates.aclose()
        finally:
            await node.stop()

    run(scenario())


def test_multi_homed_node_is_reached_at_the_address_that_answers(tmp_path: pathlib.Path) -> None:
    """The record lists an address where nothing listens first (docker0, a VPN...): the
    registry tries the next one, follows the node there and watches it there."""

    async def scenario() -> None:
        from mesh.core.ids import NodeId
        from mesh.core.records import NodeRecord
        from mesh.discovery.browser import DiscoveryEvent, DiscoveryKind

        node = await start_node(tmp_path, "multi")
        port = int(node.address.rsplit(":", 1)[1])
        record = NodeRecord(
            node_id=NodeId(node.node_id),
            name="multi",
            cluster="it",
            grpc_port=port,
            incarnation="ab",
            addresses=("127.0.0.2", "127.0.0.1"),  # the node listens on 127.0.0.1 only
        )
        try:
            async with NodeRegistry(cluster="it", timings=TIMINGS) as registry:
                registry.handle_discovery(
                    DiscoveryEvent(kind=DiscoveryKind.ADDED, name="multi._em", record=record)
                )
                view = await wait_for_state(registry, node.node_id, NodeState.READY, timeout_s=5)
                assert view.address == node.address
                # Refreshes and the watch work there: a crash is still noticed at once.
                await asyncio.sleep(0.5)
                assert registry.snapshot()[0].state is NodeState.READY
                await node._server.stop(None)
                await wait_for_state(registry, node.node_id, NodeState.GONE, timeout_s=3)
        finally:
            await node.stop()

    run(scenario())


@pytest.mark.parametrize(
    ("interface", "message"),
    [
        ("198.51.100.7", "error: cannot listen for mDNS on 198.51.100.7: "),
        ("eth0", "error: --interface takes an IP address of this machine, got 'eth0'"),
    ],
)
def test_discover_on_an_interface_that_is_not_ours_is_one_clear_error(
    interface: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from mesh.cli import main

    code = main(["discover", "--timeout", "0.2", "--interface", interface])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith(message) and err.count("\n") == 1, err
    assert "Traceback" not in err
