"""The dispatcher's tunables, and how a topology maps onto them."""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING, Annotated

from pydantic import Field

from mesh.cluster import AUDIT
from mesh.coordinator.escalation import EscalationPolicy
from mesh.core.bounds import (
    DEFAULT_MAX_MESSAGES,
    DEFAULT_MAX_PROMPT_BYTES,
    json_body_limit_bytes,
    receive_limit_bytes,
)
from mesh.core.model import FrozenModel

if TYPE_CHECKING:
    from mesh.topology import Topology


PROXY_MIN_MESSAGE_BYTES = 1024 * 1024


class DispatcherSettings(FrozenModel):
    """Routing and failover knobs of one dispatcher (one per Ray Serve replica)."""

    policy: str = "least_loaded"  # a name in mesh.routing.POLICIES
    ewma_alpha: Annotated[float, Field(gt=0, le=1)] = 0.3
    seed: int | None = None
    failover: bool = True  # False: one attempt per task
    max_attempts: Annotated[int, Field(ge=1, le=20)] = 3
    # Unary: the most one attempt may take. Streams: the most a node may stay silent (before the
    # first chunk or between chunks), so a long answer that keeps coming is never cut off.
    attempt_timeout_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 30.0
    deadline_s: Annotated[float, Field(gt=0, le=86_400)] = 120.0  # a task's, unless it says
    cooldown_s: Annotated[float, Field(ge=0)] = 5.0
    failures_before_cooldown: Annotated[int, Field(ge=1)] = 2
    resume_streams: bool = True  # continue a broken stream on another node from the text sent
    # ... and from its token ids where the next node runs the same model file (same sha256), so
    # the answer goes on token for token; False: always from the text (tokenized again).
    resume_from_token_ids: bool = True
    queue_timeout_s: Annotated[float, Field(ge=0)] = 1.0  # wait for a slot when all nodes are full
    node_wait_s: Annotated[float, Field(ge=0)] = 5.0  # wait for a ready node when none is
    # How many dispatchers share each node's advertised capacity (the replica count): each one
    # sends a node at most its share, so together they never exceed what the node accepts (a
    # node with fewer slots than dispatchers is refused, not overfilled: pool._share).
    # CoordinatorConfig sets it from its final `replicas`.
    capacity_share: Annotated[int, Field(ge=1)] = 1
    ledger_size: Annotated[int, Field(ge=1)] = 10_000  # finished tasks kept for DescribeTask
    # Agent tasks: model tiers and when to move up (the topology's `escalation`), and the most
    # a Classify for `--agent auto` may take.
    escalation: EscalationPolicy = EscalationPolicy()
    classify_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    # What a task may hold (mesh/core/bounds.py), checked at the ingress before anything else:
    # the same defaults as a node's, so a request no node would take is refused at the edge.
    max_prompt_bytes: Annotated[int, Field(ge=1, le=16 * 1024 * 1024)] = DEFAULT_MAX_PROMPT_BYTES
    max_messages: Annotated[int, Field(ge=1, le=100_000)] = DEFAULT_MAX_MESSAGES
    # Traces (mesh/core/tracing.py): the share of tasks traced when the caller sends no
    # sampled `traceparent` (0: none, 1: all), the traces kept in memory for `mesh trace`, and
    # where to export spans over OTLP/gRPC ("": nowhere).
    trace_sample_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0
    traces_kept: Annotated[int, Field(ge=1, le=100_000)] = 256
    otlp_endpoint: str = ""
    # The audit summary (mesh/coordinator/audit.py): a JSON line per agent task appended to this
    # file ("": none). CoordinatorConfig sets it from its `audit_log` and `cluster_dir`.
    audit_log: str = ""

    @property
    def receive_limit_bytes(self) -> int:
        """The largest gRPC message the fast path takes (refused unread beyond)."""
        return receive_limit_bytes(self.max_prompt_bytes, self.max_messages)

    @property
    def http_body_limit_bytes(self) -> int:
        """The largest request body the OpenAI API reads (413 beyond)."""
        return json_body_limit_bytes(self.max_prompt_bytes, self.max_messages)

    @classmethod
    def from_topology(cls, topology: Topology, **overrides: object) -> DispatcherSettings:
        routing, failover = topology.routing, topology.failover
        values: dict[str, object] = dict(
            policy=routing.policy,
            ewma_alpha=routing.ewma_alpha,
            seed=routing.seed,
            failover=failover.enabled,
            max_attempts=failover.max_attempts,
            attempt_timeout_s=failover.attempt_timeout_s,
            deadline_s=failover.deadline_s,
            cooldown_s=failover.cooldown_s,
            failures_before_cooldown=failover.failures_before_cooldown,
            resume_streams=failover.resume_streams,
            capacity_share=topology.coordinator.replicas,
            escalation=EscalationPolicy.from_spec(topology.escalation),
        )
        values.update(overrides)
        return cls.model_validate(values)


class CoordinatorConfig(FrozenModel):
    """Everything `mesh coordinator start` deploys: from a topology plus command-line flags."""

    cluster: str = "default"
    static_nodes: tuple[str, ...] = ()  # host:port of nodes reached without mDNS
    mdns: bool = True
    # NodeRegistry timings (mesh.node_table.RegistryTimings fields), from the topology's discovery.
    registry_timings: dict[str, float] = Field(default_factory=dict)
    dispatcher: DispatcherSettings = DispatcherSettings()
    replicas: Annotated[int, Field(ge=1, le=64)] = 1
    max_ongoing_requests: Annotated[int, Field(ge=1)] = 1000
    host: str = "127.0.0.1"
    grpc_port: Annotated[int, Field(ge=0, le=65535)] = 9000  # Ray Serve's gRPC proxy
    http_port: Annotated[int, Field(ge=0, le=65535)] = 8000  # Ray Serve's HTTP proxy
    # Each dispatcher replica also serves MeshService straight on grpc.aio (no Ray hop).
    # 0: any free port; a fixed port is used only with one replica.
    fast_path: bool = True
    fast_port: Annotated[int, Field(ge=0, le=65535)] = 0
    # ... and the OpenAI API straight on uvicorn (the HTTP fast path: no Ray hop); the same
    # rules for its port. Serve's HTTP proxy (`http_port`) stays the entry that scales.
    http_fast_path: bool = True
    http_fast_port: Annotated[int, Field(ge=0, le=65535)] = 0
    stream_window_s: Annotated[float, Field(ge=0)] = 0.03  # chunk batching through Serve
    ray_address: str | None = None  # None: start a local Ray
    num_cpus: float | None = None  # for a local Ray; None: all cores
    # The cluster's trust (mesh/cluster): with a directory, nodes are reached over mTLS and must
    # hold a certificate of its CA, and the ingress requires an API key (or a cluster
    # certificate). None: an open mesh, as `mesh demo`.
    cluster_dir: str | None = None
    # The join port (ClusterService: nodes join and renew there), on `host`, with a cluster.
    join_port: Annotated[int, Field(ge=0, le=65535)] = 9100
    # The audit summary, a JSON line per agent task (who asked, agent, tools, outcome; 0600),
    # which `mesh audit` reads. None: <cluster_dir>/audit.jsonl with a cluster directory, else
    # none; "": none; a path: there (the dispatcher replicas all append to it).
    audit_log: str | None = None

    @classmethod
    def from_topology(
        cls, topology: Topology | None, *, nodes: tuple[str, ...] = (), **overrides: object
    ) -> CoordinatorConfig:
        """The topology's settings (defaults without one), then non-None `overrides`."""
        from mesh.topology import default_topology

        if topology is None:
            topology = default_topology()
        coordinator, discovery = topology.coordinator, topology.discovery
        static = tuple(address for address in topology.static_addresses().values())
        values: dict[str, object] = dict(
            cluster=topology.cluster.name,
            static_nodes=tuple(dict.fromkeys(static + tuple(nodes))),
            mdns=discovery.mdns,
            registry_timings={
                "health_interval_s": discovery.health_interval_s,
                "probe_timeout_s": discovery.health_timeout_s,
                "suspect_timeout_s": discovery.gone_after_s,
            },
            dispatcher=DispatcherSettings.from_topology(topology),
            replicas=coordinator.replicas,
            max_ongoing_requests=coordinator.max_ongoing_requests,
            host=coordinator.host,
            grpc_port=coordinator.grpc_port,
            http_port=coordinator.http_port,
            ray_address=coordinator.ray_address,
            num_cpus=coordinator.num_cpus,
        )
        values.update({key: value for key, value in overrides.items() if value is not None})
        config = cls.model_validate(values)
        # The replica count is final only now (a command line may override the topology's).
        return config.model_copy(update={"dispatcher": config.dispatcher_settings()})

    @property
    def proxy_receive_limit_bytes(self) -> int:
        """The largest message Serve's gRPC proxy takes, and sends: the fast path's, but at
        least PROXY_MIN_MESSAGE_BYTES, as the same number caps its answers (ListNodes)."""
        return max(self.dispatcher.receive_limit_bytes, PROXY_MIN_MESSAGE_BYTES)

    def resolved_audit_log(self) -> str:
        """Where the audit summary goes ("": nowhere): `audit_log`, else the cluster dir's."""
        if self.audit_log is not None:
            return self.audit_log
        if self.cluster_dir:
            return str(pathlib.Path(self.cluster_dir) / AUDIT)
        return ""

    def dispatcher_settings(self) -> DispatcherSettings:
        """The dispatcher settings each replica runs with: capacity shared by `replicas`, and
        the audit summary's file."""
        return self.dispatcher.model_copy(
            update={"capacity_share": self.replicas, "audit_log": self.resolved_audit_log()}
        )
