"""Cluster trust, kept in one directory on the coordinator's host (`ClusterDir`).

    ca.pem / ca.key            the cluster CA (the key 0600; it never leaves this directory)
    coordinator.pem / .key     the coordinator's certificate: client of nodes, join server
    admin.pem / .key           the operator's certificate, for the CLI (`mesh nodes --node`)
    cluster.json               the cluster's name and CA fingerprint
    tokens.json                join tokens, secrets hashed (mesh/cluster/tokens.py)
    members.json               nodes that joined, their certificates, revocations
    keys.json                  API keys, hashed (mesh/cluster/keys.py)
    audit.jsonl                the coordinator's audit summary, one line per agent task
    ray-token                  Ray's own token (RAY_AUTH_MODE=token) for a Ray it starts

Every file is written 0600 in a 0700 directory. A coordinator started with this directory
(`--cluster-dir`, or the default one once `mesh cluster init` made it) requires client
certificates on every node and credentials at its ingress.
"""

from __future__ import annotations

import os
import pathlib

from mesh.core.files import write_private

__all__ = ["default_cluster_dir", "is_initialized", "write_private"]

DEFAULT_CLUSTER_DIR_ENV = "MESH_CLUSTER_DIR"

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
COORDINATOR_CERT = "coordinator.pem"
COORDINATOR_KEY = "coordinator.key"
ADMIN_CERT = "admin.pem"
ADMIN_KEY = "admin.key"
CLUSTER_INFO = "cluster.json"
TOKENS = "tokens.json"
MEMBERS = "members.json"
KEYS = "keys.json"
AUDIT = "audit.jsonl"
RAY_TOKEN = "ray-token"


def default_cluster_dir() -> pathlib.Path:
    """$MESH_CLUSTER_DIR, else $XDG_STATE_HOME (or ~/.local/state)/edge-agent-mesh/cluster."""
    explicit = os.environ.get(DEFAULT_CLUSTER_DIR_ENV)
    if explicit:
        return pathlib.Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return pathlib.Path(base) / "edge-agent-mesh" / "cluster"


def is_initialized(directory: pathlib.Path) -> bool:
    return (directory / CA_CERT).is_file()
