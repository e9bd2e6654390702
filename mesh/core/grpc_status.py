"""Translation between the project's exceptions and gRPC status codes."""

from __future__ import annotations

import grpc

from mesh.core.errors import MeshError, error_for_code_name


def status_code_for(error: MeshError) -> grpc.StatusCode:
    """The gRPC status code a servicer answers for `error`."""
    return getattr(grpc.StatusCode, error.grpc_code_name, grpc.StatusCode.INTERNAL)


def from_grpc_error(error: grpc.RpcError) -> MeshError:
    """The project's exception for an error raised by a grpc call."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    name = code.name if code is not None else "UNKNOWN"
    return error_for_code_name(name, details or name.lower())
