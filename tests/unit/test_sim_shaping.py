"""Delay and loss in a namespace (mesh/sim/shaping.py) against a fake namespace, and the
nfnetlink_queue wire format of the delayer (mesh/sim/nfqueue.py). The real thing, packets really
held, is tests/e2e/test_sim_delay.py."""

from __future__ import annotations

import collections
import json
import os
import shlex
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from mesh.sim import nfqueue, shaping
from mesh.sim.backend import SimError

pytestmark = pytest.mark.unit

ENTER = ["ip", "netns", "exec", "ns1"]
TAG = "edgemesh-shape:lab/edge-b"
NO_NETEM = "Error: Specified qdisc kind is unknown.\n"


@dataclass(frozen=True)
class Done:
    returncode: int
    stdout: str = ""
    stderr: str = ""


class FakeNamespace:
    """One namespace's interfaces, qdiscs and OUTPUT chain, and the delayers started in it."""

    def __init__(self, *, netem: bool, iptables_fails: str = "", delayer_fails: bool = False):
        self.netem = netem
        self.iptables_fails = iptables_fails  # a word: an `iptables -I` whose rule holds it fails
        self.delayer_fails = delayer_fails
        self.qdiscs: dict[str, list[str]] = {}
        # Someone else's rule, which nothing here may touch.
        self.output: list[list[str]] = [["-p", "udp", "--dport", "53", "-j", "ACCEPT"]]
        self.delayers: dict[int, list[str]] = {}
        self.commands: list[list[str]] = []
        self._next_pid = 700

    def __call__(self, argv: Sequence[str]) -> Done:
        argv = list(argv)
        self.commands.append(argv)
        if argv[1:3] == ["-I", str(shaping.DELAYER)] and "--stop" in argv:
            pid = int(argv[-1])
            if self.delayers.pop(pid, None) is None:
                return Done(0, f"delayer {pid}: not running\n")
            return Done(0, f"delayer {pid}: stopped\n")
        assert argv[:4] == ENTER, argv
        command = argv[4:]
        if command == ["ip", "-o", "link", "show"]:
            return Done(0, "1: lo: <LOOPBACK,UP>\n7: eth0@if8: <BROADCAST,UP>\n")
        if command[:2] == ["tc", "qdisc"]:
            interface = command[command.index("dev") + 1]
            if command[2] == "replace":
                if not self.netem:
                    return Done(2, "", NO_NETEM)
                self.qdiscs[interface] = command[command.index("netem") + 1 :]
                return Done(0)
            if command[2] == "del":
                return Done(0) if self.qdiscs.pop(interface, None) else Done(2, "", "no qdisc")
        if command[:1] == ["iptables"]:
            return self._iptables(command[2:])
        if command[1:3] == ["-I", str(shaping.DELAYER)]:
            if self.delayer_fails:
                return Done(1, "", "nfqueue delayer: queue 4711: bind: Device or resource busy")
            self._next_pid += 1
            self.delayers[self._next_pid] = command
            return Done(0, f"{self._next_pid}\n")
        raise AssertionError(f"unexpected command {argv}")

    def _iptables(self, args: list[str]) -> Done:
        verb, chain, rule = args[0], args[1], args[2:]
        assert chain == "OUTPUT", args
        if verb == "-S":
            lines = ["-P OUTPUT ACCEPT"] + [shlex.join(["-A", "OUTPUT", *r]) for r in self.output]
            return Done(0, "\n".join(lines) + "\n")
        if verb == "-I":
            if self.iptables_fails and self.iptables_fails in rule:
                return Done(2, "", f"iptables: No chain/target/match by that name ({rule[-1]})")
            self.output.insert(0, rule)
            return Done(0)
        if verb == "-D":
            if rule not in self.output:
                return Done(1, "", "iptables: Bad rule (does a matching rule exist in that chain?)")
            self.output.remove(rule)
            return Done(0)
        raise AssertionError(f"unexpected iptables {args}")

    def ours(self) -> list[list[str]]:
        return [r for r in self.output if TAG in r]


def _apply(fake: FakeNamespace, delay: float | None, loss: float | None, previous=None):
    return shaping.apply(ENTER, delay_ms=delay, loss_pct=loss, tag=TAG, previous=previous, run=fake)


def test_netem_does_delay_and_loss_together_on_every_interface_but_lo() -> None:
    fake = FakeNamespace(netem=True)
    state = _apply(fake, 200, None)
    assert state == {"method": "netem", "delay_ms": 200, "loss_pct": None, "interfaces": ["eth0"]}
    assert fake.qdiscs == {"eth0": ["delay", "200ms"]}
    state = _apply(fake, 200, 5, previous=state)
    assert fake.qdiscs == {"eth0": ["delay", "200ms", "loss", "5%"]}
    assert shaping.describe(state) == "by netem"
    assert shaping.clear(ENTER, state, run=fake) == ["netem qdisc on eth0"]
    assert fake.qdiscs == {}
    assert not [c for c in fake.commands if "iptables" in c or "--background" in c]


def test_without_netem_delay_is_an_nfqueue_rule_and_a_delayer_in_the_namespace() -> None:
    fake = FakeNamespace(netem=False)
    state = _apply(fake, 200, None)
    assert state["method"] == "iptables"
    [started] = fake.delayers.values()
    assert started[1:] == ["-I", str(shaping.DELAYER), "--queue", "4711"] + [
        "--delay-ms",
        "200",
        "--background",
    ]
    assert state["delayer_pid"] == 701
    assert fake.ours() == [shaping.delay_rule(4711, TAG)]
    assert fake.ours()[0][:3] == ["!", "-o", "lo"]  # everything leaving but loopback
    assert fake.ours()[0][-5:] == ["-j", "NFQUEUE", "--queue-num", "4711", "--queue-bypass"]
    # The delayer is started before the rule: no packet is queued with nobody to serve it.
    delayer_at = next(i for i, c in enumerate(fake.commands) if "--background" in c)
    rule_at = next(i for i, c in enumerate(fake.commands) if "-I" in c and "NFQUEUE" in c)
    assert delayer_at < rule_at
    assert "NFQUEUE delayer pid 701" in shaping.describe(state)


def test_loss_and_delay_rules_are_tagged_and_removed_exactly_from_another_process() -> None:
    fake = FakeNamespace(netem=False)
    state = _apply(fake, 200, 5)
    assert fake.ours() == [shaping.loss_rule(5, TAG), shaping.delay_rule(4711, TAG)]
    assert fake.output[0][fake.output[0].index("--probability") + 1] == "0.0500"
    assert fake.output[0][-2:] == ["-j", "DROP"]
    saved = json.loads(json.dumps(state))  # what a backend keeps between commands
    removed = shaping.clear(ENTER, saved, run=fake)
    assert fake.ours() == [] and fake.delayers == {}
    assert fake.output == [["-p", "udp", "--dport", "53", "-j", "ACCEPT"]]  # not ours: kept
    assert len([line for line in removed if line.startswith("iptables rule")]) == 2
    assert removed[-1] == "delayer 701: stopped"
    stop = fake.commands[-1]
    assert stop[:2] == [state["python"], "-I"] and stop[-2:] == ["--stop", "701"]


def test_changing_one_value_replaces_the_rules_and_the_delayer() -> None:
    fake = FakeNamespace(netem=False)
    state = _apply(fake, 200, None)
    state = _apply(fake, 200, 30, previous=state)
    assert fake.ours() == [shaping.loss_rule(30, TAG), shaping.delay_rule(4711, TAG)]
    assert list(fake.delayers) == [702]  # the first one stopped, one running
    state = _apply(fake, None, 30, previous=state)
    assert fake.ours() == [shaping.loss_rule(30, TAG)] and fake.delayers == {}
    assert state["delayer_pid"] == 0
    assert _apply(fake, None, None, previous=state) == {}
    assert fake.ours() == []


def test_clear_also_sweeps_tagged_rules_a_crashed_apply_left_and_only_those() -> None:
    fake = FakeNamespace(netem=False)
    stray = shaping.loss_rule(50, TAG)
    other = shaping.loss_rule(50, "edgemesh-shape:lab/edge-a")
    fake.output += [stray, other]
    state = _apply(fake, 100, None)
    shaping.clear(ENTER, state, run=fake)
    assert fake.output == [["-p", "udp", "--dport", "53", "-j", "ACCEPT"], other]


def test_a_failed_rule_leaves_nothing_and_says_both_reasons() -> None:
    fake = FakeNamespace(netem=False, iptables_fails="DROP")
    with pytest.raises(SimError) as raised:
        _apply(fake, 200, 5)
    message = str(raised.value)
    assert "Specified qdisc kind is unknown" in message and "No chain/target" in message
    assert fake.ours() == [] and fake.delayers == {}  # the delay rule and its delayer undone


def test_a_delayer_that_cannot_bind_is_an_error_and_no_rule_is_added() -> None:
    fake = FakeNamespace(netem=False, delayer_fails=True)
    with pytest.raises(SimError, match="Device or resource busy"):
        _apply(fake, 200, None)
    assert fake.ours() == []


def test_clear_of_a_gone_namespace_still_stops_the_delayer() -> None:
    fake = FakeNamespace(netem=False)
    state = _apply(fake, 200, None)
    before = len(fake.commands)
    assert shaping.clear(None, state, run=fake) == ["delayer 701: stopped"]
    assert [c[-2:] for c in fake.commands[before:]] == [["--stop", "701"]]


def test_a_namespace_that_cannot_be_entered_is_a_clear_error() -> None:
    def refuse(argv: Sequence[str]) -> Done:
        return Done(1, "", "nsenter: cannot open /proc/42/ns/net: Permission denied")

    with pytest.raises(SimError, match="root needed.*Permission denied"):
        shaping.apply(["nsenter", "-t", "42", "-n"], delay_ms=5, loss_pct=None, tag=TAG, run=refuse)


def test_tags_refuse_spaces_and_quotes() -> None:
    assert shaping.shaping_tag("em-x", "edge-b") == "edgemesh-shape:em-x/edge-b"
    with pytest.raises(SimError):
        shaping.shaping_tag("em x", "edge-b")


# ---------------------------------------------------------------------------- the wire format


def _packet_message(packet_id: int, queue: int = 4711) -> bytes:
    """An NFQNL_MSG_PACKET as the kernel sends it: other attributes around the header."""
    hook = nfqueue.attribute(9, struct.pack("!I", 2))  # NFQA_IFINDEX_OUTDEV, say
    header = nfqueue.attribute(nfqueue.NFQA_PACKET_HDR, struct.pack("!IHB", packet_id, 0x800, 3))
    return nfqueue.message(nfqueue.NFQNL_MSG_PACKET, queue, hook + header, flags=0, sequence=0)


def test_packet_ids_are_read_from_each_message_of_a_datagram() -> None:
    data = _packet_message(41) + _packet_message(42)
    found = [(kind, nfqueue.packet_id(payload)) for kind, _seq, payload in nfqueue.messages(data)]
    assert found == [(0x300, 41), (0x300, 42)]  # NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_PACKET
    assert list(nfqueue.messages(data[:-3])) == list(nfqueue.messages(_packet_message(41)))


def test_a_batch_verdict_accepts_every_id_up_to_the_last() -> None:
    wire = nfqueue.verdict_batch(4711, 99, sequence=7)
    length, kind, flags, sequence, _port = struct.unpack_from("=IHHII", wire)
    assert (length, kind, flags, sequence) == (len(wire), 0x303, 1, 7)
    family, version, queue = struct.unpack_from("!BBH", wire, 16)
    assert (family, version, queue) == (socket.AF_UNSPEC, 0, 4711)
    attribute_length, attribute_type = struct.unpack_from("=HH", wire, 20)
    assert (attribute_length, attribute_type) == (12, nfqueue.NFQA_VERDICT_HDR)
    assert struct.unpack_from("!II", wire, 24) == (nfqueue.NF_ACCEPT, 99)


def test_packets_leave_in_order_each_held_from_its_own_arrival() -> None:
    delayer = object.__new__(nfqueue.Delayer)  # the timing logic, without a socket
    delayer.delay_s = 0.2
    delayer.pending = collections.deque()
    delayer.released = 0
    sent: list[int] = []
    delayer._send_verdict = sent.append  # type: ignore[method-assign]
    delayer.pending.extend([(10.2, 1), (10.25, 2), (10.9, 3)])
    assert delayer.release_due(10.1) == pytest.approx(0.1)
    assert sent == []
    assert delayer.release_due(10.3) == pytest.approx(0.6)
    assert sent == [2]  # one batch verdict lets 1 and 2 go
    delayer.release_all()
    assert sent == [2, 3] and delayer.released == 3


def test_the_delayer_is_recognised_by_its_command_line_only() -> None:
    assert not nfqueue.is_delayer(os.getpid())  # pytest, not a delayer
    assert nfqueue.stop(2**22 + 12345) == f"delayer {2**22 + 12345}: not running"
