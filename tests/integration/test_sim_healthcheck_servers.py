"""`python3 -m mesh.sim.healthcheck`, the command Docker runs in every simulated container,
against a real node daemon (fake backend) and real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import io
import pathlib
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

from nodes.config import NodeConfig
from nodes.daemon import NodeDaemon
from tests.fakes import FakeBackend

pytestmark = pytest.mark.integration

ROOT = pathlib.Path(__file__).resolve().parents[2]


def run(coro, timeout=60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def healthcheck(*arguments: str) -> tuple[int, str, float]:
    """(exit status, stderr, seconds) of the health check as Docker runs it."""
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mesh.sim.healthcheck",
        *arguments,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _out, err = await asyncio.wait_for(process.communicate(), 20)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, err.decode(), time.monotonic() - started


@contextlib.asynccontextmanager
async def running_node(tmp_path):
    daemon = NodeDaemon(
        NodeConfig(host="127.0.0.1", port=0, advertise=False, state_dir=str(tmp_path)),
        backends={"smollm2": FakeBackend("smollm2")},
        progress=io.StringIO(),
    )
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.stop()


def test_a_serving_node_is_healthy_and_a_draining_one_is_not(tmp_path) -> None:
    async def scenario():
        async with running_node(tmp_path) as daemon:
            code, err, seconds = await healthcheck(daemon.address)
            assert code == 0, err
            assert seconds < 5  # about 0.05 s on 2 cores; Docker's timeout in the file is 3 s
            assert daemon.health is not None
            await daemon.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            code, err, _ = await healthcheck(daemon.address)
            assert code == 1 and err.strip() == f"{daemon.address}: NOT_SERVING"

    run(scenario())


def test_a_server_without_the_health_service_is_not_healthy() -> None:
    async def scenario():
        server = grpc.aio.server()
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            code, err, _ = await healthcheck(f"127.0.0.1:{port}")
        finally:
            await server.stop(0)
        assert code == 1 and "without a health status" in err

    run(scenario())


def test_nothing_listening_is_not_healthy() -> None:
    async def scenario():
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        code, err, _ = await healthcheck(f"127.0.0.1:{port}")
        assert code == 1 and f"127.0.0.1:{port}:" in err

    run(scenario())


def test_a_server_that_never_answers_is_not_healthy_within_the_timeout() -> None:
    async def scenario():
        connections: list[asyncio.StreamWriter] = []

        async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connections.append(writer)  # read nothing, answer nothing

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            code, err, seconds = await healthcheck(f"127.0.0.1:{port}", "--timeout", "0.5")
        finally:
            for writer in connections:
                writer.close()
            server.close()
            await server.wait_closed()
        assert code == 1 and "no answer within 0.5 s" in err
        assert seconds < 4

    run(scenario())


async def _http_server(status_of: dict[str, int]) -> asyncio.Server:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        path = request.split(b" ")[1].decode()
        status = status_of.get(path, 404)
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 2\r\n\r\n{{}}".encode())
        await writer.drain()
        writer.close()

    return await asyncio.start_server(answer, "127.0.0.1", 0)


def test_http_mode_wants_a_200_on_the_path() -> None:
    async def scenario():
        server = await _http_server({"/v1/mesh/info": 200, "/starting": 503})
        address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        try:
            ok = await healthcheck("--http", "/v1/mesh/info", address)
            starting = await healthcheck("--http", "/starting", address)
        finally:
            server.close()
            await server.wait_closed()
        assert ok[0] == 0, ok[1]
        assert starting[0] == 1 and starting[1].strip() == f"http://{address}/starting: HTTP 503"

    run(scenario())
