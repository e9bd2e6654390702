"""Every gRPC channel and server port in the project is created here.

One place so that transport security (mTLS, join tokens) can be added once
for every channel. Channels are plaintext in an open mesh and mTLS in a cluster (`ChannelSecurity`).
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Self

import grpc

from mesh.core.decoding import DecodeGuard

# Keepalive lets a client notice a dead peer on an idle connection; retries
# from the service config cover transient UNAVAILABLE on idempotent reads.
_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [
                    {"service": "edgemesh.v1.NodeService", "method": "Describe"},
                    {"service": "edgemesh.v1.MeshService", "method": "ListNodes"},
                    {"service": "edgemesh.v1.MeshService", "method": "DescribeTask"},
                ],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)

_COMMON_CHANNEL_OPTIONS: tuple[tuple[str, object], ...] = (
    ("grpc.enable_retries", 1),
    ("grpc.service_config", _SERVICE_CONFIG),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    # Reconnect quickly after a peer restarts (default backoff starts at 1 s).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
)


class Keepalive(enum.Enum):
    """How often a channel pings its server, chosen by what that server allows.

    A server answers pings more frequent than its policy allows with GOAWAY (too_many_pings),
    which kills every call on the connection. gRPC's default server policy, which Ray Serve's
    gRPC proxy keeps (it takes no server options), allows a ping only every 5 minutes, and
    none while no call is open. The project's own servers (`create_server`: nodes and the
    coordinator's fast path) allow one every 5 s, with or without calls.
    """

    # To a node (our server): a dead peer is noticed within ~15 s even on an idle connection.
    NODE = (10_000, 5_000, True)
    # To the coordinator's ingress, which may be Serve's proxy: within its default policy.
    INGRESS = (330_000, 20_000, False)

    def options(self) -> tuple[tuple[str, object], ...]:
        every_ms, timeout_ms, without_calls = self.value
        return (
            ("grpc.keepalive_time_ms", every_ms),
            ("grpc.keepalive_timeout_ms", timeout_ms),
            ("grpc.keepalive_permit_without_calls", int(without_calls)),
            ("grpc.http2.max_pings_without_data", 0),
        )


_SERVER_OPTIONS: tuple[tuple[str, object], ...] = (
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    # The pings our servers accept (see Keepalive): every 5 s at most, also without calls.
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.so_reuseport", 0),
)


Options = tuple[tuple[str, object], ...]


def _override(options: Options, **changes: object) -> Options:
    """`options` with the named gRPC options (dots spelled as `__`) replaced or added."""
    named = {key.replace("__", "."): value for key, value in changes.items()}
    return tuple((k, v) for k, v in options if k not in named) + tuple(named.items())


# Coordinator -> node links (the dispatcher's channels, mesh/coordinator/pool.py): a link that
# goes silent (cable pulled, host gone: no reset, no goodbye) must fail the calls on it within
# about a second, so the attempt loop moves them to another node long before the registry
# declares the node gone (RegistryTimings.vanished_host_bound_s). gRPC pings when it has read
# nothing for keepalive_time and closes the transport, failing every call on it UNAVAILABLE,
# when a ping is not acknowledged within keepalive_timeout (also its TCP_USER_TIMEOUT: the
# peer's kernel acknowledges, so a busy node process is not mistaken for a dead one). A gRPC
# client sends at most one ping per second while it receives no data (fixed in chttp2), and a
# unary call receives nothing until its answer: so while calls are in flight the link also
# holds a Heartbeat stream (NODE_LINK_HEARTBEAT_MS; mesh/coordinator/pool.py), whose data lets
# the keepalive ping 250 ms after the link went quiet. A connection attempt to a host that does
# not answer gives up after min_reconnect_backoff (gRPC's min connect timeout; 20 s by
# default), so a new call to a vanished node fails in a second instead of waiting that long.
NODE_LINK_OPTIONS: Options = _override(
    _COMMON_CHANNEL_OPTIONS + Keepalive.NODE.options(),
    grpc__keepalive_time_ms=250,
    grpc__keepalive_timeout_ms=250,
    grpc__min_reconnect_backoff_ms=1_000,
)
NODE_LINK_HEARTBEAT_MS = 200  # under keepalive_time: a healthy busy link never needs a ping
# A node's server accepts those pings (gRPC's default policy would answer pings more often than
# every 5 minutes without data with GOAWAY too_many_pings).
NODE_SERVER_OPTIONS: Options = _override(
    _SERVER_OPTIONS,
    grpc__http2__min_ping_interval_without_data_ms=100,
    grpc__http2__max_ping_strikes=0,  # 0: never GOAWAY for pings
    grpc__keepalive_permit_without_calls=1,
)


@dataclass(frozen=True)
class ChannelSecurity:
    """Transport security for channels and servers (mTLS with the cluster's certificates,
    mesh/core/pki.py). Plaintext when empty.

    A channel checks that the server's certificate was issued by `ca_file` and names
    `server_name` (a node's `<id>.node.edgemesh`: so a node is reached only as the id it
    advertised), and presents `cert_file`. A server presents `cert_file` and requires a client
    certificate from `ca_file`; the files are read again when they change (a renewed
    certificate is served from the next connection on)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None

    @property
    def enabled(self) -> bool:
        return self.ca_file is not None

    def expecting(self, server_name: str) -> ChannelSecurity:
        """The same credentials, for a server that must present `server_name`."""
        return dataclasses.replace(self, server_name=server_name) if self.enabled else self


PLAINTEXT = ChannelSecurity()


def _read(path: str | None) -> bytes:
    with open(path or "", "rb") as handle:
        return handle.read()


def _credentials(security: ChannelSecurity) -> grpc.ChannelCredentials:
    key = cert = None
    if security.cert_file and security.key_file:
        key, cert = _read(security.key_file), _read(security.cert_file)
    return grpc.ssl_channel_credentials(_read(security.ca_file), key, cert)


def create_channel(
    address: str,
    security: ChannelSecurity = PLAINTEXT,
    keepalive: Keepalive = Keepalive.NODE,
    *,
    options: Options | None = None,
) -> grpc.aio.Channel:
    """An asyncio channel to `address` ("host:port"), pinging as `keepalive` says its server
    allows; `options` replaces them all (NODE_LINK_OPTIONS: the coordinator's links to nodes)."""
    if options is None:
        options = _COMMON_CHANNEL_OPTIONS + keepalive.options()
    if security.enabled:
        if security.server_name:
            options = _override(options, grpc__ssl_target_name_override=security.server_name)
        return grpc.aio.secure_channel(address, _credentials(security), options=options)
    return grpc.aio.insecure_channel(address, options=options)


class PeerGuard(grpc.aio.ServerInterceptor):
    """Refuses (PERMISSION_DENIED) a call whose client certificate's role is not in `roles`: a
    node serves the coordinator and the operator, not another node holding a stolen key.
    The TLS handshake already required a certificate of the cluster's CA."""

    def __init__(self, roles: tuple[str, ...]) -> None:
        self._roles = frozenset(roles)

    def _allowed(self, context: grpc.aio.ServicerContext) -> bool:
        from mesh.core.pki import TrustError, identity_of_pem

        pems = context.auth_context().get("x509_pem_cert") or []
        try:
            return bool(pems) and identity_of_pem(bytes(pems[0])).role in self._roles
        except TrustError:
            return False

    def _wrap(self, inner: Any, streaming: bool) -> Any:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if not self._allowed(context):
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED, "this role may not call here"
                )
            return await inner(request, context)

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if not self._allowed(context):
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED, "this role may not call here"
                )
            async for item in inner(request, context):
                yield item

        return stream if streaming and inspect.isasyncgenfunction(inner) else unary

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        # Every kind of call, client-streaming ones included (reflection's is bidirectional):
        # the first argument is the request or the request iterator, guarded alike.
        for kind, streaming in (
            ("unary_unary", False),
            ("unary_stream", True),
            ("stream_unary", False),
            ("stream_stream", True),
        ):
            behaviour = getattr(handler, kind)
            if behaviour is not None:
                return handler._replace(**{kind: self._wrap(behaviour, streaming)})
        return handler


def create_server(
    *,
    max_receive_bytes: int,
    max_concurrent_rpcs: int,
    options: Options = _SERVER_OPTIONS,
    peer_roles: tuple[str, ...] = (),
) -> grpc.aio.Server:
    """An asyncio server with the project's options (NODE_SERVER_OPTIONS for a node's: they
    accept the coordinator's links' pings); add ports with `add_server_port`.

    Bounded: a message over `max_receive_bytes` is refused unread (RESOURCE_EXHAUSTED "Received
    message larger than max", which the client library turns into InvalidRequestError), and
    beyond `max_concurrent_rpcs` calls at once a new call is refused (RESOURCE_EXHAUSTED), so
    what requests in flight can hold is at most their product. Requests that do not decode are
    answered INVALID_ARGUMENT (`mesh.core.decoding`). With `peer_roles`, on a port with mTLS,
    only clients whose certificate has one of these roles are served (`PeerGuard`)."""
    interceptors: list[grpc.aio.ServerInterceptor] = [DecodeGuard()]
    if peer_roles:
        interceptors.insert(0, PeerGuard(peer_roles))
    return grpc.aio.server(
        interceptors=tuple(interceptors),
        options=_override(options, grpc__max_receive_message_length=max_receive_bytes),
        maximum_concurrent_rpcs=max_concurrent_rpcs,
    )


class _ReloadingCertificates:
    """A server's certificate configuration, fetched again when its files change."""

    def __init__(self, security: ChannelSecurity) -> None:
        self._security = security
        self._seen: tuple[float, ...] = ()

    def _stamp(self) -> tuple[float, ...]:
        paths = (self._security.ca_file, self._security.cert_file, self._security.key_file)
        return tuple(os.stat(p or "").st_mtime for p in paths)

    def configuration(self) -> Any:
        self._seen = self._stamp()
        pair = [(_read(self._security.key_file), _read(self._security.cert_file))]
        return grpc.ssl_server_certificate_configuration(pair, _read(self._security.ca_file))

    def __call__(self) -> Any:
        try:
            if self._stamp() == self._seen:
                return None  # unchanged: gRPC keeps the current configuration
            return self.configuration()
        except OSError:  # mid-rewrite (renewal writes atomically, but be safe): keep the old
            return None


def add_server_port(
    server: grpc.aio.Server, address: str, security: ChannelSecurity = PLAINTEXT
) -> int:
    """Bind `address` ("host:port", port 0 for any) and return the port actually bound. With
    `security`, mTLS: a client must present a certificate issued by its CA."""
    if security.enabled:
        certificates = _ReloadingCertificates(security)
        creds = grpc.dynamic_ssl_server_credentials(
            certificates.configuration(), certificates, require_client_authentication=True
        )
        return server.add_secure_port(address, creds)
    return server.add_insecure_port(address)


def format_address(host: str, port: int) -> str:
    """`host:port`, with brackets around IPv6 literals."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class ChannelClient:
    """Base of the client classes: owns (or borrows) one channel; an async context manager."""

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float,
        security: ChannelSecurity = PLAINTEXT,
        channel: grpc.aio.Channel | None = None,
        keepalive: Keepalive = Keepalive.NODE,
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = channel or create_channel(address, security, keepalive)
        self._owns_channel = channel is None

    @property
    def channel(self) -> grpc.aio.Channel:
        """The underlying channel, for stubs of other services at the same address."""
        return self._channel

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_channel:
            await self._channel.close()
