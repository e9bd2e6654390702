"""One exception hierarchy for the whole project.

Servicers translate these to gRPC status codes at the edge (`to_grpc_status`);
the client library translates status codes back (`from_grpc_error`), so callers
never import grpc.
"""

from __future__ import annotations

from typing import Any


class MeshError(Exception):
    """Base of every error the project raises on purpose."""

    grpc_code_name = "INTERNAL"

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields

    def __str__(self) -> str:
        return self.message


class InvalidRequestError(MeshError):
    """The request is malformed or out of range; change it and retry."""

    grpc_code_name = "INVALID_ARGUMENT"


class NotFoundError(MeshError):
    """The named model, agent, node or task does not exist."""

    grpc_code_name = "NOT_FOUND"


class OverloadedError(MeshError):
    """No capacity left now (queue full); retry later or elsewhere."""

    grpc_code_name = "RESOURCE_EXHAUSTED"


class UnavailableError(MeshError):
    """The peer cannot be reached or is not serving."""

    grpc_code_name = "UNAVAILABLE"


class DeadlineExceededError(MeshError):
    """The request ran out of time."""

    grpc_code_name = "DEADLINE_EXCEEDED"


class CancelledError(MeshError):
    """The request was cancelled by the caller."""

    grpc_code_name = "CANCELLED"


class NotReadyError(MeshError):
    """The component is still starting (e.g. the model is loading)."""

    grpc_code_name = "UNAVAILABLE"


class PermissionDeniedError(MeshError):
    """The caller is not authenticated or not allowed."""

    grpc_code_name = "PERMISSION_DENIED"


class ConfigError(MeshError):
    """A configuration or topology file is wrong; the message names file, key and line."""

    grpc_code_name = "FAILED_PRECONDITION"


class ModelLoadError(MeshError):
    """A model file is missing, unreadable or not of the expected format."""

    grpc_code_name = "FAILED_PRECONDITION"


class TaskFailedError(MeshError):
    """Every attempt at a task failed; `attempts` says where and why."""

    grpc_code_name = "UNAVAILABLE"


class ProcessStartError(MeshError):
    """A local child process (node, coordinator) exited or timed out before its ready line."""


_BY_CODE_NAME: dict[str, type[MeshError]] = {
    "INVALID_ARGUMENT": InvalidRequestError,
    "OUT_OF_RANGE": InvalidRequestError,
    "NOT_FOUND": NotFoundError,
    "RESOURCE_EXHAUSTED": OverloadedError,
    "UNAVAILABLE": UnavailableError,
    "DEADLINE_EXCEEDED": DeadlineExceededError,
    "CANCELLED": CancelledError,
    "PERMISSION_DENIED": PermissionDeniedError,
    "UNAUTHENTICATED": PermissionDeniedError,
    "FAILED_PRECONDITION": ConfigError,
}


def error_for_code_name(code_name: str, message: str) -> MeshError:
    """The project's exception for a gRPC status code name (e.g. "NOT_FOUND")."""
    cls = _BY_CODE_NAME.get(code_name, MeshError)
    return cls(message, grpc_code=code_name)
