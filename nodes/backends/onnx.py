"""Any ONNX model through ONNX Runtime: load, list inputs and outputs, run, classify.

onnxruntime is imported only when an ONNX model loads (importing it costs tens
of MB a GGUF-only node should not carry). Execution providers are chosen from
those this onnxruntime build offers, accelerators first (CUDA, ROCm, OpenVINO,
CoreML, DirectML, QNN), CPU always last as the fallback; a model that the
chosen accelerator refuses is loaded again on CPU alone.

An InferenceSession is safe for concurrent `run` calls, so runs go to a small
thread pool (`max_concurrent_runs` threads, never the event loop) and at most
`max_queued_runs` more wait; beyond that a run is refused with OverloadedError.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pathlib
from collections.abc import AsyncGenerator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from mesh.core.errors import (
    InvalidRequestError,
    MeshError,
    ModelLoadError,
    NotReadyError,
    OverloadedError,
)
from nodes.backends import GenerationInput, ModelDescriptor, ModelStatus, Piece
from nodes.backends.tensors import TensorSpec, check_inputs, check_output_names, spec_from_onnx
from nodes.router import METADATA_LABELS, METADATA_TASK, MODEL_PATH, ROUTER_ALIAS

logger = logging.getLogger(__name__)

BACKEND_NAME = "onnxruntime"
CPU = "CPUExecutionProvider"
# Tried in this order when the configuration names no providers. TensorRT is left
# out of the automatic choice: it compiles engines for minutes on a first run.
PROVIDER_PREFERENCE = (
    "CUDAExecutionProvider",
    "ROCMExecutionProvider",
    "MIGraphXExecutionProvider",
    "OpenVINOExecutionProvider",
    "CoreMLExecutionProvider",
    "DmlExecutionProvider",
    "QNNExecutionProvider",
    CPU,
)
# ONNX models that ship with the project, by alias.
BUNDLED_ONNX: dict[str, pathlib.Path] = {ROUTER_ALIAS: MODEL_PATH}


def choose_providers(available: Sequence[str], requested: Sequence[str] = ()) -> list[str]:
    """The providers to ask ONNX Runtime for, best first, always ending with CPU.

    `requested` (from the config) must all be available; empty means choose by preference.
    """
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise ModelLoadError(
                f"execution provider(s) {', '.join(missing)} are not in this onnxruntime build "
                f"(it has {', '.join(available) or 'none'}); install the matching onnxruntime "
                "package (e.g. onnxruntime-gpu) or remove `providers` from the config"
            )
        chosen = list(dict.fromkeys(requested))
    else:
        chosen = [p for p in PROVIDER_PREFERENCE if p in available]
    if CPU not in chosen:
        chosen.append(CPU)
    return chosen


def is_onnx_source(source: str) -> bool:
    """Whether a model `source` names an ONNX model (a bundled ONNX alias or a .onnx path)."""
    return source.removeprefix("bundled:") in BUNDLED_ONNX or source.lower().endswith(".onnx")


def resolve_onnx(source: str) -> tuple[pathlib.Path, str]:
    """The file for `source` ("bundled:ALIAS", an alias, or a path) and how to show it."""
    alias = source.removeprefix("bundled:")
    if alias in BUNDLED_ONNX:
        path, shown = BUNDLED_ONNX[alias], f"bundled {alias} ({BUNDLED_ONNX[alias].name})"
        if not path.exists():
            raise ModelLoadError(
                f"the bundled ONNX model {alias!r} is missing at {path}; "
                "rebuild it with: python -m nodes.router.build"
            )
    elif source.startswith("bundled:"):
        raise ModelLoadError(
            f"unknown bundled ONNX model {alias!r}; known: {', '.join(sorted(BUNDLED_ONNX))}"
        )
    else:
        path = pathlib.Path(os.path.expanduser(source))
        shown = str(path)
    if not path.exists():
        raise ModelLoadError(f"ONNX model file not found: {path}")
    if not path.is_file():
        raise ModelLoadError(f"ONNX model path is not a file: {path}")
    return path, shown


@dataclass(frozen=True)
class Classification:
    label: str
    confidence: float
    scores: tuple[tuple[str, float], ...]  # every label, best first


def ranked_scores(labels: Sequence[str], probabilities: Sequence[float]) -> Classification:
    """The best label, its probability, and all (label, probability), best first."""
    if len(labels) != len(probabilities) or not labels:
        raise MeshError(f"the classifier gave {len(probabilities)} scores for {len(labels)} labels")
    ranked = sorted(
        zip(labels, (float(p) for p in probabilities), strict=True), key=lambda pair: -pair[1]
    )
    return Classification(label=ranked[0][0], confidence=ranked[0][1], scores=tuple(ranked))


def _onnxruntime_errors(ort: Any) -> tuple[type[BaseException], ...]:
    state = ort.capi.onnxruntime_pybind11_state
    names = (
        "Fail",
        "InvalidArgument",
        "NoSuchFile",
        "NoModel",
        "EngineError",
        "RuntimeException",
        "InvalidProtobuf",
        "ModelLoaded",
        "NotImplemented",
        "InvalidGraph",
        "EPFail",
    )
    return tuple(getattr(state, n) for n in names if hasattr(state, n)) + (RuntimeError,)


class OnnxBackend:
    """One ONNX model served by ONNX Runtime."""

    def __init__(
        self,
        model_id: str,
        source: str,
        *,
        providers: Sequence[str] = (),
        intra_op_threads: int = 1,
        max_concurrent_runs: int = 1,
        max_queued_runs: int = 64,
    ) -> None:
        self._source = source
        self._requested_providers = tuple(providers)
        self._intra_op_threads = intra_op_threads
        self._max_concurrent_runs = max_concurrent_runs
        self._max_queued_runs = max_queued_runs
        self.descriptor = ModelDescriptor(model_id=model_id, backend=BACKEND_NAME, source=source)
        self.status = ModelStatus.UNLOADED
        self.error = ""
        self.task = "tensor"
        self.inputs: tuple[TensorSpec, ...] = ()
        self.outputs: tuple[TensorSpec, ...] = ()
        self.labels: tuple[str, ...] = ()
        self.providers: tuple[str, ...] = ()  # those the session actually uses
        self._session: Any = None
        self._errors: tuple[type[BaseException], ...] = ()
        self._executor: ThreadPoolExecutor | None = None
        self._slots: asyncio.Semaphore | None = None
        self._waiting = 0

    # ------------------------------------------------------------------ loading

    def expected_bytes(self) -> int:
        return resolve_onnx(self._source)[0].stat().st_size

    async def load(self) -> None:
        self.status = ModelStatus.LOADING
        try:
            path, shown = resolve_onnx(self._source)
            self._session = await asyncio.to_thread(self._create_session, path)
        except ModelLoadError as error:
            self.status, self.error = ModelStatus.FAILED, str(error)
            raise
        session = self._session
        self.inputs = tuple(spec_from_onnx(i.name, i.type, i.shape) for i in session.get_inputs())
        self.outputs = tuple(spec_from_onnx(o.name, o.type, o.shape) for o in session.get_outputs())
        meta = session.get_modelmeta()
        custom = dict(meta.custom_metadata_map)
        self.labels = _labels_from_metadata(custom.get(METADATA_LABELS, ""))
        self.task = custom.get(METADATA_TASK) or _guess_task(self.inputs, self.outputs)
        self.providers = tuple(session.get_providers())
        self.descriptor = ModelDescriptor(
            model_id=self.descriptor.model_id,
            backend=BACKEND_NAME,
            source=shown,
            size_bytes=path.stat().st_size,
            family=meta.graph_name or path.stem,
        )
        self._executor = ThreadPoolExecutor(
            max_workers=self._max_concurrent_runs,
            thread_name_prefix=f"onnx-{self.descriptor.model_id}",
        )
        self._slots = asyncio.Semaphore(self._max_concurrent_runs)
        self.status = ModelStatus.READY
        logger.info(
            "ONNX model %s loaded on %s", self.descriptor.model_id, ", ".join(self.providers)
        )

    def _create_session(self, path: pathlib.Path) -> Any:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ModelLoadError(
                "onnxruntime is not installed; install the node extra: "
                "pip install 'edge-agent-mesh[node]'"
            ) from None
        self._errors = _onnxruntime_errors(ort)
        providers = choose_providers(ort.get_available_providers(), self._requested_providers)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self._intra_op_threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: ORT's warnings go to stderr, not our logs
        try:
            return ort.InferenceSession(str(path), options, providers=providers)
        except self._errors as error:
            if providers == [CPU] or self._requested_providers:
                raise ModelLoadError(f"ONNX Runtime could not load {path}: {error}") from None
            logger.warning(
                "ONNX Runtime could not load %s on %s (%s); trying CPU only",
                path,
                providers[0],
                error,
            )
        try:
            return ort.InferenceSession(str(path), options, providers=[CPU])
        except self._errors as error:
            raise ModelLoadError(f"ONNX Runtime could not load {path}: {error}") from None

    async def close(self) -> None:
        if self._executor is not None:
            await asyncio.to_thread(self._executor.shutdown, True)
            self._executor = None
        self._session = None
        self.status = ModelStatus.UNLOADED

    # ------------------------------------------------------------------ running

    async def run(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] = ()
    ) -> dict[str, Any]:
        """Outputs by name (numpy arrays; lists for non-tensor outputs) for named inputs."""
        if self.status is not ModelStatus.READY or self._slots is None:
            raise NotReadyError(f"model {self.descriptor.model_id!r} is {self.status.value}")
        check_inputs(self.inputs, inputs)
        names = check_output_names(self.outputs, outputs)
        if self._slots.locked() and self._waiting >= self._max_queued_runs:
            raise OverloadedError(
                f"model {self.descriptor.model_id!r} has {self._waiting} runs waiting; retry later"
            )
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        try:
            loop = asyncio.get_running_loop()
            values = await loop.run_in_executor(
                self._executor, self._session.run, names, dict(inputs)
            )
        except self._errors as error:
            kind = type(error).__name__
            if kind == "InvalidArgument":
                raise InvalidRequestError(
                    f"model {self.descriptor.model_id!r} refused the inputs: {error}"
                ) from None
            raise MeshError(
                f"ONNX Runtime failed on {self.descriptor.model_id!r}: {error}"
            ) from None
        finally:
            self._slots.release()
        return dict(zip(names, values, strict=True))

    async def classify(self, text: str) -> Classification:
        """The label for one text; the model must take one string input and give probabilities."""
        if self.task != "text-classification":
            raise InvalidRequestError(
                f"model {self.descriptor.model_id!r} is not a text "
                f"classifier (it is a {self.task} model); use Infer"
            )
        spec = self.inputs[0]
        shape = (1,) * max(1, len(spec.shape))
        values = await self.run({spec.name: np.array([text], dtype=object).reshape(shape)})
        for output in self.outputs:
            value = values[output.name]
            if isinstance(value, list) and value and isinstance(value[0], dict):  # a ZipMap
                return ranked_scores(list(value[0]), list(value[0].values()))
            if (
                isinstance(value, np.ndarray)
                and value.dtype.kind == "f"
                and self.labels
                and value.shape[-1] == len(self.labels)
            ):
                return ranked_scores(self.labels, value.reshape(-1, len(self.labels))[0].tolist())
        raise MeshError(
            f"model {self.descriptor.model_id!r} gave no probabilities output for "
            f"its {len(self.labels)} labels"
        )

    async def stream(self, request: GenerationInput) -> AsyncGenerator[Piece, None]:
        raise InvalidRequestError(
            f"model {self.descriptor.model_id!r} is an ONNX Runtime {self.task} model and does "
            "not generate text; use Classify or Infer"
        )
        yield Piece("")  # pragma: no cover - makes this an async generator


def _labels_from_metadata(value: str) -> tuple[str, ...]:
    if not value:
        return ()
    try:
        labels = json.loads(value)
    except json.JSONDecodeError:
        logger.warning("ignoring model metadata %s: not JSON", METADATA_LABELS)
        return ()
    return tuple(str(x) for x in labels) if isinstance(labels, list) else ()


def _guess_task(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> str:
    """A model with one string input and a map-of-probabilities output is a text classifier."""
    if (
        len(inputs) == 1
        and inputs[0].dtype == "string"
        and any(o.dtype.startswith("seq(map(string") for o in outputs)
    ):
        return "text-classification"
    return "tensor"
