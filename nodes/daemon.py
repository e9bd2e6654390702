"""The node daemon's lifecycle: check models, serve, load, advertise, drain, stop.

Order at start: model files are checked first (a missing or non-GGUF file fails
before anything listens); the server then listens with health NOT_SERVING while
models load, and turns SERVING only when every model is ready. On SIGINT or
SIGTERM: health NOT_SERVING, the mDNS goodbye, then in-flight requests get
`grace_s` to finish before the server stops.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Protocol, TextIO

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from edgemesh.v1 import node_pb2, node_pb2_grpc
from mesh.core import pki
from mesh.core.channels import (
    NODE_SERVER_OPTIONS,
    PLAINTEXT,
    add_server_port,
    create_server,
    format_address,
)
from mesh.core.errors import ConfigError
from mesh.core.ids import new_node_id
from mesh.core.records import is_loopback_address
from mesh.core.version import PROTOCOL_VERSION, __version__
from nodes.admission import AdmissionController
from nodes.backends import Backend
from nodes.backends.factory import build_backend
from nodes.backends.llama import LlamaBackend
from nodes.backends.onnx import BACKEND_NAME as ONNX_BACKEND
from nodes.capability import Capabilities, Capability, hardware_key, measure
from nodes.config import NodeConfig
from nodes.hardware import HardwareInfo, probe_hardware
from nodes.join import NodeTls, Renewal, enroll
from nodes.model_files import resolve_gguf
from nodes.model_manager import ModelManager
from nodes.router import ROUTER_ALIAS
from nodes.service import NodeIdentity, NodeServicer
from nodes.task_counts import JOURNAL_NAME, TaskCounts

logger = logging.getLogger(__name__)

NODE_SERVICE_NAME = node_pb2.DESCRIPTOR.services_by_name["NodeService"].full_name


class Announcer(Protocol):
    """What the daemon needs from an mDNS announcer (see nodes/announcer.py)."""

    async def start(self) -> None: ...
    async def refresh(self) -> None: ...
    async def stop(self) -> None: ...


AnnouncerFactory = Callable[["NodeDaemon"], Announcer]


def load_node_id(config: NodeConfig) -> str:
    """The node's id, kept in its state directory so that a restart keeps it."""
    directory = config.resolved_state_dir()
    path = directory / "node-id"
    try:
        existing = path.read_text(encoding="utf-8").strip()
        if existing:
            return existing
    except FileNotFoundError:
        pass
    except OSError as error:
        raise ConfigError(f"cannot read node id from {path}: {error.strerror}") from None
    node_id = new_node_id()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        path.write_text(node_id + "\n", encoding="utf-8")
    except OSError as error:
        logger.warning(
            "cannot keep node id in %s (%s); it will change on restart", path, error.strerror
        )
    return node_id


def open_task_counts(config: NodeConfig) -> TaskCounts:
    """The node's per-task counts, read back from its state directory's journal (if kept)."""
    journal = config.resolved_state_dir() / JOURNAL_NAME if config.task_journal else None
    return TaskCounts.open(kept=config.task_counts_kept, journal=journal)


def build_backends(config: NodeConfig) -> dict[str, Backend]:
    backends: dict[str, Backend] = {}
    for model in config.models:
        if model.kind in ("onnx", "openai"):  # ONNX Runtime / OpenAI-compatible upstream
            backends[model.id] = build_backend(model)
            continue
        resolve_gguf(model.source)  # fail now, before listening, on a bad file
        backends[model.id] = LlamaBackend(
            model.id,
            model.source,
            n_ctx=model.n_ctx,
            n_threads=model.n_threads,
            n_batch=model.n_batch,
            instances=model.instances,
            system_prompt=model.system_prompt,
            kv_cache=model.kv_cache,
            stream_interval_s=config.stream_interval_ms / 1000,
            max_rendered_bytes=config.rendered_limit_bytes(model),
            prefix_cache_mb=model.prefix_cache_mb,
        )
    if config.router is not None:  # the intent router (ONNX), served like any model
        backends[config.router.id] = build_backend(config.router)
    return backends


class CapabilityProbe:
    """A model's measured speeds on this node (nodes/capability.py): read back from the state
    dir when this file was measured on this hardware, else measured now."""

    def __init__(self, config: NodeConfig, say: Callable[[str], None]) -> None:
        self._threads = {m.id: m.n_threads for m in config.models}
        self._known = Capabilities(config.resolved_state_dir())
        self._say = say

    async def __call__(self, model_id: str, backend: Backend) -> Capability | None:
        sha = backend.descriptor.sha256
        if not sha or model_id not in self._threads:
            return None
        key = f"{sha}|{hardware_key(self._threads[model_id])}"
        known = self._known.get(key)
        if known is not None:
            return known
        began = time.perf_counter()
        measured = await measure(backend)
        self._known.put(key, measured)
        self._say(
            f"model {model_id} measured: {measured.prompt_tokens_per_s:g} prompt and "
            f"{measured.decode_tokens_per_s:g} decode tokens/s "
            f"(in {time.perf_counter() - began:.1f} s, kept for the next start)"
        )
        return measured


def model_manager(
    config: NodeConfig, backends: Mapping[str, Backend], say: Callable[[str], None]
) -> ModelManager:
    """The node's ModelManager: its GGUF models under the config's caps; ONNX models (the
    router) and upstreams always loaded."""
    gguf = {m.id for m in config.models if m.kind not in ("onnx", "openai")}
    return ModelManager(
        backends,
        pinned=frozenset(m.id for m in config.models if m.pinned),
        unmanaged=frozenset(m for m in backends if m not in gguf),
        max_loaded_models=config.max_loaded_models,
        max_model_memory_mb=config.max_model_memory_mb,
        idle_unload_s=config.idle_unload_s,
        say=say,
        measured=CapabilityProbe(config, say) if config.measure_capability else None,
    )


def serves_tensor_models(backends: Mapping[str, Backend]) -> bool:
    """Whether a model takes Infer's input tensors, which may be megabytes: an ONNX model other
    than the bundled intent router (which takes a string)."""
    router = (f"bundled:{ROUTER_ALIAS}", f"bundled {ROUTER_ALIAS} ")  # before and after load
    return any(
        b.descriptor.backend == ONNX_BACKEND and not b.descriptor.source.startswith(router)
        for b in backends.values()
    )


class NodeDaemon:
    def __init__(
        self,
        config: NodeConfig,
        *,
        backends: dict[str, Backend] | None = None,
        announcer_factory: AnnouncerFactory | None = None,
        progress: TextIO = sys.stderr,
    ) -> None:
        self.config = config
        self.backends = backends if backends is not None else build_backends(config)
        self.node_id = load_node_id(config)
        self.counts = open_task_counts(config)
        self.hardware: HardwareInfo | None = None
        self.admission = AdmissionController(config.max_concurrent, config.max_queued)
        # gRPC asyncio objects bind to the running loop: created in start().
        self.health: health.aio.HealthServicer | None = None
        self._server: grpc.aio.Server | None = None
        self.port = 0
        self.metrics_port = 0  # bound when config.metrics_port is set
        self._idle_unloader: asyncio.Task[None] | None = None
        self._renewal: asyncio.Task[None] | None = None
        self.tls: NodeTls | None = None  # the cluster membership, once enrolled
        self.servicer: NodeServicer | None = None
        self._announcer_factory = announcer_factory
        self._announcer: Announcer | None = None
        self._progress = progress
        self._stopping = asyncio.Event()
        self._stopped = False
        self.serving = asyncio.Event()

    @property
    def address(self) -> str:
        return format_address(self.config.host, self.port)

    def _say(self, text: str) -> None:
        print(text, file=self._progress, flush=True)

    async def _enroll(self) -> None:
        """Join the cluster (or use the membership kept): the node then serves mTLS only, as the
        cluster's name, with the token's labels added to its own."""
        config = self.config
        self.tls = await enroll(
            config.resolved_state_dir(),
            config.join_token_text(),
            node_id=self.node_id,
            node_name=config.name,
            coordinators=config.coordinator,
            timeout_s=config.join_timeout_s,
            interface=config.interface,
            say=self._say,
        )
        if self.tls is not None:
            labels = {**self.tls.labels, **config.labels}
            self.config = config.model_copy(update={"cluster": self.tls.cluster, "labels": labels})
        elif not config.insecure and not (
            config.host == "localhost" or is_loopback_address(config.host)
        ):
            self._say(
                f"WARNING: node {config.name} listens on {config.host} without cluster "
                "credentials: anyone on the network can use it. Join a cluster "
                "(`mesh cluster token`, then --join TOKEN), listen on 127.0.0.1, or pass "
                "--insecure to acknowledge this."
            )

    async def start(self) -> None:
        """Listen, load models, and turn SERVING. Raises ModelLoadError if a model fails."""
        await self._enroll()
        self.health = health.aio.HealthServicer()
        self._server = create_server(
            max_receive_bytes=self.config.receive_limit_bytes(
                tensor_models=serves_tensor_models(self.backends)
            ),
            max_concurrent_rpcs=self.config.rpc_limit,
            options=NODE_SERVER_OPTIONS,  # accepts the links' pings
            # In a cluster: the coordinator and the operator, never another node.
            peer_roles=(pki.ROLE_COORDINATOR, pki.ROLE_ADMIN) if self.tls else (),
        )
        # The probe (ONNX Runtime providers in a child process) runs while models load.
        probe = asyncio.create_task(asyncio.to_thread(probe_hardware))
        identity = NodeIdentity(
            node_id=self.node_id,
            name=self.config.name,
            cluster=self.config.cluster,
            version=__version__,
            protocol_version=PROTOCOL_VERSION,
            started_at_unix_s=time.time(),
        )
        self.models = model_manager(self.config, self.backends, self._say)
        self.servicer = NodeServicer(
            identity,
            self.config,
            self.backends,
            None,
            self.admission,
            counts=self.counts,
            models=self.models,
        )
        await self.servicer.agents.open()  # agents' data store: seeded on first start
        node_pb2_grpc.add_NodeServiceServicer_to_server(self.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (NODE_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        for service in ("", NODE_SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            self.port = add_server_port(
                self._server,
                format_address(self.config.host, self.config.port),
                self.tls.security if self.tls is not None else PLAINTEXT,
            )
        except RuntimeError as error:  # grpc raises RuntimeError when the port is taken
            raise ConfigError(
                f"cannot listen on {format_address(self.config.host, self.config.port)}: {error}; "
                "pick another --port (0 for any free port)"
            ) from None
        await self._server.start()
        if self.config.metrics_port is not None:
            self.metrics_port = self.servicer.metrics.serve(
                self.config.metrics_host, self.config.metrics_port
            )
            self._say(
                f"metrics on http://{format_address(self.config.metrics_host, self.metrics_port)}"
                "/metrics"
            )
        try:
            await self.models.start()
            self._idle_unloader = asyncio.create_task(self.models.run_idle_unloader())
        finally:
            self.hardware = self.servicer.hardware = await probe
        for service in ("", NODE_SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        if self.tls is not None:
            renewal = Renewal(self.tls, on_renewed=self.refresh_announcement)
            self._renewal = asyncio.create_task(renewal.run())
        self.serving.set()

    async def announce(self) -> None:
        """Advertise on mDNS (when configured); returns after probing, about a second."""
        if self.config.advertise and self._announcer_factory is not None:
            self._announcer = self._announcer_factory(self)
            await self._announcer.start()

    def request_stop(self) -> None:
        self._stopping.set()

    async def wait_stopped(self) -> None:
        await self._stopping.wait()

    async def stop(self) -> None:
        """NOT_SERVING, goodbye on mDNS, let in-flight requests finish within grace, stop."""
        if self._server is None or self.health is None or self._stopped:
            return
        self._stopped = True
        await self.health.enter_graceful_shutdown()
        if self._announcer is not None:
            try:
                await asyncio.wait_for(self._announcer.stop(), timeout=5)
            except TimeoutError:
                logger.warning("mDNS goodbye did not finish within 5 s")
        await self._server.stop(self.config.grace_s)
        if self._renewal is not None:
            self._renewal.cancel()
            await asyncio.gather(self._renewal, return_exceptions=True)
        if self._idle_unloader is not None:
            self._idle_unloader.cancel()
            await asyncio.gather(self._idle_unloader, return_exceptions=True)
        for backend in self.backends.values():
            await backend.close()
        self.counts.close()
        if self.servicer is not None:
            self.servicer.metrics.close()
            self.servicer.tracing.shutdown()

    async def refresh_announcement(self) -> None:
        if self._announcer is not None:
            await self._announcer.refresh()


async def run_daemon(daemon: NodeDaemon, *, ready_line: TextIO = sys.stdout) -> int:
    """Run until SIGINT/SIGTERM; print one line with the address once serving. Returns an exit code.

    A signal during model load stops the start (the node never turns SERVING); whatever
    happens, the server is stopped and the models released before returning.
    """
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, daemon.request_stop)
    stop_requested = asyncio.create_task(daemon.wait_stopped())
    try:
        if not await _unless_stopped(daemon.start(), stop_requested):
            print(f"node {daemon.config.name}: stopped before it was serving", file=sys.stderr)
            return 0
        models = ", ".join(daemon.backends)
        print(
            f"node {daemon.config.name} ({daemon.node_id}) serving {models} on {daemon.address}",
            file=ready_line,
            flush=True,
        )
        if await _unless_stopped(daemon.announce(), stop_requested):
            await stop_requested
        print(
            f"node {daemon.config.name} stopping: draining in-flight requests "
            f"(grace {daemon.config.grace_s:g} s)",
            file=sys.stderr,
            flush=True,
        )
        return 0
    finally:
        for sig in signals:  # from here a second signal ends the process at once
            loop.remove_signal_handler(sig)
        stop_requested.cancel()
        await daemon.stop()


async def _unless_stopped(
    work: Coroutine[Any, Any, None], stop_requested: asyncio.Task[None]
) -> bool:
    """Run `work` unless a stop comes first (then cancel it). True if it finished."""
    task = asyncio.create_task(work)
    await asyncio.wait({task, stop_requested}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # raise what the work raised
        return True
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return False
