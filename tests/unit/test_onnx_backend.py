"""ONNX Runtime backend logic without a model: tensors on the wire, input checks, providers, config."""

from __future__ import annotations

import numpy as np
import pytest

from edgemesh.v1 import node_pb2
from mesh.core.errors import ConfigError, InvalidRequestError, ModelLoadError
from nodes.backends.onnx import (
    CPU,
    choose_providers,
    is_onnx_source,
    ranked_scores,
    resolve_onnx,
)
from nodes.backends.tensors import (
    TensorSpec,
    array_to_tensor,
    check_inputs,
    check_output_names,
    spec_from_onnx,
    tensor_to_array,
)
from nodes.config import ModelConfig, NodeConfig, default_router_config, load_node_config

pytestmark = pytest.mark.unit


# ---------------------------------------------------------------- tensors


@pytest.mark.parametrize(
    "dtype", ["float32", "float64", "float16", "int64", "int32", "int8", "uint8", "bool"]
)
def test_numeric_tensor_round_trip(dtype):
    array = (
        (np.arange(6).reshape(2, 3) % 2 == 0)
        if dtype == "bool"
        else np.arange(6, dtype=dtype).reshape(2, 3)
    )
    tensor = array_to_tensor("x", array)
    assert tensor.dtype == dtype and list(tensor.shape) == [2, 3]
    back = tensor_to_array("x", tensor)
    assert back.dtype == array.dtype and np.array_equal(back, array)


def test_raw_bytes_are_little_endian_row_major():
    tensor = array_to_tensor("x", np.array([[1.0, 2.0]], dtype=np.float32))
    assert tensor.raw == b"\x00\x00\x80?\x00\x00\x00@"
    big_endian = np.array([1, 2], dtype=">i4")
    assert array_to_tensor("x", big_endian).raw == b"\x01\x00\x00\x00\x02\x00\x00\x00"


def test_string_tensor_round_trip():
    tensor = node_pb2.Tensor(dtype="string", shape=[2, 1], strings=["héllo", "wifi"])
    array = tensor_to_array("text", tensor)
    assert array.dtype == object and array.shape == (2, 1) and array[0, 0] == "héllo"
    assert array_to_tensor("text", array) == tensor


def test_scalar_tensor():
    tensor = node_pb2.Tensor(dtype="int64", shape=[], raw=np.int64(7).tobytes())
    assert tensor_to_array("n", tensor).item() == 7


@pytest.mark.parametrize(
    "tensor, message",
    [
        (node_pb2.Tensor(dtype="float32", shape=[2], raw=b"\x00" * 4), "needs 8 bytes, got 4"),
        (node_pb2.Tensor(dtype="float32", shape=[-1], raw=b""), "negative dimension"),
        (node_pb2.Tensor(dtype="complex64", shape=[1], raw=b"\x00" * 8), "is not one of"),
        (node_pb2.Tensor(dtype="string", shape=[3], strings=["a"]), "needs 3 strings, got 1"),
        (node_pb2.Tensor(dtype="string", shape=[1], raw=b"a"), "carries `strings`"),
        (node_pb2.Tensor(dtype="int64", shape=[1], strings=["a"]), "carries `raw`"),
    ],
)
def test_bad_tensors_say_what_is_wrong(tensor, message):
    with pytest.raises(InvalidRequestError, match=message):
        tensor_to_array("x", tensor)


def test_non_tensor_output_is_refused():
    with pytest.raises(ValueError, match="not a tensor"):
        array_to_tensor("probabilities", [{"a": 0.5}])


SPECS = (TensorSpec("text", "string", (-1, 1)), TensorSpec("mask", "int64", (-1, 4)))


def test_check_inputs_accepts_matching_arrays():
    check_inputs(
        SPECS,
        {"text": np.array([["a"], ["b"]], dtype=object), "mask": np.zeros((2, 4), dtype=np.int64)},
    )


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"text": np.array([["a"]], dtype=object)}, "missing input"),
        (
            {
                "text": np.array([["a"]], dtype=object),
                "mask": np.zeros((1, 4), np.int64),
                "other": np.zeros(1),
            },
            "unknown input",
        ),
        (
            {"text": np.array([["a"]], dtype=object), "mask": np.zeros((1, 4), np.int32)},
            "must be int64, got int32",
        ),
        (
            {"text": np.array(["a"], dtype=object), "mask": np.zeros((1, 4), np.int64)},
            "must have 2 dimensions",
        ),
        (
            {"text": np.array([["a"]], dtype=object), "mask": np.zeros((1, 3), np.int64)},
            "dimension 1 must be 4, got 3",
        ),
    ],
)
def test_check_inputs_refuses(arrays, message):
    with pytest.raises(InvalidRequestError, match=message):
        check_inputs(SPECS, arrays)


def test_output_names():
    outputs = (
        TensorSpec("label", "string", (-1,)),
        TensorSpec("probabilities", "float32", (-1, 3)),
    )
    assert check_output_names(outputs, []) == ["label", "probabilities"]
    assert check_output_names(outputs, ["probabilities"]) == ["probabilities"]
    with pytest.raises(InvalidRequestError, match="unknown output"):
        check_output_names(outputs, ["logits"])


def test_spec_from_onnx_keeps_symbolic_dimension_names():
    spec = spec_from_onnx("input_ids", "tensor(int64)", ["batch", 128, None])
    assert spec == TensorSpec("input_ids", "int64", (-1, 128, -1), ("batch", "", ""))
    assert spec.to_proto().shape == [-1, 128, -1]
    assert spec_from_onnx("p", "seq(map(string,tensor(float)))", []).dtype.startswith("seq(map")


# ---------------------------------------------------------------- providers


def test_providers_accelerator_first_cpu_last():
    available = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(available) == ["CUDAExecutionProvider", CPU]  # no TensorRT by default
    assert choose_providers(["CPUExecutionProvider", "OpenVINOExecutionProvider"]) == [
        "OpenVINOExecutionProvider",
        CPU,
    ]
    assert choose_providers(["AzureExecutionProvider", "CPUExecutionProvider"]) == [CPU]


def test_requested_providers_are_honoured_and_checked():
    available = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(available, ["CPUExecutionProvider"]) == [CPU]
    assert choose_providers(available, ["CUDAExecutionProvider"]) == ["CUDAExecutionProvider", CPU]
    with pytest.raises(ModelLoadError, match="QNNExecutionProvider are not in this onnxruntime"):
        choose_providers(available, ["QNNExecutionProvider"])


def test_ranked_scores_best_first():
    result = ranked_scores(["a", "b", "c"], [0.2, 0.7, 0.1])
    assert result.label == "b" and result.confidence == pytest.approx(0.7)
    assert [label for label, _ in result.scores] == ["b", "a", "c"]


# ---------------------------------------------------------------- sources and config


def test_onnx_sources(tmp_path):
    assert is_onnx_source("bundled:intent-router") and is_onnx_source("intent-router")
    assert is_onnx_source("/models/Net.ONNX") and not is_onnx_source("smollm2")
    path, shown = resolve_onnx("bundled:intent-router")
    assert path.name == "intent_router.onnx" and "intent-router" in shown
    with pytest.raises(ModelLoadError, match="unknown bundled ONNX model"):
        resolve_onnx("bundled:nope")
    with pytest.raises(ModelLoadError, match="not found"):
        resolve_onnx(str(tmp_path / "missing.onnx"))


def test_model_kind_follows_source_and_stays_backward_compatible():
    assert ModelConfig(id="s", source="bundled:smollm2").kind == "gguf"
    assert ModelConfig(id="g", source="/m/model.gguf").kind == "gguf"
    assert ModelConfig(id="r", source="bundled:intent-router").kind == "onnx"
    assert ModelConfig(id="n", source="net.onnx").kind == "onnx"
    upstream = ModelConfig(
        id="big",
        base_url="http://127.0.0.1:11434",
        remote_model="llama3.2",
        api_key_env="OLLAMA_KEY",
    )
    assert upstream.kind == "openai" and upstream.api_key_env == "OLLAMA_KEY"
    # The intent router is served by default (`--agent auto` works out of the box), off with
    # `router: null`, and not added twice when a model already is the bundled router.
    assert NodeConfig().router == default_router_config()
    assert NodeConfig(router=None).router is None
    listed = {"id": "intent-router", "source": "bundled:intent-router", "kind": "onnx"}
    assert NodeConfig.model_validate({"models": [listed]}).router is None


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"id": "u", "kind": "openai"}, "base_url: an openai model needs"),
        (
            {"id": "u", "base_url": "http://user:secret@host:8000/v1"},
            "must not contain credentials",
        ),
        ({"id": "u", "base_url": "ftp://host/v1"}, "is not an http"),
        (
            {"id": "u", "base_url": "http://host/v1", "source": "x.gguf"},
            "base_url instead of source",
        ),
        ({"id": "u", "base_url": "http://host/v1", "api_key_env": "sk-123"}, "api_key_env"),
        ({"id": "g", "source": "a.gguf", "api_key_env": "KEY"}, "for openai models only"),
        ({"id": "g"}, "needs a source"),
    ],
)
def test_model_config_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**fields)


def test_router_config_from_yaml(tmp_path):
    path = tmp_path / "node.yaml"
    path.write_text(
        "models:\n"
        "  - {id: smollm2, source: bundled:smollm2}\n"
        "  - {id: big, base_url: 'http://127.0.0.1:8000/v1', remote_model: qwen, api_key_env: KEY}\n"
        "router: {id: intent-router, source: bundled:intent-router, n_threads: 1}\n",
        encoding="utf-8",
    )
    config = load_node_config(str(path))
    assert [m.kind for m in config.models] == ["gguf", "openai"]
    assert config.router is not None and config.router.kind == "onnx"
    assert default_router_config().providers == ("CPUExecutionProvider",)
    path.write_text("router: {id: smollm2, source: bundled:smollm2}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="router: must be an onnx model"):
        load_node_config(str(path))


def test_daemon_builds_a_backend_per_kind_without_loading(tmp_path):
    from nodes.backends.onnx import OnnxBackend
    from nodes.backends.openai_upstream import OpenAIUpstreamBackend
    from nodes.daemon import build_backends

    config = NodeConfig(
        models=(
            ModelConfig(
                id="big",
                base_url="http://127.0.0.1:9/v1",
                remote_model="qwen",
                api_key_env="SOME_KEY",
            ),
        ),
        router=default_router_config(),
    )
    backends = build_backends(config)
    assert isinstance(backends["big"], OpenAIUpstreamBackend)
    assert isinstance(backends["intent-router"], OnnxBackend)
    assert backends["big"].descriptor.source == "http://127.0.0.1:9/v1"
    missing = NodeConfig(models=(ModelConfig(id="net", source=str(tmp_path / "net.onnx")),))
    with pytest.raises(ModelLoadError, match="not found"):
        build_backends(missing)  # before the node listens
