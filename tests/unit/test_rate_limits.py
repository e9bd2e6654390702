"""Requests and tokens per minute per API key (mesh/cluster/limits.py), on a manual clock; and
the same counters shared by dispatcher replicas through the node-table owner."""

from __future__ import annotations

import asyncio

import pytest

from mesh.cluster.keys import KeyRing, KeyStore
from mesh.cluster.limits import WINDOW_S, RateLimiter
from mesh.coordinator.access import AccessControl, caller_of
from mesh.coordinator.tasks import build_task
from mesh.core.errors import RateLimitedError
from tests.coordinator_fakes import ManualClock

pytestmark = pytest.mark.unit


def run(coro, timeout=10):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_requests_per_minute_slide_and_say_when_to_come_back():
    clock = ManualClock()
    limiter = RateLimiter(clock)
    assert limiter.admit("k", rpm=3, tpm=None) is None
    clock.advance(10)
    assert limiter.admit("k", rpm=3, tpm=None) is None
    clock.advance(10)
    assert limiter.admit("k", rpm=3, tpm=None) is None
    clock.advance(5)
    refusal = limiter.admit("k", rpm=3, tpm=None)
    assert refusal is not None and refusal.over == ("rpm",)
    assert refusal.retry_after_s == pytest.approx(WINDOW_S - 25)  # the first one leaves then
    assert "3 requests per minute" in refusal.describe("k") and "retry after 35 s" in (
        refusal.describe("k")
    )
    clock.advance(refusal.retry_after_s - 0.01)
    assert limiter.admit("k", rpm=3, tpm=None) is not None  # a refusal counts nothing
    clock.advance(0.01)
    assert limiter.admit("k", rpm=3, tpm=None) is None
    assert limiter.admit("other", rpm=3, tpm=None) is None  # each key its own window


def test_a_lowered_limit_waits_for_as_many_requests_to_leave():
    clock = ManualClock()
    limiter = RateLimiter(clock)
    for _ in range(4):
        assert limiter.admit("k", rpm=10, tpm=None) is None
        clock.advance(1)
    refusal = limiter.admit("k", rpm=2, tpm=None)  # 4 in the window, 2 allowed: 3 must leave
    assert refusal is not None and refusal.retry_after_s == pytest.approx(WINDOW_S - 4 + 2)


def test_tokens_per_minute_refuse_once_spent_and_until_enough_are_a_minute_old():
    clock = ManualClock()
    limiter = RateLimiter(clock)
    assert limiter.admit("k", rpm=None, tpm=100) is None
    limiter.spend("k", 60)
    clock.advance(20)
    assert limiter.admit("k", rpm=None, tpm=100) is None  # 60 < 100: still under
    limiter.spend("k", 50)  # 110: over from now on
    clock.advance(1)
    refusal = limiter.admit("k", rpm=None, tpm=100)
    assert refusal is not None and refusal.over == ("tpm",)
    # The first 60 leave at 60 s: 50 < 100 then.
    assert refusal.retry_after_s == pytest.approx(WINDOW_S - 21)
    clock.advance(refusal.retry_after_s)
    assert limiter.admit("k", rpm=None, tpm=100) is None


def test_both_limits_over_wait_for_the_later_one_and_no_limits_count_nothing():
    clock = ManualClock()
    limiter = RateLimiter(clock)
    assert limiter.admit("k", rpm=1, tpm=10) is None
    limiter.spend("k", 30)
    clock.advance(30)
    limiter.spend("k", 30)
    refusal = limiter.admit("k", rpm=1, tpm=10)
    assert refusal is not None and refusal.over == ("rpm", "tpm")
    assert refusal.retry_after_s == pytest.approx(WINDOW_S)  # the second 30 tokens: at 90 s
    assert "1 requests per minute and 10 tokens per minute" in refusal.describe("k")
    for _ in range(1000):
        assert limiter.admit("free", rpm=None, tpm=None) is None


def test_tokens_of_one_second_share_an_entry_and_never_leave_early():
    clock = ManualClock()
    limiter = RateLimiter(clock)
    for _ in range(100):
        limiter.spend("k", 1)
        clock.advance(0.009)
    refusal = limiter.admit("k", rpm=None, tpm=50)
    assert refusal is not None
    # All 100 in one bucket, its last at +0.891 s: none leaves before that one would.
    assert refusal.retry_after_s == pytest.approx(WINDOW_S - 0.009)


class _Method:
    def __init__(self, function):
        self._function = function

    def remote(self, *args):
        async def call():
            await asyncio.sleep(0)  # a hop, as Ray's
            return self._function(*args)

        return call()


class FakeOwnerHandle:
    """A DeploymentHandle to an owner in this process: `handle.method.remote(...)` awaits."""

    def __init__(self, owner) -> None:
        self._owner = owner

    def __getattr__(self, name):
        return _Method(getattr(self._owner, name))


def test_replicas_share_one_count_through_the_owner(tmp_path):
    """Several dispatcher replicas (app.py `_OwnerLimits`) ask the owner's one limiter: a key's
    limits hold across them. (A Ray test with two replicas would cost a minute on 2 cores.)"""
    from mesh.coordinator.app import NodeTableOwner, _OwnerLimits

    store = KeyStore(tmp_path)
    store.create("shared", rpm=3, tpm=100)
    who = caller_of(store.list()[0])
    task = build_task(prompt="hi", model="m")

    class LimiterOnly(NodeTableOwner):
        """The owner's limiter methods only: not constructed, no registry to stop."""

        def __del__(self) -> None:
            pass

    async def scenario():
        owner = LimiterOnly.__new__(LimiterOnly)
        limits = [_OwnerLimits(FakeOwnerHandle(owner)) for _ in range(2)]
        replicas = [AccessControl(KeyRing(store.path), limit) for limit in limits]
        outcomes = []
        for replica in (replicas[0], replicas[1], replicas[0], replicas[1]):
            try:
                await replica.admit(who, task)
                outcomes.append("ok")
            except RateLimitedError as error:
                outcomes.append(f"429 after {error.retry_after_s:.0f} s")
        spent = RateLimiter()  # a fresh key's tokens: spent on one replica, refused on the other
        owner._limiter = spent
        replicas[0].spend(who, 150)
        await asyncio.wait_for(asyncio.gather(*limits[0]._sending), 5)
        try:
            await replicas[1].admit(who, task)
        except RateLimitedError as error:
            outcomes.append(f"429 {error.fields['over']}")
        return outcomes

    assert run(scenario()) == ["ok", "ok", "ok", "429 after 60 s", "429 ('tpm',)"]
