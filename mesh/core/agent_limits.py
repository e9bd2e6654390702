"""Step limits of agent tasks: nodes enforce them, the coordinator escalates within them.

An agent's own `max_steps` bounds a task. A caller may lower it in `AgentRequest.max_steps`;
it may raise it only as the coordinator's escalation does after a "max_steps" result: to
`ESCALATION_EXTRA_STEPS` past the steps it replays (room for one more tool call and the
answer), never above `MAX_AGENT_STEPS`. So one request never makes a node run more new steps
than the agent's own limit (or two, after an escalation), however it is built.
"""

from __future__ import annotations

MAX_AGENT_STEPS = 16  # the most steps any agent task has, replayed ones included
ESCALATION_EXTRA_STEPS = 2  # what an escalation after "max_steps" adds to the replayed steps


def escalation_max_steps(replayed_steps: int) -> int:
    """AgentRequest.max_steps of an escalation after "max_steps" that replays that many steps."""
    return min(MAX_AGENT_STEPS, replayed_steps + ESCALATION_EXTRA_STEPS)


def highest_max_steps(agent_max_steps: int, replayed_steps: int) -> int:
    """The highest AgentRequest.max_steps a node accepts for an agent whose own limit is
    `agent_max_steps` in a request that replays `replayed_steps` steps."""
    return max(agent_max_steps, escalation_max_steps(replayed_steps))
