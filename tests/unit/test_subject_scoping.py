"""The demo tools answer only for who is asking (`ToolContext.subject`, from the caller's API
key): their own customer record, their own orders, tickets and bookings in their own name;
with no subject they answer for anyone, as before. A refusal never says whether what was
asked for exists."""

from __future__ import annotations

import asyncio
import json

import pytest

from edgemesh.v1 import node_pb2
from mesh.core.errors import InvalidRequestError
from nodes.agents.demo import CUSTOMER_SERVICE
from nodes.agents.host import MAX_CALLER_TEXT_CHARS, task_from_request
from nodes.agents.records import AgentTask, OutcomeEvent
from nodes.agents.runtime import AgentRuntime
from nodes.tools import DemoStore, ToolAccessDenied, ToolContext, ToolError, builtin_registry
from tests.agent_fakes import ScriptedBackend

pytestmark = pytest.mark.unit

ANA = "ana@example.com"  # the demo store's customer 1: orders 1042 and 1044
REGISTRY = builtin_registry()


def run(coro, timeout=10):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture
def store(tmp_path):
    store = DemoStore(tmp_path / "data", now=lambda: "2025-03-07T10:00:00Z")
    store.open()
    return store


def call(store: DemoStore, name: str, caller: str = "", step: int = 0, **arguments):
    """Run tool `name` as `caller` (the subject; "": nobody in particular)."""
    context = ToolContext(
        task_id="t", step_index=step, store=store, idempotency_key=f"t:{step}", subject=caller
    )
    return run(REGISTRY.get(name).call(arguments, context))


def refusal(store: DemoStore, name: str, caller: str, **arguments) -> ToolError:
    with pytest.raises(ToolError) as raised:
        call(store, name, caller, **arguments)
    return raised.value


def test_customer_lookup_answers_only_for_the_subjects_own_email(store):
    assert call(store, "customer_lookup", ANA, email="ANA@example.com ")["name"] == "Ana Lima"
    other = refusal(store, "customer_lookup", ANA, email="bob@example.com")
    missing = refusal(store, "customer_lookup", ANA, email="nobody@example.com")
    assert isinstance(other, ToolAccessDenied) and isinstance(missing, ToolAccessDenied)
    assert str(other) == str(missing) == "you can only see your own customer record"


def test_order_status_answers_only_for_the_subjects_orders_and_says_nothing_of_others(store):
    assert call(store, "order_status", ANA, order_id=1042)["status"] == "shipped"
    others = refusal(store, "order_status", ANA, order_id=1041)  # Bob's
    missing = refusal(store, "order_status", ANA, order_id=5)
    assert isinstance(others, ToolAccessDenied) and not isinstance(missing, ToolAccessDenied)
    assert str(others) == "no order 1041 among your orders"
    assert str(missing) == "no order 5 among your orders"  # the same shape: no existence oracle
    assert "Bob" not in str(others) and "USB-C" not in str(others)


def test_tickets_and_bookings_are_made_in_the_subjects_name_whatever_email_the_model_wrote(
    store,
):
    ticket = call(
        store, "create_ticket", ANA, customer_email="bob@example.com", subject="Cracked screen"
    )
    assert ticket["customer_email"] == ANA and ticket["created_now"]
    booking = call(
        store, "book_appointment", ANA, step=1, day="friday", time="09:00", email="lee@mail.test"
    )
    assert booking["booked_for"] == ANA and booking["created_now"]


def test_without_a_subject_the_tools_answer_for_anyone_as_before(store):
    assert call(store, "customer_lookup", email="bob@example.com")["name"] == "Bob Stone"
    assert call(store, "order_status", order_id=1041)["item"] == "USB-C dock"
    with pytest.raises(ToolError, match="^no order 5$"):
        call(store, "order_status", order_id=5)
    ticket = call(store, "create_ticket", customer_email="bob@example.com", subject="Broken")
    assert ticket["customer_email"] == "bob@example.com"
    booking = call(
        store, "book_appointment", step=1, day="friday", time="09:00", email="lee@mail.test"
    )
    assert booking["booked_for"] == "lee@mail.test"


def test_a_subject_that_is_no_customer_sees_no_customer_and_no_order(store):
    kiosk = "kiosk-7"
    assert isinstance(refusal(store, "customer_lookup", kiosk, email=ANA), ToolAccessDenied)
    assert isinstance(refusal(store, "order_status", kiosk, order_id=1042), ToolAccessDenied)
    # Tools over no personal data are the same for everyone.
    assert call(store, "appointment_slots", kiosk, day="friday")["free"]


def test_the_node_takes_who_is_asking_from_the_task_context_and_bounds_it():
    request = node_pb2.AgentRequest(
        agent="customer-service",
        input="Who am I?",
        task=node_pb2.TaskContext(
            task_id="t1", attempt=2, key_name="kiosk-7", subject=" ana@example.com "
        ),
    )
    task = task_from_request(request, 65536)
    assert (task.key_name, task.subject, task.attempt) == ("kiosk-7", ANA, 2)
    request.task.subject = "x" * (MAX_CALLER_TEXT_CHARS + 1)
    with pytest.raises(InvalidRequestError, match="task.subject is over"):
        task_from_request(request, 65536)


def test_the_runtime_hands_the_subject_to_the_tool(store):
    """End to end on the node without a model: a scripted backend calls customer_lookup for
    someone else; the step's result is the refusal, naming nobody."""
    backend = ScriptedBackend(
        [
            json.dumps({"tool": "customer_lookup", "arguments": {"email": "bob@example.com"}}),
            json.dumps({"final": "I cannot see that."}),
        ]
    )
    runtime = AgentRuntime({"smollm2": backend}, REGISTRY, store=store)
    task = AgentTask(
        agent="customer-service", input="Who is bob@example.com?", task_id="t", subject=ANA
    )

    async def scenario():
        return [event async for event in runtime.run(CUSTOMER_SERVICE, task)]

    events = run(scenario())
    outcome = events[-1]
    assert isinstance(outcome, OutcomeEvent)
    lookup = outcome.outcome.steps[0]
    assert lookup.tool == "customer_lookup"
    assert json.loads(lookup.result_json) == {"error": "you can only see your own customer record"}
    assert "Bob" not in lookup.result_json
