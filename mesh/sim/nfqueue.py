"""Hold every packet of an NFQUEUE queue for a fixed time, then let it go: `delay MS` without netem.

A kernel built without the netem qdisc (`# CONFIG_NET_SCH_NETEM is not set`, as on this project's
VM and CI) cannot delay packets with `tc`. Netfilter's queue can: an iptables rule in the target's
network namespace

    iptables -I OUTPUT ! -o lo -j NFQUEUE --queue-num N --queue-bypass

hands every packet leaving it to this process (over an AF_NETLINK / NETLINK_NETFILTER socket,
the nfnetlink_queue protocol), which gives the kernel its verdict, NF_ACCEPT, MS milliseconds
after the packet arrived. Each packet's clock starts when it arrives, not when the one before it
left, so throughput is not serialised: a 200 ms delay holds every packet 200 ms, as netem does.
The delay is constant, so packets leave in the order they came (no reordering), and one batch
verdict (NFQNL_MSG_VERDICT_BATCH: every id up to N) lets out everything that is due.

    python3 -m mesh.sim.nfqueue --queue 4711 --delay-ms 200             # in the foreground
    python3 /path/to/mesh/sim/nfqueue.py --queue 4711 --delay-ms 200 --background --log F
    python3 /path/to/mesh/sim/nfqueue.py --stop PID                     # SIGTERM, and wait

Standard library only, and runnable by its path with no package around it (`python3 -I FILE`),
so the host's python3 can run it inside a container's namespace (`nsenter -t PID -n`) or a
lab's (`ip netns exec NAME`). Queue numbers are per network namespace, and so is the socket: it
must be created inside the namespace whose packets it delays.

Overload passes packets rather than dropping them: the queue is bound with NFQA_CFG_F_FAIL_OPEN
(a full queue, or a message the socket cannot take, accepts the packet at once), a maxlen of
QUEUE_MAXLEN packets and a large receive buffer; the rule's `--queue-bypass` lets packets
through when no delayer is bound (it ended or was killed). Only metadata is copied
(NFQNL_COPY_META): the verdict needs the packet id, not the payload, and large (GSO) packets are
queued whole (NFQA_CFG_F_GSO).

With `--background` the queue is bound first (so a failure, such as another process holding the
queue, is this command's error and exit status), then a detached child takes over and the
command prints the child's pid and exits. SIGTERM or SIGINT ends the delayer cleanly: everything
still held is accepted at once, the queue unbound, exit status 0. (A delayer killed with SIGKILL
loses the packets it held: the kernel drops a queue's packets when its listener goes.)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import os
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterator

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
SO_RCVBUFFORCE = 33  # socket.SO_RCVBUFFORCE where Python knows it

NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4

NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQNL_MSG_VERDICT_BATCH = 3

NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2

NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
NFQNL_COPY_META = 1
NFQA_CFG_F_FAIL_OPEN = 0x1
NFQA_CFG_F_GSO = 0x4

NF_ACCEPT = 1

QUEUE_MAXLEN = 65536  # packets held at once before fail-open lets more through undelayed
RECEIVE_BUFFER_BYTES = 16 * 1024 * 1024
STOP_WAIT_S = 5.0

_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
_NFGEN = struct.Struct("!BBH")  # nfgenmsg: family, version, resource id (the queue number)
_ATTRIBUTE = struct.Struct("=HH")  # nlattr: length, type


class DelayerError(Exception):
    """The queue could not be bound or served; the message says why and what to do."""


def _align(length: int) -> int:
    return (length + 3) & ~3


def attribute(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    length = _ATTRIBUTE.size + len(payload)
    return _ATTRIBUTE.pack(length, kind) + payload + b"\0" * (_align(length) - length)


def message(kind: int, queue: int, attributes: bytes, *, flags: int, sequence: int) -> bytes:
    """One nfnetlink_queue message: nlmsghdr, nfgenmsg (AF_UNSPEC, version 0, the queue)."""
    body = _NFGEN.pack(socket.AF_UNSPEC, 0, queue) + attributes
    kind_word = (NFNL_SUBSYS_QUEUE << 8) | kind
    return _HEADER.pack(_HEADER.size + len(body), kind_word, flags, sequence, 0) + body


def verdict_batch(queue: int, last_id: int, *, sequence: int = 0) -> bytes:
    """NF_ACCEPT for every packet of `queue` with an id up to `last_id`."""
    header = attribute(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, last_id))
    return message(NFQNL_MSG_VERDICT_BATCH, queue, header, flags=NLM_F_REQUEST, sequence=sequence)


def messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(type, sequence, payload after nlmsghdr) for each netlink message in one datagram."""
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, kind, _flags, sequence, _port = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size or offset + length > len(data):
            return  # truncated: nothing more to read in this datagram
        yield kind, sequence, data[offset + _HEADER.size : offset + length]
        offset += _align(length)


def packet_id(payload: bytes) -> int | None:
    """The packet id of an NFQNL_MSG_PACKET payload (after nlmsghdr), None if it has none."""
    offset = _NFGEN.size
    while offset + _ATTRIBUTE.size <= len(payload):
        length, kind = _ATTRIBUTE.unpack_from(payload, offset)
        if length < _ATTRIBUTE.size:
            return None
        if kind & 0x3FFF == NFQA_PACKET_HDR and length >= _ATTRIBUTE.size + 4:
            return int(struct.unpack_from("!I", payload, offset + _ATTRIBUTE.size)[0])
        offset += _align(length)
    return None


class Delayer:
    """A bound queue whose packets are accepted `delay_ms` after each arrived."""

    def __init__(self, queue: int, delay_ms: float) -> None:
        if not 0 <= queue <= 65535:
            raise DelayerError(f"queue {queue}: expected 0..65535")
        if not 0 < delay_ms <= 60_000:
            raise DelayerError(f"delay {delay_ms:g} ms: expected 1..60000")
        self.queue = queue
        self.delay_s = delay_ms / 1000.0
        self.pending: collections.deque[tuple[float, int]] = collections.deque()
        self.released = 0
        self._sequence = 0
        try:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        except OSError as error:
            raise DelayerError(
                f"cannot open a netfilter netlink socket: {error}; needs root (CAP_NET_ADMIN) "
                "and a kernel with nfnetlink_queue (CONFIG_NETFILTER_NETLINK_QUEUE)"
            ) from None
        try:
            self._bind()
        except BaseException:
            self.sock.close()
            raise

    def _bind(self) -> None:
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER_BYTES)
        except OSError:  # not privileged enough to pass rmem_max: the capped size will do
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES)
        with contextlib.suppress(OSError):  # an overrun is survivable: fail-open passed them
            self.sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
        self.sock.bind((0, 0))
        self._configure(
            attribute(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, socket.AF_INET)),
            "bind",
        )
        self._configure(
            attribute(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META)), "copy mode"
        )
        self._configure(
            attribute(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", QUEUE_MAXLEN)), "queue length"
        )
        flags = NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO
        self._configure(
            attribute(NFQA_CFG_MASK, struct.pack("!I", flags))
            + attribute(NFQA_CFG_FLAGS, struct.pack("!I", flags)),
            "fail-open",
        )

    def _configure(self, attributes: bytes, what: str) -> None:
        """Send one NFQNL_MSG_CONFIG and wait for its acknowledgement."""
        self._sequence += 1
        sequence = self._sequence
        request = message(
            NFQNL_MSG_CONFIG,
            self.queue,
            attributes,
            flags=NLM_F_REQUEST | NLM_F_ACK,
            sequence=sequence,
        )
        self.sock.send(request)
        deadline = time.monotonic() + 5.0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.sock], [], [], remaining)[0]:
                raise DelayerError(f"queue {self.queue}: no answer from the kernel to {what}")
            for kind, answered, payload in messages(self.sock.recv(65536)):
                if kind != NLMSG_ERROR or answered != sequence:
                    continue  # a packet that came in meanwhile: the loop's business, not ours
                code = -int(struct.unpack_from("=i", payload)[0])
                if code == 0:
                    return
                hint = (
                    " (another process holds this queue: pick another --queue)"
                    if code == errno.EBUSY
                    else ""
                )
                raise DelayerError(f"queue {self.queue}: {what}: {os.strerror(code)}{hint}")

    def receive(self, now: float) -> None:
        """Take every message waiting on the socket; each packet is due `delay` from `now`."""
        while True:
            try:
                data = self.sock.recv(65536, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno == errno.ENOBUFS:  # overrun: those packets were passed (fail-open)
                    continue
                raise
            for kind, _sequence, payload in messages(data):
                if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                    found = packet_id(payload)
                    if found is not None:
                        self.pending.append((now + self.delay_s, found))

    def release_due(self, now: float) -> float | None:
        """Accept every packet whose time has come; seconds until the next one (None: none)."""
        last = None
        while self.pending and self.pending[0][0] <= now:
            last = self.pending.popleft()[1]
            self.released += 1
        if last is not None:
            self._send_verdict(last)
        return max(0.0, self.pending[0][0] - now) if self.pending else None

    def release_all(self) -> None:
        """Accept everything still held (on the way out: unbinding would drop it)."""
        if self.pending:
            last = self.pending[-1][1]
            self.released += len(self.pending)
            self.pending.clear()
            self._send_verdict(last)

    def _send_verdict(self, last_id: int) -> None:
        self._sequence += 1
        self.sock.send(verdict_batch(self.queue, last_id, sequence=self._sequence))

    def close(self) -> None:
        """Let everything go, unbind the queue, close the socket."""
        try:
            self.receive(time.monotonic())  # read but not yet held: unbinding would drop them
            self.release_all()
            command = struct.pack("!BxH", NFQNL_CFG_CMD_UNBIND, socket.AF_INET)
            self._sequence += 1
            self.sock.send(
                message(
                    NFQNL_MSG_CONFIG,
                    self.queue,
                    attribute(NFQA_CFG_CMD, command),
                    flags=NLM_F_REQUEST,
                    sequence=self._sequence,
                )
            )
        except OSError:  # the socket is closing anyway; the kernel unbinds it then
            pass
        finally:
            self.sock.close()

    def serve(self, wake: int) -> None:
        """Hold and release packets until `wake` (a signal's wakeup fd) becomes readable."""
        timeout: float | None = None
        while True:
            readable = select.select([self.sock.fileno(), wake], [], [], timeout)[0]
            now = time.monotonic()
            if wake in readable:
                return
            if readable:
                self.receive(now)
            timeout = self.release_due(time.monotonic())


def run(queue: int, delay_ms: float, *, background: bool, log: str | None) -> int:
    """Bind the queue, then serve it here or in a detached child (whose pid is printed)."""
    try:
        delayer = Delayer(queue, delay_ms)
    except (DelayerError, OSError) as error:
        print(f"nfqueue delayer: {error}", file=sys.stderr)
        return 1
    if background:
        child = os.fork()
        if child:
            delayer.sock.close()  # the child's copy keeps the binding
            print(child, flush=True)
            return 0
        os.setsid()
        _detach(log)
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end)
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda _number, _frame: None)  # wakes `serve` through the pipe
    print(
        f"nfqueue delayer: pid {os.getpid()} holds queue {queue} packets {delay_ms:g} ms",
        file=sys.stderr,
        flush=True,
    )
    try:
        delayer.serve(read_end)
    finally:
        delayer.close()
    print(
        f"nfqueue delayer: pid {os.getpid()} ended after {delayer.released} packets",
        file=sys.stderr,
        flush=True,
    )
    return 0


def _detach(log: str | None) -> None:
    """The background child's stdio: nothing in, output to `log` (or nowhere). The pipes of the
    command that started it are closed here, so that command sees its end of output."""
    null = os.open(os.devnull, os.O_RDWR)
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if log else null
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)


def is_delayer(pid: int) -> bool:
    """Whether `pid` is a running delayer (not gone, not a zombie, not a reused pid)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rpartition(")")[2].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            words = cmdline.read().split(b"\0")
    except OSError:
        return False
    ours = any(w.endswith(b"nfqueue.py") or w == b"mesh.sim.nfqueue" for w in words)
    return state != "Z" and ours and b"--queue" in words


def stop(pid: int, timeout_s: float = STOP_WAIT_S) -> str:
    """SIGTERM the delayer `pid` and wait for it to end (SIGKILL after `timeout_s`)."""
    if not is_delayer(pid):
        return f"delayer {pid}: not running"
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while is_delayer(pid):
        if time.monotonic() >= deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            return f"delayer {pid}: killed (SIGKILL after {timeout_s:g} s)"
        time.sleep(0.02)
    return f"delayer {pid}: stopped"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nfqueue.py", description="Delay the packets of an NFQUEUE queue by a fixed time."
    )
    parser.add_argument("--queue", type=int, help="the queue number (0..65535)")
    parser.add_argument("--delay-ms", type=float, help="how long each packet is held")
    parser.add_argument(
        "--background", action="store_true", help="bind, then serve detached; print its pid"
    )
    parser.add_argument("--log", help="with --background: append the delayer's lines here")
    parser.add_argument("--stop", type=int, metavar="PID", help="stop the delayer PID and wait")
    args = parser.parse_args(argv)
    if args.stop is not None:
        print(stop(args.stop))
        return 0
    if args.queue is None or args.delay_ms is None:
        parser.error("--queue and --delay-ms are required (or --stop PID)")
    return run(args.queue, args.delay_ms, background=args.background, log=args.log)


if __name__ == "__main__":
    sys.exit(main())
