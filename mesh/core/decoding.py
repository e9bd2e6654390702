"""Requests whose bytes do not decode answer INVALID_ARGUMENT, never UNKNOWN.

gRPC Python answers a request its deserializer cannot parse (garbage, a truncated message, a
string field that is not UTF-8, nesting past protobuf's depth limit) with UNKNOWN: "Unexpected
DecodeError". Here every unary-request method decodes through `tolerant`, which turns such a
request into an `Undecodable` instead:

- on the project's own servers (nodes, the coordinator's fast path) `DecodeGuard`, a server
  interceptor `mesh.core.channels.create_server` installs, answers it with INVALID_ARGUMENT
  before the servicer sees it;
- Ray Serve's gRPC proxy takes no interceptors: `add_mesh_service` registers MeshService there
  with tolerant deserializers, the proxy hands the `Undecodable` to the ingress replica like any
  request, and the ingress answers it with INVALID_ARGUMENT (`undecodable_error`).

Client-streaming methods (only gRPC's reflection service has one) keep gRPC's own decoding.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError

from mesh.core.errors import InvalidRequestError
from mesh.core.grpc_status import abort_with_error

_MAX_REASON_CHARS = 200


@dataclass(frozen=True)
class Undecodable:
    """A request that did not decode, and why. Picklable: Serve's proxy sends it to a replica."""

    type_name: str
    reason: str
    size_bytes: int

    def error(self) -> InvalidRequestError:
        return InvalidRequestError(
            f"the request ({self.size_bytes} bytes) is not a valid {self.type_name}: "
            f"{self.reason}; send a serialized {self.type_name} (strings in UTF-8)"
        )


def undecodable_error(request: object) -> InvalidRequestError | None:
    """The error to answer for `request` when it did not decode, else None."""
    return request.error() if isinstance(request, Undecodable) else None


def tolerant(parse: Callable[[bytes], Any], type_name: str) -> Callable[[bytes], Any]:
    """`parse`, but a request that does not decode becomes an `Undecodable` (no exception)."""

    def decode(raw: bytes) -> Any:
        try:
            return parse(raw)
        except DecodeError as error:  # protobuf's one error for bytes that are not the message
            return Undecodable(type_name, str(error)[:_MAX_REASON_CHARS], len(raw))

    return decode


def _type_name(parse: Callable[[bytes], Any]) -> str:
    owner = getattr(parse, "__self__", None)  # Message.FromString is a bound classmethod
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", "") or "request message")


Behaviour = Callable[[Any, grpc.aio.ServicerContext], Any]


def _guard_unary(inner: Behaviour) -> Behaviour:
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        error = undecodable_error(request)
        if error is not None:
            await abort_with_error(context, error)
        return await inner(request, context)

    return unary


def _guard_stream(inner: Behaviour) -> Behaviour:
    if not inspect.isasyncgenfunction(inner):  # writes with context.write (gRPC's health Watch)
        return _guard_unary(inner)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        error = undecodable_error(request)
        if error is not None:
            await abort_with_error(context, error)
        async for item in inner(request, context):
            yield item

    return stream


def guard_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """`handler` with a tolerant deserializer and an INVALID_ARGUMENT answer to what it cannot
    decode; a client-streaming handler or one without a deserializer is returned as it is."""
    parse = handler.request_deserializer
    if parse is None or handler.request_streaming:
        return handler
    decode = tolerant(parse, _type_name(parse))
    if handler.unary_unary is not None:
        return handler._replace(
            request_deserializer=decode, unary_unary=_guard_unary(handler.unary_unary)
        )
    if handler.unary_stream is not None:
        return handler._replace(
            request_deserializer=decode, unary_stream=_guard_stream(handler.unary_stream)
        )
    return handler


class DecodeGuard(grpc.aio.ServerInterceptor):
    """Answers requests that do not decode with INVALID_ARGUMENT, on every service."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        return guard_handler(handler) if handler is not None else handler


def add_service(
    service: ServiceDescriptor, servicer: object, server: Any
) -> None:  # server: a grpc.aio.Server, or Serve's subclass of it
    """Register `servicer`'s methods of `service` on `server`, each with a tolerant deserializer
    (what the generated `add_*Servicer_to_server` does, but an undecodable request reaches the
    servicer as an `Undecodable`). Unary and server-streaming methods only."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        decode = tolerant(request_class.FromString, method.input_type.full_name)
        behaviour = getattr(servicer, method.name)
        make = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(
            behaviour,
            request_deserializer=decode,
            response_serializer=response_class.SerializeToString,
        )
    generic = grpc.method_handlers_generic_handler(service.full_name, handlers)
    server.add_generic_rpc_handlers((generic,))
    server.add_registered_method_handlers(service.full_name, handlers)


def add_mesh_service(servicer: object, server: Any) -> None:
    """MeshService with tolerant deserializers: the servicer function Ray Serve's gRPC proxy is
    given (`mesh.coordinator.app.MESH_SERVICER`), in place of the generated one."""
    from edgemesh.v1 import mesh_pb2

    add_service(mesh_pb2.DESCRIPTOR.services_by_name["MeshService"], servicer, server)
