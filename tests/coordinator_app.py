"""The coordinator's HTTP app in this process, over real node processes: no Ray.

    async with coordinator_app(node_addresses) as app:
        ... app.base ("http://127.0.0.1:PORT"), app.address ("127.0.0.1:PORT"), app.dispatcher

A NodeRegistry over the nodes' static addresses feeds a Dispatcher, and the OpenAI app that
Ray Serve wraps (`build_openai_app`) is served by uvicorn on 127.0.0.1 port 0. Ready once the
server listens and (`wait_for_models`) a node's model is ready; all stopped on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import uvicorn

from mesh.coordinator.dispatch import Dispatcher
from mesh.coordinator.openai_api import build_openai_app
from mesh.coordinator.settings import DispatcherSettings
from mesh.registry import NodeRegistry


@dataclass(frozen=True)
class RunningApp:
    dispatcher: Dispatcher
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def base(self) -> str:
        return f"http://{self.address}"


@contextlib.asynccontextmanager
async def coordinator_app(
    node_addresses: Sequence[str],
    settings: DispatcherSettings | None = None,
    *,
    wait_for_models: bool = True,
    timeout_s: float = 60.0,
    access: object = None,
) -> AsyncIterator[RunningApp]:
    """`access`: a mesh.coordinator.access.AccessControl (API keys), None for an open mesh."""
    registry = NodeRegistry(static_addresses=list(node_addresses))
    dispatcher = Dispatcher(settings or DispatcherSettings(deadline_s=120, attempt_timeout_s=60))
    registry.subscribe(lambda _event: dispatcher.update_nodes(registry.snapshot()))
    await registry.start()
    server = uvicorn.Server(
        uvicorn.Config(
            build_openai_app(dispatcher, access=access),
            host="127.0.0.1",
            port=0,
            log_level="warning",
        )
    )
    serving = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(timeout_s):
            while not server.started or (wait_for_models and not dispatcher.models()):
                await asyncio.sleep(0.05)
        yield RunningApp(dispatcher, server.servers[0].sockets[0].getsockname()[1])
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 10)
        await dispatcher.close()
        await registry.stop()
