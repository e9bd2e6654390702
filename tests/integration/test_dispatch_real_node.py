"""The coordinator's dispatcher (in process, no Ray) against a real node daemon over gRPC.

A busy but healthy node is not a dead one: tasks that wait in its queue for longer than the
per-attempt timeout are answered there, each once, and the node is not cooled down.
"""

from __future__ import annotations

import asyncio
import io

import pytest

from mesh.coordinator.dispatch import Dispatcher
from mesh.coordinator.settings import DispatcherSettings
from mesh.coordinator.tasks import AttemptOutcome, build_task
from mesh.core.ids import NodeId
from mesh.nodes_view import NodeSource, NodeState, NodeView
from nodes.config import NodeConfig
from nodes.daemon import NodeDaemon
from tests.fakes import FakeBackend

pytestmark = pytest.mark.integration

REPLY = " ".join(f"w{i}" for i in range(10))


def run(coro, timeout=60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.mark.parametrize("streamed", [False, True])
def test_tasks_queued_past_the_attempt_timeout_are_answered_by_the_busy_node(tmp_path, streamed):
    async def scenario():
        backend = FakeBackend("m", reply=REPLY, delay_s=0.03)  # 0.3 s a task, one at a time
        config = NodeConfig(
            host="127.0.0.1",
            port=0,
            advertise=False,
            state_dir=str(tmp_path),
            max_concurrent=1,
            max_queued=16,
            router=None,
        )
        daemon = NodeDaemon(config, backends={"m": backend}, progress=io.StringIO())
        await daemon.start()
        dispatcher = Dispatcher(
            DispatcherSettings(attempt_timeout_s=0.5, deadline_s=30, queue_timeout_s=0.0)
        )
        try:
            dispatcher.update_nodes(
                [
                    NodeView(
                        node_id=NodeId(daemon.node_id),
                        name="busy",
                        address=daemon.address,
                        state=NodeState.READY,
                        source=NodeSource.STATIC,
                        models=("m",),
                        max_concurrent=1,
                        max_queued=16,
                    )
                ]
            )

            async def one(i: int):
                task = build_task(f"task {i}", model="m")
                if not streamed:
                    return await dispatcher.submit(task)
                async for item in dispatcher.stream(task):
                    result = item
                return result

            # Eight tasks: the last waits ~2.1 s, four times the per-attempt timeout.
            results = await asyncio.gather(*(one(i) for i in range(8)))
        finally:
            await dispatcher.close()
            await daemon.stop()
        assert [r.text for r in results] == [REPLY] * 8
        assert all([a.outcome for a in r.attempts] == [AttemptOutcome.OK] for r in results)
        assert len(backend.requests) == 8  # each ran once, on the node
        assert not dispatcher.pool.cooldowns.is_cooling(NodeId(daemon.node_id))

    run(scenario())
