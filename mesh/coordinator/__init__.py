"""The coordinator: a task submitted once is answered once, by the best node for it.

Mechanism without Ray (importable anywhere):

    from mesh.coordinator import Dispatcher, DispatcherSettings, build_task
    dispatcher = Dispatcher(DispatcherSettings(policy="least_loaded"))
    dispatcher.update_nodes(registry.snapshot())
    result = await dispatcher.submit(build_task("Hello", model="smollm2"))
    result = await dispatcher.submit(build_task("Order 1042?", agent="customer-service"))
    result.steps, result.tier, result.escalation_reason, result.routed_by   # agent tasks

The Ray Serve application is `mesh.coordinator.app` (imports Ray); start and stop it with
`mesh.coordinator.runner.start_coordinator` / `stop_coordinator`, or `mesh coordinator start`.
Callers use `mesh.coordinator_client.MeshClient` (gRPC) or any OpenAI client (HTTP).
"""

from mesh.coordinator.dispatch import Dispatcher
from mesh.coordinator.escalation import AUTO_AGENT, EscalationPolicy
from mesh.coordinator.grpc_link import GrpcNodeLink
from mesh.coordinator.pool import NodeLink, NodePool, NodeRow, connect_grpc
from mesh.coordinator.settings import CoordinatorConfig, DispatcherSettings
from mesh.coordinator.tasks import (
    AttemptOutcome,
    AttemptRecord,
    TaskRecord,
    TaskResult,
    TaskSpec,
    TaskState,
    build_task,
)

__all__ = [
    "AUTO_AGENT",
    "AttemptOutcome",
    "AttemptRecord",
    "CoordinatorConfig",
    "Dispatcher",
    "DispatcherSettings",
    "EscalationPolicy",
    "GrpcNodeLink",
    "NodeLink",
    "NodePool",
    "NodeRow",
    "TaskRecord",
    "TaskResult",
    "TaskSpec",
    "TaskState",
    "build_task",
    "connect_grpc",
]
