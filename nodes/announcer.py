"""Announce this node on the LAN with DNS-SD over mDNS (`_edgemesh._tcp.local.`).

    announcer = MulticastAnnouncer(interface_ip="192.168.1.20", addresses=["192.168.1.20"])
    await announcer.start(record)   # after the models are loaded and health is SERVING
    await announcer.update(record)  # whenever load/models change; rate-limited, coalesced
    await announcer.stop()          # on shutdown: sends the goodbye packets

`daemon_announcer(daemon)` adapts it to the node daemon (`nodes.daemon.Announcer`): it builds
the record from the daemon's own `Describe` and keeps the advertised load current.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from zeroconf import IPVersion, NonUniqueNameException
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from edgemesh.v1 import node_pb2
from mesh.core.errors import ConfigError
from mesh.core.ids import NodeId
from mesh.core.records import (
    MAX_NAME_CHARS,
    SERVICE_TYPE,
    MalformedRecordError,
    NodeRecord,
    accelerator_kinds,
    coarse_load_percent,
    is_valid_item,
    served_models,
)

if TYPE_CHECKING:
    from nodes.daemon import NodeDaemon

logger = logging.getLogger("nodes.announcer")

_UNSPECIFIED_HOSTS = ("", "0.0.0.0", "::", "[::]")


def _specific_ip(host: str) -> str | None:
    """`host` when it is one IP address of this machine (then mDNS uses that interface only);
    None for an unspecified address or a host name (then every interface)."""
    host = host.strip("[]")
    if host in _UNSPECIFIED_HOSTS:
        return None
    try:
        ipaddress.ip_address(host)
    except ValueError:  # a host name such as "localhost": not an interface address
        return None
    return host


def new_incarnation() -> str:
    """A token that differs at every process start (not a secret: it only tells restarts apart)."""
    return os.urandom(4).hex()


def service_instance_name(record: NodeRecord, service_type: str = SERVICE_TYPE) -> str:
    """`<name>-<node id>.<service type>`; the node id keeps it unique, the label stays <= 63 bytes."""
    suffix = f"-{record.node_id}"
    name = re.sub(r"[^A-Za-z0-9-]+", "-", record.name).strip("-") or "node"
    name = name[: max(1, MAX_NAME_CHARS - len(suffix))]
    return f"{name}{suffix}.{service_type}"


def record_from_describe(
    reply: node_pb2.DescribeResponse,
    *,
    grpc_port: int,
    incarnation: str,
    cert_fingerprint: str = "",
) -> NodeRecord:
    """The TXT summary of a node's own Describe reply (the models it serves, and which of them
    are loaded; no secrets in it)."""
    hardware, load, capacity = reply.hardware, reply.load, reply.capacity
    served, loaded = served_models(reply.models)
    return NodeRecord(
        node_id=NodeId(reply.node.node_id),
        name=reply.node.name[:MAX_NAME_CHARS] or reply.node.node_id,
        cluster=reply.node.cluster or "default",
        grpc_port=grpc_port,
        incarnation=incarnation,
        models=served,
        loaded_models=loaded,
        agents=tuple(a.name for a in reply.agents),
        cores=hardware.logical_cores or hardware.physical_cores,
        ram_gb=round(hardware.memory_total_bytes / 1e9, 1),
        accelerators=accelerator_kinds((g.vendor for g in hardware.gpus), hardware.onnx_providers),
        load_percent=coarse_load_percent(load.in_flight, load.queued, capacity.max_concurrent),
        capacity=capacity.max_concurrent,
        cert_fingerprint=cert_fingerprint,
    )


def check_advertisable_ids(*, models: Sequence[str] = (), agents: Sequence[str] = ()) -> None:
    """Raise ConfigError naming the first model or agent id that mDNS browsers would reject.

    Cheap and config-only: the daemon may call it before it loads anything.
    """
    for kind, items in (("model", models), ("agent", agents)):
        for item in items:
            if not is_valid_item(item):
                raise ConfigError(
                    f"{kind} id {item!r} cannot be advertised on mDNS: ids must start with a "
                    "letter or digit, then use only letters, digits and . _ : / @ + - (at most "
                    "100 characters)"
                )


def check_advertisable(record: NodeRecord) -> None:
    """Raise ConfigError unless every browser will accept `record` (it is round-tripped
    through the parser browsers use), naming the model or agent id that it would reject."""
    check_advertisable_ids(models=record.models, agents=record.agents)
    try:
        NodeRecord.from_txt(record.to_txt(), addresses=(), port=record.grpc_port)
    except MalformedRecordError as error:
        raise ConfigError(
            f"this node's mDNS record would be rejected by browsers: {error}"
        ) from None


def check_interface_ip(value: str) -> str:
    """`value` if it is an IP address, else ConfigError (an interface name is a common slip)."""
    try:
        ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        raise ConfigError(
            f"--interface takes an IP address of this machine, got {value!r}"
        ) from None
    return value


def local_ipv4_addresses() -> list[str]:
    """This host's IPv4 addresses, loopback last (used only if nothing else exists)."""
    import ifaddr  # a dependency of zeroconf

    found: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ipaddress.ip_address(ip.ip).is_link_local:
                found.append(ip.ip)
    found.sort(key=lambda a: ipaddress.ip_address(a).is_loopback)
    non_loopback = [a for a in found if not ipaddress.ip_address(a).is_loopback]
    return non_loopback or found[:1]


class UpdateThrottle:
    """At most one update per `min_interval_s`: says how long the next one must wait."""

    def __init__(self, min_interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.min_interval_s = min_interval_s
        self._clock = clock
        self._last_s: float | None = None

    def delay_s(self) -> float:
        if self._last_s is None:
            return 0.0
        return max(0.0, self._last_s + self.min_interval_s - self._clock())

    def mark_sent(self) -> None:
        self._last_s = self._clock()


class MulticastAnnouncer:
    """Registers, updates and withdraws one node's DNS-SD service."""

    def __init__(
        self,
        *,
        interface_ip: str | None = None,
        addresses: Sequence[str] | None = None,
        min_update_interval_s: float = 1.0,
        service_type: str = SERVICE_TYPE,
        zeroconf: AsyncZeroconf | None = None,
    ) -> None:
        self.interface_ip = interface_ip
        self.service_type = service_type
        self._addresses = list(addresses) if addresses else None
        self._throttle = UpdateThrottle(min_update_interval_s)
        self._given_zeroconf = zeroconf
        self._zeroconf: AsyncZeroconf | None = None
        self._info: AsyncServiceInfo | None = None
        self._instance_name: str | None = None
        self._current: NodeRecord | None = None
        self._pending: NodeRecord | None = None
        self._flush: asyncio.Task[None] | None = None
        self._broadcasts: set[Awaitable[object]] = set()
        self._lock = asyncio.Lock()
        self._unsendable: str | None = None  # the last reason an update was refused

    @property
    def record(self) -> NodeRecord | None:
        """The record last sent on the network."""
        return self._current

    @property
    def addresses(self) -> list[str]:
        if self._addresses is None:
            self._addresses = [self.interface_ip] if self.interface_ip else local_ipv4_addresses()
        return self._addresses

    async def start(self, record: NodeRecord) -> None:
        """Probe for the name and register; returns when the first announcement goes out.

        ConfigError when the interface is not an IP address of this machine, or when browsers
        would reject the record (e.g. a model id they cannot parse).
        """
        if self.interface_ip:
            check_interface_ip(self.interface_ip)
        for address in self._addresses or ():
            check_interface_ip(address)
        check_advertisable(record)
        async with self._lock:
            if self._zeroconf is None:
                self._zeroconf = self._given_zeroconf or self._open_zeroconf()
            self._info = self._service_info(record)
            began = time.perf_counter()
            try:
                broadcast = await self._zeroconf.async_register_service(self._info)
            except NonUniqueNameException:
                # Another responder holds our name: the same node id runs twice on this LAN.
                # Take a suffixed name; registries will reject the duplicate node id.
                logger.warning(
                    "mDNS name %s is taken; node id %s is not unique on this LAN",
                    self._info.name,
                    record.node_id,
                )
                broadcast = await self._zeroconf.async_register_service(
                    self._info, allow_name_change=True
                )
            self._track(broadcast)
            self._instance_name = self._info.name  # may carry a suffix after a name conflict
            self._current = record
            self._throttle.mark_sent()
            logger.info(
                "announced %s on %s as %s (%.2f s)",
                record.summary() if record.addresses else record.name,
                ", ".join(self.addresses),
                self._info.name,
                time.perf_counter() - began,
            )

    def _open_zeroconf(self) -> AsyncZeroconf:
        try:
            if self.interface_ip:
                return AsyncZeroconf(interfaces=[self.interface_ip])
            return AsyncZeroconf(ip_version=IPVersion.V4Only)
        except ValueError:  # zeroconf's own check; check_interface_ip should catch it first
            raise ConfigError(
                f"--interface takes an IP address of this machine, got {self.interface_ip!r}"
            ) from None
        except OSError as error:  # no such interface, or multicast unavailable on it
            where = f"interface {self.interface_ip}" if self.interface_ip else "any interface"
            raise ConfigError(
                f"cannot advertise on mDNS on {where}: {error.strerror or error}; "
                "pass --interface with an IP address of this host, or --no-advertise"
            ) from None

    async def update(self, record: NodeRecord) -> None:
        """Publish `record` now, or at the end of the rate limit (only the latest is sent).

        A record browsers would reject is not sent (logged once); the last good one stays.
        """
        if self._info is None or record == self._current:
            self._pending = None
            return
        try:
            check_advertisable(record)
        except ConfigError as error:
            if self._unsendable != str(error):
                self._unsendable = str(error)
                logger.error("not updating the mDNS record: %s", error)
            return
        self._pending = record
        if self._flush is not None and not self._flush.done():
            return  # a flush is scheduled; it will send the latest record
        delay = self._throttle.delay_s()
        if delay <= 0:
            await self._send_pending()
        else:
            self._flush = asyncio.get_running_loop().create_task(self._flush_after(delay))

    async def stop(self) -> None:
        """Withdraw the service with goodbye packets and release the sockets. Never raises
        for a failed update or goodbye: the daemon's shutdown must go on."""
        if self._flush is not None:
            self._flush.cancel()
            # A flush that failed was logged by _flush_after; its error is not stop()'s.
            await asyncio.gather(self._flush, return_exceptions=True)
            self._flush = None
        async with self._lock:
            if self._zeroconf is None:
                return
            if self._info is not None:
                try:
                    goodbye = await self._zeroconf.async_unregister_service(self._info)
                    self._track(goodbye)
                except OSError as error:  # the network is gone: no goodbye, still release
                    logger.warning("could not send the mDNS goodbye: %s", error)
                self._info = None
            await asyncio.gather(*self._broadcasts, return_exceptions=True)
            if self._given_zeroconf is None:
                await self._zeroconf.async_close()
            self._zeroconf = None
            logger.info("withdrew the mDNS service (goodbye sent)")

    async def _flush_after(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        try:
            await self._send_pending()
        except Exception:  # a background send: log it; the next update retries
            logger.exception("sending the mDNS update failed")

    async def _send_pending(self) -> None:
        async with self._lock:
            record, self._pending = self._pending, None
            if record is None or self._zeroconf is None or self._info is None:
                return
            if record == self._current:
                return
            self._info = self._service_info(record)
            broadcast = await self._zeroconf.async_update_service(self._info)
            self._track(broadcast)
            self._current = record
            self._throttle.mark_sent()
            logger.debug("updated mDNS record: load %d%%", record.load_percent)

    def _service_info(self, record: NodeRecord) -> AsyncServiceInfo:
        return AsyncServiceInfo(
            self.service_type,
            self._instance_name or service_instance_name(record, self.service_type),
            port=record.grpc_port,
            properties=record.to_txt(),
            server=f"em-{record.node_id}.local.",
            parsed_addresses=self.addresses,
        )

    def _track(self, awaitable: Awaitable[object]) -> None:
        future = asyncio.ensure_future(awaitable)
        self._broadcasts.add(future)
        future.add_done_callback(self._broadcasts.discard)


class DaemonAnnouncement:
    """The node daemon's announcer (`nodes.daemon.Announcer`): start, refresh, stop.

    Builds the record from the daemon's own Describe, and every `refresh_interval_s` checks
    whether the coarse load or the models changed (the announcer sends only real changes,
    at most once per `min_update_interval_s`).
    """

    def __init__(
        self,
        daemon: NodeDaemon,
        *,
        refresh_interval_s: float = 1.0,
        min_update_interval_s: float = 1.0,
    ) -> None:
        self._daemon = daemon
        self.refresh_interval_s = refresh_interval_s
        config = daemon.config
        interface = config.interface or _specific_ip(config.host)
        self.announcer = MulticastAnnouncer(
            interface_ip=interface,
            addresses=[interface] if interface else None,
            min_update_interval_s=min_update_interval_s,
        )
        self.incarnation = new_incarnation()
        self._loop_task: asyncio.Task[None] | None = None

    def build_record(self) -> NodeRecord:
        servicer = self._daemon.servicer
        assert servicer is not None, "the daemon must be started before it is announced"
        tls = self._daemon.tls
        return record_from_describe(
            servicer.describe(),
            grpc_port=self._daemon.port,
            incarnation=self.incarnation,
            cert_fingerprint=tls.fingerprint() if tls is not None else "",
        )

    async def start(self) -> None:
        """Announce; ConfigError for a bad interface or a model/agent id browsers reject."""
        self._check_configured_ids()
        await self.announcer.start(self.build_record())
        self._loop_task = asyncio.get_running_loop().create_task(self._refresh_loop())

    def _check_configured_ids(self) -> None:
        # Every model (also those still loading) and agent, not only what is ready now.
        servicer = self._daemon.servicer
        assert servicer is not None, "the daemon must be started before it is announced"
        reply = servicer.describe()
        record = self.build_record().model_copy(
            update={
                "models": tuple(m.model_id for m in reply.models),
                "agents": tuple(a.name for a in reply.agents),
            }
        )
        check_advertisable(record)

    async def refresh(self) -> None:
        await self.announcer.update(self.build_record())

    async def stop(self) -> None:
        """Stop refreshing and say goodbye; never raises what the refresh loop ran into."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        await self.announcer.stop()

    async def _refresh_loop(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.refresh_interval_s)
            try:
                await self.refresh()
            except Exception:  # keep advertising; the next refresh may work
                if not failing:
                    logger.exception("refreshing the mDNS record failed (will keep trying)")
                failing = True
            else:
                if failing:
                    logger.info("refreshing the mDNS record works again")
                failing = False


def daemon_announcer(daemon: NodeDaemon) -> DaemonAnnouncement:
    """The factory `mesh node start` passes to `NodeDaemon(announcer_factory=...)`."""
    return DaemonAnnouncement(daemon)
