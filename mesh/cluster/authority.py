"""The cluster's CA, join tokens and members, kept in the cluster directory (mesh/cluster).

`init_cluster` makes the CA and the coordinator's and operator's certificates once;
`ClusterAuthority` opens them and does what joins, renewals and the CLI need. Several processes
use one directory (the coordinator, `mesh cluster token`, `mesh cluster revoke`): every
read-modify-write of tokens.json and members.json holds an exclusive lock on `.lock`.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hmac
import json
import logging
import pathlib
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from edgemesh.v1 import cluster_pb2
from mesh.cluster import (
    ADMIN_CERT,
    ADMIN_KEY,
    CA_CERT,
    CA_KEY,
    CLUSTER_INFO,
    COORDINATOR_CERT,
    COORDINATOR_KEY,
    MEMBERS,
    TOKENS,
    is_initialized,
    write_private,
)
from mesh.core import pki
from mesh.core.channels import ChannelSecurity
from mesh.core.errors import ConfigError, InvalidRequestError, MeshError, NotFoundError
from mesh.core.pki import TrustError

logger = logging.getLogger("mesh.cluster")

NODE_CERT_LIFETIME = datetime.timedelta(days=30)
SERVICE_CERT_LIFETIME = datetime.timedelta(days=365)
RENEW_CLOCK_SKEW_S = 300
_CLUSTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class AlreadyMemberError(MeshError):
    grpc_code_name = "ALREADY_EXISTS"


@dataclass(frozen=True)
class Member:
    node_id: str
    name: str
    fingerprint: str
    not_after_unix_s: float
    joined_unix_s: float
    labels: Mapping[str, str] = field(default_factory=dict)
    revoked_unix_s: float | None = None
    # The certificate before the last renewal: still accepted until the node uses the new one
    # (a renewal whose answer was lost must not lock the node out), and renewable again.
    previous_fingerprint: str = ""
    token_id: str = ""  # the token it joined with (a join whose answer was lost is redone)

    @property
    def revoked(self) -> bool:
        return self.revoked_unix_s is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "name": self.name,
            "fingerprint": self.fingerprint,
            "not_after_unix_s": self.not_after_unix_s,
            "joined_unix_s": self.joined_unix_s,
            "labels": dict(self.labels),
            "revoked_unix_s": self.revoked_unix_s,
            "previous_fingerprint": self.previous_fingerprint,
            "token_id": self.token_id,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Member:
        return cls(
            node_id=str(data["node_id"]),
            name=str(data["name"]),
            fingerprint=str(data["fingerprint"]),
            not_after_unix_s=float(data["not_after_unix_s"]),
            joined_unix_s=float(data["joined_unix_s"]),
            labels={str(k): str(v) for k, v in dict(data.get("labels") or {}).items()},
            revoked_unix_s=(
                None if data.get("revoked_unix_s") is None else float(data["revoked_unix_s"])
            ),
            previous_fingerprint=str(data.get("previous_fingerprint") or ""),
            token_id=str(data.get("token_id") or ""),
        )


@dataclass(frozen=True)
class TokenInfo:
    token_id: str
    expires_unix_s: float
    uses_left: int | None  # None: unlimited
    labels: Mapping[str, str]


def init_cluster(directory: pathlib.Path, name: str) -> str:
    """Create the CA and the coordinator's and operator's certificates in `directory`; return
    the CA's fingerprint. ConfigError if a cluster is already there (never overwritten)."""
    if not _CLUSTER_NAME.match(name):
        raise ConfigError(f"cluster name {name!r}: letters, digits, '.', '_' and '-', up to 63")
    if is_initialized(directory):
        raise ConfigError(
            f"{directory} already holds a cluster (its CA is {directory / CA_CERT}); "
            "use it, or pass another --dir"
        )
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    directory.chmod(0o700)
    ca_key, ca_cert = pki.make_ca(name)
    write_private(directory / CA_KEY, pki.key_pem(ca_key))
    for role, cert_file, key_file in (
        (pki.ROLE_COORDINATOR, COORDINATOR_CERT, COORDINATOR_KEY),
        (pki.ROLE_ADMIN, ADMIN_CERT, ADMIN_KEY),
    ):
        key = pki.new_key()
        cert = pki.issue(
            ca_key,
            ca_cert,
            key.public_key(),
            role=role,
            identity=role,
            lifetime=SERVICE_CERT_LIFETIME,
        )
        write_private(directory / key_file, pki.key_pem(key))
        write_private(directory / cert_file, pki.cert_pem(cert))
    fp = pki.fingerprint(ca_cert)
    write_private(
        directory / CLUSTER_INFO,
        json.dumps({"cluster": name, "ca_fingerprint": fp, "created_unix_s": time.time()}).encode(),
    )
    write_private(directory / CA_CERT, pki.cert_pem(ca_cert))  # last: marks the dir initialized
    return fp


class ClusterAuthority:
    """One cluster directory: the CA, tokens, members (see the module's docstring)."""

    def __init__(self, directory: pathlib.Path, *, clock: Callable[[], float] = time.time) -> None:
        if not is_initialized(directory):
            raise ConfigError(
                f"{directory} holds no cluster: run `mesh cluster init` (or pass --cluster-dir)"
            )
        self.directory = directory
        self._clock = clock
        self.ca_pem = (directory / CA_CERT).read_bytes()
        self.ca_cert = pki.load_cert(self.ca_pem)
        self.name = pki.identity_of(self.ca_cert).cluster
        self.ca_fingerprint = pki.fingerprint(self.ca_cert)

    # ------------------------------------------------------------------ credentials

    def security(self, role: str = pki.ROLE_COORDINATOR) -> ChannelSecurity:
        """Channel credentials of the coordinator (or the operator: role admin)."""
        cert, key = {
            pki.ROLE_COORDINATOR: (COORDINATOR_CERT, COORDINATOR_KEY),
            pki.ROLE_ADMIN: (ADMIN_CERT, ADMIN_KEY),
        }[role]
        return ChannelSecurity(
            ca_file=str(self.directory / CA_CERT),
            cert_file=str(self.directory / cert),
            key_file=str(self.directory / key),
        )

    def _ca_key(self) -> pki.PrivateKey:
        return pki.load_key((self.directory / CA_KEY).read_bytes())

    # ------------------------------------------------------------------ storage

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock = self.directory / ".lock"
        with open(lock, "a+") as handle:
            lock.chmod(0o600)
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _read(self, name: str) -> dict[str, Any]:
        try:
            data = json.loads((self.directory / name).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        return data if isinstance(data, dict) else {}

    def _write(self, name: str, data: Mapping[str, Any]) -> None:
        write_private(self.directory / name, json.dumps(data, indent=1, sort_keys=True).encode())

    # ------------------------------------------------------------------ tokens

    def create_token(
        self, *, ttl_s: float = 3600.0, uses: int | None = None, labels: Mapping[str, str] = {}
    ) -> pki.JoinToken:
        if ttl_s <= 0:
            raise InvalidRequestError("--ttl must be positive")
        if uses is not None and uses < 1:
            raise InvalidRequestError("--uses must be at least 1")
        token = pki.JoinToken.new(self.ca_fingerprint)
        with self._locked():
            tokens = self._read(TOKENS)
            now = self._clock()
            # Expired and used-up tokens are dropped as new ones are made.
            tokens = {
                k: v
                for k, v in tokens.items()
                if v.get("expires_unix_s", 0) > now and v.get("uses_left") != 0
            }
            tokens[token.token_id] = {
                "secret_sha256": pki.secret_hash(token.secret),
                "expires_unix_s": now + ttl_s,
                "uses_left": uses,
                "labels": dict(labels),
            }
            self._write(TOKENS, tokens)
        return token

    def tokens(self) -> list[TokenInfo]:
        now = self._clock()
        return [
            TokenInfo(k, v["expires_unix_s"], v.get("uses_left"), v.get("labels") or {})
            for k, v in sorted(self._read(TOKENS).items())
            if v.get("expires_unix_s", 0) > now and v.get("uses_left") != 0
        ]

    # ------------------------------------------------------------------ members

    def members(self) -> dict[str, Member]:
        return {
            node_id: Member.from_json(entry)
            for node_id, entry in self._read(MEMBERS).get("members", {}).items()
        }

    def revoke(self, node: str) -> Member:
        """Revoke the member with this node id or name; NotFoundError if none."""
        with self._locked():
            data = self._read(MEMBERS)
            members = data.setdefault("members", {})
            live = {k: v for k, v in members.items() if not v.get("revoked_unix_s")}
            # An exact node id wins over names (a name may not be another member's id anyway).
            matches = (
                [node] if node in live else [k for k, v in live.items() if v.get("name") == node]
            )
            if not matches:
                raise NotFoundError(f"no member {node!r} (see `mesh cluster nodes`)")
            if len(matches) > 1:
                raise InvalidRequestError(f"{node!r} names several members: use the node id")
            members[matches[0]]["revoked_unix_s"] = self._clock()
            self._write(MEMBERS, data)
            return Member.from_json(members[matches[0]])

    # ------------------------------------------------------------------ join and renew

    def join(self, request: cluster_pb2.JoinRequest) -> cluster_pb2.JoinResponse:
        """Check the token's proof, record the member, and sign its certificate. Every refusal
        is a MeshError whose message names no secret."""
        if not pki.JOINABLE_ID.match(request.node_id):
            raise InvalidRequestError(
                "node id must be lowercase letters, digits and '-' (one DNS label) to join"
            )
        if not 1 <= len(request.node_name) <= 63 or len(request.nonce) < 16:
            raise InvalidRequestError("the join request is incomplete")
        public_key = pki.csr_public_key(request.csr_der)
        with self._locked():
            tokens = self._read(TOKENS)
            entry = tokens.get(request.token_id)
            if entry is None:
                raise TrustError("unknown join token (make one with `mesh cluster token`)")
            # The proof is checked before anything about the token is revealed or spent. Its
            # key is derived from the secret (pki.proof_key), which is all the store keeps:
            # the same directory holds the CA's key, so what reads one reads the other.
            expected_hash = entry["secret_sha256"]
            proof = pki.join_proof(
                pki.proof_key_from_hash(expected_hash),
                request.token_id,
                request.node_id,
                request.node_name,
                request.nonce,
                request.csr_der,
            )
            if not hmac.compare_digest(proof, request.proof):
                raise TrustError("the join token's proof does not hold (a wrong or damaged token)")
            now = self._clock()
            if entry["expires_unix_s"] <= now:
                raise TrustError("the join token has expired: make a new one")
            data = self._read(MEMBERS)
            members = data.setdefault("members", {})
            redo = False  # the same node's join again, its answer lost: no use spent
            for node_id, other in members.items():
                if other.get("revoked_unix_s"):
                    continue
                if node_id == request.node_id:
                    if other.get("name") == request.node_name and (
                        other.get("token_id") == request.token_id
                        or float(other.get("not_after_unix_s", 0)) <= now
                    ):
                        # The same node with the same token (its answer was lost), or one whose
                        # certificate expired: it joins again, and the old certificate is void.
                        redo = other.get("token_id") == request.token_id
                        continue
                    raise AlreadyMemberError(
                        f"node id {request.node_id} is already a member; revoke it first "
                        "(`mesh cluster revoke`) to join again"
                    )
                if request.node_name in (other.get("name"), node_id):
                    raise AlreadyMemberError(
                        f"node name {request.node_name!r} is taken by member {node_id}"
                    )
            if entry.get("uses_left") == 0 and not redo:
                raise TrustError("the join token has been used up: make a new one")
            cert = pki.issue(
                self._ca_key(),
                self.ca_cert,
                public_key,
                role=pki.ROLE_NODE,
                identity=request.node_id,
                lifetime=NODE_CERT_LIFETIME,
            )
            labels = dict(entry.get("labels") or {})
            members[request.node_id] = Member(
                node_id=request.node_id,
                name=request.node_name,
                fingerprint=pki.fingerprint(cert),
                not_after_unix_s=cert.not_valid_after_utc.timestamp(),
                joined_unix_s=now,
                labels=labels,
                token_id=request.token_id,
            ).to_json()
            if entry.get("uses_left") is not None and not redo:
                entry["uses_left"] -= 1
            self._write(TOKENS, tokens)
            self._write(MEMBERS, data)
        certificate_pem = pki.cert_pem(cert)
        logger.info("node %s (%s) joined", request.node_id, request.node_name)
        return cluster_pb2.JoinResponse(
            certificate_pem=certificate_pem,
            ca_pem=self.ca_pem,
            cluster=self.name,
            labels=labels,
            proof=pki.joined_proof(
                pki.proof_key_from_hash(expected_hash),
                request.nonce,
                certificate_pem,
                self.ca_pem,
                self.name,
                labels,
            ),
            not_after_unix_s=cert.not_valid_after_utc.timestamp(),
        )

    def renew(self, request: cluster_pb2.RenewRequest) -> cluster_pb2.JoinResponse:
        """A new certificate for a member that proves it holds its current one's key."""
        current = pki.load_cert(request.certificate_pem)
        identity = pki.check_issued(current, self.ca_cert)
        if identity.role != pki.ROLE_NODE:
            raise TrustError("only node certificates are renewed here")
        if abs(self._clock() - request.unix_s) > RENEW_CLOCK_SKEW_S:
            raise TrustError("the renewal's time is more than 5 minutes off this coordinator's")
        pki.verify_signature(
            current, pki.renew_message(request.unix_s, request.csr_der), request.signature
        )
        public_key = pki.csr_public_key(request.csr_der)
        with self._locked():
            data = self._read(MEMBERS)
            entry = data.get("members", {}).get(identity.identity)
            if entry is None or entry.get("revoked_unix_s"):
                raise TrustError(f"node {identity.identity} is not a member (revoked?)")
            if identity.fingerprint not in (
                entry.get("fingerprint"),
                entry.get("previous_fingerprint"),
            ):
                raise TrustError("that certificate was replaced already")
            # Renewing from the previous certificate: the last answer was lost; the
            # certificate issued then is dropped, the previous one stays the fallback.
            previous = (
                identity.fingerprint
                if identity.fingerprint == entry.get("previous_fingerprint")
                else entry.get("fingerprint")
            )
            cert = pki.issue(
                self._ca_key(),
                self.ca_cert,
                public_key,
                role=pki.ROLE_NODE,
                identity=identity.identity,
                lifetime=NODE_CERT_LIFETIME,
            )
            entry["previous_fingerprint"] = previous
            entry["fingerprint"] = pki.fingerprint(cert)
            entry["not_after_unix_s"] = cert.not_valid_after_utc.timestamp()
            self._write(MEMBERS, data)
        logger.info("node %s renewed its certificate", identity.identity)
        return cluster_pb2.JoinResponse(
            certificate_pem=pki.cert_pem(cert),
            ca_pem=self.ca_pem,
            cluster=self.name,
            not_after_unix_s=cert.not_valid_after_utc.timestamp(),
        )


class MemberDirectory:
    """The members as the registry sees them: read again when members.json changes (checked
    at most every `recheck_s`), so that a revocation takes effect within a second."""

    def __init__(
        self,
        authority: ClusterAuthority,
        *,
        recheck_s: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._authority = authority
        self._recheck_s = recheck_s
        self._clock = clock
        self._checked = float("-inf")
        self._stamp: tuple[int, int] | None = None
        self._members: dict[str, Member] = {}
        self.version = 0

    def refresh(self) -> bool:
        """Read members.json again if it changed; True if it did."""
        now = self._clock()
        if now - self._checked < self._recheck_s:
            return False
        self._checked = now
        try:
            stat = (self._authority.directory / MEMBERS).stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            stamp = (0, 0)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        self._members = self._authority.members()
        self.version += 1
        return True

    def get(self, node_id: str) -> Member | None:
        self.refresh()
        return self._members.get(node_id)

    def revoked(self) -> set[str]:
        self.refresh()
        return {k for k, m in self._members.items() if m.revoked}

    def refusal(self, node_id: str, name: str | None, fingerprint: str | None) -> str | None:
        """Why a node advertising this id, name and certificate fingerprint is not a member
        (None: it may be, and its TLS handshake decides)."""
        member = self.get(node_id)
        if member is None:
            return f"node id {node_id} is not a member of this cluster"
        if member.revoked:
            return f"node {node_id} ({member.name}) was revoked"
        if name is not None and name != member.name:
            return (
                f"node {node_id} advertises name {name!r}, its certificate is for {member.name!r}"
            )
        if fingerprint is not None and fingerprint not in (
            member.fingerprint,
            member.previous_fingerprint or member.fingerprint,
        ):
            return f"node {node_id} advertises a certificate that is not its current one"
        return None


def certificate_expiry(pem: bytes) -> float:
    cert: x509.Certificate = pki.load_cert(pem)
    return cert.not_valid_after_utc.timestamp()
