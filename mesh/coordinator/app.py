"""The coordinator as a Ray Serve application: one node-table owner, N dispatcher replicas.

    NodeTableOwner (1 replica)       runs the NodeRegistry (mDNS + static nodes, health watches);
                                     answers long-polls for snapshots; knows the fast paths; with
                                     several replicas, keeps the TaskDirectory they share
                                     (one run per idempotency key, any task's record).
    MeshIngress (N replicas)         a Dispatcher each; MeshService for Serve's gRPC proxy, the
                                     OpenAI API for Serve's HTTP proxy, and both straight from
                                     the replica, no Ray hop: MeshService on grpc.aio (the fast
                                     path) and the OpenAI API on uvicorn (the HTTP fast path).

The dispatchers hold a snapshot of the node table, refreshed by long-poll (an answer as soon as
the table changes, at the latest every `_POLL_WAIT_S`): no Ray call happens per request. With a
cluster directory the ingress requires API keys (mesh/coordinator/access.py); their rate
counters are each replica's own with one replica, the owner's (one Ray call per task of a
limited key) with several, so that a key's limits hold across them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import uvicorn
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle

from edgemesh.v1 import mesh_pb2
from mesh.cluster.limits import RateLimiter, Refusal
from mesh.coordinator.access import AccessControl, LocalLimits
from mesh.coordinator.dispatch import Dispatcher
from mesh.coordinator.openai_api import build_openai_app
from mesh.coordinator.pool import grpc_connector
from mesh.coordinator.service import MeshHandlers, start_fast_path
from mesh.coordinator.settings import CoordinatorConfig
from mesh.coordinator.shared_tasks import Claim, Outcome, TaskDirectory
from mesh.coordinator.tasks import TaskRecord
from mesh.coordinator.trust import ClusterTrust, node_security
from mesh.core.channels import format_address
from mesh.core.errors import MeshError
from mesh.core.grpc_status import error_detail, set_error
from mesh.core.ids import TaskId
from mesh.core.tracing import incoming_traceparent
from mesh.nodes_view import NodeView
from mesh.observe.metrics import CoordinatorMetrics

logger = logging.getLogger("mesh.coordinator")

APP_NAME = "mesh"
# MeshService with deserializers that hand a request that does not decode to the ingress, which
# answers INVALID_ARGUMENT (gRPC's own would answer UNKNOWN): mesh/core/decoding.py.
MESH_SERVICER = "mesh.core.decoding.add_mesh_service"
_POLL_WAIT_S = 1.0  # longest a long-poll waits without a change
_POLL_RETRY_S = 0.2  # pause after a failed poll (the owner restarting)
_HTTP_START_S = 10.0  # longest uvicorn may take to serve on a socket already listening
_HTTP_GRACE_S = 1  # calls still open at shutdown get this long, as the gRPC fast path's


def _log_with_serve() -> None:
    """The project's warnings (a refused node, a dropped member) into this replica's Serve log
    (logs/serve/replica_mesh_*.log of Ray's session), where an operator finds the rest."""
    serve_logger = logging.getLogger("ray.serve")
    ours = logging.getLogger("mesh")
    for handler in serve_logger.handlers:
        if handler not in ours.handlers:
            ours.addHandler(handler)
    if ours.level == logging.NOTSET:
        ours.setLevel(logging.INFO)


class NodeTableOwner:
    """The one owner of the node table: a NodeRegistry, and a version bumped on every event."""

    # Ray Serve awaits an async constructor of a deployment; mypy allows only a plain one.
    async def __init__(self, config: CoordinatorConfig) -> None:  # type: ignore[misc]
        from mesh.node_table import RegistryTimings
        from mesh.registry import NodeRegistry

        browser = None
        if config.mdns:
            from mesh.discovery.browser import MdnsBrowser

            browser = MdnsBrowser()
        _log_with_serve()
        trust = ClusterTrust.open(config)
        self.trust = trust
        self.registry = NodeRegistry(
            cluster=trust.authority.name if trust else config.cluster,
            static_addresses=config.static_nodes,
            browser=browser,
            timings=RegistryTimings(**config.registry_timings),
            prober=trust.prober() if trust else None,
            admit=trust.admit if trust else None,
        )
        self.version = 0
        self._changed = asyncio.Event()
        self._fast_paths: dict[str, str] = {}
        self._http_fast_paths: dict[str, str] = {}
        self.tasks = TaskDirectory(config.dispatcher.ledger_size)
        self.registry.subscribe(self._on_event)
        await self.registry.start()
        if trust is not None:
            await trust.start(self.registry, config)

    def _on_event(self, _event: object) -> None:
        self.version += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def snapshot(self, since_version: int, wait_s: float) -> tuple[int, list[NodeView]]:
        """The table once its version differs from `since_version`, or after `wait_s`."""
        if self.version == since_version:
            try:
                async with asyncio.timeout(wait_s):
                    await self._changed.wait()
            except TimeoutError:
                pass  # no change: answer with the same version, the caller polls again
        return self.version, self.registry.snapshot()

    def add_node(self, address: str) -> None:
        self.registry.add_static(address)

    def register_fast_path(self, replica: str, address: str) -> None:
        self._fast_paths[replica] = address

    def fast_paths(self) -> list[str]:
        return sorted(self._fast_paths.values())

    def register_http_fast_path(self, replica: str, base_url: str) -> None:
        self._http_fast_paths[replica] = base_url

    def http_fast_paths(self) -> list[str]:
        return sorted(self._http_fast_paths.values())

    # The TaskDirectory, for dispatcher replicas (mesh/coordinator/shared_tasks.py).

    def claim_task(self, key: str, token: str, task_id: TaskId, ttl_s: float, owner: str) -> Claim:
        return self.tasks.claim(key, token, task_id, ttl_s, owner)

    def settle_task(self, key: str, token: str, outcome: Outcome) -> None:
        self.tasks.settle(key, token, outcome)

    async def task_outcome(self, key: str, token: str, wait_s: float) -> Outcome | None:
        return await self.tasks.outcome(key, token, wait_s)

    def publish_tasks(self, records: list[TaskRecord]) -> None:
        self.tasks.publish(records)

    def task_record(self, task_id: str, reader: str | None) -> TaskRecord | None:
        return self.tasks.record(task_id, reader)

    def refusals(self) -> list[dict[str, object]]:
        """Nodes refused (not members, failed handshakes, revoked...), newest last."""
        return list(self.registry.refusals)

    def join_address(self) -> str:
        """host:port of the join port ("" in an open mesh)."""
        return self.trust.join_address if self.trust is not None else ""

    async def __del__(self) -> None:
        if self.trust is not None:
            await self.trust.stop()
        await self.registry.stop()

    # API keys' rate limits, shared by the dispatcher replicas (`_OwnerLimits`). Made on first
    # use, so that the constructor knows nothing of them.

    _limiter: RateLimiter | None = None

    def _rate_limiter(self) -> RateLimiter:
        if self._limiter is None:
            self._limiter = RateLimiter()
        return self._limiter

    def limit_admit(self, key: str, rpm: int | None, tpm: int | None) -> Refusal | None:
        return self._rate_limiter().admit(key, rpm, tpm)

    def limit_spend(self, key: str, tokens: int) -> None:
        self._rate_limiter().spend(key, tokens)


class _OwnerLimits:
    """The rate counters in the owner, reached through its deployment handle: one count for
    all replicas. A finished task's tokens are sent without waiting for the answer."""

    def __init__(self, owner: DeploymentHandle) -> None:
        self._owner = owner
        self._sending: set[asyncio.Task[None]] = set()

    async def admit(self, key: str, rpm: int | None, tpm: int | None) -> Refusal | None:
        return await self._owner.limit_admit.remote(key, rpm, tpm)

    def spend(self, key: str, tokens: int) -> None:
        sending = asyncio.get_running_loop().create_task(self._spend(key, tokens))
        self._sending.add(sending)
        sending.add_done_callback(self._sending.discard)

    async def _spend(self, key: str, tokens: int) -> None:
        try:
            await self._owner.limit_spend.remote(key, tokens)
        except Exception as error:  # Ray raises many kinds while the owner restarts
            logger.warning("could not count %d tokens of an API key: %s", tokens, error)


class _OwnerDirectory:
    """The TaskDirectory in the owner, reached through its deployment handle."""

    def __init__(self, owner: DeploymentHandle) -> None:
        self._owner = owner

    async def claim(self, key: str, token: str, task_id: TaskId, ttl_s: float, owner: str) -> Claim:
        return await self._owner.claim_task.remote(key, token, task_id, ttl_s, owner)

    async def settle(self, key: str, token: str, outcome: Outcome) -> None:
        await self._owner.settle_task.remote(key, token, outcome)

    async def outcome(self, key: str, token: str, wait_s: float) -> Outcome | None:
        return await self._owner.task_outcome.remote(key, token, wait_s)

    async def publish(self, records: list[TaskRecord]) -> None:
        await self._owner.publish_tasks.remote(records)

    async def record(self, task_id: str, reader: str | None) -> TaskRecord | None:
        return await self._owner.task_record.remote(task_id, reader)


class _ReplicaServer(uvicorn.Server):
    """uvicorn without its signal handlers: the replica's process and its signals are Ray's."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on `host`:`port` (0: any free port). Bound here rather than by
    uvicorn, which answers a port already taken with SystemExit, not the OSError raised here."""
    loop = asyncio.get_running_loop()
    family, *_rest, address = (
        await loop.getaddrinfo(
            host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    )[0]
    return socket.create_server(address[:2], family=family, backlog=2048)


class HttpFastPath:
    """An ASGI app served by uvicorn on the running loop: the HTTP twin of `start_fast_path`.

    `await HttpFastPath.start(app, host, port)` listens (port 0: any free one; `.port` says
    which); `await stop()` ends it, calls still open getting `_HTTP_GRACE_S`."""

    def __init__(self, server: uvicorn.Server, serving: asyncio.Task[None]) -> None:
        self._server = server
        self._serving = serving
        self.port = int(server.servers[0].sockets[0].getsockname()[1])

    @classmethod
    async def start(cls, app: Any, host: str, port: int, *, max_connections: int) -> HttpFastPath:
        listener = await _listen(host, port)
        config = uvicorn.Config(
            app,
            log_config=None,  # the replica's logging stays Ray's; only uvicorn's levels set
            log_level="warning",
            access_log=False,
            lifespan="off",
            proxy_headers=False,  # no proxy in front: the peer is the client
            limit_concurrency=max_connections,  # beyond: 503, as gRPC's max_concurrent_rpcs
            timeout_graceful_shutdown=_HTTP_GRACE_S,
        )
        server = _ReplicaServer(config)
        serving = asyncio.get_running_loop().create_task(server.serve(sockets=[listener]))
        try:
            async with asyncio.timeout(_HTTP_START_S):
                while not server.started:
                    if serving.done():  # its error, or the reason it ended
                        serving.result()
                        raise RuntimeError("uvicorn stopped before it served")
                    await asyncio.sleep(0.005)
        except BaseException:
            serving.cancel()
            listener.close()
            raise
        return cls(server, serving)

    async def stop(self) -> None:
        self._server.should_exit = True  # seen within uvicorn's 0.1 s tick
        try:
            await asyncio.wait_for(self._serving, _HTTP_GRACE_S + 1.0)
        except TimeoutError:  # wait_for cancelled it: the calls still open are cut
            logger.warning("the HTTP fast path did not stop in time; its calls were cut")


class MeshIngress:
    """One dispatcher replica: MeshService (Serve gRPC proxy and fast path) and the OpenAI API
    (Serve HTTP proxy and HTTP fast path)."""

    # Ray Serve awaits an async constructor of a deployment; mypy allows only a plain one.
    async def __init__(self, owner: DeploymentHandle, config: CoordinatorConfig) -> None:  # type: ignore[misc]
        self._owner = owner
        self._config = config
        directory = _OwnerDirectory(owner) if config.replicas > 1 else None
        replica = str(serve.get_replica_context().replica_id.unique_id)
        self.dispatcher = Dispatcher(
            config.dispatcher_settings(),
            directory=directory,
            metrics=CoordinatorMetrics(replica),  # each replica its own (mesh/observe/metrics.py)
            connect=grpc_connector(node_security(config)),  # mTLS to nodes in a cluster
        )
        self.access = _access(owner, config)
        self.handlers = MeshHandlers(
            self.dispatcher, stream_window_s=config.stream_window_s, access=self.access
        )
        self._version = -1
        await self._poll_once(wait_s=0.0)
        self._poller = asyncio.get_running_loop().create_task(self._poll_forever())
        self._fast_server: grpc.aio.Server | None = None
        self._http_fast_path: HttpFastPath | None = None
        if config.fast_path:
            port = config.fast_port if config.replicas == 1 else 0
            direct = MeshHandlers(self.dispatcher, stream_window_s=0.0, access=self.access)
            self._fast_server, bound = await start_fast_path(
                direct,
                format_address(config.host, port),
                max_concurrent_rpcs=config.max_ongoing_requests,
            )
            replica = str(serve.get_replica_context().replica_id)
            await owner.register_fast_path.remote(replica, format_address(config.host, bound))
        if config.http_fast_path:
            await self._start_http_fast_path()

    async def _start_http_fast_path(self) -> None:
        """The OpenAI API straight on uvicorn. Its own app over this replica's dispatcher (the
        same ledger and traces as Serve's), with no chunk batching: like the gRPC fast path,
        no Ray hop per chunk to save."""
        config = self._config
        app = build_openai_app(
            self.dispatcher,
            stream_window_s=0.0,
            info=self._info,
            access=self.access,
            refusals=self._refusals,
        )
        self._http_fast_path = await HttpFastPath.start(
            app,
            config.host,
            config.http_fast_port if config.replicas == 1 else 0,
            max_connections=config.max_ongoing_requests,
        )
        address = format_address(config.host, self._http_fast_path.port)
        replica = str(serve.get_replica_context().replica_id)
        await self._owner.register_http_fast_path.remote(replica, f"http://{address}/v1")

    async def _poll_once(self, wait_s: float) -> None:
        version, views = await self._owner.snapshot.remote(self._version, wait_s)
        if version != self._version:
            self._version = version
            self.dispatcher.update_nodes(views)

    async def _poll_forever(self) -> None:
        failing = False  # logged once per outage, not every _POLL_RETRY_S
        while True:
            try:
                await self._poll_once(_POLL_WAIT_S)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # Ray raises many kinds while the owner restarts
                if not failing:
                    logger.warning(
                        "node table poll failed (%s); keeping the last snapshot "
                        "until it answers again",
                        error,
                    )
                failing = True
                await asyncio.sleep(_POLL_RETRY_S)
                continue
            if failing:
                logger.warning("node table poll answers again")
                failing = False

    # -------------------------------------------------------------- gRPC (Serve's proxy)

    async def Submit(
        self, request: mesh_pb2.SubmitRequest, grpc_context: RayServegRPCContext
    ) -> mesh_pb2.SubmitResponse:
        try:
            caller = self.handlers.caller_of(grpc_context)
            parent = incoming_traceparent(grpc_context)
            return await self.handlers.submit(request, traceparent=parent, caller=caller)
        except MeshError as error:
            set_error(grpc_context, error)  # the proxy sends code, message and trailer
            return mesh_pb2.SubmitResponse()

    async def SubmitStream(
        self, request: mesh_pb2.SubmitRequest, grpc_context: RayServegRPCContext
    ) -> AsyncIterator[mesh_pb2.SubmitChunk]:
        sent = 0
        try:
            caller = self.handlers.caller_of(grpc_context)
            parent = incoming_traceparent(grpc_context)
            chunks = self.handlers.submit_stream(request, traceparent=parent, caller=caller)
            async with contextlib.aclosing(chunks):  # the node freed, its tokens counted at once
                async for chunk in chunks:
                    yield chunk
                    sent += 1
        except MeshError as error:
            # The proxy takes a stream's status (code, message, trailer) from the context that
            # comes with a message; raising instead would keep the code and message but drop
            # the trailer, and with it the ErrorDetail. So one last chunk goes out with the
            # status, carrying the error itself as well; the stream then ends with its code.
            set_error(grpc_context, error)
            yield mesh_pb2.SubmitChunk(index=sent, error=error_detail(error))

    async def ListNodes(
        self, request: mesh_pb2.ListNodesRequest, grpc_context: RayServegRPCContext
    ) -> mesh_pb2.ListNodesResponse:
        try:
            return self.handlers.list_nodes(caller=self.handlers.caller_of(grpc_context))
        except MeshError as error:
            set_error(grpc_context, error)
            return mesh_pb2.ListNodesResponse()

    async def DescribeTask(
        self, request: mesh_pb2.DescribeTaskRequest, grpc_context: RayServegRPCContext
    ) -> mesh_pb2.TaskRecord:
        try:
            caller = self.handlers.caller_of(grpc_context)
            return await self.handlers.describe_task(request, caller=caller)
        except MeshError as error:
            set_error(grpc_context, error)
            return mesh_pb2.TaskRecord()

    # -------------------------------------------------------------- HTTP (Serve's proxy)

    def __serve_build_asgi_app__(self) -> Any:
        return build_openai_app(
            self.dispatcher,
            stream_window_s=self._config.stream_window_s,
            info=self._info,
            access=self.access,
            refusals=self._refusals,
        )

    async def _refusals(self) -> list[dict[str, Any]]:
        return list(await self._owner.refusals.remote())

    async def _info(self) -> dict[str, Any]:
        return {
            "fast_paths": await self._owner.fast_paths.remote(),
            "http_fast_paths": await self._owner.http_fast_paths.remote(),
            "replicas": self._config.replicas,
            "cluster": self._config.cluster,
        }

    async def __del__(self) -> None:
        self._poller.cancel()
        if self._http_fast_path is not None:
            await self._http_fast_path.stop()
        if self._fast_server is not None:
            await self._fast_server.stop(1.0)
        await self.dispatcher.close()


def _access(owner: DeploymentHandle, config: CoordinatorConfig) -> AccessControl | None:
    """API keys from the cluster directory (None: an open mesh); the rate counters this
    replica's own, or the owner's when there are several replicas."""
    if config.cluster_dir is None:
        return None
    limits = _OwnerLimits(owner) if config.replicas > 1 else LocalLimits()
    access = AccessControl.for_cluster_dir(config.cluster_dir, limits)
    logger.info("the ingress requires API keys: %d valid in %s", len(access.keys), access.keys.path)
    return access


def build_app(config: CoordinatorConfig) -> serve.Application:
    """The Serve application: bind the owner into the ingress replicas."""
    # The decorator form: Ray annotates `serve.deployment` only as a decorator factory.
    owner = serve.deployment(name="NodeTableOwner")(NodeTableOwner).options(
        num_replicas=1, max_ongoing_requests=10_000, ray_actor_options={"num_cpus": 0}
    )
    ingress_class = serve.ingress()(MeshIngress)
    ingress = serve.deployment(name="MeshIngress")(ingress_class).options(
        num_replicas=config.replicas,
        max_ongoing_requests=config.max_ongoing_requests,
        ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(owner.bind(config), config)
