"""Keep a lab's own bridges open when the host's firewall would drop bridged traffic.

A Docker engine started with default flags sets the iptables FORWARD policy to DROP and loads
`br_netfilter` (`net.bridge.bridge-nf-call-iptables=1`). From then on every frame that crosses
any Linux bridge also traverses iptables' FORWARD chain, so traffic between network namespaces on
a plain bridge (the test lab's, the netns simulation's) is dropped without a word, and mDNS
discovery between them silently fails. Both settings outlive dockerd.

Changing the policy or the sysctl back would be changing the host's (and Docker's) firewall, so
a lab never does. Instead, when either is in force, it inserts one rule per bridge of its own:

    iptables -w -I FORWARD -i BR -o BR -m comment --comment edgemesh:LAB -j ACCEPT

and removes exactly the rules carrying its tag at teardown (`remove`, which also finds the rules
of a lab whose process died without tearing down). Inserted first in the chain, the rule comes
before Docker's own jumps, and it only matches frames that enter and leave through the lab's
bridge, so nothing else is opened.

Whatever `iptables` is on PATH is used (iptables-nft or iptables-legacy): Docker uses the same
alternative, so the rule lands in the tables whose policy drops. With no `iptables` at all there
is no rule to add (and nothing that could have set a DROP policy through it). IPv4 only: mDNS
and the mesh's own traffic in a lab are IPv4.
"""

from __future__ import annotations

import pathlib
import shlex
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mesh.sim.backend import SimError
from mesh.sim.commands import Completed, run_command

# A short command's argv -> what it did (the real one: commands.run_command, never raises).
Runner = Callable[[Sequence[str]], Completed]

BRIDGE_NF_CALL_IPTABLES = pathlib.Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
TAG_PREFIX = "edgemesh:"
CHAIN = "FORWARD"


def tagged_rules(listing: str, chain: str, tag: str) -> list[list[str]]:
    """From `iptables -S CHAIN` output, the rules whose comment is exactly `tag`, each as the
    arguments after `-A CHAIN` (what `-D CHAIN` takes to delete it)."""
    found = []
    for line in listing.splitlines():
        try:
            words = shlex.split(line)
        except ValueError:  # an unbalanced quote in someone else's comment: not ours
            continue
        spec = words[2:]
        if words[:2] == ["-A", chain] and any(
            word == "--comment" and spec[index + 1 : index + 2] == [tag]
            for index, word in enumerate(spec)
        ):
            found.append(spec)
    return found


def lab_tag(name: str) -> str:
    """The comment that marks the rules of the lab called `name` (no spaces: one shell word)."""
    tag = f"{TAG_PREFIX}{name}"
    if not name or any(c.isspace() or c in "\"'" for c in tag) or len(tag) > 250:
        raise ValueError(f"lab name {name!r}: expected 1..240 characters, no spaces or quotes")
    return tag


def accept_rule(bridge: str, tag: str) -> list[str]:
    """The rule's match and target, as `iptables -I/-C/-D FORWARD` take them."""
    return ["-i", bridge, "-o", bridge, "-m", "comment", "--comment", tag, "-j", "ACCEPT"]


@dataclass(frozen=True)
class FirewallState:
    """What decides whether a lab's bridge needs an accept rule."""

    iptables: str | None  # the iptables program, or None when there is none
    forward_policy: str | None  # ACCEPT, DROP, ... ; None when it could not be read
    bridge_nf_call: bool  # bridged frames traverse iptables (br_netfilter loaded and on)

    @property
    def needs_rules(self) -> bool:
        if self.iptables is None:
            return False
        return self.bridge_nf_call or self.forward_policy == "DROP"

    def describe(self) -> str:
        if self.iptables is None:
            return "no iptables: bridged traffic is not filtered by it"
        policy = self.forward_policy or "unknown"
        nf = "on" if self.bridge_nf_call else "off"
        return f"FORWARD policy {policy}, bridge-nf-call-iptables {nf}"


class Firewall:
    """Accept rules for a lab's bridges; every command goes through `runner` (tests fake it)."""

    def __init__(
        self,
        *,
        runner: Runner = run_command,
        sysctl_path: pathlib.Path = BRIDGE_NF_CALL_IPTABLES,
        which: Callable[[str], str | None] = shutil.which,
    ) -> None:
        self._runner = runner
        self._sysctl_path = sysctl_path
        self._which = which

    def _iptables(self) -> str | None:
        return self._which("iptables")

    def state(self) -> FirewallState:
        """The FORWARD policy and whether bridged frames go through iptables, read now."""
        try:
            bridge_nf_call = self._sysctl_path.read_text().strip() == "1"
        except OSError:  # no br_netfilter: bridged frames never reach iptables
            bridge_nf_call = False
        iptables = self._iptables()
        policy = None
        if iptables is not None:
            listed = self._runner([iptables, "-w", "-S", CHAIN])
            for line in listed.stdout.splitlines():
                words = line.split()
                if len(words) == 3 and words[:2] == ["-P", CHAIN]:
                    policy = words[2]
        return FirewallState(iptables, policy, bridge_nf_call)

    def allow_bridge(self, bridge: str, tag: str) -> str | None:
        """Insert the accept rule for `bridge` if the firewall would drop its traffic (once:
        an identical rule is not added twice). Returns a line saying what was added, or None
        when no rule is needed. SimError when iptables refuses."""
        state = self.state()
        if not state.needs_rules or state.iptables is None:
            return None
        rule = accept_rule(bridge, tag)
        if self._runner([state.iptables, "-w", "-C", CHAIN, *rule]).returncode != 0:
            done = self._runner([state.iptables, "-w", "-I", CHAIN, *rule])
            if done.returncode != 0:
                raise SimError(
                    f"cannot add an iptables accept rule for bridge {bridge} ({state.describe()}):"
                    f" {done.stderr.strip() or done.stdout.strip()}; traffic on it would be "
                    "dropped. Check that `iptables` works (root, the xt_comment match), or set "
                    "the FORWARD policy to ACCEPT / bridge-nf-call-iptables to 0 yourself"
                )
        return f"iptables rule: accept {bridge} <-> {bridge} ({state.describe()})"

    def rules(self, tag: str) -> list[list[str]]:
        """The FORWARD rules carrying `tag`, each as its `-A FORWARD` arguments (without them)."""
        iptables = self._iptables()
        if iptables is None:
            return []
        listed = self._runner([iptables, "-w", "-S", CHAIN])
        return tagged_rules(listed.stdout, CHAIN, tag)

    def remove(self, tag: str) -> list[str]:
        """Delete every FORWARD rule carrying `tag` (ours: the tag names the lab); one line per
        rule removed. Leaves the policy and the sysctl as they are. SimError when a delete fails."""
        iptables = self._iptables()
        removed = []
        for spec in self.rules(tag):
            assert iptables is not None  # rules() found some, so there is an iptables
            done = self._runner([iptables, "-w", "-D", CHAIN, *spec])
            if done.returncode != 0:
                raise SimError(
                    f"cannot remove iptables rule `{shlex.join(spec)}`: "
                    f"{done.stderr.strip() or done.stdout.strip()}; remove it with "
                    f"`iptables -D {CHAIN} {shlex.join(spec)}`"
                )
            removed.append(f"iptables rule {shlex.join(spec)}")
        return removed
