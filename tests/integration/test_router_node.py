"""The intent router and a generic ONNX model, on a real ONNX Runtime session, through a real node."""

from __future__ import annotations

import asyncio
import contextlib
import io

import numpy as np
import pytest

from edgemesh.v1 import node_pb2, node_pb2_grpc
from mesh.client import NodeClient
from mesh.core.channels import create_channel
from mesh.core.errors import InvalidRequestError, NotFoundError
from mesh.core.grpc_status import from_grpc_error
from nodes.backends.onnx import OnnxBackend
from nodes.backends.tensors import array_to_tensor, tensor_to_array
from nodes.config import ModelConfig, NodeConfig, default_router_config
from nodes.daemon import NodeDaemon, build_backends
from tests.fakes import FakeBackend

pytestmark = pytest.mark.integration


def run(coro, timeout=60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@contextlib.asynccontextmanager
async def router_node(tmp_path, extra_backends=None):
    config = NodeConfig(
        host="127.0.0.1",
        port=0,
        advertise=False,
        state_dir=str(tmp_path),
        grace_s=1.0,
        router=default_router_config(),
    )
    backends = {
        "smollm2": FakeBackend("smollm2"),
        "intent-router": OnnxBackend("intent-router", "bundled:intent-router"),
    }
    backends.update(extra_backends or {})
    daemon = NodeDaemon(config, backends=backends, progress=io.StringIO())
    await daemon.start()
    channel = create_channel(daemon.address)
    try:
        yield daemon, node_pb2_grpc.NodeServiceStub(channel)
    finally:
        await channel.close()
        await daemon.stop()


async def call(method, request, deadline_s=10):
    """A unary call with a deadline; gRPC errors come back as mesh errors."""
    import grpc

    try:
        return await method(request, timeout=deadline_s)
    except grpc.RpcError as error:
        raise from_grpc_error(error) from None


def test_technical_request_is_routed_to_technical_support(tmp_path):
    async def scenario():
        async with router_node(tmp_path) as (_daemon, stub):
            reply = await call(
                stub.Classify,
                node_pb2.ClassifyRequest(
                    text="My laptop shows a blue screen and restarts every time I open the app"
                ),
            )
            assert reply.label == "technical-support" and reply.model == "intent-router"
            assert reply.confidence > 0.5 and reply.latency_ms > 0
            assert [s.label for s in reply.scores][0] == "technical-support"
            assert sum(s.score for s in reply.scores) == pytest.approx(1.0, abs=1e-4)
            assert sorted(s.label for s in reply.scores) == sorted(
                ["customer-service", "technical-support", "scheduling"]
            )
            booking = await call(
                stub.Classify,
                node_pb2.ClassifyRequest(
                    model="intent-router", text="Can I book an appointment for Friday at 10am?"
                ),
            )
            assert booking.label == "scheduling"
            order = await call(
                stub.Classify, node_pb2.ClassifyRequest(text="What is the status of order 1042?")
            )
            assert order.label == "customer-service"

    run(scenario())


def test_describe_lists_tensors_and_labels(tmp_path):
    async def scenario():
        async with router_node(tmp_path) as (daemon, _stub), NodeClient(daemon.address) as client:
            models = {m.model_id: m for m in (await client.describe()).models}
            router = models["intent-router"]
            assert router.backend == "onnxruntime" and router.state == node_pb2.MODEL_STATE_READY
            assert router.task == "text-classification" and router.size_bytes > 0
            assert [(i.name, i.dtype, list(i.shape)) for i in router.inputs] == [
                ("text", "string", [-1, 1])
            ]
            assert {o.name: o.dtype for o in router.outputs} == {
                "label": "string",
                "probabilities": "float32",
            }
            assert set(router.labels) == {"customer-service", "technical-support", "scheduling"}
            assert models["smollm2"].task == "text-generation" and not models["smollm2"].inputs
            with pytest.raises(InvalidRequestError, match="does not generate text"):
                await client.generate("hello", model="intent-router")

    run(scenario())


def test_infer_on_the_router(tmp_path):
    async def scenario():
        async with router_node(tmp_path) as (_daemon, stub):
            texts = np.array(
                [["The printer shows error E-04"], ["Move my 3pm meeting to 4pm"]], dtype=object
            )
            reply = await call(
                stub.Infer,
                node_pb2.InferRequest(
                    model="intent-router", inputs={"text": array_to_tensor("text", texts)}
                ),
            )
            assert reply.model == "intent-router" and reply.latency_ms > 0
            labels = tensor_to_array("label", reply.outputs["label"])
            probabilities = tensor_to_array("probabilities", reply.outputs["probabilities"])
            assert list(labels) == ["technical-support", "scheduling"]
            assert probabilities.shape == (2, 3) and probabilities.dtype == np.float32
            only = await call(
                stub.Infer,
                node_pb2.InferRequest(
                    model="intent-router",
                    inputs={"text": array_to_tensor("text", texts)},
                    outputs=["probabilities"],
                ),
            )
            assert list(only.outputs) == ["probabilities"]
            wrong = node_pb2.Tensor(dtype="float32", shape=[1, 1], raw=b"\x00" * 4)
            with pytest.raises(InvalidRequestError, match="must be string, got float32"):
                await call(
                    stub.Infer, node_pb2.InferRequest(model="intent-router", inputs={"text": wrong})
                )
            with pytest.raises(NotFoundError):
                await call(stub.Infer, node_pb2.InferRequest(model="nope"))
            with pytest.raises(InvalidRequestError, match="text generator"):
                await call(stub.Infer, node_pb2.InferRequest(model="smollm2"))
            with pytest.raises(InvalidRequestError, match="empty"):
                await call(stub.Classify, node_pb2.ClassifyRequest(text="  "))

    run(scenario())


def test_any_onnx_model_can_be_loaded_listed_and_run(tmp_path):
    onnx = pytest.importorskip("onnx")  # the model is written with the onnx package (dev extra)
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Relu", ["xw"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor("w", TensorProto.FLOAT, [2, 2], [1.0, -1.0, 2.0, 0.5])],
    )
    path = tmp_path / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    tiny = build_backends(NodeConfig(models=(ModelConfig(id="tiny", source=str(path)),)))["tiny"]

    async def scenario():
        async with router_node(tmp_path, {"tiny": tiny}) as (daemon, stub):
            x = np.array([[1.0, 1.0], [-1.0, 0.0]], dtype=np.float32)
            reply = await call(
                stub.Infer,
                node_pb2.InferRequest(model="tiny", inputs={"x": array_to_tensor("x", x)}),
            )
            y = tensor_to_array("y", reply.outputs["y"])
            assert np.allclose(y, np.maximum(x @ np.array([[1, -1], [2, 0.5]]), 0))
            big = np.random.default_rng(0).standard_normal((300_000, 2)).astype(np.float32)
            reply = await call(
                stub.Infer,
                node_pb2.InferRequest(  # 2.4 MB: converted off the loop
                    model="tiny", inputs={"x": array_to_tensor("x", big)}
                ),
            )
            assert tensor_to_array("y", reply.outputs["y"]).shape == (300_000, 2)
            async with NodeClient(daemon.address) as client:
                info = {m.model_id: m for m in (await client.describe()).models}["tiny"]
            assert info.task == "tensor" and info.inputs[0].dim_names == ["batch", ""]
            with pytest.raises(InvalidRequestError, match="not a text classifier"):
                await call(stub.Classify, node_pb2.ClassifyRequest(model="tiny", text="hi"))

    run(scenario())
