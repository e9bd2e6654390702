"""Models on demand with the real bundled model on real nodes (gRPC on 127.0.0.1, port 0).

Two model ids on the same GGUF file stand for two models; with `max_loaded_models: 1` a node
holds one of them at a time. Through the node: a request for the other loads it and unloads
the first; Describe says which is loaded and which is only available. Through a Dispatcher
over two such nodes: a model task goes where its model is resident, and a model no node holds
is loaded on a node that has room.
"""

from __future__ import annotations

import asyncio
import contextlib
import io

import pytest

from edgemesh.v1 import node_pb2
from mesh.client import NodeClient
from mesh.coordinator.dispatch import Dispatcher
from mesh.coordinator.settings import DispatcherSettings
from mesh.coordinator.tasks import build_task
from mesh.health import details_from_describe, ready_view
from mesh.nodes_view import NodeView
from nodes.config import ModelConfig, NodeConfig
from nodes.daemon import NodeDaemon

pytestmark = pytest.mark.integration

QUESTION = "What is the capital city of France?"


@contextlib.asynccontextmanager
async def node(tmp_path, name: str, **caps):
    config = NodeConfig(
        name=name,
        host="127.0.0.1",
        port=0,
        advertise=False,
        router=None,
        state_dir=str(tmp_path / name),
        grace_s=1.0,
        models=tuple(
            ModelConfig(id=model_id, source="bundled:smollm2", n_ctx=1024, n_threads=1)
            for model_id in ("alpha", "beta", "gamma")
        ),
        **caps,
    )
    daemon = NodeDaemon(config, progress=io.StringIO())
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.stop()


def model_states(reply: node_pb2.DescribeResponse) -> dict[str, tuple[str, bool]]:
    return {
        m.model_id: (node_pb2.ModelState.Name(m.state).removeprefix("MODEL_STATE_"), m.on_demand)
        for m in reply.models
    }


def run(coro, timeout=120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_a_request_for_an_unloaded_model_loads_it_and_unloads_the_least_recent(tmp_path):
    async def scenario():
        async with node(tmp_path, "n1", max_loaded_models=1) as daemon:
            async with NodeClient(daemon.address, timeout_s=60) as client:
                at_start = model_states(await client.describe())
                reply = await client.generate(QUESTION, model="beta", max_tokens=12, temperature=0)
                after = model_states(await client.describe())
                again = await client.generate(QUESTION, model="alpha", max_tokens=12, temperature=0)
                last = model_states(await client.describe())
            log = daemon._progress.getvalue()  # type: ignore[attr-defined]
        return at_start, reply, after, again, last, log

    at_start, reply, after, again, last, log = run(scenario())
    assert at_start == {
        "alpha": ("READY", False),
        "beta": ("UNLOADED", True),
        "gamma": ("UNLOADED", True),
    }
    assert "Paris" in reply.text and reply.model == "beta"
    assert after["alpha"] == ("UNLOADED", True) and after["beta"] == ("READY", False)
    assert "Paris" in again.text
    assert last["alpha"] == ("READY", False) and last["beta"] == ("UNLOADED", True)
    assert "model beta available on demand" in log
    assert "unloading model alpha (least recently used, to make room for beta)" in log


def test_the_coordinator_sends_a_task_where_its_model_is_resident_and_loads_it_elsewhere(
    tmp_path,
):
    async def view_of(daemon: NodeDaemon) -> NodeView:
        return await ready_view(daemon.address)

    async def scenario():
        async with (
            node(tmp_path, "n1", max_loaded_models=1) as n1,
            node(tmp_path, "n2", max_loaded_models=1) as n2,
        ):
            # n1 holds alpha; n2 is made to hold beta (asked for it once).
            async with NodeClient(n2.address, timeout_s=60) as client:
                await client.generate(QUESTION, model="beta", max_tokens=4, temperature=0)
            views = [await view_of(n1), await view_of(n2)]
            dispatcher = Dispatcher(DispatcherSettings(policy="round_robin"))
            dispatcher.update_nodes(views)
            try:
                served = []
                for model in ("alpha", "beta", "alpha", "beta"):
                    task = build_task(QUESTION, model=model, max_tokens=4, temperature=0)
                    served.append((model, (await dispatcher.submit(task)).node_name))
                # Resident nowhere: loaded on a node that has room, and answered.
                gamma = await dispatcher.submit(build_task(QUESTION, model="gamma", max_tokens=4))
                loaded = [(await view_of(n)).loaded_models for n in (n1, n2)]
            finally:
                await dispatcher.close()
        return views, served, gamma, loaded

    views, served, gamma, loaded = run(scenario())
    assert [(v.models, v.loaded_models) for v in views] == [
        (("alpha", "beta", "gamma"), ("alpha",)),
        (("alpha", "beta", "gamma"), ("beta",)),
    ]
    assert gamma.text and ("gamma",) in loaded
    # Round robin alone would alternate; the resident model decides.
    assert served == [("alpha", "n1"), ("beta", "n2"), ("alpha", "n1"), ("beta", "n2")]


def test_a_node_measures_its_models_once_and_reads_the_figures_back_at_the_next_start(tmp_path):
    async def start_and_describe() -> tuple[node_pb2.DescribeResponse, str]:
        async with node(tmp_path, "n1", max_loaded_models=1) as daemon:
            async with NodeClient(daemon.address) as client:
                reply = await client.describe()
            return reply, daemon._progress.getvalue()  # type: ignore[attr-defined]

    first, first_log = run(start_and_describe())
    again, again_log = run(start_and_describe())
    alpha = next(m for m in first.models if m.model_id == "alpha")
    assert alpha.decode_tokens_per_s > 0 and alpha.prompt_tokens_per_s > 0
    assert "model alpha measured:" in first_log
    assert "measured:" not in again_log  # the same file on the same hardware: read back
    alpha_again = next(m for m in again.models if m.model_id == "alpha")
    assert alpha_again.decode_tokens_per_s == alpha.decode_tokens_per_s
    # The coordinator's view of it.
    assert details_from_describe(again).decode_tokens_per_s["alpha"] == alpha.decode_tokens_per_s
