"""Delay and loss on what a network namespace sends: the `delay MS` and `loss PCT` faults.

Both backends call this one place with an argv prefix that enters the target's namespace
(`["nsenter", "-t", PID, "-n"]` for a container, `["ip", "netns", "exec", NAME]` for a lab's
node) and a runner for short commands:

    state = apply(enter, delay_ms=200, loss_pct=None, tag="edgemesh-shape:em-x/edge-b")
    ...                                   # the caller keeps `state` (a small JSON-able dict)
    clear(enter, state)                   # later, from this process or another

Where the kernel has the netem qdisc, `tc qdisc replace dev IF root netem delay ..ms loss ..%`
on every interface but `lo` does both. Where it has not (`# CONFIG_NET_SCH_NETEM is not set`,
as on this project's VM and CI), the namespace's own iptables OUTPUT chain does, for packets
leaving by any interface but `lo`:

- loss: `-m statistic --mode random --probability P -j DROP`;
- delay: `-j NFQUEUE --queue-num N --queue-bypass`, served by a delayer process
  (mesh/sim/nfqueue.py) started detached inside the namespace, which accepts each packet MS
  milliseconds after it arrived. Packets are really held: an established connection slows
  down as much as a new one. If the delayer ends, `--queue-bypass` lets traffic through
  undelayed rather than cutting the node off.

Every rule carries the caller's tag as an iptables comment; `clear` deletes the rules it added
(and any other rule with the tag, e.g. from an `apply` that crashed before its state was saved),
then stops the delayer (its pid is in the state: it runs in the host's pid namespace, so it does
not die with a container's network namespace). Only OUTPUT is touched: the namespace is the
target's own, so its firewall has nothing else of ours in it.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mesh.sim import firewall
from mesh.sim.backend import SimError
from mesh.sim.commands import Completed, run_command

DEFAULT_QUEUE = 4711  # NFQUEUE numbers are per network namespace: one delayer per namespace
TAG_PREFIX = "edgemesh-shape:"
DELAYER = Path(__file__).resolve().with_name("nfqueue.py")
CHAIN = "OUTPUT"


Runner = Callable[[Sequence[str]], Completed]  # what firewall.py's runners are


def shaping_tag(*names: str) -> str:
    """The iptables comment that marks one target's rules (one shell word, no quotes)."""
    tag = TAG_PREFIX + "/".join(names)
    if any(c.isspace() or c in "\"'" for c in tag) or len(tag) > 250:
        raise SimError(f"shaping tag {tag!r}: expected no spaces or quotes, 250 characters")
    return tag


def delay_rule(queue: int, tag: str) -> list[str]:
    """The OUTPUT rule (after `-I OUTPUT`) that hands leaving packets to the delayer."""
    target = ["-j", "NFQUEUE", "--queue-num", str(queue), "--queue-bypass"]
    return ["!", "-o", "lo", "-m", "comment", "--comment", tag, *target]


def loss_rule(loss_pct: float, tag: str) -> list[str]:
    """The OUTPUT rule that drops `loss_pct` percent of leaving packets at random."""
    probability = f"{loss_pct / 100:.4f}"
    match = ["-m", "statistic", "--mode", "random", "--probability", probability]
    return ["!", "-o", "lo", *match, "-m", "comment", "--comment", tag, "-j", "DROP"]


def _python() -> str:
    return sys.executable or "/usr/bin/python3"


def interfaces(enter: Sequence[str], run: Runner) -> list[str]:
    """The namespace's interfaces but `lo`; SimError when the namespace cannot be entered."""
    links = run([*enter, "ip", "-o", "link", "show"])
    if links.returncode != 0:
        raise SimError(
            f"cannot enter the namespace (`{shlex.join(enter)}`; root needed): "
            f"{links.stderr.strip() or 'failed'}"
        )
    names = []
    for line in links.stdout.splitlines():
        if ":" in line:
            name = line.split(":")[1].strip().split("@")[0]
            if name and name != "lo":
                names.append(name)
    return names


def _netem_spec(delay_ms: float | None, loss_pct: float | None) -> list[str]:
    spec = []
    if delay_ms is not None:
        spec += ["delay", f"{delay_ms:g}ms"]
    if loss_pct is not None:
        spec += ["loss", f"{loss_pct:g}%"]
    return spec


def apply(
    enter: Sequence[str],
    *,
    delay_ms: float | None,
    loss_pct: float | None,
    tag: str,
    previous: Mapping[str, Any] | None = None,
    run: Runner = run_command,
    log: str | None = None,
    queue: int = DEFAULT_QUEUE,
) -> dict[str, Any]:
    """Make the namespace's outgoing traffic have exactly this delay and loss (None: none),
    replacing what `previous` (an earlier `apply`'s state) set. Returns the new state ({} when
    neither is set). On failure nothing of this call or `previous` is left, and SimError says
    why (the caller may apply its previous values again)."""
    previous = dict(previous or {})
    if delay_ms is None and loss_pct is None:
        clear(enter, previous, run=run)
        return {}
    if previous.get("method") != "netem":
        clear(enter, previous, run=run)
        previous = {}
    names = interfaces(enter, run)
    spec = _netem_spec(delay_ms, loss_pct)
    # With no interface but lo (a partitioned container) netem has nowhere to go; the
    # iptables rules below act on whatever interface comes back.
    netem_error = "" if names else "no interface but lo for netem"
    done: list[str] = []
    for name in names:
        replaced = run([*enter, "tc", "qdisc", "replace", "dev", name, "root", "netem", *spec])
        if replaced.returncode != 0:
            netem_error = f"tc netem on {name}: {replaced.stderr.strip() or 'failed'}"
            break
        done.append(name)
    if not netem_error:
        return {"method": "netem", "delay_ms": delay_ms, "loss_pct": loss_pct, "interfaces": names}
    # No netem here (or no tc): take back what netem did, and use iptables instead.
    clear(
        enter,
        {"method": "netem", "interfaces": sorted({*done, *previous.get("interfaces", [])})},
        run=run,
    )
    state: dict[str, Any] = {
        "method": "iptables",
        "delay_ms": delay_ms,
        "loss_pct": loss_pct,
        "tag": tag,
        "queue": queue,
        "rules": [],
        "delayer_pid": 0,
        "python": _python(),
    }
    try:
        if delay_ms is not None:
            state["delayer_pid"] = _start_delayer(enter, queue, delay_ms, log, run)
            _insert(enter, delay_rule(queue, tag), state, run)
        if loss_pct is not None:
            _insert(enter, loss_rule(loss_pct, tag), state, run)  # first: no point holding those
    except SimError as error:
        clear(enter, state, run=run)
        raise SimError(f"{' '.join(spec)}: {netem_error}; and without netem: {error}") from None
    return state


def _start_delayer(
    enter: Sequence[str], queue: int, delay_ms: float, log: str | None, run: Runner
) -> int:
    argv = [*enter, _python(), "-I", str(DELAYER), "--queue", str(queue)]
    argv += ["--delay-ms", f"{delay_ms:g}", "--background"]
    if log:
        argv += ["--log", log]
    started = run(argv)
    pid = started.stdout.strip()
    if started.returncode != 0 or not pid.isdigit():
        raise SimError(
            f"cannot start the NFQUEUE delayer: {started.stderr.strip() or 'no pid printed'} "
            "(needs root and a kernel with nfnetlink_queue)"
        )
    return int(pid)


def _insert(enter: Sequence[str], rule: list[str], state: dict[str, Any], run: Runner) -> None:
    inserted = run([*enter, "iptables", "-w", "-I", CHAIN, *rule])
    if inserted.returncode != 0:
        raise SimError(
            f"iptables -I {CHAIN} {shlex.join(rule)}: {inserted.stderr.strip() or 'failed'} "
            "(needs iptables with the NFQUEUE target and the statistic and comment matches)"
        )
    state["rules"].append(rule)


def clear(
    enter: Sequence[str] | None, state: Mapping[str, Any], *, run: Runner = run_command
) -> list[str]:
    """Undo what `apply` set (`state`); one line per thing removed. `enter` None: the namespace
    is gone (a removed container), so only the delayer is left to stop. Never raises: what is
    already gone is fine."""
    removed: list[str] = []
    method = state.get("method")
    if method == "netem" and enter is not None:
        for name in state.get("interfaces", []):
            deleted = run([*enter, "tc", "qdisc", "del", "dev", name, "root"])
            if deleted.returncode == 0:
                removed.append(f"netem qdisc on {name}")
    if method != "iptables":
        return removed
    if enter is not None:
        rules = [list(rule) for rule in state.get("rules", [])]
        tag = str(state.get("tag", ""))
        # The rules it added, then any other with its tag (an `apply` that died half-way).
        for rule in rules:
            if run([*enter, "iptables", "-w", "-D", CHAIN, *rule]).returncode == 0:
                removed.append(f"iptables rule {CHAIN} {shlex.join(rule)}")
        for rule in tagged_rules(enter, tag, run=run):
            if run([*enter, "iptables", "-w", "-D", CHAIN, *rule]).returncode == 0:
                removed.append(f"iptables rule {CHAIN} {shlex.join(rule)}")
    pid = int(state.get("delayer_pid") or 0)
    if pid:
        python = str(state.get("python") or _python())
        stopped = run([python, "-I", str(DELAYER), "--stop", str(pid)])
        removed.append(stopped.stdout.strip() or f"delayer {pid}: {stopped.stderr.strip()}")
    return removed


def tagged_rules(enter: Sequence[str], tag: str, *, run: Runner = run_command) -> list[list[str]]:
    """The namespace's OUTPUT rules carrying `tag` (each as `-A OUTPUT`'s arguments)."""
    if not tag:
        return []
    return firewall.tagged_rules(run([*enter, "iptables", "-w", "-S", CHAIN]).stdout, CHAIN, tag)


def describe(state: Mapping[str, Any]) -> str:
    """How the shaping in `state` is done, for the line a fault prints."""
    if state.get("method") == "netem":
        return "by netem"
    if state.get("method") == "iptables":
        parts = []
        if state.get("delayer_pid"):
            parts.append(f"NFQUEUE delayer pid {state['delayer_pid']}")
        if state.get("loss_pct") is not None:
            parts.append("iptables statistic drop")
        return "by " + " and ".join(parts) + " (no netem in this kernel)"
    return ""
