"""A test hook loaded into a node with `agent_modules: [stream_pause_hook]` (PYTHONPATH=tests/e2e).

For a streamed generation whose task id starts with `cut-NODE-`, where NODE is this node's
name, on the task's first attempt, the node pauses `PAUSE_S` after it has sent `PAUSE_AFTER`
chunks of text. That holds the node in the one moment a kill must land in to test mid-stream
failover: part of the answer is out, the rest is not, however far the coordinator lags behind
the node on busy cores. Every other generation, and this one on any other node (where it
continues after the kill), is not touched. It defines no tools or agents.
"""

from __future__ import annotations

import asyncio
import logging

from nodes.service import NodeServicer

PREFIX = "cut-"
PAUSE_AFTER = 2  # chunks of text
PAUSE_S = 30.0

logger = logging.getLogger(__name__)
_generate = NodeServicer.generate


async def _generate_with_pause(self, request, **options):  # type: ignore[no-untyped-def]
    marked = (
        request.task.task_id.startswith(f"{PREFIX}{self.identity.name}-")
        and request.task.attempt <= 1
    )
    sent = 0
    async for chunk in _generate(self, request, **options):
        yield chunk
        if chunk.text:
            sent += 1
        if marked and sent == PAUSE_AFTER:
            logger.warning("test hook: task %s pauses %.0f s", request.task.task_id, PAUSE_S)
            await asyncio.sleep(PAUSE_S)


NodeServicer.generate = _generate_with_pause  # type: ignore[method-assign]
