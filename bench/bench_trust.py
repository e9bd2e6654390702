"""What trust costs: mTLS on the coordinator's link to a node and on the fast path, and joining.

    python -m bench.bench_trust [--requests 400] [--joins 5] [--no-write]

Latency: two *instant* fake-model nodes (`bench.fake_node`): one open (plaintext), one that
joined a cluster (mTLS only). Four paths, requests alternating so that drift hits all alike:
- each node called directly (plaintext; mTLS with the operator's certificate): the link;
- a coordinator without Ray (a Dispatcher and its gRPC fast path, each in a process of its
  own: `--serve`) in front of each: open, or with the cluster (mTLS to its node, and an API
  key checked on every request).

Join time: `bench.fake_node` started with a join token (a new member each time, found at the
join port given) until it prints its serving line, against the same without a token. The
difference is what joining adds (key, CSR, two RPCs, files); a real model adds its own load.
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import subprocess
import sys
import tempfile
import time

from bench._processes import processes
from bench._report import machine_line, median, percentile, write_section
from bench.bench_coordinator import MESSAGES, latencies
from mesh.local_processes import LocalNode, python_command


def serve(node: str, cluster_dir: str) -> int:
    """A coordinator without Ray for `node` (`cluster_dir` "-": open); prints `ready ADDRESS`."""
    from mesh.coordinator.access import AccessControl
    from mesh.coordinator.dispatch import Dispatcher
    from mesh.coordinator.pool import grpc_connector
    from mesh.coordinator.service import MeshHandlers, start_fast_path
    from mesh.coordinator.settings import DispatcherSettings
    from mesh.health import ready_view

    async def run() -> None:
        access = None
        connect = grpc_connector(_security(None))
        if cluster_dir != "-":
            access = AccessControl.for_cluster_dir(cluster_dir)
            connect = grpc_connector(_security(cluster_dir, "coordinator"))
        dispatcher = Dispatcher(DispatcherSettings(), connect=connect)
        view = await ready_view(
            node, security=_security(None if cluster_dir == "-" else cluster_dir)
        )
        dispatcher.update_nodes([view])
        handlers = MeshHandlers(dispatcher, access=access)
        server, port = await start_fast_path(handlers, "127.0.0.1:0")
        print(f"ready 127.0.0.1:{port}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop(0)
            await dispatcher.close()

    asyncio.run(run())
    return 0


def _security(cluster_dir: str | None, role: str = "admin"):  # noqa: ANN202
    from mesh.core.channels import PLAINTEXT

    if cluster_dir is None:
        return PLAINTEXT
    from mesh.cluster.authority import ClusterAuthority
    from mesh.core.pki import MEMBER_NAME

    return ClusterAuthority(pathlib.Path(cluster_dir)).security(role).expecting(MEMBER_NAME)


async def measure(
    nodes: dict[str, str], coordinators: dict[str, str], cluster_dir: str, key: str, requests: int
) -> dict[str, list[float]]:
    from mesh.client import NodeClient
    from mesh.coordinator_client import MeshClient

    open_node = NodeClient(nodes["open"])
    joined_node = NodeClient(nodes["joined"], security=_security(cluster_dir))
    open_mesh = MeshClient(coordinators["open"])
    cluster_mesh = MeshClient(coordinators["cluster"], api_key=key)
    try:
        targets = {
            "node, plaintext": lambda: open_node.generate(
                messages=MESSAGES, model="smollm2", max_tokens=20
            ),
            "node, mTLS": lambda: joined_node.generate(
                messages=MESSAGES, model="smollm2", max_tokens=20
            ),
            "fast path, open mesh": lambda: open_mesh.submit(
                messages=MESSAGES, model="smollm2", max_tokens=20
            ),
            "fast path, cluster (mTLS + API key)": lambda: cluster_mesh.submit(
                messages=MESSAGES, model="smollm2", max_tokens=20
            ),
        }
        return await latencies(targets, requests)
    finally:
        for client in (open_node, joined_node, open_mesh, cluster_mesh):
            await client.close()


def _start_coordinator(node: str, cluster_dir: str) -> tuple[subprocess.Popen[str], str]:
    child = subprocess.Popen(
        [sys.executable, "-m", "bench.bench_trust", "--serve", node, cluster_dir],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    line = child.stdout.readline().split()
    if len(line) != 2 or line[0] != "ready":
        child.kill()
        raise RuntimeError(f"the coordinator for {node} did not start")
    return child, line[1]


def join_times(cluster_dir: pathlib.Path, join_address: str, joins: int, log: pathlib.Path) -> dict:
    """Seconds from start to the serving line, with and without a join (alternating)."""
    from mesh.cluster.authority import ClusterAuthority, MemberDirectory
    from mesh.health import GrpcProber
    from mesh.node_table import ProbeStatus

    authority = ClusterAuthority(cluster_dir)
    times: dict[str, list[float]] = {"without a token": [], "with --join-file": []}
    ready: list[float] = []  # joined, to OK from a coordinator's prober (mTLS, member check)
    for index in range(joins):
        for label in ("without a token", "with --join-file"):
            argv = python_command("-m", "bench.fake_node", "--name", f"j{index}{len(label)}")
            if label == "with --join-file":
                token_file = cluster_dir.parent / f"token-{index}"
                token_file.write_text(str(authority.create_token(ttl_s=600, uses=1)))
                token_file.chmod(0o600)
                argv += ["--join-file", str(token_file), "--coordinator", join_address]
            began = time.monotonic()
            node = LocalNode.start(argv, name="join", log=log, timeout_s=60)
            times[label].append(time.monotonic() - began)
            if label == "with --join-file":

                async def probe(address: str, node_id: str) -> bool:
                    prober = GrpcProber(authority.security(), MemberDirectory(authority))
                    result = await prober.probe("bench", address, timeout_s=5, node_id=node_id)
                    await prober.close()
                    return result.status is ProbeStatus.OK

                if not asyncio.run(probe(node.address, node.node_id)):
                    raise RuntimeError("the joined node was not accepted by the prober")
                ready.append(time.monotonic() - began)
            node.stop()
    return {**times, "to ready at the coordinator": ready}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=400, help="per path (default 400)")
    parser.add_argument("--joins", type=int, default=5, help="joins timed (default 5)")
    parser.add_argument("--no-write", action="store_true", help="print, do not update the doc")
    parser.add_argument("--serve", nargs=2, metavar=("NODE", "CLUSTER_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve(*args.serve)

    from mesh.cluster.authority import ClusterAuthority, init_cluster
    from mesh.cluster.join_server import JoinServer
    from mesh.cluster.keys import KeyStore

    with processes() as started, tempfile.TemporaryDirectory() as temporary:
        cluster_dir = pathlib.Path(temporary) / "cluster"
        init_cluster(cluster_dir, "bench")
        authority = ClusterAuthority(cluster_dir)
        _, key = KeyStore(cluster_dir).create("bench")
        # The join port, in a thread of its own loop (the nodes are child processes).
        import threading

        loop = asyncio.new_event_loop()
        join = JoinServer(authority)
        port = loop.run_until_complete(join.start("127.0.0.1", 0, advertise=False))
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        join_address = f"127.0.0.1:{port}"
        token_file = pathlib.Path(temporary) / "token"
        token_file.write_text(str(authority.create_token(ttl_s=600, uses=1)))
        token_file.chmod(0o600)
        fake = ("-m", "bench.fake_node", "--max-concurrent", "64")
        nodes = {
            "open": started.node(python_command(*fake, "--name", "open"), "open").address,
            "joined": started.node(
                python_command(
                    *fake,
                    "--name",
                    "joined",
                    "--join-file",
                    str(token_file),
                    "--coordinator",
                    join_address,
                ),
                "joined",
            ).address,
        }
        children: list[subprocess.Popen[str]] = []
        try:
            coordinators = {}
            for name, node, directory in (
                ("open", nodes["open"], "-"),
                ("cluster", nodes["joined"], str(cluster_dir)),
            ):
                child, address = _start_coordinator(node, directory)
                children.append(child)
                coordinators[name] = address
            began = time.monotonic()
            samples = asyncio.run(
                measure(nodes, coordinators, str(cluster_dir), key, args.requests)
            )
            elapsed_s = time.monotonic() - began
            joined = join_times(
                cluster_dir, join_address, args.joins, pathlib.Path(temporary) / "join.log"
            )
        finally:
            for child in children:
                child.kill()
                child.wait(10)
            asyncio.run_coroutine_threadsafe(join.stop(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)

    def row(name: str, base: str | None) -> str:
        values = samples[name]
        p50, p99 = median(values), percentile(values, 99)
        if base is None:
            return f"| {name} | {p50:.2f} | {p99:.2f} | | |"
        ref = samples[base]
        return (
            f"| {name} | {p50:.2f} | {p99:.2f} | {p50 - median(ref):+.2f} | "
            f"{p99 - percentile(ref, 99):+.2f} |"
        )

    rows = [
        "| path | p50 ms | p99 ms | added by trust, p50 ms | added, p99 ms |",
        "|---|---|---|---|---|",
        row("node, plaintext", None),
        row("node, mTLS", "node, plaintext"),
        row("fast path, open mesh", None),
        row("fast path, cluster (mTLS + API key)", "fast path, open mesh"),
    ]
    plain, with_join = joined["without a token"], joined["with --join-file"]
    to_ready = joined["to ready at the coordinator"]
    body = (
        f"Command: `python -m bench.bench_trust --requests {args.requests} --joins {args.joins}`\n"
        f"({machine_line()}; {args.requests} sequential requests per path, alternating, "
        f"max_tokens 20 from instant fake-model nodes; {elapsed_s:.0f} s)\n\n"
        + "\n".join(rows)
        + "\n\nJoin: a fake-model node process from start to its serving line, median of "
        f"{args.joins}: {median(plain):.2f} s without a token, {median(with_join):.2f} s with "
        f"`--join-file` (joining adds {median(with_join) - median(plain):+.2f} s: key, CSR, "
        f"two RPCs, the files), and {median(to_ready):.2f} s from `node start --join` to "
        "ready at a coordinator's prober (mTLS handshake as the node's id, member check, "
        "health and Describe: a static address). Found by mDNS instead, add the announcement "
        "(~1.7 s, MEASURED.md)."
    )
    print(body)
    if not args.no_write:
        write_section("Trust: mTLS and joining", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
