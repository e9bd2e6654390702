"""A test hook loaded into a node with `agent_modules: [agent_pause_hook]` (PYTHONPATH=tests/e2e).

For tasks whose id starts with `pause-`, the node waits `PAUSE_S` after it has streamed a
tool-call step it ran itself (not a replayed one), before it asks the model for the next step.
That holds the node in the one moment a kill must land in to test tool-call-safe failover: the
side-effecting tool has run and been reported, the task is not finished. Other tasks are not
touched. It defines no tools or agents, so the node offers the same agents as without it.
"""

from __future__ import annotations

import asyncio
import logging

from nodes.agents.records import StepEvent
from nodes.agents.runtime import AgentRuntime

PREFIX = "pause-"
PAUSE_S = 30.0

logger = logging.getLogger(__name__)
_run = AgentRuntime.run


async def _run_with_pause(self, spec, task):  # type: ignore[no-untyped-def]
    async for event in _run(self, spec, task):
        yield event
        if (
            task.task_id.startswith(PREFIX)
            and isinstance(event, StepEvent)
            and event.step.kind == "tool_call"
            and not event.step.replayed
        ):
            logger.warning(
                "test hook: task %s pauses %.0f s after step %d",
                task.task_id,
                PAUSE_S,
                event.step.index,
            )
            await asyncio.sleep(PAUSE_S)


AgentRuntime.run = _run_with_pause  # type: ignore[method-assign]
