"""Agents on the node: a model plus tools plus a loop, defined in a few lines of Python.

    from nodes.agents import Agent
    from nodes.tools import tool

    @tool(idempotent=True, data=("inventory",))
    def stock_level(sku: str) -> dict:
        '''How many units of a product are in stock.

        Args:
            sku: the product code.
        '''
        return {"sku": sku, "units": 3}

    kiosk = Agent("retail-kiosk", tools=[stock_level],
                  system_prompt="You help shoppers in a store.")

A node loads such a module with `agent_modules: [my_module]` in its config and
offers the agent to the mesh (Describe lists it); `AgentRuntime` runs one directly.
Only `spec` is imported by `nodes.config`; keep it free of imports back into `nodes`.
"""

from nodes.agents.decision import (
    DecisionError,
    FinalDecision,
    ToolCallDecision,
    decision_schema,
    grammar_for,
    parse_decision,
    select_tools,
)
from nodes.agents.demo import DEMO_AGENTS
from nodes.agents.host import AgentHost, offered_agents
from nodes.agents.records import AgentOutcome, AgentTask, StepRecord
from nodes.agents.runtime import AgentRuntime
from nodes.agents.spec import Agent, AgentSpec

__all__ = [
    "DEMO_AGENTS",
    "Agent",
    "AgentHost",
    "AgentOutcome",
    "AgentRuntime",
    "AgentSpec",
    "AgentTask",
    "DecisionError",
    "FinalDecision",
    "StepRecord",
    "ToolCallDecision",
    "decision_schema",
    "grammar_for",
    "offered_agents",
    "parse_decision",
    "select_tools",
]
