"""A small live mesh to throw hostile input at (tests/integration/test_hostile_fuzz.py and
bench/bench_hostile.py).

Two node daemons with a fake backend (or one with the bundled model) on 127.0.0.1 port 0, a
dispatcher over them with its gRPC fast path and the OpenAI HTTP ingress (uvicorn), all on the
caller's event loop. Every node counts the RPCs it receives and the handler exceptions that
were not a status on purpose (what a caller would see as UNKNOWN), so a test can tell a request
that was retried from one that was not, and a node-side crash hidden behind a coordinator's
retry from a clean refusal.

    async with HostileMesh.started(tmp_path) as mesh:
        before = mesh.work_calls()
        ...  # a hostile request
        assert mesh.work_calls() - before <= 1 and not mesh.unexpected()
        await mesh.normal_requests()  # still answers, right after
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import json
import pathlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from unittest import mock

import grpc
import httpx
import psutil
import uvicorn

from mesh.client import NodeClient
from mesh.coordinator.dispatch import Dispatcher
from mesh.coordinator.openai_api import build_openai_app
from mesh.coordinator.service import MeshHandlers, start_fast_path
from mesh.coordinator.settings import DispatcherSettings
from mesh.coordinator_client import MeshClient
from mesh.core.ids import NodeId
from mesh.nodes_view import NodeSource, NodeState, NodeView
from nodes.agents import DEMO_AGENTS
from nodes.config import ModelConfig, NodeConfig
from nodes.daemon import NodeDaemon
from tests.fakes import FakeBackend

MODEL = "smollm2"
# A reply that is also a valid agent decision, so agents on the fake backend can answer.
FAKE_REPLY = '{"final": "ok"}'
WORK_METHODS = frozenset({"Generate", "GenerateStream", "RunAgent"})


class RpcRecorder(grpc.aio.ServerInterceptor):
    """Counts the RPCs a server receives, by method, and keeps every exception a handler let
    out that was not an abort (gRPC answers those UNKNOWN)."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self.unexpected: list[str] = []

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method.rsplit("/", 1)[-1]
        self.calls[method] += 1
        handler = await continuation(details)
        if handler is None or handler.request_streaming:
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(method, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _unary(self, method: str, behaviour: Callable[..., Any]) -> Callable[..., Any]:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await behaviour(request, context)
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as error:
                self.unexpected.append(f"{method}: {type(error).__name__}: {error}"[:300])
                raise

        return unary

    def _stream(self, method: str, behaviour: Callable[..., Any]) -> Callable[..., Any]:
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for item in behaviour(request, context):
                    yield item
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as error:
                self.unexpected.append(f"{method}: {type(error).__name__}: {error}"[:300])
                raise

        return stream


@contextlib.contextmanager
def recording_servers(recorder: RpcRecorder) -> Iterator[None]:
    """Servers created inside get `recorder` as their first interceptor, options unchanged."""
    real = grpc.aio.server

    def server(*args: Any, interceptors: Any = (), **kwargs: Any) -> grpc.aio.Server:
        return real(*args, interceptors=[recorder, *interceptors], **kwargs)

    with mock.patch.object(grpc.aio, "server", server):
        yield


def rss_bytes() -> int:
    return int(psutil.Process().memory_info().rss)


class HostileMesh:
    """Nodes, a dispatcher, its gRPC fast path and its OpenAI HTTP ingress on 127.0.0.1."""

    def __init__(self, state_dir: pathlib.Path, *, nodes: int = 2, real_model: bool = False):
        self.state_dir = state_dir
        self.node_count = 1 if real_model else nodes
        self.real_model = real_model
        self.daemons: list[NodeDaemon] = []
        self.recorders: list[RpcRecorder] = []
        self.dispatcher: Dispatcher | None = None
        self._fast_path: grpc.aio.Server | None = None
        self._http: uvicorn.Server | None = None
        self._http_task: asyncio.Task[None] | None = None
        self.fast_path_address = ""
        self.http_base_url = ""
        self.node_clients: list[NodeClient] = []
        self.mesh_client: MeshClient | None = None
        self.http_client: httpx.AsyncClient | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def started(cls, state_dir: pathlib.Path, **options: Any) -> AsyncIterator[HostileMesh]:
        mesh = cls(state_dir, **options)
        try:
            await mesh.start()
            yield mesh
        finally:
            await mesh.stop()

    # ------------------------------------------------------------------ lifecycle

    def _node_config(self, index: int) -> NodeConfig:
        settings: dict[str, Any] = dict(
            host="127.0.0.1",
            port=0,
            advertise=False,
            name=f"hostile-{index}",
            state_dir=str(self.state_dir / f"node-{index}"),
            max_concurrent=2,
            max_queued=8,
            grace_s=0.5,
        )
        if self.real_model:
            settings["models"] = (
                ModelConfig(id=MODEL, source="bundled:smollm2", n_ctx=2048, n_threads=2),
            )
        return NodeConfig(**settings)

    async def start(self) -> None:
        for index in range(self.node_count):
            recorder = RpcRecorder()
            backends = None if self.real_model else {MODEL: FakeBackend(MODEL, reply=FAKE_REPLY)}
            daemon = NodeDaemon(self._node_config(index), backends=backends, progress=io.StringIO())
            with recording_servers(recorder):
                await daemon.start()
            self.daemons.append(daemon)
            self.recorders.append(recorder)
            self.node_clients.append(NodeClient(daemon.address, timeout_s=30))
        settings = DispatcherSettings(queue_timeout_s=0.5, node_wait_s=0.5, deadline_s=30)
        self.dispatcher = Dispatcher(settings)
        self.dispatcher.update_nodes([self._view(d) for d in self.daemons])
        self._fast_path, port = await start_fast_path(MeshHandlers(self.dispatcher), "127.0.0.1:0")
        self.fast_path_address = f"127.0.0.1:{port}"
        self.mesh_client = MeshClient(self.fast_path_address, timeout_s=30)
        await self._start_http()
        self.http_client = httpx.AsyncClient(base_url=self.http_base_url, timeout=30)

    async def _start_http(self) -> None:
        assert self.dispatcher is not None
        app = build_openai_app(self.dispatcher)
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, log_level="error", lifespan="off", access_log=False
        )
        self._http = uvicorn.Server(config)
        self._http_task = asyncio.get_running_loop().create_task(self._http.serve())
        async with asyncio.timeout(10):
            while not self._http.started:
                await asyncio.sleep(0.01)
        port = self._http.servers[0].sockets[0].getsockname()[1]
        self.http_base_url = f"http://127.0.0.1:{port}"

    @staticmethod
    def _view(daemon: NodeDaemon) -> NodeView:
        return NodeView(
            node_id=NodeId(daemon.node_id),
            name=daemon.config.name,
            address=daemon.address,
            state=NodeState.READY,
            source=NodeSource.STATIC,
            models=(MODEL,),
            agents=tuple(spec.name for spec in DEMO_AGENTS),
            max_concurrent=daemon.config.max_concurrent,
            max_queued=daemon.config.max_queued,
        )

    async def stop(self) -> None:
        if self.http_client is not None:
            await self.http_client.aclose()
        if self._http is not None and self._http_task is not None:
            self._http.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._http_task, 10)
        if self.mesh_client is not None:
            await self.mesh_client.close()
        if self._fast_path is not None:
            await self._fast_path.stop(0.5)
        if self.dispatcher is not None:
            await self.dispatcher.close()
        for client in self.node_clients:
            await client.close()
        for daemon in self.daemons:
            await daemon.stop()

    # ------------------------------------------------------------------ observations

    def work_calls(self) -> int:
        """Generate, GenerateStream and RunAgent calls all nodes received so far."""
        return sum(r.calls[m] for r in self.recorders for m in WORK_METHODS)

    def unexpected(self) -> list[str]:
        """Handler exceptions on any node that gRPC answered as UNKNOWN."""
        return [item for r in self.recorders for item in r.unexpected]

    def cooling(self) -> list[str]:
        """Nodes the dispatcher cools down (a hostile request must never cool a healthy one)."""
        assert self.dispatcher is not None
        return [row.view.name for row in self.dispatcher.node_rows() if row.cooling_down]

    async def normal_requests(self, *, node_only: bool = False) -> float:
        """Seconds to answer one normal request on each surface (node, gRPC ingress, OpenAI
        HTTP; only the node's with `node_only`); AssertionError when one is not answered."""
        assert self.mesh_client is not None and self.http_client is not None
        began = time.perf_counter()
        prompt, tokens = "What is the capital of France?", 4
        reply = await self.node_clients[0].generate(prompt, max_tokens=tokens, temperature=0)
        assert reply.text, "the node gave an empty answer"
        if node_only:
            return time.perf_counter() - began
        submitted = await self.mesh_client.submit(prompt, model=MODEL, max_tokens=tokens)
        assert submitted.text, "the coordinator gave an empty answer"
        chat = await self.http_client.post(
            "/v1/chat/completions",
            json={
                "model": MODEL,
                "max_tokens": tokens,
                "messages": [{"role": "user", "content": prompt}],
            },
        )
        assert chat.status_code == 200, chat.text
        assert json.loads(chat.text)["choices"][0]["message"]["content"]
        return time.perf_counter() - began
