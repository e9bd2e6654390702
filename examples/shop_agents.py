"""An agent of your own: one tool and one agent, loaded by a node through `agent_modules`.

Not a script: a module a node imports. `examples/node.yaml` names it; start the node with this
folder on the Python path, then ask the agent:

    PYTHONPATH=examples .venv/bin/mesh node start --config examples/node.yaml \\
        --host 127.0.0.1 --port 50051 --no-advertise
    .venv/bin/python examples/node_agent.py 127.0.0.1:50051 --agent retail-kiosk "Do you have SKU-7 in stock?"

The tool's argument schema comes from its type hints and its descriptions from its docstring;
the `ToolContext` parameter (task id, step index, idempotency key, the node's store) is
injected by the node, never written by the model. See docs/agents.md.
"""

from __future__ import annotations

from nodes.agents import Agent
from nodes.tools import ToolContext, tool


@tool(
    idempotent=True,  # reading stock has no side effect: safe to run again after a failover
    data=("inventory",),  # a node offers the agent only if it holds this dataset
    keywords=("stock", "units", "have"),  # rank this tool for requests that use these words
    examples=[
        {
            "request": "Is SKU-1 in stock?",
            "arguments": {"sku": "SKU-1"},
            "result": {"sku": "SKU-1", "units": 4},
            "answer": "We have 4 units of SKU-1.",
        }
    ],
)
def stock_level(sku: str, context: ToolContext) -> dict:
    """How many units of a product are in stock.

    Args:
        sku: the product code, e.g. SKU-1.
    """
    return {"sku": sku, "units": 3}


kiosk = Agent(
    "retail-kiosk",
    tools=[stock_level],
    system_prompt="You help shoppers in a store.",
    offered_tools=1,  # a 135M model picks well between one tool and an answer, not among many
    tool_choice="required",  # the first step must call the tool
)
