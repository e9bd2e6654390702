"""Shared test configuration: every layer's marker applies by folder, and nothing may leak."""

from __future__ import annotations

import contextlib
import pathlib

import pytest

_LAYERS = {"unit", "integration", "e2e"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        layer = pathlib.Path(str(item.fspath)).parent.name
        if layer in _LAYERS and not any(m.name == layer for m in item.iter_markers()):
            item.add_marker(getattr(pytest.mark, layer))


@pytest.fixture(autouse=True)
def _no_leaks():
    """Fail a test that leaves child processes or non-daemon threads behind."""
    import threading

    import psutil

    me = psutil.Process()
    before_threads = {t.ident for t in threading.enumerate()}
    before_children = {c.pid for c in me.children()}  # e.g. a session-scoped Ray
    yield
    children = []
    for child in me.children():  # direct children: Ray's own workers are not ours
        try:
            if child.pid not in before_children and child.status() != psutil.STATUS_ZOMBIE:
                children.append(child)
        except psutil.NoSuchProcess:  # ended while we looked
            continue
    leaked_threads = [
        t.name
        for t in threading.enumerate()
        if t.ident not in before_threads and not t.daemon and t.is_alive()
    ]
    for child in children:  # clean up so one leak does not cascade into later tests
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    assert not children, f"test left processes running: {[c.cmdline() for c in children]}"
    assert not leaked_threads, f"test left threads running: {leaked_threads}"
