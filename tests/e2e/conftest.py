"""Fixtures for end-to-end tests: hosts in network namespaces (see tests/netns.py)."""

from __future__ import annotations

from tests.netns import netns_lab_factory  # noqa: F401  (a fixture)
