"""The cluster's CA, tokens, members and renewals as logic (mesh/core/pki.py,
mesh/cluster/authority.py, nodes/join.py), with an injected clock; the real gRPC join is in
tests/integration/test_cluster_join.py."""

from __future__ import annotations

import datetime
import json
import os
import secrets
import stat

import pytest

from edgemesh.v1 import cluster_pb2
from mesh.cluster.authority import (
    AlreadyMemberError,
    ClusterAuthority,
    MemberDirectory,
    init_cluster,
)
from mesh.core import pki
from mesh.core.errors import ConfigError, NotFoundError
from mesh.core.pki import TrustError
from nodes.join import NodeTls, Renewal


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def directory(tmp_path):
    path = tmp_path / "cluster"
    init_cluster(path, "store")
    return path


def join_request(token: pki.JoinToken, node_id: str, name: str, key=None):
    key = key or pki.new_key()
    csr = pki.csr_for(key, node_id)
    nonce = secrets.token_bytes(16)
    proof = pki.join_proof(pki.proof_key(token.secret), token.token_id, node_id, name, nonce, csr)
    return (
        cluster_pb2.JoinRequest(
            token_id=token.token_id,
            node_id=node_id,
            node_name=name,
            csr_der=csr,
            nonce=nonce,
            proof=proof,
        ),
        key,
    )


def test_init_writes_owner_only_files_and_never_overwrites(directory):
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()}
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert all(mode == 0o600 for mode in modes.values()), modes
    with pytest.raises(ConfigError, match="already holds a cluster"):
        init_cluster(directory, "store")
    with pytest.raises(ConfigError, match="cluster name"):
        init_cluster(directory.parent / "x", "bad name!")


def test_a_token_round_trips_and_never_shows_its_secret():
    token = pki.JoinToken.new("ab" * 16)
    text = str(token)
    assert pki.JoinToken.parse(text) == token
    secret = text.split(".")[2]
    assert secret not in repr(token)
    for damaged in (text[:-1], text.replace("emjoin1", "emjoin2"), "x.y", text + ".z"):
        with pytest.raises(ConfigError) as error:
            pki.JoinToken.parse(damaged)
        assert secret not in str(error.value)


def test_join_signs_a_certificate_for_the_id_and_spends_the_token(directory):
    clock = Clock()
    authority = ClusterAuthority(directory, clock=clock)
    token = authority.create_token(ttl_s=60, uses=1, labels={"site": "s1"})
    request, _key = join_request(token, "abc123", "till")
    reply = authority.join(request)
    cert = pki.load_cert(reply.certificate_pem)
    identity = pki.check_issued(cert, authority.ca_cert)
    assert (identity.role, identity.identity, identity.cluster) == ("node", "abc123", "store")
    names = cert.extensions.get_extension_for_class(pki.x509.SubjectAlternativeName).value
    assert pki.node_name("abc123") in names.get_values_for_type(pki.x509.DNSName)
    # The node can check the answer: the proof is keyed by the token it holds.
    expected = pki.joined_proof(
        pki.proof_key(token.secret),
        request.nonce,
        reply.certificate_pem,
        reply.ca_pem,
        "store",
        {"site": "s1"},
    )
    # Cluster and labels are covered: a relay cannot change them.
    assert reply.proof != pki.joined_proof(
        pki.proof_key(token.secret),
        request.nonce,
        reply.certificate_pem,
        reply.ca_pem,
        "store",
        {"site": "s2"},
    )
    assert reply.proof == expected and dict(reply.labels) == {"site": "s1"}
    again, _ = join_request(token, "def456", "till-2")
    with pytest.raises(TrustError, match="used up"):
        authority.join(again)
    member = authority.members()["abc123"]
    assert member.fingerprint == identity.fingerprint and not member.revoked


def test_join_refusals(directory):
    clock = Clock()
    authority = ClusterAuthority(directory, clock=clock)
    token = authority.create_token(ttl_s=60)
    forged, _ = join_request(
        pki.JoinToken(token.token_id, b"x" * 32, token.ca_fingerprint), "a1", "a"
    )
    with pytest.raises(TrustError, match="proof does not hold"):
        authority.join(forged)
    unknown, _ = join_request(pki.JoinToken.new(token.ca_fingerprint), "a1", "a")
    with pytest.raises(TrustError, match="unknown join token"):
        authority.join(unknown)
    bad_id, _ = join_request(token, "Not_A_Label", "a")
    with pytest.raises(Exception, match="one DNS label"):
        authority.join(bad_id)
    authority.join(join_request(token, "a1", "a")[0])
    with pytest.raises(AlreadyMemberError, match="already a member"):
        authority.join(join_request(token, "a1", "other")[0])
    with pytest.raises(AlreadyMemberError, match="taken"):
        authority.join(join_request(token, "b2", "a")[0])
    clock.now += 61
    with pytest.raises(TrustError, match="expired"):
        authority.join(join_request(token, "c3", "c")[0])


def test_membership_refusals_and_revocation(directory):
    authority = ClusterAuthority(directory)
    token = authority.create_token(ttl_s=60)
    reply = authority.join(join_request(token, "a1", "kiosk")[0])
    fp = pki.identity_of_pem(reply.certificate_pem).fingerprint
    members = MemberDirectory(authority, recheck_s=0.0)
    assert members.refusal("a1", "kiosk", fp) is None
    assert "not a member" in members.refusal("zz9", None, None)
    assert "name" in members.refusal("a1", "gpu-beast", fp)
    assert "not its current" in members.refusal("a1", "kiosk", "0" * 32)
    authority.revoke("kiosk")
    assert "revoked" in members.refusal("a1", None, None)
    assert members.revoked() == {"a1"}
    with pytest.raises(NotFoundError):
        authority.revoke("kiosk")  # already revoked


def test_renewal_needs_the_current_key_and_a_member(directory, tmp_path):
    clock = Clock(datetime.datetime.now(datetime.UTC).timestamp())
    authority = ClusterAuthority(directory, clock=clock)
    token = authority.create_token(ttl_s=60)
    reply = authority.join(join_request(token, "a1", "kiosk")[0])
    key = pki.new_key()  # not the certificate's key
    csr = pki.csr_for(pki.new_key(), "a1")
    now = int(clock.now)
    forged = cluster_pb2.RenewRequest(
        certificate_pem=reply.certificate_pem,
        csr_der=csr,
        unix_s=now,
        signature=pki.sign(key, pki.renew_message(now, csr)),
    )
    with pytest.raises(TrustError, match="signature"):
        authority.renew(forged)


def test_renewal_is_due_in_the_last_third_and_replaces_key_and_certificate(directory, tmp_path):
    authority = ClusterAuthority(directory)
    token = authority.create_token(ttl_s=60)
    request, key = join_request(token, "a1", "kiosk")
    reply = authority.join(request)
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    (tls_dir / "node.key").write_bytes(pki.key_pem(key))
    (tls_dir / "node.pem").write_bytes(reply.certificate_pem)
    (tls_dir / "ca.pem").write_bytes(reply.ca_pem)
    tls = NodeTls(tls_dir, "store", authority.ca_fingerprint, (), {})
    cert = pki.load_cert(reply.certificate_pem)
    begin = cert.not_valid_before_utc.timestamp()
    end = cert.not_valid_after_utc.timestamp()
    clock = Clock(begin + (end - begin) * 0.5)
    renewal = Renewal(tls, clock=clock)
    assert not renewal.due()
    clock.now = begin + (end - begin) * 0.7
    assert renewal.due()
    # The coordinator's side of a renewal, as the node would ask for it.
    new_key = pki.new_key()
    csr = pki.csr_for(new_key, "a1")
    now = int(datetime.datetime.now(datetime.UTC).timestamp())
    renewed = authority.renew(
        cluster_pb2.RenewRequest(
            certificate_pem=reply.certificate_pem,
            csr_der=csr,
            unix_s=now,
            signature=pki.sign(key, pki.renew_message(now, csr)),
        )
    )
    new_fp = pki.identity_of_pem(renewed.certificate_pem).fingerprint
    assert authority.members()["a1"].fingerprint == new_fp

    def renew_from(pem: bytes, signer: pki.PrivateKey) -> cluster_pb2.JoinResponse:
        csr = pki.csr_for(pki.new_key(), "a1")
        return authority.renew(
            cluster_pb2.RenewRequest(
                certificate_pem=pem,
                csr_der=csr,
                unix_s=now,
                signature=pki.sign(signer, pki.renew_message(now, csr)),
            )
        )

    # The answer was lost: the node, still holding the first certificate, renews again (and
    # stays acceptable meanwhile); the certificate it never received is void from then on.
    members = MemberDirectory(authority, recheck_s=0.0)
    first_fp = pki.identity_of_pem(reply.certificate_pem).fingerprint
    assert members.refusal("a1", "kiosk", first_fp) is None
    again = renew_from(reply.certificate_pem, key)
    assert (
        authority.members()["a1"].fingerprint
        == pki.identity_of_pem(again.certificate_pem).fingerprint
    )
    with pytest.raises(TrustError, match="replaced"):
        renew_from(renewed.certificate_pem, new_key)
    authority.revoke("a1")
    with pytest.raises(TrustError, match="not a member"):
        renew_from(reply.certificate_pem, key)


def test_a_lost_join_answer_or_an_expired_certificate_allows_joining_again(directory):
    clock = Clock(datetime.datetime.now(datetime.UTC).timestamp())
    authority = ClusterAuthority(directory, clock=clock)
    token = authority.create_token(ttl_s=600, uses=1)
    authority.join(join_request(token, "a1", "kiosk")[0])
    # The same node and token again (its answer was lost): served, no use spent.
    authority.join(join_request(token, "a1", "kiosk")[0])
    with pytest.raises(TrustError, match="used up"):
        authority.join(join_request(token, "b2", "till")[0])
    # Another token, same node, certificate still valid: refused; expired: joins again.
    other = authority.create_token(ttl_s=10**8)
    with pytest.raises(AlreadyMemberError):
        authority.join(join_request(other, "a1", "kiosk")[0])
    clock.now = authority.members()["a1"].not_after_unix_s + 1
    authority.join(join_request(other, "a1", "kiosk")[0])
    # A name may not be another member's id (revocation by id stays unambiguous).
    with pytest.raises(AlreadyMemberError, match="taken"):
        authority.join(join_request(other, "c3", "a1")[0])


def test_tokens_json_keeps_no_secret(directory):
    authority = ClusterAuthority(directory)
    token = authority.create_token(ttl_s=60, uses=3)
    stored = (directory / "tokens.json").read_text()
    secret_b64 = str(token).split(".")[2]
    assert secret_b64 not in stored and token.secret.hex() not in stored
    assert json.loads(stored)[token.token_id]["uses_left"] == 3
    assert stat.S_IMODE(os.stat(directory / "tokens.json").st_mode) == 0o600


def test_a_cluster_coordinator_turns_on_rays_token_auth_with_an_owner_only_token(
    directory, monkeypatch
):
    import sys

    from mesh.coordinator import runner
    from mesh.coordinator.settings import CoordinatorConfig

    monkeypatch.setattr(os, "environ", dict(os.environ))  # nothing leaks to later tests
    for name in (runner.RAY_AUTH_MODE_VARIABLE, runner.RAY_AUTH_TOKEN_PATH_VARIABLE):
        os.environ.pop(name, None)
    monkeypatch.setitem(sys.modules, "ray", None)  # no Ray started in this process
    runner.prepare_ray_environment(CoordinatorConfig(cluster_dir=str(directory)))
    assert os.environ[runner.RAY_AUTH_MODE_VARIABLE] == "token"
    token_path = directory / "ray-token"
    assert os.environ[runner.RAY_AUTH_TOKEN_PATH_VARIABLE] == str(token_path)
    assert stat.S_IMODE(token_path.stat().st_mode) == 0o600
    assert len(token_path.read_text()) == 64
    # An open mesh leaves Ray's authentication alone.
    for name in (runner.RAY_AUTH_MODE_VARIABLE, runner.RAY_AUTH_TOKEN_PATH_VARIABLE):
        del os.environ[name]
    runner.prepare_ray_environment(CoordinatorConfig())
    assert runner.RAY_AUTH_MODE_VARIABLE not in os.environ


def test_only_a_certificate_problem_counts_as_not_a_member():
    from mesh.core.errors import UnavailableError
    from mesh.health import _handshake_failed

    proof = (
        "failed to connect to all addresses; last error: UNKNOWN: ipv4:1.2.3.4:5: Tls handshake "
        "failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000f7:SSL routines:"
        "OPENSSL_internal:WRONG_VERSION_NUMBER",
        "Peer name 0123.node.edgemesh is not in peer certificate",
        "Handshake failed with error SSL_ERROR_SSL: CERTIFICATE_VERIFY_FAILED",
    )
    flaky = (
        "failed to connect to all addresses; last error: UNAVAILABLE: Handshake read failed "
        "(Socket closed)",
        "Connection reset by peer",
    )
    assert all(_handshake_failed(UnavailableError(text)) for text in proof)
    assert not any(_handshake_failed(UnavailableError(text)) for text in flaky)


def test_a_renewal_cut_between_its_two_renames_is_completed_at_load(directory, tmp_path):
    from nodes.join import _replace_pair

    authority = ClusterAuthority(directory)
    token = authority.create_token(ttl_s=60)
    request, key = join_request(token, "a1", "kiosk")
    reply = authority.join(request)
    tls_dir = tmp_path / "tls"
    tls = NodeTls(tls_dir, "store", authority.ca_fingerprint, (), {})
    tls_dir.mkdir()
    (tls_dir / "ca.pem").write_bytes(reply.ca_pem)
    _replace_pair(tls_dir, pki.key_pem(key), reply.certificate_pem)
    tls.save()
    # A renewal that got as far as the key: the new certificate still waits in node.pem.next.
    new_key = pki.new_key()
    new_cert = pki.cert_pem(
        pki.issue(
            pki.load_key((directory / "ca.key").read_bytes()),
            authority.ca_cert,
            new_key.public_key(),
            role=pki.ROLE_NODE,
            identity="a1",
            lifetime=datetime.timedelta(days=1),
        )
    )
    (tls_dir / "node.pem.next").write_bytes(new_cert)
    (tls_dir / "node.key").write_bytes(pki.key_pem(new_key))
    loaded = NodeTls.load(tls_dir)
    assert loaded is not None
    assert loaded.cert_file.read_bytes() == new_cert
    assert not (tls_dir / "node.pem.next").exists()
