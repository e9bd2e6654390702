"""API keys at rest (mesh/cluster/keys.py) and `mesh keys`: hashed, owner-only, revocable, and
seen by a running coordinator's key ring within a second of a change."""

from __future__ import annotations

import json
import stat

import pytest

from mesh.cli import main
from mesh.cluster import KEYS
from mesh.cluster.keys import KeyRing, KeyStore, hash_key, key_id_of
from mesh.core.errors import InvalidRequestError, NotFoundError, UnauthenticatedError
from tests.coordinator_fakes import ManualClock

pytestmark = pytest.mark.unit


@pytest.fixture
def cluster_dir(tmp_path):
    return tmp_path / "cluster"  # not there yet: keys must work before `mesh cluster init`


def test_a_new_key_is_shown_once_and_only_its_hash_is_kept(cluster_dir):
    store = KeyStore(cluster_dir, clock=lambda: 1_800_000_000.0)
    record, secret = store.create(
        "kiosk-12", rpm=60, tpm=20_000, agents=("customer-service",), subject="kiosk 12"
    )
    assert secret.startswith("emk_") and key_id_of(secret) == record.id
    assert len(secret.rsplit("_", 1)[1]) == 64  # 32 random bytes, hex
    text = (cluster_dir / KEYS).read_text()
    assert secret not in text and secret.rsplit("_", 1)[1] not in text
    stored = json.loads(text)["keys"][0]
    assert stored["sha256"] == hash_key(secret)
    assert (stored["name"], stored["rpm"], stored["tpm"]) == ("kiosk-12", 60, 20_000)
    assert (stored["agents"], stored["models"], stored["subject"]) == (
        ["customer-service"],
        [],
        "kiosk 12",
    )
    assert stat.S_IMODE((cluster_dir / KEYS).stat().st_mode) == 0o600
    assert stat.S_IMODE(cluster_dir.stat().st_mode) == 0o700
    _other, another = store.create("kiosk-13")
    assert another != secret


def test_names_are_unique_for_good_and_checked(cluster_dir):
    store = KeyStore(cluster_dir)
    store.create("a")
    store.revoke("a")
    with pytest.raises(InvalidRequestError, match="never reused"):
        store.create("a")
    for bad in ("", "-x", "with space", "x" * 65, "ünï"):
        with pytest.raises(InvalidRequestError, match="name"):
            store.create(bad)
    with pytest.raises(NotFoundError):
        store.revoke("nope")
    assert [key.name for key in store.list()] == ["a"]


def test_the_ring_verifies_and_never_quotes_what_was_presented(cluster_dir):
    store = KeyStore(cluster_dir)
    record, secret = store.create("good", subject="ana@example.com")
    ring = KeyRing(cluster_dir / KEYS)
    assert ring.verify(secret) == record
    wrong_secret = secret[:-1] + ("0" if secret[-1] != "0" else "1")  # right id, wrong secret
    for presented in (wrong_secret, "emk_nothing", "sk-openai-style", ""):
        with pytest.raises(UnauthenticatedError) as refused:
            ring.verify(presented)
        assert str(refused.value) == "the API key is not valid"


def test_a_revocation_or_a_new_key_is_seen_on_the_next_check(cluster_dir):
    store = KeyStore(cluster_dir)
    _record, secret = store.create("temp")
    clock = ManualClock()
    ring = KeyRing(cluster_dir / KEYS, check_every_s=0.5, clock=clock)
    ring.verify(secret)
    store.revoke("temp")
    _new, fresh = store.create("fresh")
    ring.verify(secret)  # not looked at again yet: within check_every_s
    clock.advance(0.5)
    with pytest.raises(UnauthenticatedError, match="'temp' was revoked"):
        ring.verify(secret)
    assert ring.verify(fresh).name == "fresh"
    assert len(ring) == 1


def test_a_damaged_file_keeps_the_keys_read_before(cluster_dir, caplog):
    store = KeyStore(cluster_dir)
    _record, secret = store.create("kept")
    clock = ManualClock()
    ring = KeyRing(cluster_dir / KEYS, clock=clock)
    (cluster_dir / KEYS).write_text('{"version": 1, "keys": [{"name": ')
    clock.advance(1.0)
    assert ring.verify(secret).name == "kept"
    assert "keeping the API keys read before" in caplog.text
    assert secret not in caplog.text


def test_no_file_means_no_key_is_valid(cluster_dir):
    ring = KeyRing(cluster_dir / KEYS)
    with pytest.raises(UnauthenticatedError):
        ring.verify("emk_0123456789ab_" + "0" * 64)


def test_the_cli_creates_lists_and_revokes(cluster_dir, capsys):
    where = ["--cluster-dir", str(cluster_dir)]
    assert (
        main(["keys", "create", "kiosk", "--rpm", "5", "--agents", "a,b", "--subject", "k"] + where)
        == 0
    )
    out, err = capsys.readouterr()
    secret = out.strip()
    assert key_id_of(secret) is not None and "will not be shown again" in err
    assert secret not in err

    assert main(["keys", "list", "--json"] + where) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(k["name"], k["rpm"], k["agents"], k["revoked"]) for k in listed] == [
        ("kiosk", 5, ["a", "b"], None)
    ]
    assert "sha256" not in listed[0]

    assert main(["keys", "list"] + where) == 0
    table = capsys.readouterr().out
    assert "kiosk" in table and "valid" in table and secret not in table

    assert main(["keys", "revoke", "kiosk"] + where) == 0
    assert "revoked" in capsys.readouterr().out
    assert main(["keys", "list", "--json"] + where) == 0
    assert json.loads(capsys.readouterr().out)[0]["revoked"] is not None

    assert main(["keys", "create", "kiosk"] + where) == 1
    assert "never reused" in capsys.readouterr().err
    assert main(["keys", "revoke", "ghost"] + where) == 1


def test_the_cli_refuses_a_limit_below_one(cluster_dir, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["keys", "create", "x", "--rpm", "0", "--cluster-dir", str(cluster_dir)])
    assert exited.value.code == 2
    assert "--rpm: must be 1 or more" in capsys.readouterr().err
