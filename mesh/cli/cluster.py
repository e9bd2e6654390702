"""`mesh cluster init|token|nodes|revoke`: the cluster's CA, join tokens and members."""

from __future__ import annotations

import argparse
import datetime
import pathlib
import re
import sys

from mesh.cli._common import EXIT_ERROR, print_json
from mesh.core.errors import MeshError

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_s(text: str) -> float:
    """`90`, `90s`, `15m`, `1h`, `7d` in seconds (argparse type)."""
    match = _DURATION.match(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 30m, 1h, 7d)")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "cluster", help="cluster trust: CA, join tokens, members (run on the coordinator's host)"
    )
    actions = parser.add_subparsers(dest="cluster_command", metavar="ACTION")

    def with_dir(action: argparse.ArgumentParser) -> argparse.ArgumentParser:
        action.add_argument(
            "--dir",
            "--cluster-dir",
            dest="cluster_dir",
            metavar="DIR",
            help="the cluster directory (default $MESH_CLUSTER_DIR or "
            "~/.local/state/edge-agent-mesh/cluster)",
        )
        return action

    init = with_dir(actions.add_parser("init", help="create the cluster's CA and certificates"))
    init.add_argument("--name", default="default", help="the cluster's name (default: default)")
    init.set_defaults(func=_init)

    token = with_dir(actions.add_parser("token", help="print a join token for new nodes"))
    token.add_argument(
        "--ttl", type=duration_s, default=3600.0, help="valid for (default 1h; e.g. 30m, 7d)"
    )
    token.add_argument("--uses", type=int, help="how many nodes may join with it (default: any)")
    token.add_argument(
        "--labels",
        default="",
        metavar="K=V,...",
        help="labels every node that joins with it gets (e.g. site=store-1)",
    )
    token.set_defaults(func=_token)

    nodes = with_dir(actions.add_parser("nodes", help="list the members"))
    nodes.add_argument("--json", action="store_true", help="print JSON")
    nodes.set_defaults(func=_nodes)

    revoke = with_dir(
        actions.add_parser("revoke", help="remove a member (a running coordinator drops it)")
    )
    revoke.add_argument("node", help="node id or name")
    revoke.set_defaults(func=_revoke)
    parser.set_defaults(func=lambda _args: parser.print_help() or 2)


def _directory(args: argparse.Namespace) -> pathlib.Path:
    from mesh.cluster import default_cluster_dir

    return pathlib.Path(args.cluster_dir) if args.cluster_dir else default_cluster_dir()


def _labels(text: str) -> dict[str, str]:
    labels = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise MeshError(f"--labels {pair!r}: expected KEY=VALUE")
        labels[key] = value
    return labels


def _init(args: argparse.Namespace) -> int:
    from mesh.cluster.authority import init_cluster

    directory = _directory(args)
    try:
        fingerprint = init_cluster(directory, args.name)
    except MeshError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    print(f"cluster {args.name} created in {directory} (CA fingerprint {fingerprint})")
    print("next: `mesh coordinator start` uses it; `mesh cluster token` lets nodes join")
    return 0


def _token(args: argparse.Namespace) -> int:
    from mesh.cluster.authority import ClusterAuthority

    try:
        authority = ClusterAuthority(_directory(args))
        token = authority.create_token(ttl_s=args.ttl, uses=args.uses, labels=_labels(args.labels))
    except MeshError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    until = datetime.datetime.now().astimezone() + datetime.timedelta(seconds=args.ttl)
    uses = f"{args.uses} use(s)" if args.uses else "any number of uses"
    print(str(token))
    print(
        f"valid until {until:%Y-%m-%d %H:%M %Z}, {uses}; on a device: "
        "mesh node start --join TOKEN (or --join-file FILE)",
        file=sys.stderr,
    )
    return 0


def _nodes(args: argparse.Namespace) -> int:
    from mesh.cluster.authority import ClusterAuthority

    try:
        members = ClusterAuthority(_directory(args)).members()
    except MeshError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print_json([m.to_json() for m in members.values()])
        return 0
    if not members:
        print("no members yet (a node joins with `mesh node start --join TOKEN`)")
        return 0
    print(f"{'NODE ID':<14} {'NAME':<20} {'STATE':<8} {'CERT UNTIL':<17} LABELS")
    for member in sorted(members.values(), key=lambda m: m.joined_unix_s):
        until = datetime.datetime.fromtimestamp(member.not_after_unix_s).strftime("%Y-%m-%d %H:%M")
        state = "revoked" if member.revoked else "member"
        labels = ",".join(f"{k}={v}" for k, v in sorted(member.labels.items()))
        print(f"{member.node_id:<14} {member.name:<20} {state:<8} {until:<17} {labels}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from mesh.cluster.authority import ClusterAuthority

    try:
        member = ClusterAuthority(_directory(args)).revoke(args.node)
    except MeshError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    print(
        f"revoked {member.name} ({member.node_id}); a running coordinator stops using it "
        "within a second"
    )
    return 0
