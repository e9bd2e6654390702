"""Backends for the model kinds other than GGUF: ONNX Runtime and OpenAI-compatible upstreams.

Kept apart from the daemon so that `build_backends` needs one line per kind;
neither onnxruntime nor httpx is imported here (the backends import them when
they load).
"""

from __future__ import annotations

from nodes.backends import Backend
from nodes.backends.onnx import OnnxBackend, resolve_onnx
from nodes.backends.openai_upstream import OpenAIUpstreamBackend
from nodes.config import ModelConfig


def build_backend(model: ModelConfig) -> Backend:
    """The backend for an onnx or openai model; a missing ONNX file fails here, before listening."""
    if model.kind == "onnx":
        resolve_onnx(model.source)
        return OnnxBackend(
            model.id,
            model.source,
            providers=model.providers,
            intra_op_threads=model.n_threads,
            max_concurrent_runs=model.instances,
        )
    if model.kind == "openai":
        assert model.base_url is not None  # the config's validator guarantees it
        return OpenAIUpstreamBackend(
            model.id,
            model.base_url,
            remote_model=model.remote_model,
            api_key_env=model.api_key_env,
            system_prompt=model.system_prompt,
            request_timeout_s=model.request_timeout_s,
            continuation_mode=model.continuation_mode,
            response_format=model.response_format,
        )
    raise ValueError(f"model {model.id!r}: kind {model.kind!r} is built by the daemon (llama.cpp)")
