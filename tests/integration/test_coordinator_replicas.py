"""Two dispatcher replicas on real Ray Serve: a task with an idempotency key runs once whichever
replica its submissions land on, and DescribeTask answers on any replica.

Nodes are real daemons with an instant fake backend (the model is not what is tested here), so
a node's `completed` counter says how many times a task really ran. Ray starts once for this
module and is shut down at its end.
"""

from __future__ import annotations

import asyncio

import pytest

from mesh.client import NodeClient
from mesh.coordinator.runner import start_coordinator, stop_coordinator
from mesh.coordinator.settings import CoordinatorConfig, DispatcherSettings
from mesh.coordinator_client import MeshClient
from mesh.core.errors import NotFoundError
from tests.mesh_processes import running_nodes

pytestmark = [pytest.mark.integration, pytest.mark.ray, pytest.mark.timeout(300)]

REPLY = " ".join(f"word{i}" for i in range(20))


def run(coro, timeout=60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    directory = tmp_path_factory.mktemp("replicas")
    with running_nodes(
        directory,
        ["slow-1", "slow-2"],
        fake=True,
        delay_ms=20,
        model="slow",
        reply=REPLY,
        max_concurrent=4,
    ) as nodes:
        config = CoordinatorConfig(
            cluster="default",
            static_nodes=tuple(n.address for n in nodes),
            mdns=False,
            grpc_port=0,
            http_port=0,
            num_cpus=2,
            replicas=2,
            dispatcher=DispatcherSettings(policy="round_robin", deadline_s=30),
        )
        try:
            running = start_coordinator(config)
            run(wait_ready(running.fast_paths, len(nodes)))
            yield running, nodes
        finally:
            stop_coordinator()


async def wait_ready(addresses, count: int, timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        for address in addresses:
            async with MeshClient(address) as client:
                while sum(n.state == "ready" for n in await client.list_nodes()) < count:
                    await asyncio.sleep(0.1)


async def completed(nodes) -> int:
    total = 0
    for node in nodes:
        async with NodeClient(node.address) as client:
            total += (await client.describe()).load.completed
    return total


def test_each_replica_serves_its_own_fast_path(mesh):
    running, _nodes = mesh
    assert len(running.fast_paths) == 2 and len(set(running.fast_paths)) == 2


def test_one_idempotency_key_through_every_ingress_runs_once(mesh):
    running, nodes = mesh
    addresses = [*running.fast_paths, running.grpc_address]

    async def scenario():
        before = await completed(nodes)
        clients = [MeshClient(address) for address in addresses]
        try:
            replies = await asyncio.gather(
                *(
                    client.submit("hello", model="slow", idempotency_key="order-7-refund")
                    for client in clients
                    for _ in range(2)
                )
            )
            streamed = [
                chunk
                async for chunk in clients[1].submit_stream(
                    "hello", model="slow", idempotency_key="order-7-refund"
                )
            ]
        finally:
            for client in clients:
                await client.close()
        assert {reply.task_id for reply in replies} == {replies[0].task_id}
        assert all(reply.text == REPLY for reply in replies)
        assert "".join(c.text for c in streamed) == REPLY
        assert streamed[-1].result.task_id == replies[0].task_id
        assert await completed(nodes) - before == 1  # six submissions, one run

    run(scenario())


def test_describe_task_answers_on_the_replica_that_did_not_run_it(mesh):
    running, _nodes = mesh
    first, second = running.fast_paths

    async def scenario():
        async with MeshClient(first) as one, MeshClient(second) as two:
            reply = await one.submit("hello", model="slow")
            states = []
            async with asyncio.timeout(5):
                while not states or states[-1] != "done":
                    try:
                        record = await two.describe_task(reply.task_id)
                        states.append(record.state)
                    except NotFoundError:
                        states.append("not yet")  # replicas publish records in batches
                    await asyncio.sleep(0.05)
            # Published when it began ("running") and when it ended, nothing else in between.
            assert set(states) <= {"not yet", "running", "done"}
            assert record.result.text == REPLY
            assert record.result.node_name == reply.node_name
            with pytest.raises(NotFoundError, match="never ran"):
                await two.describe_task("task-never-ran")

    run(scenario())
