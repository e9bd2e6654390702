"""The cluster's certificates and join tokens: what nodes, the coordinator and the CLI share.

A cluster has one CA (mesh/cluster/ca.py keeps it). Every certificate it issues names a role
(the subject's OU: "node", "coordinator", "admin") and an identity (the CN: a node's id), and
carries DNS names that TLS checks on every connection:

    <node id>.node.edgemesh     a node: the coordinator dials a node expecting its id, so a
                                certificate of another node (or of none) fails the handshake
    member.edgemesh             any member: for a static address whose id is not known yet
    coordinator.edgemesh        the coordinator (client of nodes, join server)

A join token is `emjoin1.<token id>.<secret>.<CA fingerprint>`: the id names it in the
coordinator's token store, the secret (32 random bytes) never crosses the wire (it keys the
HMACs that prove, both ways, that each end holds it), and the fingerprint (the first 128 bits of
the CA certificate's SHA-256) pins the CA the node will trust.
"""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import hmac
import ipaddress
import json
import re
import secrets
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh.core.errors import ConfigError, MeshError

ROLE_NODE = "node"
ROLE_COORDINATOR = "coordinator"
ROLE_ADMIN = "admin"
ROLES = (ROLE_NODE, ROLE_COORDINATOR, ROLE_ADMIN)

MEMBER_NAME = "member.edgemesh"
COORDINATOR_NAME = "coordinator.edgemesh"
_NODE_SUFFIX = ".node.edgemesh"

TOKEN_PREFIX = "emjoin1"
FINGERPRINT_HEX = 32  # 128 bits of SHA-256: what tokens and TXT records carry
_SECRET_BYTES = 32
# A node id a certificate can bind: one DNS label (ids made by `new_node_id` are 12 hex digits).
JOINABLE_ID = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")

PrivateKey = ec.EllipticCurvePrivateKey


class TrustError(MeshError):
    """A certificate, token or proof that does not hold: wrong CA, expired, forged."""

    grpc_code_name = "PERMISSION_DENIED"


def node_name(node_id: str) -> str:
    """The DNS name a node's certificate carries for its id (what the coordinator expects)."""
    return f"{node_id}{_NODE_SUFFIX}"


def new_key() -> PrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_key(pem: bytes) -> PrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TrustError("not an EC private key")
    return key


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_cert(pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as error:
        raise TrustError(f"not a PEM certificate: {error}") from None


def fingerprint(cert: x509.Certificate) -> str:
    """The SHA-256 of the certificate's DER, in hex, cut to FINGERPRINT_HEX digits."""
    return cert.fingerprint(hashes.SHA256()).hex()[:FINGERPRINT_HEX]


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _name(cluster: str, role: str, common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_ca(cluster: str, *, days: int = 3650) -> tuple[PrivateKey, x509.Certificate]:
    """A new self-signed CA for `cluster`."""
    key = new_key()
    subject = _name(cluster, "ca", f"edgemesh CA {cluster}")
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def names_for(role: str, identity: str) -> tuple[str, ...]:
    """The DNS names a certificate of `role` for `identity` carries."""
    if role == ROLE_NODE:
        return (node_name(identity), MEMBER_NAME)
    if role == ROLE_COORDINATOR:
        return (COORDINATOR_NAME, MEMBER_NAME)
    return (MEMBER_NAME,)


def issue(
    ca_key: PrivateKey,
    ca_cert: x509.Certificate,
    public_key: ec.EllipticCurvePublicKey,
    *,
    role: str,
    identity: str,
    lifetime: datetime.timedelta,
    addresses: tuple[str, ...] = (),
) -> x509.Certificate:
    """A certificate for `public_key` as `role`/`identity`, valid for `lifetime` from now.

    The subject and names come from here, never from a CSR: the CA decides what it binds."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    cluster = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
    alternative: list[x509.GeneralName] = [x509.DNSName(n) for n in names_for(role, identity)]
    alternative += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(_name(str(cluster), role, identity))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + lifetime, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alternative), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


def csr_for(key: PrivateKey, node_id: str) -> bytes:
    """A PKCS#10 request (DER) for `key`; the CA takes only its public key."""
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .sign(key, hashes.SHA256())
    )
    return request.public_bytes(serialization.Encoding.DER)


def csr_public_key(der: bytes) -> ec.EllipticCurvePublicKey:
    """The public key of a CSR whose self-signature holds (proof the sender has its key)."""
    try:
        request = x509.load_der_x509_csr(der)
    except ValueError:
        raise TrustError("the certificate request does not parse") from None
    if not request.is_signature_valid:
        raise TrustError("the certificate request's signature does not hold")
    public_key = request.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise TrustError("the certificate request must be for an EC key")
    return public_key


@dataclass(frozen=True)
class Identity:
    """What a certificate says: cluster, role, identity (a node id), validity, fingerprint."""

    cluster: str
    role: str
    identity: str
    not_after: datetime.datetime
    fingerprint: str

    @property
    def label(self) -> str:
        return f"{self.role}:{self.identity}"


def identity_of(cert: x509.Certificate) -> Identity:
    def one(oid: x509.ObjectIdentifier) -> str:
        values = cert.subject.get_attributes_for_oid(oid)
        return str(values[0].value) if values else ""

    return Identity(
        cluster=one(NameOID.ORGANIZATION_NAME),
        role=one(NameOID.ORGANIZATIONAL_UNIT_NAME),
        identity=one(NameOID.COMMON_NAME),
        not_after=cert.not_valid_after_utc,
        fingerprint=fingerprint(cert),
    )


@functools.lru_cache(maxsize=256)
def identity_of_pem(pem: bytes) -> Identity:
    """`identity_of` a PEM certificate, cached: servers look at each call's peer."""
    return identity_of(load_cert(pem))


def check_issued(
    cert: x509.Certificate, ca_cert: x509.Certificate, *, at: datetime.datetime | None = None
) -> Identity:
    """The certificate's Identity if `ca_cert` signed it and it is valid now; else TrustError."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise TrustError("the certificate was not issued by this cluster's CA") from None
    moment = at or _now()
    if not cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc:
        raise TrustError(f"the certificate is not valid now (until {cert.not_valid_after_utc})")
    return identity_of(cert)


# ---------------------------------------------------------------- join tokens


@dataclass(frozen=True)
class JoinToken:
    token_id: str
    secret: bytes
    ca_fingerprint: str

    def __str__(self) -> str:
        secret = base64.urlsafe_b64encode(self.secret).decode().rstrip("=")
        return f"{TOKEN_PREFIX}.{self.token_id}.{secret}.{self.ca_fingerprint}"

    def __repr__(self) -> str:  # never the secret, in logs or tracebacks
        return f"JoinToken(token_id={self.token_id!r}, ca_fingerprint={self.ca_fingerprint!r})"

    @classmethod
    def new(cls, ca_fingerprint: str) -> JoinToken:
        return cls(secrets.token_hex(8), secrets.token_bytes(_SECRET_BYTES), ca_fingerprint)

    @classmethod
    def parse(cls, text: str) -> JoinToken:
        """A token from its text; ConfigError that never repeats the text (it is a secret)."""
        parts = text.strip().split(".")
        if len(parts) != 4 or parts[0] != TOKEN_PREFIX:
            raise ConfigError(
                f"not a join token (expected {TOKEN_PREFIX}.ID.SECRET.FINGERPRINT, "
                "as `mesh cluster token` prints)"
            )
        _, token_id, secret, fp = parts
        try:
            raw = base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4))
        except ValueError:
            raw = b""
        if (
            not re.fullmatch(r"[0-9a-f]{16}", token_id)
            or len(raw) != _SECRET_BYTES
            or not re.fullmatch(rf"[0-9a-f]{{{FINGERPRINT_HEX}}}", fp)
        ):
            raise ConfigError("the join token is damaged (copy it again from `mesh cluster token`)")
        return cls(token_id, raw, fp)


def secret_hash(secret: bytes) -> str:
    """What the coordinator keeps of a token's secret (never the secret)."""
    return hashlib.sha256(b"edgemesh-token-v1" + secret).hexdigest()


def proof_key(secret: bytes) -> bytes:
    """The HMAC key of a token's proofs, derived from its secret (the node's side)."""
    return bytes.fromhex(secret_hash(secret))


def proof_key_from_hash(stored_hash: str) -> bytes:
    """The same key from what the coordinator's store keeps (`secret_hash`)."""
    return bytes.fromhex(stored_hash)


def _framed(*parts: bytes | str) -> bytes:
    """Length-prefixed concatenation: no two different part lists give the same bytes."""
    out = bytearray()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        out += struct.pack(">I", len(data)) + data
    return bytes(out)


def join_proof(
    secret: bytes, token_id: str, node_id: str, node_name_: str, nonce: bytes, csr_der: bytes
) -> bytes:
    message = _framed("edgemesh-join-v1", token_id, node_id, node_name_, nonce, csr_der)
    return hmac.new(secret, message, hashlib.sha256).digest()


def joined_proof(
    secret: bytes,
    nonce: bytes,
    certificate_pem: bytes,
    ca_pem: bytes,
    cluster: str,
    labels: Mapping[str, str],
) -> bytes:
    """The coordinator's answer proved: everything in it the node keeps (certificate, CA,
    cluster name, the token's labels), bound to the node's nonce."""
    label_text = json.dumps(dict(labels), sort_keys=True, separators=(",", ":"))
    message = _framed("edgemesh-joined-v2", nonce, certificate_pem, ca_pem, cluster, label_text)
    return hmac.new(secret, message, hashlib.sha256).digest()


def renew_message(unix_s: int, csr_der: bytes) -> bytes:
    return _framed("edgemesh-renew-v1", str(unix_s), csr_der)


def sign(key: PrivateKey, message: bytes) -> bytes:
    return key.sign(message, ec.ECDSA(hashes.SHA256()))


def verify_signature(cert: x509.Certificate, message: bytes, signature: bytes) -> None:
    public_key = cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise TrustError("the certificate's key is not an EC key")
    try:
        public_key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise TrustError("the renewal's signature does not hold") from None
