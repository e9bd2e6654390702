"""Issue 10 item 7, the small ones: what a hostile caller or a rogue mDNS peer sends comes back
short, strict and escaped (no sockets)."""

from __future__ import annotations

import asyncio
import logging
import unicodedata

import pytest
from fastapi.testclient import TestClient

from edgemesh.v1 import mesh_pb2, node_pb2
from mesh.client import build_generate_request
from mesh.coordinator.dispatch import Dispatcher
from mesh.coordinator.openai_api import build_openai_app
from mesh.coordinator.settings import DispatcherSettings
from mesh.coordinator.tasks import build_task
from mesh.coordinator_client import build_submit_request
from mesh.core.errors import InvalidRequestError, NotFoundError
from mesh.core.ids import NodeId
from mesh.core.records import SERVICE_TYPE, NodeRecord
from mesh.core.untrusted import SEED_MAX, printable, quoted
from mesh.discovery.browser import DiscoveryKind, MdnsBrowser
from mesh.nodes_view import NodeSource, NodeState, NodeView
from nodes.agents import AgentHost
from nodes.config import NodeConfig
from nodes.service import to_generation_input
from tests.coordinator_fakes import FakeMesh, view
from tests.fakes import FakeBackend

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

LONG_NAME = "x" * 10_240
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
HOSTILE = "kiosk\x1b[2J\x1b]0;owned\x07\u202egnp.exe\u200b\r\nREADY"


def run(coro, timeout=10):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def make_dispatcher(mesh: FakeMesh, *views: NodeView) -> Dispatcher:
    dispatcher = Dispatcher(
        DispatcherSettings(queue_timeout_s=0, node_wait_s=0), connect=mesh.connect
    )
    dispatcher.update_nodes(list(views))
    return dispatcher


@pytest.fixture
def api():
    mesh = FakeMesh()
    dispatcher = make_dispatcher(mesh, view("a"), view("b"))
    with TestClient(build_openai_app(dispatcher, stream_window_s=0.0)) as client:
        yield client, mesh


def assert_short_echo(message: str) -> None:
    assert len(message) < 400, f"{len(message)} characters echoed: {message[:120]}..."
    assert "(10240 characters)" in message


# ---------------------------------------------------------------- long names echoed short


def test_quoted_cuts_long_names_and_says_how_long_they_were():
    assert quoted("smollm2") == "'smollm2'"
    assert quoted(LONG_NAME) == f"{'x' * 64!r}... (10240 characters)"
    assert quoted(10**5000).endswith("-bit integer")  # repr() of it would raise


def test_a_10_kb_model_name_is_echoed_short_by_the_node():
    backends = {"smollm2": FakeBackend("smollm2")}
    run(backends["smollm2"].load())
    request = node_pb2.GenerateRequest(model=LONG_NAME, prompt="hi")
    with pytest.raises(NotFoundError) as raised:
        to_generation_input(request, NodeConfig(advertise=False), backends)
    assert_short_echo(str(raised.value))
    with pytest.raises(NotFoundError) as raised:
        AgentHost(backends, data_dir=None).get(LONG_NAME)
    assert_short_echo(str(raised.value))


def test_a_10_kb_model_or_agent_name_is_echoed_short_by_the_coordinator(api):
    client, _mesh = api
    reply = client.post("/v1/chat/completions", json={**CHAT, "model": LONG_NAME})
    assert reply.status_code == 404
    assert_short_echo(reply.json()["error"]["message"])
    reply = client.post("/v1/chat/completions", json=CHAT, headers={"X-Mesh-Agent": "a" * 10_240})
    assert reply.status_code == 404
    assert len(reply.json()["error"]["message"]) < 400


# ---------------------------------------------------------------- strict booleans


@pytest.mark.parametrize(
    "body",
    [
        {**CHAT, "stream": True, "stream_options": {"include_usage": "no"}},
        {**CHAT, "stream": True, "stream_options": {"include_usage": 1}},
        {**CHAT, "stream": "no"},
    ],
)
def test_booleans_of_the_openai_body_are_json_booleans_only(api, body):
    client, mesh = api
    reply = client.post("/v1/chat/completions", json=body)
    assert reply.status_code == 400, reply.text
    message = reply.json()["error"]["message"]
    assert "valid boolean" in message
    assert ("include_usage" in message) == ("stream_options" in body)
    assert mesh.calls.events == []  # refused before any node was asked


def test_include_usage_false_sends_no_usage_chunk(api):
    client, _mesh = api
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": False}}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        events = [line for line in response.iter_lines() if line]
    assert response.status_code == 200 and events[-1] == "data: [DONE]"
    assert not any('"usage"' in event for event in events)


# ---------------------------------------------------------------- seeds


@pytest.mark.parametrize("seed", [-1, 2**32, 2**40, 2**63, -(2**63), 2**70])
def test_a_seed_out_of_range_is_a_clear_invalid_argument_everywhere(api, seed):
    client, mesh = api
    reply = client.post("/v1/chat/completions", json={**CHAT, "seed": seed})
    assert reply.status_code == 400
    message = reply.json()["error"]["message"]
    assert f"seed must be an integer from 0 to {SEED_MAX}" in message
    assert "Value out of range" not in message and mesh.calls.events == []
    for build in (
        lambda: build_task("hi", seed=seed),  # both ingresses build tasks so
        lambda: build_submit_request("hi", seed=seed),  # the gRPC ingress's client
        lambda: build_generate_request("hi", seed=seed),  # a node's client
    ):
        with pytest.raises(InvalidRequestError, match=f"from 0 to {SEED_MAX}, got"):
            build()


def test_seeds_at_the_ends_of_the_range_are_accepted():
    for seed in (0, SEED_MAX):
        assert build_task("hi", seed=seed).request.sampling.seed == seed
        assert build_submit_request("hi", seed=seed).sampling.seed == seed
        assert build_generate_request("hi", seed=seed).sampling.seed == seed


# ---------------------------------------------------------------- labels that match no node


def test_labels_that_exclude_every_node_say_so():
    async def scenario() -> str:
        dispatcher = make_dispatcher(
            FakeMesh(), view("a", labels={"site": "x"}), view("b", labels={"zone": "1"})
        )
        try:
            with pytest.raises(NotFoundError) as raised:
                await dispatcher.submit(build_task("hi", model="m", labels={"site": "shop"}))
            return str(raised.value)
        finally:
            await dispatcher.close()

    message = run(scenario())
    assert "ready models: m" not in message
    assert message.startswith("no node with labels site='shop' serves model 'm'")
    assert "the labels excluded 2 ready node(s) serving it" in message
    assert "'name-a' (site='x')" in message and "'name-b' (none of them)" in message


def test_a_model_that_no_node_serves_is_still_named_as_such():
    async def scenario() -> str:
        dispatcher = make_dispatcher(FakeMesh(), view("a", labels={"site": "x"}))
        try:
            with pytest.raises(NotFoundError) as raised:
                await dispatcher.submit(build_task("hi", model="other", labels={"site": "x"}))
            return str(raised.value)
        finally:
            await dispatcher.close()

    assert run(scenario()) == "no node serves model 'other'; ready models: m"


# ---------------------------------------------------------------- what the CLI prints


def assert_printable(text: str) -> None:
    bad = [ch for ch in text if ch != "\n" and unicodedata.category(ch) in ("Cc", "Cf", "Zl")]
    assert not bad, f"raw control or bidi characters printed: {bad!r}"


def test_printable_escapes_control_and_bidi_characters():
    assert printable("kiosk-1") == "kiosk-1"
    assert printable(HOSTILE) == (
        "kiosk\\x1b[2J\\x1b]0;owned\\x07\\u202egnp.exe\\u200b\\x0d\\x0aREADY"
    )
    assert printable("a" * 100, 10) == "aaaaaaa..."


def test_mesh_discover_escapes_node_names_and_txt_values(capsys):
    from mesh.cli.discover import _print_event, format_table

    hostile = NodeView(
        node_id=NodeId("n\u202e1"),
        name=HOSTILE,
        address="198.18.0.2:50051",
        state=NodeState.READY,
        source=NodeSource.MDNS,
        models=("smollm2\x1b[31m",),
        accelerators=("cpu\u2028",),
    )
    table = format_table([hostile])
    assert_printable(table)
    assert "\\x1b[2J" in table and "\\u202e" in table and len(table.splitlines()) == 2
    _print_event("added", "verified\x1b[1A", hostile, as_json=False)
    _print_event("added", "verified", hostile, as_json=True)
    out = capsys.readouterr().out
    assert_printable(out)
    assert len(out.splitlines()) == 2


def test_mesh_nodes_escapes_what_the_coordinator_lists(monkeypatch, capsys):
    import argparse

    import mesh.coordinator_client
    from mesh.cli.nodes import _nodes

    entry = mesh_pb2.NodeEntry(
        node_id="n1",
        name=HOSTILE,
        address="198.18.0.2:1\x1b[2J",
        state="ready",
        source="mdns\u202e",
        models=["smollm2\x07"],
    )

    class FakeMeshClient:
        def __init__(self, address: str, *, api_key: str | None = None) -> None:
            self.address = address

        async def __aenter__(self) -> FakeMeshClient:
            return self

        async def __aexit__(self, *exc: object) -> None:
            return None

        async def list_nodes(self) -> list[mesh_pb2.NodeEntry]:
            return [entry]

    monkeypatch.setattr(mesh.coordinator_client, "MeshClient", FakeMeshClient)
    assert _nodes(argparse.Namespace(coordinator="x:1", json=False)) == 0
    out = capsys.readouterr().out
    assert_printable(out)
    assert len(out.splitlines()) == 2 and "\\x1b[2J" in out


def test_cli_errors_escape_the_text_they_quote(capsys):
    from mesh.cli._common import run_async

    async def fail() -> int:
        raise NotFoundError(f"node said: {HOSTILE}")

    assert run_async(fail) == 1
    err = capsys.readouterr().err
    assert_printable(err)
    assert err.startswith("error: node said: kiosk\\x1b[2J")


# ---------------------------------------------------------------- loopback mDNS records

NAME = f"rogue.{SERVICE_TYPE}"


def txt() -> dict[bytes, bytes | None]:
    record = NodeRecord(
        node_id=NodeId("n1"), name="kiosk", cluster="c", grpc_port=50051, incarnation="ab"
    )
    return dict(record.to_txt())


def resolved(browser: MdnsBrowser, addresses: list[str]) -> list:
    browser.handle_resolved(NAME, txt(), addresses, 50051)
    events = []
    while not browser._queue.empty():
        events.append(browser._queue.get_nowait())
    return events


@pytest.mark.parametrize(
    "addresses",
    [["127.0.0.1"], ["::1"], ["127.8.9.10"], ["::ffff:127.0.0.1"], ["0.0.0.0", "0.1.2.3"]],
)
def test_mdns_records_pointing_at_loopback_or_nowhere_are_ignored(addresses, caplog):
    caplog.set_level(logging.WARNING, logger="mesh.discovery")
    assert resolved(MdnsBrowser(), addresses) == []
    assert len(caplog.records) == 1
    assert "loopback" in caplog.text or "no usable address" in caplog.text


def test_a_record_with_a_loopback_and_a_lan_address_keeps_only_the_lan_one():
    events = resolved(MdnsBrowser(), ["127.0.0.1", "198.18.0.2", "::1", "255.255.255.255"])
    assert [e.kind for e in events] == [DiscoveryKind.ADDED]
    assert events[0].record.addresses == ("198.18.0.2",)


def test_a_browser_listening_on_loopback_accepts_loopback_records():
    events = resolved(MdnsBrowser(interface_ip="127.0.0.1"), ["127.0.0.1"])
    assert [e.kind for e in events] == [DiscoveryKind.ADDED]
    assert events[0].record.address == "127.0.0.1:50051"


def test_a_failed_task_is_kept_without_the_frames_that_hold_its_request():
    """A 10 KB model name, refused, was kept ~5 times over by the ledger's error (its
    traceback's frames) for as long as the ledger keeps the task: ~47 KB a request."""

    async def scenario():
        dispatcher = make_dispatcher(FakeMesh(), view("a"))
        try:
            task = build_task("hi", model=LONG_NAME)
            with pytest.raises(NotFoundError) as raised:
                await dispatcher.submit(task)
            entry = dispatcher.ledger._entries[task.task_id]
            return raised.value, entry.error, entry.future.exception()
        finally:
            await dispatcher.close()

    original, kept, waited = run(scenario())
    assert original.__traceback__ is not None  # the caller's error is whole
    assert kept is waited and isinstance(kept, NotFoundError) and str(kept) == str(original)
    assert kept.__traceback__ is None and kept.__context__ is None
