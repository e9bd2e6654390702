"""Running agents on a node: a thin layer over `NodeClient`. Raises `mesh.core.errors`, never grpc errors.

    async with NodeClient("127.0.0.1:50051") as node:
        async for event in run_agent(node, "customer-service", "What is the status of order 1042?"):
            if event.HasField("step"):
                print(event.step.call.tool, event.step.call.arguments_json, event.step.result_json)
            elif event.HasField("result"):
                print(event.result.answer)

A task that failed over passes the steps it already completed (`completed_steps`,
from the AgentStep events received so far) and the same `task` id: the new node
replays them without running their tools again.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence

import grpc

from edgemesh.v1 import node_pb2
from mesh.client import NodeClient
from mesh.core.errors import MeshError
from mesh.core.grpc_status import from_grpc_error

DEFAULT_AGENT_TIMEOUT_S = 300.0


def build_agent_request(
    agent: str,
    input: str,
    *,
    task: node_pb2.TaskContext | None = None,
    completed_steps: Iterable[node_pb2.AgentStep] = (),
    history: Sequence[dict[str, str]] = (),
    model: str = "",
    max_steps: int = 0,
) -> node_pb2.AgentRequest:
    """An AgentRequest from plain Python values."""
    request = node_pb2.AgentRequest(
        agent=agent,
        input=input,
        completed_steps=list(completed_steps),
        history=[node_pb2.ChatMessage(**m) for m in history],
        model=model,
        max_steps=max_steps,
    )
    if task is not None:
        request.task.CopyFrom(task)
    return request


async def run_agent_request(
    node: NodeClient, request: node_pb2.AgentRequest, *, timeout_s: float | None = None
) -> AsyncIterator[node_pb2.AgentEvent]:
    """The node's AgentEvents: one per completed step, the answer text, then `result` (last)."""
    # NodeClient keeps its stub private; the agent RPC lives here to keep that module small.
    call = node._stub.RunAgent(
        request, timeout=timeout_s or DEFAULT_AGENT_TIMEOUT_S, metadata=node._call_metadata()
    )
    try:
        async for event in call:
            yield event
    except grpc.RpcError as error:
        raise from_grpc_error(error) from None
    finally:
        call.cancel()  # leaving early stops the task on the node


async def run_agent(
    node: NodeClient,
    agent: str,
    input: str,
    *,
    timeout_s: float | None = None,
    **options: object,
) -> AsyncIterator[node_pb2.AgentEvent]:
    """Run `agent` on `input`; options are those of `build_agent_request`."""
    request = build_agent_request(agent, input, **options)  # type: ignore[arg-type]
    async for event in run_agent_request(node, request, timeout_s=timeout_s):
        yield event


async def run_agent_to_result(
    node: NodeClient,
    agent: str,
    input: str,
    *,
    timeout_s: float | None = None,
    **options: object,
) -> node_pb2.AgentResult:
    """Run `agent` and return only its final AgentResult (which lists every step)."""
    result = None
    async for event in run_agent(node, agent, input, timeout_s=timeout_s, **options):
        if event.HasField("result"):
            result = event.result
    if result is None:
        raise MeshError(f"agent {agent} ended without a result")
    return result
