"""Browse the LAN for `_edgemesh._tcp` services and turn them into typed discovery events.

    async with MdnsBrowser(interface_ip="192.168.1.20") as browser:
        async for event in browser.events():
            print(event.kind, event.record)

Malformed or hostile records are logged once per service name and otherwise ignored. So are
records that point at a loopback address (127.0.0.1, ::1): no other host can reach a node there,
and a rogue record could aim the coordinator at a service on its own machine. A browser that
itself listens on a loopback interface (a one-machine lab: `--interface 127.0.0.1`) accepts
them; static node addresses (`--node 127.0.0.1:50051`) never pass through here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from enum import StrEnum

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from mesh.core.errors import ConfigError
from mesh.core.model import FrozenModel
from mesh.core.records import (
    SERVICE_TYPE,
    MalformedRecordError,
    NodeRecord,
    is_loopback_address,
)

logger = logging.getLogger("mesh.discovery")


class DiscoveryKind(StrEnum):
    ADDED = "added"
    UPDATED = "updated"
    REMOVED = "removed"


class DiscoveryEvent(FrozenModel):
    """One change seen on mDNS. `record` is None only for REMOVED."""

    kind: DiscoveryKind
    name: str  # the DNS-SD service instance name
    record: NodeRecord | None = None

    @property
    def address(self) -> str | None:
        return self.record.address if self.record is not None else None


class MdnsBrowser:
    """Follows `service_type` on the LAN (or on one interface) and queues `DiscoveryEvent`s."""

    def __init__(
        self,
        *,
        interface_ip: str | None = None,
        service_type: str = SERVICE_TYPE,
        resolve_timeout_s: float = 3.0,
        zeroconf: AsyncZeroconf | None = None,
        accept_loopback: bool | None = None,
    ) -> None:
        self.interface_ip = interface_ip
        # None: only when listening on a loopback interface ourselves.
        self.accept_loopback = (
            accept_loopback
            if accept_loopback is not None
            else bool(interface_ip) and is_loopback_address(interface_ip or "")
        )
        self.service_type = service_type
        self.resolve_timeout_s = resolve_timeout_s
        self._given_zeroconf = zeroconf
        self._zeroconf: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._queue: asyncio.Queue[DiscoveryEvent] = asyncio.Queue()
        self._resolving: dict[str, asyncio.Task[None]] = {}
        self._known: set[str] = set()  # names that produced a valid record
        self._warned: set[str] = set()  # names already logged as malformed
        self._stopping = False

    async def start(self) -> None:
        """Open the mDNS socket and start browsing; ConfigError if the interface is unusable."""
        self._stopping = False
        given = self._given_zeroconf
        self._zeroconf = given if given is not None else self._open_zeroconf()
        self._browser = AsyncServiceBrowser(
            self._zeroconf.zeroconf, [self.service_type], handlers=[self._on_change]
        )

    def _open_zeroconf(self) -> AsyncZeroconf:
        if not self.interface_ip:
            return AsyncZeroconf(ip_version=IPVersion.V4Only)
        try:
            return AsyncZeroconf(interfaces=[self.interface_ip])
        except ValueError:  # not an IP address at all (e.g. an interface name)
            raise ConfigError(
                f"--interface takes an IP address of this machine, got {self.interface_ip!r}"
            ) from None
        except OSError as error:  # no interface has this address, or it cannot do multicast
            raise ConfigError(
                f"cannot listen for mDNS on {self.interface_ip}: {error.strerror or error}; "
                "--interface takes an IP address of this machine"
            ) from None

    async def stop(self) -> None:
        """Stop browsing first (no new resolves can start), then end the resolves in flight."""
        self._stopping = True
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        tasks = list(self._resolving.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._resolving.clear()
        if self._zeroconf is not None and self._given_zeroconf is None:
            await self._zeroconf.async_close()
        self._zeroconf = None

    async def __aenter__(self) -> MdnsBrowser:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def events(self) -> AsyncIterator[DiscoveryEvent]:
        """Discovery events as they happen (one consumer)."""
        while True:
            yield await self._queue.get()

    # Called by zeroconf on the event loop, with keyword arguments.
    def _on_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        if self._stopping:
            return
        previous = self._resolving.pop(name, None)
        if previous is not None:
            previous.cancel()  # the newest change wins
        if state_change is ServiceStateChange.Removed:
            if name in self._known:
                self._known.discard(name)
                self._queue.put_nowait(DiscoveryEvent(kind=DiscoveryKind.REMOVED, name=name))
            return
        task = asyncio.get_running_loop().create_task(self._resolve(service_type, name))
        self._resolving[name] = task
        task.add_done_callback(lambda t: self._forget_task(name, t))

    def _forget_task(self, name: str, task: asyncio.Task[None]) -> None:
        if self._resolving.get(name) is task:
            del self._resolving[name]
        if not task.cancelled() and task.exception() is not None:
            logger.error("resolving %s failed", name, exc_info=task.exception())

    async def _resolve(self, service_type: str, name: str) -> None:
        assert self._zeroconf is not None
        info = AsyncServiceInfo(service_type, name)
        found = await info.async_request(
            self._zeroconf.zeroconf, int(self.resolve_timeout_s * 1000)
        )
        if not found or info.port is None:
            self._warn_once(name, "did not resolve (no SRV/TXT/address answer)")
            return
        self.handle_resolved(name, info.properties, info.parsed_addresses(), info.port)

    def handle_resolved(
        self,
        name: str,
        properties: Mapping[bytes, bytes | None],
        addresses: Sequence[str],
        port: int,
    ) -> None:
        """Turn one resolved service into an event; anything unparsable is the peer's garbage."""
        try:
            record = NodeRecord.from_txt(properties, addresses=addresses, port=port)
            if not record.addresses:
                raise MalformedRecordError("no usable address")
            record = self._without_loopback(record)
        except (MalformedRecordError, ValueError, TypeError) as error:
            # Peer data: a parser gap (ValueError/TypeError) must not become a traceback on
            # every re-announce, nor keep a node whose record turned bad.
            why = str(error) if isinstance(error, MalformedRecordError) else repr(error)
            self._warn_once(name, why)
            if name in self._known:  # a valid node turned bad: treat it as gone
                self._known.discard(name)
                self._queue.put_nowait(DiscoveryEvent(kind=DiscoveryKind.REMOVED, name=name))
            return
        kind = DiscoveryKind.UPDATED if name in self._known else DiscoveryKind.ADDED
        self._known.add(name)
        self._warned.discard(name)
        self._queue.put_nowait(DiscoveryEvent(kind=kind, name=name, record=record))

    def _without_loopback(self, record: NodeRecord) -> NodeRecord:
        if self.accept_loopback:
            return record
        kept = tuple(a for a in record.addresses if not is_loopback_address(a))
        if not kept:
            raise MalformedRecordError(
                f"it advertises only loopback addresses ({', '.join(record.addresses)}), "
                "which other hosts cannot reach"
            )
        return record if kept == record.addresses else record.model_copy(update={"addresses": kept})

    def _warn_once(self, name: str, why: str) -> None:
        if name in self._warned:
            logger.debug("ignoring mDNS service %s: %s", name, why)
            return
        self._warned.add(name)
        logger.warning("ignoring mDNS service %s: %s", name, why)
