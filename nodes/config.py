"""Node configuration: a YAML file, overridden by command-line flags."""

from __future__ import annotations

import os
import pathlib
import socket
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, SecretStr, ValidationError, model_validator

from mesh.core.bounds import (
    DEFAULT_MAX_MESSAGES,
    DEFAULT_MAX_PROMPT_BYTES,
    receive_limit_bytes,
    rendered_limit_bytes,
)
from mesh.core.errors import ConfigError
from mesh.core.model import FrozenModel
from nodes.agents.spec import AgentSpec
from nodes.cpu_limits import usable_cpu_count
from nodes.router import ROUTER_ALIAS

Port = Annotated[int, Field(ge=0, le=65535)]
DEFAULT_PORT = 50051
TENSOR_REQUEST_BYTES = 16 * 1024 * 1024  # receive limit of a node serving ONNX tensor models
RPC_HEADROOM = 64  # calls beyond admission's: coordinators' health watches, Describe, Classify


def _default_threads() -> int:
    return usable_cpu_count()


class ModelConfig(FrozenModel):
    """One model the node serves."""

    # Starts with a letter or digit: the form mDNS records carry (mesh/core/records.py).
    id: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")]
    # "bundled:smollm2", a path to a .gguf file, or a known alias ("smollm2");
    # for kind onnx "bundled:intent-router" or a .onnx path; unused for kind openai.
    source: str = ""
    n_ctx: Annotated[int, Field(ge=128, le=131072)] = 2048
    n_threads: Annotated[int, Field(ge=1, le=256)] = Field(default_factory=_default_threads)
    n_batch: Annotated[int, Field(ge=8, le=8192)] = 256
    instances: Annotated[int, Field(ge=1, le=16)] = 1
    # KV cache precision: q8_0 (with flash attention) halves its memory at no
    # measurable quality or speed cost on the bundled model; f16 is llama.cpp's default.
    kv_cache: Literal["f16", "q8_0"] = "q8_0"
    # Used when a chat has no system message. Small models answer far better with
    # a plain one than with their template's built-in default.
    system_prompt: str | None = "You are a helpful assistant."
    # ---- model kinds (nodes/backends/onnx.py, nodes/backends/openai_upstream.py)
    # gguf: llama.cpp; onnx: ONNX Runtime; openai: an OpenAI-compatible server the
    # node fronts. Omitted: openai when base_url is set, onnx for a .onnx or bundled
    # ONNX source, else gguf. For onnx, n_threads is ONNX Runtime's intra-op threads
    # and instances the runs at once.
    kind: Literal["gguf", "onnx", "openai"] | None = None
    providers: tuple[str, ...] = ()  # onnx: execution providers, best first; (): by hardware
    base_url: str | None = None  # openai: e.g. http://127.0.0.1:11434/v1
    remote_model: str | None = None  # openai: the upstream's name for it; None: id
    # openai: the NAME of the environment variable holding the API key (never the key).
    api_key_env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = None
    request_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 120.0  # openai: between chunks
    # openai: how a continuation is asked for (see nodes/backends/openai_upstream.py).
    continuation_mode: Literal["prefill", "continue_final_message"] = "prefill"
    # openai: how a JSON schema is sent (json_object: llama-cpp-python's server).
    response_format: Literal["json_schema", "json_object"] = "json_schema"
    # Kept loaded whatever the caps and idle_unload_s say (nodes/model_manager.py).
    pinned: bool = False
    # gguf: warm prefixes, the KV states of recent prompts kept per context, so that an agent's
    # long fixed prefix is evaluated once (nodes/backends/prefix_states.py); 0: off.
    prefix_cache_mb: Annotated[int, Field(ge=0, le=65536)] = 64

    @model_validator(mode="before")
    @classmethod
    def _infer_kind(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("kind") is None:
            source = str(data.get("source") or "")
            kind = (
                "openai" if data.get("base_url") else "onnx" if _is_onnx_source(source) else "gguf"
            )
            data = {**data, "kind": kind}
        return data

    @model_validator(mode="after")
    def _check_kind(self) -> ModelConfig:
        if self.kind == "openai":
            if not self.base_url:
                raise ValueError("base_url: an openai model needs the server's URL")
            if self.source:
                raise ValueError("source: an openai model has base_url instead of source")
            url = urllib.parse.urlsplit(self.base_url)
            if url.scheme not in ("http", "https") or not url.hostname:
                raise ValueError(f"base_url: {self.base_url!r} is not an http(s) URL")
            if url.username or url.password:
                raise ValueError(
                    "base_url: must not contain credentials; put the API key in an "
                    "environment variable and name it in api_key_env"
                )
        elif not self.source:
            raise ValueError(f"source: a {self.kind} model needs a source")
        elif self.base_url or self.api_key_env or self.remote_model:
            raise ValueError("base_url, remote_model and api_key_env are for openai models only")
        return self


def _is_onnx_source(source: str) -> bool:
    return source.removeprefix("bundled:") == ROUTER_ALIAS or source.lower().endswith(".onnx")


def _is_bundled_router(model: object) -> bool:
    """Whether a `models` entry (a ModelConfig or its mapping) is the bundled intent router."""
    if isinstance(model, ModelConfig):
        model = {"id": model.id, "source": model.source}
    if not isinstance(model, dict):
        return False
    return model.get("id") == ROUTER_ALIAS or model.get("source") == f"bundled:{ROUTER_ALIAS}"


def default_router_config() -> ModelConfig:
    """The bundled intent router: one thread, CPU (a string model gains nothing from a GPU)."""
    return ModelConfig(
        id=ROUTER_ALIAS,
        source=f"bundled:{ROUTER_ALIAS}",
        kind="onnx",
        n_threads=1,
        providers=("CPUExecutionProvider",),
    )


class NodeConfig(FrozenModel):
    """Everything a node daemon needs; defaults give a node serving the bundled model."""

    name: Annotated[str, Field(min_length=1, max_length=63)] = Field(
        default_factory=lambda: socket.gethostname().split(".")[0] or "node"
    )
    cluster: Annotated[str, Field(min_length=1, max_length=63)] = "default"
    host: str = "0.0.0.0"
    port: Port = DEFAULT_PORT
    models: tuple[ModelConfig, ...] = (ModelConfig(id="smollm2", source="bundled:smollm2"),)
    default_model: str | None = None
    max_concurrent: Annotated[int, Field(ge=1, le=256)] = 1
    max_queued: Annotated[int, Field(ge=0, le=10_000)] = 8
    max_prompt_bytes: Annotated[int, Field(ge=1, le=16 * 1024 * 1024)] = DEFAULT_MAX_PROMPT_BYTES
    # ---- bounded cost (mesh/core/bounds.py): refused before any rendering or tokenizing
    max_messages: Annotated[int, Field(ge=1, le=100_000)] = DEFAULT_MAX_MESSAGES
    # The largest gRPC message the server takes (refused unread beyond); None: from the prompt
    # limits (`receive_limit_bytes`), or 16 MiB when a tensor model (ONNX, not the router) is served
    max_request_bytes: Annotated[int, Field(ge=4096, le=256 * 1024 * 1024)] | None = None
    # Calls the server takes at once (more are refused); None: admission's places plus
    # RPC_HEADROOM (health watches, Describe, Classify).
    max_concurrent_rpcs: Annotated[int, Field(ge=1, le=100_000)] | None = None
    default_max_tokens: Annotated[int, Field(ge=1)] = 256
    default_temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.7
    # Streamed text is sent at most this often after the first token (0: every token).
    stream_interval_ms: Annotated[float, Field(ge=0.0, le=1000.0)] = 25.0
    # Prometheus `/metrics` (nodes/metrics.py) on this HTTP port; None: off, 0: any free port
    # (the daemon logs the one it bound). Loopback by default: metrics_host to expose it.
    metrics_port: Annotated[int, Field(ge=0, le=65535)] | None = None
    metrics_host: str = "127.0.0.1"
    # Models on demand (nodes/model_manager.py): what may be resident at once (None: no cap),
    # the least recently used unloaded to make room; a model nobody asked for this long is
    # unloaded (None: never). Pinned models always stay.
    # Measure each GGUF model's prompt and decode speed at its first load on this hardware
    # (a second or so; kept in the state dir) and advertise them (nodes/capability.py).
    measure_capability: bool = True
    max_loaded_models: Annotated[int, Field(ge=1, le=1000)] | None = None
    max_model_memory_mb: Annotated[int, Field(ge=1)] | None = None
    idle_unload_s: Annotated[float, Field(gt=0)] | None = None
    # Traces (mesh/core/tracing.py): the share of traces that begin on this node to record
    # (a request with a sampled `traceparent` is recorded whatever this says); the node keeps
    # its recent spans for GetTrace, and also exports them over OTLP/gRPC to otlp_endpoint.
    trace_sample_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0
    otlp_endpoint: str = ""
    grace_s: Annotated[float, Field(ge=0.0, le=600.0)] = 10.0
    advertise: bool = True
    interface: str | None = None  # IP of the interface to advertise on; None: all
    labels: dict[str, str] = Field(default_factory=dict)
    state_dir: str | None = None  # where the node id is kept; None: ~/.local/state/...
    # ---- cluster membership (nodes/join.py): a join token (`mesh cluster token`), given here,
    # in a file (join_token_file, readable by its owner only), or with --join. Used once: the
    # certificate it gets is kept in <state_dir>/tls and used at every start after.
    join_token: SecretStr | None = None
    join_token_file: str | None = None
    # The coordinator's join port(s), host:port; empty: found on mDNS by the token's CA.
    coordinator: tuple[str, ...] = ()
    join_timeout_s: Annotated[float, Field(gt=0, le=600)] = 15.0
    # Listening beyond loopback without cluster credentials: say so loudly at start, unless
    # this acknowledges that anyone on the network may use the node.
    insecure: bool = False
    # What the node did per task id (Describe with task_counts; nodes/task_counts.py): kept
    # for this many recent task ids, and journaled in <state_dir>/task-counts.jsonl so that
    # the counts survive a crash or restart (false: in memory only).
    task_counts_kept: Annotated[int, Field(ge=1, le=1_000_000)] = 4096
    task_journal: bool = True
    # ---- agents (nodes/agents, nodes/tools)
    # The agents offered; None: the demo agents (customer-service, technical-support, scheduling).
    agents: tuple[AgentSpec, ...] | None = None
    # Python modules whose top-level `@tool`s and `Agent(...)`s are added.
    agent_modules: tuple[str, ...] = ()
    # Datasets this node holds; None: the demo store's, plus those of agent_modules' tools.
    datasets: tuple[str, ...] | None = None
    data_dir: str | None = None  # the agents' SQLite store; None: <state_dir>/data
    # ---- intent router (nodes/router): the classifier Classify uses by default and
    # `--agent auto` relies on. On by default (688 KiB model, ~0.2 ms an answer, ~43 MB RSS
    # for onnxruntime and its session: docs/BENCHMARKS.md), so intent routing works out of
    # the box; `router: null` (or `mesh node start --no-router`) turns it off. Left out when
    # a model of the node already is the bundled router.
    router: ModelConfig | None = None
    # The audit log (nodes/audit.py): a JSON line per agent step this node runs, appended to
    # <state_dir>/audit.jsonl (0600): time, task, key name and subject (who asked), agent,
    # tool, side effects, outcome; never the key, tool arguments, results or the user's text.
    # false: no audit log.
    audit_log: bool = True
    # ---- a node from the topology (`mesh node start --topology FILE --node NAME`): the values
    # above are built from that node's entry (name, cluster, port, labels, capacity, threads,
    # models, agents); keys of this file and flags override them. A relative `topology` is
    # relative to this file's folder. stand_ins: a `path:` model whose file is missing is
    # served by the bundled smollm2, and an agent's tool this node lacks is left out, each
    # logged as a `stand-in:` warning (a simulation has not everything a real device has);
    # without it, those are errors.
    topology: str | None = None
    topology_node: str | None = None
    stand_ins: bool = False

    @model_validator(mode="before")
    @classmethod
    def _default_router(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "router" in data:
            return data
        models = data.get("models", ())
        if any(_is_bundled_router(model) for model in models or ()):
            return data
        return {**data, "router": default_router_config()}

    @model_validator(mode="after")
    def _check_models(self) -> NodeConfig:
        ids = [m.id for m in self.models]
        if self.router is not None:
            if self.router.kind != "onnx":
                raise ValueError("router: must be an onnx model (e.g. bundled:intent-router)")
            if self.router.id in ids:
                raise ValueError(f"router: id {self.router.id!r} is also one of the models")
        if not ids:
            raise ValueError("models: at least one model is required")
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"models: duplicate model id(s) {', '.join(duplicates)}")
        if self.default_model is not None and self.default_model not in ids:
            raise ValueError(
                f"default_model: {self.default_model!r} is not one of the models ({', '.join(ids)})"
            )
        return self

    @property
    def default_model_id(self) -> str:
        return self.default_model or self.models[0].id

    def receive_limit_bytes(self, *, tensor_models: bool) -> int:
        """The largest gRPC message the node's server takes: `max_request_bytes`, or from the
        prompt limits, or TENSOR_REQUEST_BYTES with `tensor_models` (Infer's input tensors)."""
        if self.max_request_bytes is not None:
            return self.max_request_bytes
        limit = receive_limit_bytes(self.max_prompt_bytes, self.max_messages)
        return max(limit, TENSOR_REQUEST_BYTES) if tensor_models else limit

    @property
    def rpc_limit(self) -> int:
        """The calls the node's server takes at once (`max_concurrent_rpcs`, or derived)."""
        if self.max_concurrent_rpcs is not None:
            return self.max_concurrent_rpcs
        return self.max_concurrent + self.max_queued + RPC_HEADROOM

    def rendered_limit_bytes(self, model: ModelConfig) -> int:
        """The longest prompt `model`'s chat template may render; checked before tokenizing."""
        return rendered_limit_bytes(
            self.max_prompt_bytes, self.max_messages, model.system_prompt or ""
        )

    def resolved_state_dir(self) -> pathlib.Path:
        if self.state_dir:
            return pathlib.Path(self.state_dir)
        base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
        return pathlib.Path(base) / "edge-agent-mesh" / "nodes" / self.name

    def join_token_text(self) -> str | None:
        """The join token, from the config or its file (never logged, never in errors)."""
        if self.join_token is not None:
            return self.join_token.get_secret_value()
        if not self.join_token_file:
            return None
        path = pathlib.Path(self.join_token_file)
        try:
            if path.stat().st_mode & 0o077:
                raise ConfigError(
                    f"{path}: a join token file must be readable by its owner only (chmod 600)"
                )
            return path.read_text(encoding="utf-8").strip()
        except OSError as error:
            raise ConfigError(f"{path}: cannot read the join token: {error.strerror}") from None

    def resolved_data_dir(self) -> pathlib.Path:
        return pathlib.Path(self.data_dir) if self.data_dir else self.resolved_state_dir() / "data"


def model_config_from_flag(value: str, *, n_threads: int | None = None) -> ModelConfig:
    """A ModelConfig from `--model ALIAS_OR_PATH`."""
    model_id = pathlib.Path(value).stem.lower() if value.endswith(".gguf") else value
    model_id = "".join(c if c.isalnum() or c in "._:-" else "-" for c in model_id)
    model_id = model_id.lstrip("._:-")[:64] or "model"
    if n_threads:
        return ModelConfig(id=model_id, source=value, n_threads=n_threads)
    return ModelConfig(id=model_id, source=value)


def _format_validation_error(path: str, error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        location = ".".join(str(p) for p in item["loc"]) or "(top level)"
        lines.append(f"{path}: {location}: {item['msg']}")
    return "\n".join(lines)


def read_node_config_file(path: str) -> dict[str, Any]:
    """The keys of a node config file, unvalidated; ConfigError if unreadable or not a mapping."""
    try:
        with open(path, encoding="utf-8") as handle:
            loaded = yaml.safe_load(handle)
    except OSError as error:
        raise ConfigError(f"{path}: cannot read node config: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the node config must be a mapping of keys to values")
    return dict(loaded or {})


# (topology file, node name, stand_ins, the config's other keys) -> NodeConfig values of that
# node (mesh/topology/node_config.py: nodes/ does not read topologies itself).
TopologyValues = Callable[[str, str, bool, Mapping[str, Any]], dict[str, Any]]


def load_node_config(
    path: str | None, *, from_topology: TopologyValues | None = None, **overrides: object
) -> NodeConfig:
    """Read `path` (YAML; None: defaults) and apply non-None `overrides`; ConfigError on any problem.

    With `topology` and `topology_node` (in the file or the overrides) the node's entry in that
    topology, turned into values by `from_topology`, comes first; the file and then the
    overrides go over it."""
    data: dict[str, Any] = read_node_config_file(path) if path else {}
    source = path or "(command line)"
    if path and isinstance(data.get("topology"), str) and overrides.get("topology") is None:
        # A topology named in the file is found next to the file, wherever the node starts.
        data["topology"] = str(pathlib.Path(path).parent / os.path.expanduser(data["topology"]))
    data.update({k: v for k, v in overrides.items() if v is not None})
    if data.get("topology") is not None or data.get("topology_node") is not None:
        data = {**_topology_values(data, source, from_topology), **data}
    try:
        return NodeConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(source, error)) from None


def _topology_values(
    data: Mapping[str, Any], source: str, from_topology: TopologyValues | None
) -> dict[str, Any]:
    topology, node, stand_ins = (
        data.get("topology"),
        data.get("topology_node"),
        data.get("stand_ins"),
    )
    if not isinstance(topology, str) or not topology:
        raise ConfigError(
            f"{source}: topology_node {node!r} needs the topology file it is in: "
            "`topology: FILE` (or --topology FILE)"
        )
    if not isinstance(node, str) or not node:
        raise ConfigError(
            f"{source}: topology {topology}: which of its nodes is this one? Name it with "
            "`topology_node: NAME` (or --node NAME)"
        )
    if not isinstance(stand_ins, bool | None):
        raise ConfigError(f"{source}: stand_ins: must be true or false (got {stand_ins!r})")
    if from_topology is None:
        raise ConfigError(
            f"{source}: a node from a topology is built by `mesh node start`; "
            "this caller cannot read topologies"
        )
    return from_topology(topology, node, bool(stand_ins), data)
