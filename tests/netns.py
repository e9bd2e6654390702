"""The namespace lab for tests: mesh/sim/lab.py (product code since issue 11) plus its fixture.

    def test_x(netns_lab_factory):          # tests/e2e/conftest.py makes the fixture available
        lab = netns_lab_factory(3)
        ...

Kept so that tests and benchmarks import the lab from where they always did.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from mesh.sim.lab import LineReader, NetnsHost, NetnsLab, skip_reason

__all__ = ["LineReader", "NetnsHost", "NetnsLab", "netns_lab_factory", "skip_reason"]

try:
    import pytest
except ImportError:  # the harness also works outside pytest (benchmarks)
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture
    def netns_lab_factory() -> Iterator[Callable[[int], NetnsLab]]:
        """`make(n)` builds a lab of n hosts; all labs are torn down (and checked) after the test.

        Skips the test, with the reason, where namespaces cannot be built (not root, no `ip`).
        """
        reason = skip_reason()
        if reason is not None:
            pytest.skip(reason)
        with contextlib.ExitStack() as stack:

            def make(hosts: int) -> NetnsLab:
                return stack.enter_context(NetnsLab.create(hosts))

            yield make
