"""mesh/sim/firewall.py against a fake `iptables` that keeps a FORWARD chain the way the real
one prints it: a lab opens its own bridge only when the host's firewall would drop bridged
traffic, never touches the policy, and removes exactly its own rules."""

from __future__ import annotations

import pathlib
import shlex
import subprocess
from collections.abc import Sequence

import pytest

from mesh.sim.backend import SimError
from mesh.sim.firewall import Firewall, accept_rule, lab_tag

pytestmark = pytest.mark.unit


class FakeIptables:
    """`iptables -w -S|-C|-I|-D FORWARD ...` on an in-memory chain; records every call."""

    def __init__(self, policy: str = "ACCEPT", rules: Sequence[str] = ()) -> None:
        self.policy = policy
        self.rules = [shlex.split(rule) for rule in rules]  # each: the words after -A FORWARD
        self.calls: list[list[str]] = []
        self.refuse_insert = ""

    def __call__(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        argv = list(argv)
        self.calls.append(argv)
        assert argv[:2] == ["/usr/sbin/iptables", "-w"], argv
        op, chain, spec = argv[2], argv[3], argv[4:]
        assert chain == "FORWARD"
        if op == "-S":
            lines = [f"-P FORWARD {self.policy}"]
            lines += [f"-A FORWARD {self._render(rule)}" for rule in self.rules]
            return self._done(0, "\n".join(lines) + "\n")
        if op == "-C":
            return self._done(0 if spec in self.rules else 1)
        if op == "-I":
            if self.refuse_insert:
                return self._done(4, err=self.refuse_insert)
            self.rules.insert(0, spec)
            return self._done(0)
        if op == "-D":
            if spec not in self.rules:
                return self._done(1, err="iptables: Bad rule (does a matching rule exist?)")
            self.rules.remove(spec)
            return self._done(0)
        raise AssertionError(f"unexpected iptables call {argv}")

    @staticmethod
    def _render(rule: list[str]) -> str:
        # iptables quotes a comment's text whatever it contains
        words = [f'"{w}"' if i and rule[i - 1] == "--comment" else w for i, w in enumerate(rule)]
        return " ".join(words)

    @staticmethod
    def _done(code: int, out: str = "", err: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess([], code, out, err)

    def changed_policy(self) -> bool:
        return any(call[2] == "-P" for call in self.calls)


def _firewall(
    tmp_path: pathlib.Path, fake: FakeIptables, *, bridge_nf_call: str | None, iptables: bool = True
) -> Firewall:
    sysctl = tmp_path / "bridge-nf-call-iptables"
    if bridge_nf_call is not None:
        sysctl.write_text(bridge_nf_call + "\n")
    return Firewall(
        runner=fake,
        sysctl_path=sysctl,
        which=lambda name: f"/usr/sbin/{name}" if iptables else None,
    )


DOCKER_RULES = ("-j DOCKER-USER", "-j DOCKER-ISOLATION-STAGE-1", "-o docker0 -j DOCKER")


@pytest.mark.parametrize(
    ("policy", "bridge_nf_call", "needed"),
    [
        ("ACCEPT", None, False),  # no br_netfilter, open policy: nothing to do
        ("ACCEPT", "0", False),
        ("DROP", "0", True),  # dockerd's policy alone
        ("ACCEPT", "1", True),  # br_netfilter alone: bridged frames go through FORWARD
        ("DROP", "1", True),  # dockerd with default flags
    ],
)
def test_a_rule_is_added_only_where_the_firewall_sees_bridged_traffic(
    tmp_path, policy, bridge_nf_call, needed
):
    fake = FakeIptables(policy, DOCKER_RULES)
    firewall = _firewall(tmp_path, fake, bridge_nf_call=bridge_nf_call)
    tag = lab_tag("em42a")
    line = firewall.allow_bridge("em42ab", tag)
    assert (line is not None) == needed
    if needed:
        assert line is not None and "em42ab" in line and policy in line
        assert fake.rules[0] == accept_rule("em42ab", tag)  # first: before Docker's jumps
        assert fake.rules[1:] == [shlex.split(r) for r in DOCKER_RULES]
    else:
        assert [shlex.split(r) for r in DOCKER_RULES] == fake.rules
    assert fake.policy == policy and not fake.changed_policy()


def test_teardown_removes_exactly_the_labs_own_rules(tmp_path):
    other = '-i em42bb -o em42bb -m comment --comment "edgemesh:em42b" -j ACCEPT'
    lookalike = '-i x -o x -m comment --comment "edgemesh:em42a-old" -j ACCEPT'
    fake = FakeIptables("DROP", (*DOCKER_RULES, other, lookalike))
    firewall = _firewall(tmp_path, fake, bridge_nf_call="1")
    tag = lab_tag("em42a")
    firewall.allow_bridge("em42ab0", tag)
    firewall.allow_bridge("em42ab1", tag)
    firewall.allow_bridge("em42ab1", tag)  # asked twice: added once
    assert len(firewall.rules(tag)) == 2

    removed = firewall.remove(tag)
    assert len(removed) == 2 and all("em42ab" in line for line in removed)
    assert firewall.rules(tag) == []
    assert fake.rules == [shlex.split(r) for r in (*DOCKER_RULES, other, lookalike)]
    assert firewall.remove(tag) == []  # again: nothing left, no error
    assert fake.policy == "DROP" and not fake.changed_policy()


def test_without_iptables_there_is_nothing_to_add_or_remove(tmp_path):
    fake = FakeIptables("DROP")
    firewall = _firewall(tmp_path, fake, bridge_nf_call="1", iptables=False)
    assert firewall.state().needs_rules is False
    assert firewall.allow_bridge("em42ab", lab_tag("em42a")) is None
    assert firewall.rules(lab_tag("em42a")) == [] and firewall.remove(lab_tag("em42a")) == []
    assert fake.calls == []


def test_a_refused_rule_is_an_error_that_says_what_to_do(tmp_path):
    fake = FakeIptables("DROP")
    fake.refuse_insert = "iptables: Permission denied (you must be root)."
    firewall = _firewall(tmp_path, fake, bridge_nf_call="1")
    with pytest.raises(SimError, match="Permission denied.*FORWARD policy"):
        firewall.allow_bridge("em42ab", lab_tag("em42a"))


def test_a_tag_is_one_shell_word():
    assert lab_tag("em42a") == "edgemesh:em42a"
    for bad in ("", "two words", 'q"uote'):
        with pytest.raises(ValueError, match="lab name"):
            lab_tag(bad)
