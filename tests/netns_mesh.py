"""A whole mesh across network namespaces (tests/netns.py): real `mesh node start` daemons that
announce themselves by mDNS, `mesh coordinator start` (its own Ray) that finds them by mDNS
alone, and a load driver (bench/mesh_load.py) next to the coordinator. Used by
tests/e2e/test_failover_netns.py and bench/bench_link_loss.py.

    with NetnsMesh.create(directory, nodes=3) as mesh:     # host 1: coordinator, 2..: nodes
        report = cut_under_load(mesh, tasks=60, concurrency=8, cut_after=12)
        counts = [node.counts() for node in mesh.nodes]    # Describe, in each node's namespace

The coordinator runs in a namespace on the lab's bridge: multicast does not work on loopback
(docs MEASURED.md), and the bridge has no address in the root namespace, so the driver runs in
the coordinator's namespace too. Every process writes its stderr to a file in `directory`.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from tests.exactly_once import NodeCounts
from tests.netns import LineReader, NetnsHost, NetnsLab

REPO = pathlib.Path(__file__).resolve().parent.parent
CLUSTER = "netns-mesh"
SERVING = re.compile(r"^node (\S+) \((\w+)\) serving .* on (\S+)$")
OK = 1  # mesh_pb2.ATTEMPT_OUTCOME_OK


def _environment() -> dict[str, str]:
    """The worktree's code in every process, unbuffered output."""
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


def _mesh(*args: str) -> list[str]:
    return [sys.executable, "-m", "mesh.cli", *args]


@dataclass
class LabNode:
    """A real node daemon (bundled model, one thread) in its own namespace."""

    host: NetnsHost
    name: str
    directory: pathlib.Path
    process: subprocess.Popen[str] | None = None
    address: str = ""
    node_id: str = ""

    def start(self, *, timeout_s: float = 120.0) -> None:
        """Start (or start again, same state directory: same id, same task-count journal)."""
        log = open(self.directory / f"{self.name}.log", "a")  # noqa: SIM115 - the process owns it
        self.process = self.host.popen(
            _mesh(
                "node",
                "start",
                "--name",
                self.name,
                "--cluster",
                CLUSTER,
                "--host",
                self.host.ip,
                "--port",
                "0",
                "--n-threads",
                "1",
                "--max-concurrent",
                "1",
                "--max-queued",
                "8",
                "--state-dir",
                str(self.directory / self.name),
            ),
            stderr=log,
            env=_environment(),
            cwd=REPO,
        )
        log.close()
        assert self.process.stdout is not None
        _stamp, line = LineReader(self.process.stdout, name=self.name).wait_for(
            lambda text: SERVING.match(text) is not None, timeout_s=timeout_s
        )
        match = SERVING.match(line)
        assert match is not None
        self.node_id, self.address = match.group(2), match.group(3)

    def kill(self) -> None:
        """`kill -9`: no goodbye."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def stop(self, *, timeout_s: float = 30.0) -> None:
        """SIGTERM: drain and say goodbye."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=timeout_s)

    def describe(self) -> dict[str, Any]:
        """`mesh node describe --task-counts --json`, from inside the node's namespace (which
        reaches the node even while its cable is pulled)."""
        done = subprocess.run(
            self.host.command(_mesh("node", "describe", self.address, "--task-counts", "--json")),
            capture_output=True,
            text=True,
            timeout=60,
            env=_environment(),
            cwd=REPO,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout)

    def counts(self) -> NodeCounts:
        return NodeCounts.from_json(self.name, json.dumps(self.describe()))

    def idle(self) -> bool:
        load = self.describe()["load"]
        return int(load["in_flight"]) == 0 and int(load["queued"]) == 0


class LoadRun:
    """One run of bench/mesh_load.py in the coordinator's namespace; its lines as dicts."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        self.process = process
        self.reader = LineReader(process.stdout, name="load")
        self.events: list[dict[str, Any]] = []
        self.stamps: list[float] = []

    def wait(self, predicate: Callable[[dict[str, Any]], bool], *, timeout_s: float) -> dict:
        """The next event matching `predicate` (all events are kept in `events`)."""

        def matches(line: str) -> bool:
            event = json.loads(line)
            self.events.append(event)
            return predicate(event)

        _stamp, line = self.reader.wait_for(matches, timeout_s=timeout_s)
        return json.loads(line)

    def finish(self, *, timeout_s: float) -> None:
        self.wait(lambda e: e["event"] == "done", timeout_s=timeout_s)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def wait_state(self, name: str, state: str, *, timeout_s: float) -> float:
        """When (CLOCK_MONOTONIC) the coordinator next lists node `name` in `state`."""
        event = self.wait(
            lambda e: e["event"] == "node" and e["name"] == name and e["state"] == state,
            timeout_s=timeout_s,
        )
        return float(event["at"])

    def answered(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == "answered"]

    def failed(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == "failed"]


class NetnsMesh:
    """The lab: host 1 runs the coordinator and the load driver, hosts 2.. one node each."""

    def __init__(self, lab: NetnsLab, directory: pathlib.Path, nodes: int) -> None:
        self.lab = lab
        self.directory = directory
        self.coordinator_host = lab.hosts[0]
        self.nodes = [
            LabNode(host, f"n{index + 1}", directory)
            for index, host in enumerate(lab.hosts[1 : nodes + 1])
        ]
        self.coordinator: subprocess.Popen[str] | None = None
        self.fast = ""

    @classmethod
    @contextlib.contextmanager
    def create(cls, directory: pathlib.Path, *, nodes: int = 3) -> Iterator[NetnsMesh]:
        with NetnsLab.create(nodes + 1) as lab:
            mesh = cls(lab, directory, nodes)
            try:
                for node in mesh.nodes:
                    node.start()
                mesh.start_coordinator()
                mesh.load(tasks=0, wait_ready=nodes).finish(timeout_s=90)
                yield mesh
            finally:
                mesh.stop_coordinator()

    def node(self, name: str) -> LabNode:
        (node,) = [n for n in self.nodes if n.name == name]
        return node

    def start_coordinator(self, *, timeout_s: float = 240.0) -> None:
        """`mesh coordinator start` with mDNS discovery and no static node: Ray with 2 CPUs."""
        topology = self.directory / "topology.yaml"
        topology.write_text(f"cluster: {CLUSTER}\ndiscovery: {{mdns: true}}\n")
        host = self.coordinator_host
        log = open(self.directory / "coordinator.log", "w")  # noqa: SIM115
        self.coordinator = host.popen(
            _mesh(
                "coordinator",
                "start",
                "--topology",
                str(topology),
                "--host",
                host.ip,
                "--grpc-port",
                "0",
                "--http-port",
                "0",
                "--num-cpus",
                "2",
            ),
            stderr=log,
            env=_environment(),
            cwd=REPO,
        )
        log.close()
        assert self.coordinator.stdout is not None
        _stamp, line = LineReader(self.coordinator.stdout, name="coordinator").wait_for(
            lambda text: "coordinator ready" in text, timeout_s=timeout_s
        )
        words = line.split()
        self.fast = words[words.index("path") + 1]

    def stop_coordinator(self, *, timeout_s: float = 60.0) -> None:
        """SIGTERM and wait (Serve and Ray shut down); the lab kills what is left."""
        if self.coordinator is not None and self.coordinator.poll() is None:
            self.coordinator.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.coordinator.wait(timeout=timeout_s)

    def coordinator_log(self) -> str:
        return (self.directory / "coordinator.log").read_text(errors="replace")

    def load(
        self,
        *,
        tasks: int,
        concurrency: int = 8,
        prefix: str = "load",
        max_tokens: int = 16,
        wait_ready: int = 0,
        linger_s: float = 0.0,
        stderr: IO[str] | None = None,
    ) -> LoadRun:
        """Start the load driver next to the coordinator (it reports as it goes, and watches
        the coordinator's node table until `linger_s` after its last task)."""
        argv = [
            sys.executable,
            "-m",
            "bench.mesh_load",
            "--coordinator",
            self.fast,
            "--tasks",
            str(tasks),
            "--concurrency",
            str(concurrency),
            "--prefix",
            prefix,
            "--max-tokens",
            str(max_tokens),
            "--wait-ready",
            str(wait_ready),
            "--linger-s",
            str(linger_s),
        ]
        log = stderr or open(self.directory / f"load-{prefix}.log", "a")  # noqa: SIM115
        process = self.coordinator_host.popen(argv, stderr=log, env=_environment(), cwd=REPO)
        return LoadRun(process)


# ---------------------------------------------------------------------------- a cut under load


@dataclass
class CutReport:
    """What a cable pulled under load did, from the load driver's and the test's clocks."""

    node: str
    cut_at: float  # CLOCK_MONOTONIC
    cut_unix_s: float
    gone_after_s: float  # cut -> the coordinator lists the node as gone
    back_unix_s: float = 0.0  # the cable back in
    back_at: float = 0.0  # the same, CLOCK_MONOTONIC
    ready_after_s: float = 0.0  # cable back in -> the coordinator lists the node as ready
    answered: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    rerouted_s: list[float] = field(default_factory=list)  # per task in flight at the cut
    answered_after_s: list[float] = field(default_factory=list)  # cut -> its answer
    sent_after_cut: int = 0  # tasks the coordinator sent to the node after the cut
    answered_after_back: int = 0  # tasks the node answered once its cable was back in

    def summary(self) -> str:
        def stats(values: list[float]) -> str:
            if not values:
                return "none"
            return f"p50 {statistics.median(values):.2f} s, max {max(values):.2f} s"

        return (
            f"{self.node}: {len(self.rerouted_s)} tasks in flight at the cut, rerouted "
            f"{stats(self.rerouted_s)}; their answers {stats(self.answered_after_s)}; "
            f"{self.sent_after_cut} more sent to it after the cut; gone after "
            f"{self.gone_after_s:.2f} s; cable back -> ready {self.ready_after_s:.2f} s, then "
            f"{self.answered_after_back} answers from it"
        )


def _attempt_spans(event: dict[str, Any]) -> list[tuple[str, int, float, float]]:
    """(node, outcome, began, ended) of each attempt, on the driver's clock: attempts run one
    after another from the submission (the time to choose a node, ~0, is not counted)."""
    spans = []
    began = float(event["submitted"])
    for node, outcome, duration_ms, _detail in event["attempts"]:
        ended = began + float(duration_ms) / 1000.0
        spans.append((node, int(outcome), began, ended))
        began = ended
    return spans


def measure_cut(report: CutReport) -> None:
    """Fill in the reroute times: for each task whose attempt on the cut node had begun before
    the cut and failed after it, cut -> that attempt's end (the task moved on), and cut -> the
    task's answer."""
    for event in report.answered:
        for node, outcome, began, ended in _attempt_spans(event):
            if node != report.node or outcome == OK:
                continue
            if began <= report.cut_at < ended:
                report.rerouted_s.append(ended - report.cut_at)
                report.answered_after_s.append(float(event["answered"]) - report.cut_at)
            elif began >= report.cut_at:
                report.sent_after_cut += 1
        if event["node"] == report.node and float(event["answered"]) > report.back_at:
            report.answered_after_back += 1


def cut_under_load(
    mesh: NetnsMesh,
    *,
    tasks: int,
    concurrency: int,
    cut_after: int,
    prefix: str,
    node: str | None = None,
    max_tokens: int = 16,
    timeout_s: float = 600.0,
) -> CutReport:
    """Run `tasks` at `concurrency`; after `cut_after` answers pull one node's cable (the node
    that gave the last of those answers, unless `node` is named). The cable goes back in once
    the coordinator has declared the node gone and the node has finished (or dropped) what it
    held, so nothing it completed later could have been meant for anyone."""
    # Lingering keeps the node table watched until the node is gone, however fast the rest is.
    run = mesh.load(
        tasks=tasks, concurrency=concurrency, prefix=prefix, max_tokens=max_tokens, linger_s=10
    )
    answered = 0

    def counted(event: dict[str, Any]) -> bool:
        nonlocal answered
        answered += event["event"] == "answered"
        return answered >= cut_after

    last = run.wait(counted, timeout_s=timeout_s)
    target = mesh.node(node or last["node"])
    cut_at, cut_unix_s = time.monotonic(), time.time()
    target.host.set_link(up=False)
    gone_at = run.wait_state(target.name, "gone", timeout_s=60)
    report = CutReport(target.name, cut_at, cut_unix_s, gone_at - cut_at)
    give_up = time.monotonic() + 120
    while not target.idle():  # its queue drains (or its calls are dropped) behind the cut
        assert time.monotonic() < give_up, f"{target.name} still busy 120 s after the cut"
        time.sleep(0.5)
    report.back_at, report.back_unix_s = time.monotonic(), time.time()
    target.host.set_link(up=True)
    report.ready_after_s = run.wait_state(target.name, "ready", timeout_s=60) - report.back_at
    run.finish(timeout_s=timeout_s)
    report.answered, report.failed = run.answered(), run.failed()
    measure_cut(report)
    return report
