"""Shared test configuration: every layer's marker applies by folder, and nothing may leak."""

from __future__ import annotations

import pathlib

import pytest

_LAYERS = {"unit", "integration", "e2e"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        layer = pathlib.Path(str(item.fspath)).parent.name
        if layer in _LAYERS and not any(m.name == layer for m in item.iter_markers()):
            item.add_marker(getattr(pytest.mark, layer))
