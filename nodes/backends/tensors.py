"""Tensors on the wire (`edgemesh.v1.Tensor`) and in numpy, and the checks between them.

Pure functions: no onnxruntime here, so they are unit-tested without a model.
Numeric tensors travel as little-endian row-major bytes, strings as a list.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edgemesh.v1 import node_pb2
from mesh.core.errors import InvalidRequestError
from mesh.core.untrusted import quoted

# Wire dtype names (numpy's) by ONNX Runtime type string.
ONNX_TYPES: dict[str, str] = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
    "tensor(string)": "string",
}
NUMERIC_DTYPES = frozenset(ONNX_TYPES.values()) - {"string"}
MAX_TENSOR_ELEMENTS = 64 * 1024 * 1024


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output of a model; -1 in `shape` for a dimension of any size."""

    name: str
    dtype: str  # a wire dtype name, or the ONNX type string when it has none (e.g. a map)
    shape: tuple[int, ...]
    dim_names: tuple[str, ...] = ()

    def to_proto(self) -> node_pb2.TensorSpec:
        return node_pb2.TensorSpec(
            name=self.name, dtype=self.dtype, shape=list(self.shape), dim_names=list(self.dim_names)
        )


def spec_from_onnx(name: str, onnx_type: str, shape: Sequence[object] | None) -> TensorSpec:
    """A TensorSpec from ONNX Runtime's NodeArg fields (shape entries are ints, names or None)."""
    dims: list[int] = []
    names: list[str] = []
    for dim in shape or ():
        if isinstance(dim, int) and dim >= 0:
            dims.append(dim)
            names.append("")
        else:
            dims.append(-1)
            names.append(dim if isinstance(dim, str) else "")
    return TensorSpec(
        name=name,
        dtype=ONNX_TYPES.get(onnx_type, onnx_type),
        shape=tuple(dims),
        dim_names=tuple(names) if any(names) else (),
    )


def tensor_to_array(name: str, tensor: node_pb2.Tensor) -> np.ndarray:
    """The numpy array a wire tensor describes; InvalidRequestError says what is wrong with it."""
    shape = tuple(tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidRequestError(
            f"input {quoted(name)}: shape {list(shape)} has a negative dimension"
        )
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if count > MAX_TENSOR_ELEMENTS:
        raise InvalidRequestError(
            f"input {quoted(name)}: {count} elements is over the limit of {MAX_TENSOR_ELEMENTS}"
        )
    if tensor.dtype == "string":
        if tensor.raw:
            raise InvalidRequestError(
                f"input {quoted(name)}: a string tensor carries `strings`, not `raw`"
            )
        if len(tensor.strings) != count:
            raise InvalidRequestError(
                f"input {quoted(name)}: shape {list(shape)} needs {count} strings, "
                f"got {len(tensor.strings)}"
            )
        return np.array(list(tensor.strings), dtype=object).reshape(shape)
    if tensor.dtype not in NUMERIC_DTYPES:
        known = ", ".join(sorted(NUMERIC_DTYPES | {"string"}))
        raise InvalidRequestError(
            f"input {quoted(name)}: dtype {quoted(tensor.dtype)} is not one of {known}"
        )
    if tensor.strings:
        raise InvalidRequestError(
            f"input {quoted(name)}: a {tensor.dtype} tensor carries `raw`, not `strings`"
        )
    dtype = np.dtype(tensor.dtype).newbyteorder("<")
    if len(tensor.raw) != count * dtype.itemsize:
        raise InvalidRequestError(
            f"input {quoted(name)}: shape {list(shape)} of {tensor.dtype} needs "
            f"{count * dtype.itemsize} bytes, got {len(tensor.raw)}"
        )
    # Native byte order for ONNX Runtime; a copy, so the array owns writable memory.
    return (
        np.frombuffer(tensor.raw, dtype=dtype)
        .astype(dtype.newbyteorder("="), copy=True)
        .reshape(shape)
    )


def array_to_tensor(name: str, value: object) -> node_pb2.Tensor:
    """The wire tensor for an output; ValueError for outputs that are not tensors (maps, sequences)."""
    if not isinstance(value, np.ndarray):
        raise ValueError(
            f"output {name!r} is a {type(value).__name__}, not a tensor; "
            "only tensor outputs can be returned"
        )
    shape = list(value.shape)
    if value.dtype == object or value.dtype.kind in "US":
        return node_pb2.Tensor(
            dtype="string", shape=shape, strings=[str(x) for x in value.reshape(-1)]
        )
    dtype_name = value.dtype.name
    if dtype_name not in NUMERIC_DTYPES:
        raise ValueError(f"output {name!r} has dtype {dtype_name}, which has no wire form")
    little = value.astype(value.dtype.newbyteorder("<"), copy=False)
    return node_pb2.Tensor(
        dtype=dtype_name, shape=shape, raw=np.ascontiguousarray(little).tobytes()
    )


def check_inputs(specs: Sequence[TensorSpec], arrays: Mapping[str, np.ndarray]) -> None:
    """Every input present, known, of the right dtype and rank, fixed dimensions matching."""
    by_name = {s.name: s for s in specs}
    unknown = sorted(set(arrays) - set(by_name))
    if unknown:
        raise InvalidRequestError(
            f"unknown input(s) {', '.join(quoted(n) for n in unknown[:8])}; the model takes {', '.join(by_name)}"
        )
    missing = [n for n in by_name if n not in arrays]
    if missing:
        raise InvalidRequestError(f"missing input(s) {', '.join(missing)}")
    for name, array in arrays.items():
        spec = by_name[name]
        got = "string" if array.dtype == object else array.dtype.name
        if got != spec.dtype:
            raise InvalidRequestError(f"input {quoted(name)} must be {spec.dtype}, got {got}")
        if spec.shape and len(spec.shape) != array.ndim:
            raise InvalidRequestError(
                f"input {quoted(name)} must have {len(spec.shape)} dimensions "
                f"(shape {list(spec.shape)}), got {list(array.shape)}"
            )
        for axis, (want, have) in enumerate(zip(spec.shape, array.shape, strict=False)):
            if want >= 0 and want != have:
                raise InvalidRequestError(
                    f"input {quoted(name)}: dimension {axis} must be {want}, "
                    f"got {have} (shape {list(array.shape)})"
                )


def check_output_names(specs: Sequence[TensorSpec], wanted: Sequence[str]) -> list[str]:
    """The outputs to compute: `wanted`, or all of them when it is empty."""
    names = [s.name for s in specs]
    unknown = [w for w in wanted if w not in names]
    if unknown:
        raise InvalidRequestError(
            f"unknown output(s) {', '.join(quoted(n) for n in unknown[:8])}; the model gives {', '.join(names)}"
        )
    return list(wanted) or names
