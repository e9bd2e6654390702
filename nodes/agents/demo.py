"""The three agents a node offers out of the box, over the demo data seeded on first start.

They are tuned for the bundled SmolLM2-135M: each request is offered only its most
relevant tool, the first step must call it, and the answer is written from the
tool's result (see docs/agents.md for what that model can and cannot do).
"""

from __future__ import annotations

from nodes.agents.spec import Agent, AgentSpec
from nodes.tools.builtin import (
    appointment_slots,
    book_appointment,
    create_ticket,
    customer_lookup,
    order_status,
    search_knowledge_base,
    system_diagnostics,
)

_SMALL_MODEL = {"offered_tools": 1, "tool_choice": "required", "max_steps": 3}

CUSTOMER_SERVICE = Agent(
    "customer-service",
    description="Order status, customer accounts and support tickets.",
    system_prompt="You are a customer service agent for an electronics shop.",
    tools=[order_status, customer_lookup, create_ticket],
    **_SMALL_MODEL,
)

TECHNICAL_SUPPORT = Agent(
    "technical-support",
    description="Device diagnostics and troubleshooting articles.",
    system_prompt="You are a technical support agent. You fix device problems.",
    tools=[system_diagnostics, search_knowledge_base, create_ticket],
    **_SMALL_MODEL,
)

SCHEDULING = Agent(
    "scheduling",
    description="Free appointment slots and bookings.",
    system_prompt="You are a scheduling assistant for a repair shop.",
    tools=[appointment_slots, book_appointment],
    **_SMALL_MODEL,
)

DEMO_AGENTS: tuple[AgentSpec, ...] = (CUSTOMER_SERVICE, TECHNICAL_SUPPORT, SCHEDULING)
