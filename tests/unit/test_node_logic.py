"""Node logic without a model or a socket: config, model files, admission, request validation."""

from __future__ import annotations

import asyncio

import pytest

from edgemesh.v1 import node_pb2
from mesh.core.errors import (
    ConfigError,
    InvalidRequestError,
    ModelLoadError,
    NotFoundError,
    OverloadedError,
)
from nodes.admission import AdmissionController
from nodes.config import NodeConfig, load_node_config, model_config_from_flag
from nodes.model_files import resolve_gguf
from nodes.service import to_generation_input
from tests.fakes import FakeBackend

pytestmark = pytest.mark.unit


def run(coro, timeout=5):
    return asyncio.run(asyncio.wait_for(coro, timeout))


# ------------------------------------------------------------------ config


def test_default_config_serves_bundled_model():
    config = NodeConfig()
    assert config.default_model_id == "smollm2"
    assert config.models[0].source == "bundled:smollm2"


def test_config_file_error_names_file_and_key(tmp_path):
    path = tmp_path / "node.yaml"
    path.write_text("name: kiosk\nport: 70000\nmax_queued: -1\n")
    with pytest.raises(ConfigError) as error:
        load_node_config(str(path))
    message = str(error.value)
    assert f"{path}: port:" in message and "65535" in message
    assert f"{path}: max_queued:" in message


def test_config_unknown_key_and_bad_yaml(tmp_path):
    path = tmp_path / "node.yaml"
    path.write_text("nmae: typo\n")
    with pytest.raises(ConfigError, match="nmae"):
        load_node_config(str(path))
    path.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_node_config(str(path))
    with pytest.raises(ConfigError, match="cannot read"):
        load_node_config(str(tmp_path / "missing.yaml"))


def test_flags_override_file(tmp_path):
    path = tmp_path / "node.yaml"
    path.write_text("name: from-file\nport: 6000\n")
    config = load_node_config(str(path), port=0, name=None)
    assert (config.name, config.port) == ("from-file", 0)


def test_model_flag_path_gives_id_from_file_name():
    model = model_config_from_flag("/models/Qwen2.5-0.5B-Instruct.Q4_K_M.gguf", n_threads=1)
    assert model.id == "qwen2.5-0.5b-instruct.q4_k_m" and model.n_threads == 1


def test_default_model_must_exist():
    with pytest.raises(ValueError, match="default_model"):
        NodeConfig(default_model="nope")


# ------------------------------------------------------------------ model files


def test_missing_model_file_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        resolve_gguf(str(tmp_path / "absent.gguf"))


def test_non_gguf_file_is_refused(tmp_path):
    path = tmp_path / "weights.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(ModelLoadError, match="not a GGUF model file"):
        resolve_gguf(str(path))


def test_unknown_alias_lists_known_ones():
    with pytest.raises(ModelLoadError, match="smollm2"):
        resolve_gguf("no-such-model")


def test_gguf_magic_accepted(tmp_path):
    path = tmp_path / "tiny.Q8_0.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 60)
    resolved = resolve_gguf(str(path))
    assert resolved.size_bytes == 64 and resolved.quantization == "Q8_0"


# ------------------------------------------------------------------ admission


def test_admission_runs_queues_then_refuses():
    async def scenario():
        admission = AdmissionController(max_concurrent=1, max_queued=1)
        release = asyncio.Event()
        entered = []

        async def hold(tag):
            async with admission.slot():
                entered.append(tag)
                await release.wait()

        first = asyncio.create_task(hold("a"))
        await asyncio.sleep(0)
        second = asyncio.create_task(hold("b"))
        await asyncio.sleep(0)
        assert (admission.in_flight, admission.queued) == (1, 1)
        with pytest.raises(OverloadedError, match="at capacity"):
            async with admission.slot():
                pass
        release.set()
        await asyncio.gather(first, second)
        assert entered == ["a", "b"]
        assert (admission.in_flight, admission.queued, admission.completed, admission.rejected) == (
            0,
            0,
            2,
            1,
        )

    run(scenario())


def test_cancelled_waiter_leaves_the_queue():
    async def scenario():
        admission = AdmissionController(max_concurrent=1, max_queued=4)
        release = asyncio.Event()

        async def hold():
            async with admission.slot():
                await release.wait()

        holder = asyncio.create_task(hold())
        await asyncio.sleep(0)
        waiter = asyncio.create_task(hold())
        await asyncio.sleep(0)
        assert admission.queued == 1
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        assert admission.queued == 0
        release.set()
        await holder
        assert admission.in_flight == 0

    run(scenario())


# ------------------------------------------------------------------ validation


def _backends():
    backend = FakeBackend("smollm2", context_length=2048)
    run(backend.load())
    return {"smollm2": backend}


def _request(prompt="hello", **sampling):
    return node_pb2.GenerateRequest(prompt=prompt, sampling=node_pb2.Sampling(**sampling))


@pytest.mark.parametrize(
    ("request_", "error", "fragment"),
    [
        (_request(""), InvalidRequestError, "empty"),
        (_request("   "), InvalidRequestError, "empty"),
        (_request("x" * 70_000), InvalidRequestError, "over this node's limit"),
        (_request(max_tokens=0), InvalidRequestError, "max_tokens must be at least 1"),
        (_request(max_tokens=-5), InvalidRequestError, "max_tokens must be at least 1"),
        (_request(max_tokens=4096), InvalidRequestError, "context window of 2048"),
        (_request(temperature=2.5), InvalidRequestError, "temperature must be between 0 and 2"),
        (_request(temperature=-0.1), InvalidRequestError, "temperature"),
        (_request(top_p=0.0), InvalidRequestError, "top_p"),
        (node_pb2.GenerateRequest(model="gpt-9", prompt="hi"), NotFoundError, "serves: smollm2"),
        (
            node_pb2.GenerateRequest(messages=[node_pb2.ChatMessage(role="wizard", content="hi")]),
            InvalidRequestError,
            "messages[0].role",
        ),
    ],
)
def test_bad_requests_say_what_to_change(request_, error, fragment):
    with pytest.raises(error) as raised:
        to_generation_input(request_, NodeConfig(), _backends())
    assert fragment in str(raised.value)


def test_defaults_apply_and_prompt_becomes_user_message():
    backend, generation = to_generation_input(_request("What is 2+2?"), NodeConfig(), _backends())
    assert backend.descriptor.model_id == "smollm2"
    assert generation.max_tokens == 256 and generation.temperature == pytest.approx(0.7)
    assert [(m.role, m.content) for m in generation.messages] == [("user", "What is 2+2?")]


def test_explicit_zero_temperature_is_kept():
    _backend, generation = to_generation_input(_request(temperature=0.0), NodeConfig(), _backends())
    assert generation.temperature == 0.0


def test_shipped_example_node_config_is_valid():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[2]
    config = load_node_config(str(root / "deploy" / "node.example.yaml"))
    assert config.name == "kiosk-1" and config.router is not None
    assert [m.id for m in config.models] == ["smollm2"]
