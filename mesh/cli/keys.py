"""`mesh keys create|list|revoke`: API keys for the coordinator's ingress (mesh/cluster/keys.py).

    mesh keys create kiosk-12 --rpm 60 --tpm 20000 --agents customer-service --subject kiosk-12
    mesh keys list [--json]
    mesh keys revoke kiosk-12

Keys live hashed in the cluster directory's keys.json (--cluster-dir, default
$MESH_CLUSTER_DIR or ~/.local/state/edge-agent-mesh/cluster, made 0700 when missing). A
coordinator started with that directory checks them, and reads the file again within a second
of a change: a revoked key is refused without a restart.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import sys

from mesh.cli._common import EXIT_ERROR, print_json
from mesh.cluster import default_cluster_dir
from mesh.cluster.keys import ApiKey, KeyStore
from mesh.core.errors import MeshError
from mesh.core.untrusted import printable


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("keys", help="create, list and revoke API keys")
    actions = parser.add_subparsers(dest="keys_command", metavar="ACTION")
    create = actions.add_parser("create", help="a new key, shown once")
    create.add_argument("name", help="the key's name (letters, digits, '.', '_', '-')")
    create.add_argument("--rpm", type=_positive, metavar="N", help="requests per minute")
    create.add_argument("--tpm", type=_positive, metavar="N", help="tokens per minute")
    create.add_argument(
        "--agents", type=_names, default=(), metavar="A,B", help="the only agents it may run"
    )
    create.add_argument(
        "--models", type=_names, default=(), metavar="M,N", help="the only models it may use"
    )
    create.add_argument(
        "--subject", default="", help="who or what it stands for (tools see it), e.g. a customer"
    )
    _add_cluster_dir(create)
    create.set_defaults(func=_create)
    listing = actions.add_parser("list", help="the keys (never the keys themselves)")
    listing.add_argument("--json", action="store_true", help="print JSON")
    _add_cluster_dir(listing)
    listing.set_defaults(func=_list)
    revoke = actions.add_parser("revoke", help="refuse a key from now on")
    revoke.add_argument("name")
    _add_cluster_dir(revoke)
    revoke.set_defaults(func=_revoke)
    parser.set_defaults(func=lambda _args: parser.print_help() or 2)


def _add_cluster_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cluster-dir",
        type=pathlib.Path,
        metavar="DIR",
        help=f"the cluster directory (default {default_cluster_dir()})",
    )


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _store(args: argparse.Namespace) -> KeyStore:
    return KeyStore(args.cluster_dir or default_cluster_dir())


def _create(args: argparse.Namespace) -> int:
    try:
        record, secret = _store(args).create(
            args.name,
            rpm=args.rpm,
            tpm=args.tpm,
            agents=args.agents,
            models=args.models,
            subject=args.subject,
        )
    except (MeshError, OSError) as error:  # a bad name or file; a directory not ours
        print(f"error: {printable(str(error), 300)}", file=sys.stderr)
        return EXIT_ERROR
    print(secret)  # stdout holds the key alone: KEY=$(mesh keys create NAME)
    print(
        f"created API key {record.name!r} (id {record.id}); it will not be shown again: "
        "store it now",
        file=sys.stderr,
    )
    return 0


def summary(key: ApiKey) -> dict[str, object]:
    """What `list --json` shows of a key: everything but its hash."""
    return {
        "name": key.name,
        "id": key.id,
        "subject": key.subject,
        "rpm": key.rpm,
        "tpm": key.tpm,
        "agents": list(key.agents),
        "models": list(key.models),
        "created": _when(key.created_unix),
        "revoked": _when(key.revoked_unix) if key.revoked_unix is not None else None,
    }


def _when(unix: float) -> str:
    return datetime.datetime.fromtimestamp(unix, datetime.UTC).isoformat(timespec="seconds")


def _list(args: argparse.Namespace) -> int:
    try:
        keys = _store(args).list()
    except (MeshError, OSError) as error:  # a bad name or file; a directory not ours
        print(f"error: {printable(str(error), 300)}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print_json([summary(key) for key in keys])
        return 0
    print(f"{'NAME':<20} {'ID':<12} {'RPM':>6} {'TPM':>8} {'STATE':<8} {'SCOPE':<30} SUBJECT")
    for key in keys:
        scope = ", ".join(
            part
            for part in (
                f"agents {','.join(key.agents)}" if key.agents else "",
                f"models {','.join(key.models)}" if key.models else "",
            )
            if part
        )
        print(
            f"{key.name:<20} {key.id:<12} {key.rpm or '-':>6} {key.tpm or '-':>8} "
            f"{'revoked' if key.revoked else 'valid':<8} {printable(scope or 'all', 30):<30} "
            f"{printable(key.subject, 60)}"
        )
    return 0


def _revoke(args: argparse.Namespace) -> int:
    try:
        key = _store(args).revoke(args.name)
    except (MeshError, OSError) as error:  # a bad name or file; a directory not ours
        print(f"error: {printable(str(error), 300)}", file=sys.stderr)
        return EXIT_ERROR
    print(f"revoked API key {key.name!r} (id {key.id}); coordinators refuse it within a second")
    return 0
