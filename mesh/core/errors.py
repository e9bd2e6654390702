"""One exception hierarchy for the whole project.

Servicers answer them as a gRPC status with the error's kind, task and attempts in its details
(`mesh.core.grpc_status.abort_with_error`); the client library turns that status back into the
same exception (`from_grpc_error`), so callers never import grpc.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mesh.core.attempts import AttemptRecord


class MeshError(Exception):
    """Base of every error the project raises on purpose."""

    grpc_code_name = "INTERNAL"

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields

    def __str__(self) -> str:
        return self.message

    @property
    def task_id(self) -> str:
        """The task this error ended ("" when none)."""
        return str(self.fields.get("task_id") or "")

    @property
    def attempts(self) -> tuple[AttemptRecord, ...]:
        """Every attempt at the task, in order (TaskFailedError, DeadlineExceededError)."""
        return tuple(self.fields.get("attempts") or ())


class InvalidRequestError(MeshError):
    """The request is malformed or out of range; change it and retry."""

    grpc_code_name = "INVALID_ARGUMENT"


class NotFoundError(MeshError):
    """The named model, agent, node or task does not exist."""

    grpc_code_name = "NOT_FOUND"


class AlreadyExistsError(MeshError):
    """The name is taken (e.g. a task id another API key's task holds); choose another."""

    grpc_code_name = "ALREADY_EXISTS"


class OverloadedError(MeshError):
    """No capacity left now (queue full); retry later or elsewhere."""

    grpc_code_name = "RESOURCE_EXHAUSTED"


class RateLimitedError(OverloadedError):
    """The caller is over its rate (an API key's requests or tokens per minute); retry after
    `retry_after_s`."""

    @property
    def retry_after_s(self) -> float:
        """Seconds until the caller may try again (0: it did not say)."""
        return float(self.fields.get("retry_after_s") or 0.0)


class UnavailableError(MeshError):
    """The peer cannot be reached or is not serving."""

    grpc_code_name = "UNAVAILABLE"


class DeadlineExceededError(MeshError):
    """The request ran out of time; a task's says which attempts it made (`attempts`)."""

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


class UnauthenticatedError(PermissionDeniedError):
    """The caller gave no credentials, or ones that are wrong or revoked."""

    grpc_code_name = "UNAUTHENTICATED"


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
    "ALREADY_EXISTS": AlreadyExistsError,
    "RESOURCE_EXHAUSTED": OverloadedError,
    "UNAVAILABLE": UnavailableError,
    "DEADLINE_EXCEEDED": DeadlineExceededError,
    "CANCELLED": CancelledError,
    "PERMISSION_DENIED": PermissionDeniedError,
    "UNAUTHENTICATED": UnauthenticatedError,
    "FAILED_PRECONDITION": ConfigError,
}


# The kinds an error has on the wire (`ErrorDetail.kind`): the classes of this module.
_BY_KIND: dict[str, type[MeshError]] = {
    cls.__name__: cls
    for cls in (
        MeshError,
        InvalidRequestError,
        NotFoundError,
        AlreadyExistsError,
        OverloadedError,
        RateLimitedError,
        UnavailableError,
        DeadlineExceededError,
        CancelledError,
        NotReadyError,
        PermissionDeniedError,
        UnauthenticatedError,
        ConfigError,
        ModelLoadError,
        TaskFailedError,
    )
}


def kind_of(error: MeshError) -> str:
    """The name `error` goes by on the wire: its class, or the nearest one of this module."""
    for cls in type(error).__mro__:
        if _BY_KIND.get(cls.__name__) is cls:
            return cls.__name__
    return MeshError.__name__  # unreachable: every MeshError has MeshError in its MRO


def error_for_code_name(
    code_name: str, message: str, *, kind: str = "", **fields: Any
) -> MeshError:
    """The project's exception for a gRPC status code name (e.g. "NOT_FOUND").

    `kind` (the error's class name, from the wire) picks the exact class when it is one of
    this module's and goes with the code; otherwise the code alone decides."""
    cls = _BY_KIND.get(kind)
    if cls is None or cls.grpc_code_name != code_name:
        cls = _BY_CODE_NAME.get(code_name, MeshError)
    return cls(message, grpc_code=code_name, **fields)
