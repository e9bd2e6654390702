"""Errors to gRPC status and back, without a network: the status a servicer sends is read back
into the same exception (type, message, task, attempts); anything else in the trailer falls
back to the code and message."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from edgemesh.v1 import errors_pb2
from mesh.core import errors
from mesh.core.attempts import AttemptOutcome, AttemptRecord
from mesh.core.grpc_status import (
    DETAILS_KEY,
    MAX_DETAIL_BYTES,
    MAX_MESSAGE_BYTES,
    error_detail,
    from_grpc_error,
    grpc_status_for,
    set_error,
)
from mesh.core.ids import NodeId, TaskId

pytestmark = pytest.mark.unit

ATTEMPTS = (
    AttemptRecord(NodeId("n1"), "kitchen", AttemptOutcome.UNAVAILABLE, 12.5, "connection reset"),
    AttemptRecord(NodeId("n2"), "garage", AttemptOutcome.TIMEOUT, 30000.0, "silent for 30 s", 7),
    AttemptRecord(NodeId("n3"), "attic", AttemptOutcome.OVERLOADED, 0.25, "queue full"),
)


def rpc_error(status: grpc.Status) -> grpc.aio.AioRpcError:
    """The error a grpc.aio client raises for a call that ended with `status`."""
    return grpc.aio.AioRpcError(
        status.code,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(*status.trailing_metadata),
        details=status.details,
    )


def over_the_wire(error: errors.MeshError) -> errors.MeshError:
    return from_grpc_error(rpc_error(grpc_status_for(error)))


def raw_status(code: grpc.StatusCode, message: str, *details: object) -> grpc.aio.AioRpcError:
    status = status_pb2.Status(code=code.value[0], message=message)
    for detail in details:
        status.details.add().Pack(detail)
    trailer = grpc.aio.Metadata((DETAILS_KEY, status.SerializeToString()))
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailer, details=message)


@pytest.mark.parametrize(
    "cls", [errors.TaskFailedError, errors.DeadlineExceededError], ids=lambda c: c.__name__
)
def test_a_failed_tasks_attempts_survive_the_wire(cls):
    sent = cls("task t-1 failed: all 3 attempts failed", task_id=TaskId("t-1"), attempts=ATTEMPTS)
    received = over_the_wire(sent)
    assert type(received) is cls
    assert str(received) == str(sent) and received.task_id == "t-1"
    assert received.attempts == ATTEMPTS  # node, outcome, duration, detail and tokens
    assert [a.node_name for a in received.attempts] == ["kitchen", "garage", "attic"]


@pytest.mark.parametrize(
    "cls",
    [
        errors.MeshError,
        errors.InvalidRequestError,
        errors.NotFoundError,
        errors.AlreadyExistsError,
        errors.OverloadedError,
        errors.UnavailableError,
        errors.CancelledError,
        errors.NotReadyError,  # shares UNAVAILABLE with UnavailableError and TaskFailedError
        errors.PermissionDeniedError,
        errors.ConfigError,
        errors.ModelLoadError,  # shares FAILED_PRECONDITION with ConfigError
    ],
    ids=lambda c: c.__name__,
)
def test_every_kind_arrives_as_itself(cls):
    received = over_the_wire(cls("it went wrong"))
    assert type(received) is cls and str(received) == "it went wrong"
    assert received.attempts == () and received.task_id == ""


def test_an_error_class_of_another_module_arrives_as_its_nearest_public_kind():
    class RecordTooLongError(errors.InvalidRequestError):
        pass

    received = over_the_wire(RecordTooLongError("the record is 300 bytes"))
    assert type(received) is errors.InvalidRequestError


def test_the_status_is_the_standard_rich_status():
    sent = errors.TaskFailedError("all failed", task_id=TaskId("t-2"), attempts=ATTEMPTS[:1])
    status = grpc_status_for(sent)
    assert status.code is grpc.StatusCode.UNAVAILABLE and status.details == "all failed"
    [(key, value)] = status.trailing_metadata
    rich = status_pb2.Status.FromString(value)
    assert key == "grpc-status-details-bin"
    assert rich.code == grpc.StatusCode.UNAVAILABLE.value[0] and rich.message == "all failed"
    detail = errors_pb2.ErrorDetail()
    assert rich.details[0].Unpack(detail)
    assert detail.kind == "TaskFailedError" and detail.task_id == "t-2"
    assert detail.attempts[0].outcome == "unavailable"
    assert detail.attempts[0].node_name == "kitchen"


def test_set_error_gives_a_context_that_cannot_abort_the_same_status():
    class ServeContext:  # what Ray Serve's RayServegRPCContext offers
        def set_code(self, code):
            self.code = code

        def set_details(self, details):
            self.details = details

        def set_trailing_metadata(self, trailing_metadata):
            self.trailing_metadata = trailing_metadata

    sent = errors.NotFoundError("no node serves model 'gpt-9'")
    context = ServeContext()
    set_error(context, sent)
    status = grpc_status_for(sent)
    assert (context.code, context.details) == (status.code, status.details)
    assert context.trailing_metadata == list(status.trailing_metadata)


def test_a_big_error_is_cut_to_fit_a_trailer_and_keeps_its_latest_attempts():
    attempts = tuple(
        AttemptRecord(NodeId(f"n{i}"), f"node-{i}", AttemptOutcome.ERROR, 1.0, "x" * 300)
        for i in range(60)
    )
    sent = errors.TaskFailedError("attempts: " + "y" * 5000, task_id="t-3", attempts=attempts)
    status = grpc_status_for(sent)
    [(_key, value)] = status.trailing_metadata
    assert len(status.details.encode()) <= MAX_MESSAGE_BYTES
    assert len(value) <= MAX_DETAIL_BYTES + MAX_MESSAGE_BYTES + 64
    detail = error_detail(sent)
    assert detail.ByteSize() <= MAX_DETAIL_BYTES
    assert detail.omitted_attempts > 0
    assert detail.omitted_attempts + len(detail.attempts) == 60
    received = from_grpc_error(rpc_error(status))
    assert received.attempts[-1].node_name == "node-59"  # the latest attempts are the ones kept
    assert received.fields["omitted_attempts"] == detail.omitted_attempts
    assert status_pb2.Status.FromString(value).message == status.details  # what clients check


def test_a_cut_message_stays_valid_text():
    status = grpc_status_for(errors.MeshError("é" * 2000))
    assert status.details.endswith(" [...]") and status.details.startswith("éé")


def test_no_trailer_falls_back_to_code_and_message():
    error = grpc.aio.AioRpcError(
        grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(), grpc.aio.Metadata(), details="gone"
    )
    received = from_grpc_error(error)
    assert type(received) is errors.NotFoundError and str(received) == "gone"


def test_an_error_without_any_grpc_fields_still_translates():
    received = from_grpc_error(grpc.RpcError("no code, no details"))
    assert type(received) is errors.MeshError and "no code" in str(received)


@pytest.mark.parametrize(
    "trailer",
    [
        b"\xff\xfe not a status",
        "a text value where bytes belong",
        status_pb2.Status(code=14, message="m", details=[]).SerializeToString() + b"\x00\x01",
    ],
    ids=["garbage-bytes", "text", "trailing-junk"],
)
def test_a_garbled_trailer_falls_back_to_code_and_message(trailer):
    error = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE,
        grpc.aio.Metadata(),
        grpc.aio.Metadata((DETAILS_KEY, trailer)),
        details="node down",
    )
    received = from_grpc_error(error)
    assert type(received) is errors.UnavailableError and str(received) == "node down"


def test_details_of_other_types_are_ignored():
    info = error_details_pb2.ErrorInfo(reason="QUOTA", domain="example.com")
    received = from_grpc_error(raw_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", info))
    assert type(received) is errors.OverloadedError and str(received) == "slow down"


def test_an_error_detail_with_garbage_inside_falls_back():
    status = status_pb2.Status(code=14, message="m")
    packed = status.details.add()
    packed.type_url = "type.googleapis.com/edgemesh.v1.ErrorDetail"
    packed.value = b"\xff\xff\xff"
    trailer = grpc.aio.Metadata((DETAILS_KEY, status.SerializeToString()))
    error = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), trailer, details="m"
    )
    assert type(from_grpc_error(error)) is errors.UnavailableError


def test_an_unknown_kind_or_outcome_from_a_newer_server_is_read_as_far_as_it_goes():
    detail = errors_pb2.ErrorDetail(
        kind="QuantumDecoherenceError",
        task_id="t-4",
        attempts=[errors_pb2.AttemptDetail(node_name="lab", outcome="evaporated")],
    )
    received = from_grpc_error(raw_status(grpc.StatusCode.UNAVAILABLE, "hm", detail))
    assert type(received) is errors.UnavailableError and received.task_id == "t-4"
    assert received.attempts[0].node_name == "lab"
    assert received.attempts[0].outcome is AttemptOutcome.ERROR


def test_a_kind_that_contradicts_the_code_loses_to_the_code():
    detail = errors_pb2.ErrorDetail(kind="NotFoundError")
    received = from_grpc_error(raw_status(grpc.StatusCode.PERMISSION_DENIED, "no", detail))
    assert type(received) is errors.PermissionDeniedError


def test_a_rich_status_for_another_code_is_ignored():
    detail = errors_pb2.ErrorDetail(kind="TaskFailedError", task_id="t-5")
    status = status_pb2.Status(code=grpc.StatusCode.UNAVAILABLE.value[0], message="m")
    status.details.add().Pack(detail)
    trailer = grpc.aio.Metadata((DETAILS_KEY, status.SerializeToString()))
    error = grpc.aio.AioRpcError(
        grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(), trailer, details="late"
    )
    received = from_grpc_error(error)
    assert type(received) is errors.DeadlineExceededError and received.task_id == ""


def test_a_detail_carried_elsewhere_is_used_when_the_trailer_has_none():
    carried = error_detail(errors.TaskFailedError("x", task_id="t-6", attempts=ATTEMPTS))
    error = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details="x"
    )
    received = from_grpc_error(error, detail=carried)
    assert type(received) is errors.TaskFailedError and received.attempts == ATTEMPTS
