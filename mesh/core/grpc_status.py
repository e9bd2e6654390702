"""The project's exceptions on the wire and back: one way out, one way back.

Out: a servicer answers a MeshError with `abort_with_error` (grpc.aio), or with `set_error`
where the context cannot abort (Ray Serve's gRPC context). Both send one `google.rpc.Status`:
the code, the message, and an `edgemesh.v1.ErrorDetail` (kind, task, attempts) in its details,
in the standard `grpc-status-details-bin` trailer (proto/edgemesh/v1/errors.proto), so any gRPC
client can read it.

An error that says when to try again (`RateLimitedError.retry_after_s`) also carries the
standard `google.rpc.RetryInfo` in the Status's details and a `retry-after` trailer (whole
seconds, as HTTP's header).

Back: `from_grpc_error` turns code, message and detail into the same exception, attempts
(and the retry delay) included. A detail that is missing, of another type or garbled never fails it: the code and
message alone still make an exception.

Trailers are small (grpc's default limit on received metadata is 8 KiB, and the message travels
twice: as grpc-message and inside the Status), so the message is cut at `MAX_MESSAGE_BYTES` and
the detail at `MAX_DETAIL_BYTES` (attempts' texts shortened, then the earliest attempts left out).
"""

from __future__ import annotations

import collections
import inspect
import logging
import math
from typing import Any, NoReturn, Protocol

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from edgemesh.v1 import errors_pb2
from mesh.core.attempts import AttemptOutcome, AttemptRecord
from mesh.core.errors import InvalidRequestError, MeshError, error_for_code_name, kind_of
from mesh.core.ids import NodeId, TaskId

logger = logging.getLogger("mesh.core")

DETAILS_KEY = "grpc-status-details-bin"  # where gRPC carries a google.rpc.Status
RETRY_AFTER_KEY = "retry-after"  # whole seconds, beside the Status's RetryInfo
MAX_MESSAGE_BYTES = 1024
MAX_DETAIL_BYTES = 2048
_SHORT_DETAIL_CHARS = 80  # an attempt's text, when the detail is over its size
_MAX_TASK_ID_CHARS = 128
_CUT = " [...]"
# gRPC's own refusal of a message over a server's receive limit ("SERVER: Received message larger
# than max (N vs. M)"): RESOURCE_EXHAUSTED, the code of overload, but the request's fault.
_OVER_RECEIVE_LIMIT = "Received message larger than max"


class StatusContext(Protocol):
    """A servicer context that sets the status a call ends with (Ray Serve's gRPC context)."""

    def set_code(self, code: grpc.StatusCode) -> None: ...
    def set_details(self, details: str) -> None: ...
    def set_trailing_metadata(self, trailing_metadata: list[tuple[str, Any]]) -> None: ...


# ---------------------------------------------------------------------- out


def status_code_for(error: MeshError) -> grpc.StatusCode:
    """The gRPC status code a servicer answers for `error`."""
    return getattr(grpc.StatusCode, error.grpc_code_name, grpc.StatusCode.INTERNAL)


def attempt_detail(attempt: AttemptRecord) -> errors_pb2.AttemptDetail:
    return errors_pb2.AttemptDetail(
        node_id=attempt.node_id,
        node_name=attempt.node_name,
        outcome=attempt.outcome.value,
        duration_ms=attempt.duration_ms,
        detail=attempt.detail,
        completion_tokens=max(0, attempt.completion_tokens),
    )


def error_detail(error: MeshError) -> errors_pb2.ErrorDetail:
    """What `error` says beyond code and message, within `MAX_DETAIL_BYTES`."""
    detail = errors_pb2.ErrorDetail(
        kind=kind_of(error),
        task_id=error.task_id[:_MAX_TASK_ID_CHARS],
        attempts=[attempt_detail(a) for a in error.attempts],
    )
    if detail.ByteSize() > MAX_DETAIL_BYTES:
        for attempt in detail.attempts:
            if len(attempt.detail) > _SHORT_DETAIL_CHARS:
                attempt.detail = attempt.detail[: _SHORT_DETAIL_CHARS - len(_CUT)] + _CUT
        while detail.ByteSize() > MAX_DETAIL_BYTES and detail.attempts:
            del detail.attempts[0]
            detail.omitted_attempts += 1
    return detail


def _message(error: MeshError) -> str:
    message = str(error) or type(error).__name__
    encoded = message.encode()
    if len(encoded) <= MAX_MESSAGE_BYTES:
        return message
    return encoded[: MAX_MESSAGE_BYTES - len(_CUT)].decode(errors="ignore") + _CUT


class _Status(
    collections.namedtuple("_Status", ("code", "details", "trailing_metadata")), grpc.Status
):
    """A grpc.Status (grpc ships only the interface)."""


def retry_after_header(seconds: float) -> str:
    """`seconds` as a Retry-After value: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(seconds)))


def grpc_status_for(error: MeshError) -> grpc.Status:
    """The status a call that failed with `error` ends with: code, message, rich details."""
    code = status_code_for(error)
    status = status_pb2.Status(code=code.value[0], message=_message(error))
    status.details.add().Pack(error_detail(error))
    trailers: list[tuple[str, str | bytes]] = []
    retry_after_s = float(error.fields.get("retry_after_s") or 0.0)
    if retry_after_s > 0:
        info = error_details_pb2.RetryInfo()
        info.retry_delay.FromNanoseconds(int(retry_after_s * 1e9))
        status.details.add().Pack(info)
        trailers.append((RETRY_AFTER_KEY, retry_after_header(retry_after_s)))
    trailers.insert(0, (DETAILS_KEY, status.SerializeToString()))
    return _Status(code, status.message, tuple(trailers))


async def abort_with_error(context: grpc.aio.ServicerContext, error: MeshError) -> NoReturn:
    """End the call being served with `error` (code, message, ErrorDetail); raises."""
    await context.abort_with_status(grpc_status_for(error))
    raise AssertionError("unreachable: abort_with_status raises")  # grpc ships no types


def set_error(context: StatusContext, error: MeshError) -> None:
    """Make the call end with `error`, for a context that cannot abort (Ray Serve's): the
    method returns (or, streaming, yields once more) and the status goes out with it."""
    status = grpc_status_for(error)
    context.set_code(status.code)
    context.set_details(status.details)
    context.set_trailing_metadata(list(status.trailing_metadata))


# ---------------------------------------------------------------------- back


def _code_of(error: grpc.RpcError) -> grpc.StatusCode:
    code = error.code() if hasattr(error, "code") else None
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def _status_in_trailer(error: grpc.RpcError) -> status_pb2.Status | None:
    read = getattr(error, "trailing_metadata", None)
    pairs = read() if callable(read) else None
    if inspect.iscoroutine(pairs):  # an aio call rather than its error: not ours to await
        pairs.close()
        return None
    for key, value in pairs or ():
        if key == DETAILS_KEY and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except DecodeError:
                logger.debug("ignoring an undecodable %s trailer", DETAILS_KEY)
                return None
    return None


def _status_of(error: grpc.RpcError) -> status_pb2.Status | None:
    """The call's rich status, if it has one and it belongs to this call's status code."""
    status = _status_in_trailer(error)
    if status is None or status.code != _code_of(error).value[0]:
        return None  # no rich status, or one that belongs to another status than this call's
    return status


def retry_after_of(error: grpc.RpcError) -> float:
    """The RetryInfo delay of a failed call in seconds, 0.0 when it gives none."""
    status = _status_of(error)
    for packed in status.details if status is not None else ():
        if packed.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            try:
                packed.Unpack(info)
            except DecodeError:
                logger.debug("ignoring an undecodable RetryInfo")
                return 0.0
            return max(0.0, info.retry_delay.ToNanoseconds() / 1e9)
    return 0.0


def detail_of(error: grpc.RpcError) -> errors_pb2.ErrorDetail | None:
    """The ErrorDetail in the status trailer of a failed call, or None (none, or not readable)."""
    status = _status_of(error)
    if status is None:
        return None
    for packed in status.details:
        if packed.Is(errors_pb2.ErrorDetail.DESCRIPTOR):
            detail = errors_pb2.ErrorDetail()
            try:
                packed.Unpack(detail)
            except DecodeError:
                logger.debug("ignoring an undecodable ErrorDetail")
                return None
            return detail
    return None


def attempt_from_detail(attempt: errors_pb2.AttemptDetail) -> AttemptRecord:
    try:
        outcome = AttemptOutcome(attempt.outcome)
    except ValueError:  # an outcome from a newer server: a failure of another kind
        outcome = AttemptOutcome.ERROR
    return AttemptRecord(
        node_id=NodeId(attempt.node_id),
        node_name=attempt.node_name,
        outcome=outcome,
        duration_ms=attempt.duration_ms,
        detail=attempt.detail,
        completion_tokens=attempt.completion_tokens,
    )


def error_from_detail(
    code_name: str, message: str, detail: errors_pb2.ErrorDetail | None
) -> MeshError:
    """The project's exception for a status code name, message and (maybe) ErrorDetail."""
    if detail is None:
        return error_for_code_name(code_name, message)
    fields: dict[str, Any] = {}
    if detail.task_id:
        fields["task_id"] = TaskId(detail.task_id)
    if detail.attempts:
        fields["attempts"] = tuple(attempt_from_detail(a) for a in detail.attempts)
    if detail.omitted_attempts:
        fields["omitted_attempts"] = detail.omitted_attempts
    return error_for_code_name(code_name, message, kind=detail.kind, **fields)


def from_grpc_error(
    error: grpc.RpcError, *, detail: errors_pb2.ErrorDetail | None = None
) -> MeshError:
    """The project's exception for an error raised by a grpc call: the same type, message, task
    and attempts as the servicer's. `detail`: one carried elsewhere (a stream's last message),
    used when the trailer has none."""
    code = _code_of(error)
    message = error.details() if hasattr(error, "details") else str(error)
    detail = detail_of(error) or detail
    if too_large_for_the_server(code, message or "", detail):
        return InvalidRequestError(
            f"the request is larger than the server accepts ({message}); shorten it",
            grpc_code=code.name,
        )
    translated = error_from_detail(code.name, message or code.name.lower(), detail)
    retry_after_s = retry_after_of(error)
    if retry_after_s > 0:
        translated.fields["retry_after_s"] = retry_after_s
    return translated


def too_large_for_the_server(
    code: grpc.StatusCode, message: str, detail: errors_pb2.ErrorDetail | None
) -> bool:
    """Whether a failed call is gRPC refusing the request as over the server's receive limit
    (not a full server: that one says so in its detail). Sending it again anywhere fails the
    same way, so it is the caller's error (InvalidRequestError), never a node's fault."""
    return (
        code is grpc.StatusCode.RESOURCE_EXHAUSTED
        and detail is None
        and _OVER_RECEIVE_LIMIT in message
        and "CLIENT:" not in message  # a reply over this side's own limit: not the request
    )
