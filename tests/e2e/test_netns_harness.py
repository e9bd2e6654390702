"""The namespace harness itself: hosts reach each other, and nothing survives a failing block."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import pytest

from tests.netns import NetnsLab, skip_reason

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]


def test_hosts_reach_each_other(netns_lab_factory: Callable[[int], NetnsLab]) -> None:
    lab = netns_lab_factory(2)
    a, b = lab.hosts
    assert a.ip != b.ip and a.ip.startswith("198.18.")
    ping = a.run(["ping", "-c", "1", "-W", "2", b.ip]) if _has("ping") else None
    if ping is not None:
        assert ping.returncode == 0, ping.stdout + ping.stderr
    routes = a.run(["ip", "route"]).stdout
    assert "224.0.0.0/4" in routes


def test_everything_is_torn_down_when_the_block_fails() -> None:
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    with pytest.raises(RuntimeError, match="boom"), NetnsLab.create(2) as lab:
        sleeper = lab.hosts[0].popen(["sleep", "600"])
        kept = lab
        raise RuntimeError("boom")
    assert sleeper.poll() is not None  # killed
    assert kept.leftovers() == []
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert kept.prefix not in names


def _has(program: str) -> bool:
    import shutil

    return shutil.which(program) is not None
