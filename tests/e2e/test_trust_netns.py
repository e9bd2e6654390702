"""Trust across hosts, mDNS on: a coordinator with a cluster (its own Ray) in one namespace, two
nodes that join it with a token, and the attackers of issue 12 on the same LAN:

- an impostor advertising a perfect copy of a member's TXT record (id, name, certificate
  fingerprint), serving plaintext;
- an impostor with a certificate for a member's id from another CA, advertising that
  certificate's fingerprint;
- a node started with an expired token;
- a member that is revoked while it serves.

None of them is ever routed to (the impostors count every prompt they get: none); the revoked
member is dropped within about a second and gets no task after; garbage on a node's TLS port
does not disturb it. Tasks are counted on the nodes themselves (Describe's task counts).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from tests.exactly_once import NodeCounts
from tests.netns import LineReader, NetnsHost, NetnsLab

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

REPO = pathlib.Path(__file__).resolve().parents[2]
JOIN_PORT = "9100"


def mesh(*args: str) -> list[str]:
    return [sys.executable, "-m", "mesh.cli", *args]


def environment(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **extra}


def local(*args: str) -> str:
    """`mesh ...` in the root namespace (the cluster dir's commands); its stdout."""
    done = subprocess.run(
        mesh(*args), capture_output=True, text=True, timeout=60, env=environment(), cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


class JoinedNode:
    def __init__(self, host: NetnsHost, name: str, directory: pathlib.Path) -> None:
        self.host, self.name = host, name
        self.state_dir = directory / name
        self.log = directory / f"{name}.log"
        self.process: subprocess.Popen[str] | None = None
        self.node_id = self.address = ""

    def start(self, token: str, *, timeout_s: float = 120.0) -> None:
        with open(self.log, "a") as log:
            self.process = self.host.popen(
                mesh(
                    "node",
                    "start",
                    "--name",
                    self.name,
                    "--host",
                    self.host.ip,
                    "--port",
                    "0",
                    "--n-threads",
                    "1",
                    "--state-dir",
                    str(self.state_dir),
                    "--join-file",
                    str(self._token_file(token)),
                ),
                stderr=log,
                env=environment(),
                cwd=REPO,
            )
        assert self.process.stdout is not None
        _, line = LineReader(self.process.stdout, name=self.name).wait_for(
            lambda text: " serving " in text, timeout_s=timeout_s
        )
        words = line.split()
        self.node_id, self.address = words[2].strip("()"), words[-1]

    def _token_file(self, token: str) -> pathlib.Path:
        path = self.state_dir.with_suffix(".token")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(token)
        path.chmod(0o600)
        return path

    def counts(self, cluster_dir: pathlib.Path) -> NodeCounts:
        """Describe's task counts, over mTLS with the operator's certificate."""
        done = self.host.run(
            mesh(
                "node",
                "describe",
                self.address,
                "--task-counts",
                "--json",
                "--cluster-dir",
                str(cluster_dir),
            ),
            timeout_s=60,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return NodeCounts.from_json(self.name, done.stdout)


def test_only_joined_members_get_tasks_and_a_revoked_one_is_dropped(
    netns_lab_factory: Callable[[int], NetnsLab], tmp_path: pathlib.Path
) -> None:
    cluster = tmp_path / "cluster"
    local("cluster", "init", "--dir", str(cluster), "--name", "store")
    token = local("cluster", "token", "--dir", str(cluster), "--ttl", "10m").strip()
    api_key = local("keys", "create", "e2e", "--cluster-dir", str(cluster)).strip().splitlines()[0]
    expired = local("cluster", "token", "--dir", str(cluster), "--ttl", "1s").strip()

    lab = netns_lab_factory(6)
    coordinator_host, good_host, doomed_host, late_host, rogue_host, foreign_host = lab.hosts
    topology = tmp_path / "topology.yaml"
    topology.write_text("cluster: store\ndiscovery: {mdns: true}\n")
    with open(tmp_path / "coordinator.log", "w") as log:
        coordinator = coordinator_host.popen(
            mesh(
                "coordinator",
                "start",
                "--topology",
                str(topology),
                "--host",
                coordinator_host.ip,
                "--grpc-port",
                "0",
                "--http-port",
                "0",
                "--num-cpus",
                "2",
                "--cluster-dir",
                str(cluster),
                "--join-port",
                JOIN_PORT,
            ),
            stderr=log,
            env=environment(),
            cwd=REPO,
        )
    assert coordinator.stdout is not None
    _, ready = LineReader(coordinator.stdout, name="coordinator").wait_for(
        lambda text: "coordinator ready" in text, timeout_s=240
    )
    words = ready.split()
    fast = words[words.index("path") + 1]
    http_base = words[words.index("http") + 1]

    # Two members join by mDNS alone (no coordinator address), with one token.
    good = JoinedNode(good_host, "good", tmp_path)
    doomed = JoinedNode(doomed_host, "doomed", tmp_path)
    good.start(token)
    doomed.start(token)
    members = json.loads(local("cluster", "nodes", "--dir", str(cluster), "--json"))
    by_name = {m["name"]: m for m in members}
    assert set(by_name) == {"good", "doomed"}

    # An expired token: the node says so and never serves.
    late = late_host.run(
        mesh(
            "node",
            "start",
            "--name",
            "late",
            "--host",
            late_host.ip,
            "--port",
            "0",
            "--state-dir",
            str(tmp_path / "late"),
            "--join",
            expired,
            "--coordinator",
            f"{coordinator_host.ip}:{JOIN_PORT}",
        ),
        timeout_s=120,
    )
    assert late.returncode != 0 and "expired" in late.stderr, late.stderr[-1500:]
    assert expired.split(".")[2] not in late.stderr + late.stdout

    # The impostors: good's record copied exactly (plaintext), and doomed's id with a
    # certificate of another CA.
    impostors = []
    for host, victim, foreign in ((rogue_host, good, False), (foreign_host, doomed, True)):
        argv = [
            sys.executable,
            "-m",
            "tests.e2e.trust_impostor",
            "--interface",
            host.ip,
            "--state-dir",
            str(tmp_path / f"impostor-{victim.name}"),
            "--name",
            victim.name,
            "--node-id",
            victim.node_id,
            "--cluster",
            "store",
            "--fingerprint",
            by_name[victim.name]["fingerprint"],
        ] + (["--foreign-ca"] if foreign else [])
        process = host.popen(argv, env=environment(), cwd=REPO)
        assert process.stdout is not None
        reader = LineReader(process.stdout, name=f"impostor-{victim.name}")
        reader.wait_for(lambda text: text.startswith("impostor serving"), timeout_s=60)
        impostors.append(reader)

    env = environment(MESH_API_KEY=api_key)

    def load(tasks: int, prefix: str, wait_ready: int = 0) -> list[dict]:
        done = subprocess.run(
            coordinator_host.command(
                [
                    sys.executable,
                    "-m",
                    "bench.mesh_load",
                    "--coordinator",
                    fast,
                    "--tasks",
                    str(tasks),
                    "--concurrency",
                    "4",
                    "--prefix",
                    prefix,
                    "--max-tokens",
                    "8",
                    "--wait-ready",
                    str(wait_ready),
                ]
            ),
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            cwd=REPO,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]

    events = load(16, "trust", wait_ready=2)
    answered = [e for e in events if e["event"] == "answered"]
    assert len(answered) == 16, [e for e in events if e["event"] == "failed"]
    assert {e["node"] for e in answered} <= {"good", "doomed"}

    # Garbage on good's TLS port, from the coordinator's host: the node keeps serving.
    host, port = good.address.rsplit(":", 1)
    garbage = coordinator_host.run(
        [
            sys.executable,
            "-c",
            "import os,socket,sys\n"
            "for p in (b'\\x00'*4096, b'GET / HTTP/1.1\\r\\n\\r\\n', os.urandom(65536)):\n"
            f"  s=socket.create_connection(('{host}',{port}),timeout=3); s.sendall(p); s.close()\n",
        ]
    )
    assert garbage.returncode == 0, garbage.stderr

    def node_states() -> dict[str, str]:
        """`mesh nodes --json` from the coordinator's host: name -> state."""
        listing = subprocess.run(
            coordinator_host.command(mesh("nodes", "--coordinator", fast, "--json")),
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=REPO,
        )
        assert listing.returncode == 0, listing.stderr
        return {n["name"]: n["state"] for n in json.loads(listing.stdout)}

    # Revoke doomed: the coordinator drops it within about a second.
    before_revoke = doomed.counts(cluster)
    local("cluster", "revoke", "doomed", "--dir", str(cluster))
    revoked_at = time.monotonic()
    while True:
        states = node_states()
        if states.get("doomed") != "ready":
            break
        assert time.monotonic() - revoked_at < 10, states
        time.sleep(0.1)
    dropped_after_s = time.monotonic() - revoked_at
    assert dropped_after_s < 3.0, dropped_after_s  # a CLI round trip included

    events = load(8, "after", wait_ready=1)
    after = [e for e in events if e["event"] == "answered"]
    assert len(after) == 8 and {e["node"] for e in after} == {"good"}
    assert doomed.counts(cluster).counts.keys() == before_revoke.counts.keys()

    # What the nodes counted: every task ran once, on a member.
    on_good = good.counts(cluster)
    for event in answered + after:
        runs = [c.get(event["task_id"]).generations_completed for c in (on_good, before_revoke)]
        assert sorted(runs) == [0, 1], (event, runs)

    # The impostors never got a prompt; the coordinator said why, once each.
    for reader in impostors:
        while not reader.lines.empty():
            reader.history.append(reader.lines.get())
        assert not any("PROMPT RECEIVED" in line for _, line in reader.history)

    def get(url: str) -> str:
        """GET with the API key, from the coordinator's host."""
        fetch = subprocess.run(
            coordinator_host.command(
                [
                    sys.executable,
                    "-c",
                    "import os,sys,urllib.request\n"
                    "r=urllib.request.Request(sys.argv[1],headers={'Authorization':'Bearer '"
                    "+os.environ['MESH_API_KEY']})\n"
                    "print(urllib.request.urlopen(r,timeout=10).read().decode())",
                    url,
                ]
            ),
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=REPO,
        )
        assert fetch.returncode == 0, fetch.stderr
        return fetch.stdout

    # The coordinator refused them, and says why (GET /v1/mesh/refusals, with the key).
    refusals = json.loads(get(f"{http_base}/mesh/refusals"))["refusals"]
    reasons = {r["address"].rsplit(":", 1)[0]: r["reason"] for r in refusals}
    # A perfect copy of good's record while good serves: the same id twice, refused before any
    # probe (were good gone, its probe would fail the TLS handshake: see the integration test).
    copied = reasons.get(rogue_host.ip, "")
    assert "duplicate node id" in copied or "TLS handshake failed" in copied, refusals
    assert "not its current" in reasons.get(foreign_host.ip, ""), (foreign_host.ip, refusals)
    assert any("revoked" in r["reason"] for r in refusals), refusals
    # With good gone (SIGTERM: its goodbye), the copy of its record is probed at last: the
    # handshake fails (no certificate of the cluster), and it is still never ready.
    assert good.process is not None
    good.process.terminate()
    good.process.wait(timeout=30)
    deadline = time.monotonic() + 20
    while True:
        refusals = json.loads(get(f"{http_base}/mesh/refusals"))["refusals"]
        if any(
            r["address"].startswith(rogue_host.ip + ":") and "TLS handshake" in r["reason"]
            for r in refusals
        ):
            break
        assert time.monotonic() < deadline, json.dumps(refusals)
        time.sleep(0.5)
    assert "ready" not in node_states().values()
    log_text = (tmp_path / "coordinator.log").read_text(errors="replace")
    assert api_key not in log_text and token.split(".")[2] not in log_text
    coordinator.terminate()
    coordinator.wait(timeout=60)
