"""The Classify and Infer RPCs, and what Describe says about tensor models.

The servicer's CamelCase methods delegate here at once; errors are
`mesh.core.errors` exceptions, turned into status codes by the servicer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from edgemesh.v1 import node_pb2
from mesh.core.errors import InvalidRequestError, MeshError, NotFoundError, NotReadyError
from mesh.core.untrusted import quoted
from nodes.backends import Backend, ModelStatus
from nodes.backends.onnx import Classification
from nodes.backends.tensors import TensorSpec, array_to_tensor, tensor_to_array

MAX_CLASSIFY_TEXT_BYTES = 64 * 1024
INLINE_CONVERSION_BYTES = 1024 * 1024  # larger tensors are converted in a thread


@runtime_checkable
class TensorModel(Protocol):
    """What Classify and Infer need from a backend (OnnxBackend implements it)."""

    task: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    labels: tuple[str, ...]

    async def run(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] = ()
    ) -> dict[str, Any]: ...

    async def classify(self, text: str) -> Classification: ...


def default_classifier_id(backends: Mapping[str, Backend], preferred: str | None = None) -> str:
    """The model Classify uses when the request names none: `preferred`, else the first classifier."""
    if preferred:
        return preferred
    for model_id, backend in backends.items():
        if isinstance(backend, TensorModel) and backend.task == "text-classification":
            return model_id
    raise NotFoundError(
        "this node serves no text classifier; configure one (e.g. the bundled "
        "intent router: source bundled:intent-router)"
    )


def _tensor_model(backends: Mapping[str, Backend], model_id: str) -> TensorModel:
    backend = backends.get(model_id)
    if backend is None:
        raise NotFoundError(
            f"model {quoted(model_id)} is not served by this node; it serves: "
            f"{', '.join(sorted(backends))}"
        )
    if not isinstance(backend, TensorModel):
        raise InvalidRequestError(
            f"model {quoted(model_id)} is a {backend.descriptor.backend} text "
            "generator; Classify and Infer need a tensor model (ONNX)"
        )
    if backend.status is not ModelStatus.READY:
        raise NotReadyError(f"model {model_id!r} is {backend.status.value}; retry when it is ready")
    return backend


async def classify(
    request: node_pb2.ClassifyRequest,
    backends: Mapping[str, Backend],
    router_model: str | None = None,
) -> node_pb2.ClassifyResponse:
    """Label, confidence and every label's score for `request.text`."""
    model_id = request.model or default_classifier_id(backends, router_model)
    model = _tensor_model(backends, model_id)
    if not request.text.strip():
        raise InvalidRequestError("the text to classify is empty")
    if len(request.text.encode()) > MAX_CLASSIFY_TEXT_BYTES:
        raise InvalidRequestError(f"the text is over {MAX_CLASSIFY_TEXT_BYTES} bytes; shorten it")
    began = time.perf_counter()
    result = await model.classify(request.text)
    return node_pb2.ClassifyResponse(
        label=result.label,
        confidence=result.confidence,
        scores=[node_pb2.LabelScore(label=label, score=score) for label, score in result.scores],
        model=model_id,
        latency_ms=(time.perf_counter() - began) * 1000,
    )


async def infer(
    request: node_pb2.InferRequest, backends: Mapping[str, Backend]
) -> node_pb2.InferResponse:
    """Run a tensor model on named input tensors; all outputs, or those the request names."""
    if not request.model:
        raise InvalidRequestError("name the model to run in `model`")
    model = _tensor_model(backends, request.model)
    # Copying megabytes of tensor data is done off the event loop.
    large = request.ByteSize() > INLINE_CONVERSION_BYTES
    arrays = await _maybe_in_thread(large, _to_arrays, request)
    began = time.perf_counter()
    values = await model.run(arrays, list(request.outputs))
    latency_ms = (time.perf_counter() - began) * 1000
    try:
        size = sum(getattr(v, "nbytes", 0) for v in values.values())
        outputs = await _maybe_in_thread(size > INLINE_CONVERSION_BYTES, _to_tensors, values)
    except ValueError as error:  # e.g. a ZipMap output: say which one, and how to leave it out
        raise MeshError(f"{error}; ask for the tensor outputs by name in `outputs`") from None
    return node_pb2.InferResponse(outputs=outputs, model=request.model, latency_ms=latency_ms)


def _to_arrays(request: node_pb2.InferRequest) -> dict[str, np.ndarray]:
    return {name: tensor_to_array(name, tensor) for name, tensor in request.inputs.items()}


def _to_tensors(values: Mapping[str, Any]) -> dict[str, node_pb2.Tensor]:
    return {name: array_to_tensor(name, value) for name, value in values.items()}


async def _maybe_in_thread(in_thread: bool, function: Any, argument: Any) -> Any:
    return await asyncio.to_thread(function, argument) if in_thread else function(argument)


def describe_tensor_model(backend: Backend, info: node_pb2.ModelInfo) -> None:
    """Fill `info`'s task, inputs, outputs and labels (Describe)."""
    if not isinstance(backend, TensorModel):
        info.task = "text-generation"
        return
    info.task = backend.task
    info.inputs.extend(spec.to_proto() for spec in backend.inputs)
    info.outputs.extend(spec.to_proto() for spec in backend.outputs)
    info.labels.extend(backend.labels)
