"""Tools: schemas from type hints and docstrings, validation, the registry, the SQLite store."""

from __future__ import annotations

import asyncio
import enum
from typing import Annotated, Literal

import pytest

from mesh.core.errors import ConfigError, NotFoundError
from nodes.tools import (
    BUILTIN_TOOLS,
    DemoStore,
    SchemaError,
    ToolContext,
    ToolError,
    ToolRegistry,
    builtin_registry,
    parse_docstring,
    tool,
    validate,
)

pytestmark = pytest.mark.unit


def run(coro, timeout=10):
    return asyncio.run(asyncio.wait_for(coro, timeout))


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


# ---------------------------------------------------------------- schema derivation


def test_schema_from_type_hints_and_google_docstring():
    @tool(idempotent=True, data=("orders",))
    def find_orders(
        customer: str,
        limit: int = 5,
        include_closed: bool = False,
        status: Literal["open", "shipped"] | None = None,
        color: Color = Color.RED,
        tags: list[str] | None = None,
        weight: float = 1.0,
    ) -> list:
        """Find a customer's orders.

        Longer text that the model does not need.

        Args:
            customer: the customer's email
                address, as they gave it.
            limit: how many orders at most.
            status: only orders in this state.
        """
        return []

    assert find_orders.name == "find_orders"
    assert find_orders.description == "Find a customer's orders."
    assert find_orders.idempotent and find_orders.data == ("orders",)
    schema = find_orders.parameters
    assert schema["required"] == ["customer"]
    assert schema["additionalProperties"] is False
    props = schema["properties"]
    assert props["customer"] == {
        "type": "string",
        "description": "the customer's email address, as they gave it.",
    }
    assert props["limit"] == {
        "type": "integer",
        "description": "how many orders at most.",
        "default": 5,
    }
    assert props["include_closed"] == {"type": "boolean", "default": False}
    assert props["status"] == {
        "type": "string",
        "enum": ["open", "shipped"],
        "description": "only orders in this state.",
    }
    assert props["color"] == {"type": "string", "enum": ["red", "blue"], "default": "red"}
    assert props["tags"] == {"type": "array", "items": {"type": "string"}}
    assert props["weight"] == {"type": "number", "default": 1.0}


def test_sphinx_docstring_and_annotated_description():
    @tool
    def book(day: Annotated[str, "the weekday"], time: str) -> dict:
        """Book a slot.

        :param day: ignored, Annotated wins
        :param time: the start time
        """
        return {}

    assert book.idempotent is False  # side effects unless declared otherwise
    assert book.parameters["properties"]["day"]["description"] == "the weekday"
    assert book.parameters["properties"]["time"]["description"] == "the start time"
    assert book.signature() == "book(day: string, time: string)"


def test_context_parameter_is_injected_not_in_schema():
    @tool(idempotent=True)
    def whoami(context: ToolContext, greeting: str = "hi") -> str:
        """Say who runs this."""
        return f"{greeting} from {context.node_id} step {context.step_index}"

    assert whoami.context_parameter == "context"
    assert list(whoami.parameters["properties"]) == ["greeting"]
    assert whoami.signature() == "whoami(greeting?: string)"
    result = run(whoami.call({"greeting": "hello"}, ToolContext(node_id="n1", step_index=2)))
    assert result == "hello from n1 step 2"


def test_parse_docstring_summary_stops_at_first_paragraph():
    description, params = parse_docstring("Do a thing.\nStill the summary.\n\nDetails.\n")
    assert description == "Do a thing. Still the summary."
    assert params == {}


@pytest.mark.parametrize("source", ["missing_hint", "var_args", "bad_name", "object_hint"])
def test_underivable_tools_are_refused(source):
    with pytest.raises(SchemaError):
        if source == "missing_hint":

            @tool
            def f(x) -> None:  # type: ignore[no-untyped-def]
                """No hint."""
        elif source == "var_args":

            @tool
            def g(*args: int) -> None:
                """Var args."""
        elif source == "bad_name":
            tool(lambda: None, name="Bad Name")
        else:

            @tool
            def h(x: object) -> None:
                """Arbitrary object."""


def test_async_tool_and_timeout():
    @tool(idempotent=True, timeout_s=0.05)
    async def slow(seconds: float) -> str:
        """Sleep."""
        await asyncio.sleep(seconds)
        return "done"

    assert run(slow.call({"seconds": 0.0}, ToolContext())) == "done"
    with pytest.raises(TimeoutError):
        run(slow.call({"seconds": 1.0}, ToolContext()))


# ---------------------------------------------------------------- validation


def test_validate_accepts_and_explains():
    schema = {
        "type": "object",
        "required": ["id", "day"],
        "additionalProperties": False,
        "properties": {
            "id": {"type": "integer", "minimum": 1},
            "day": {"type": "string", "enum": ["mon", "tue"]},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
    }
    assert validate({"id": 3, "day": "mon", "tags": ["a"]}, schema) == []
    errors = validate({"id": "3", "day": "sun", "x": 1, "tags": [1]}, schema)
    assert "$.id: expected integer, got str" in errors
    assert "$.day: 'sun' is not one of 'mon', 'tue'" in errors
    assert "$: unexpected property 'x'" in errors
    assert "$.tags[0]: expected string, got int" in errors
    assert validate({"day": "mon"}, schema) == ["$: missing required property 'id'"]
    assert validate({"id": 0, "day": "mon"}, schema) == ["$.id: must be at least 1"]
    assert validate(True, {"type": "integer"}) == ["$: expected integer, got bool"]
    assert validate("x" * 5, {"type": "string", "maxLength": 3}) == [
        "$: must have at most 3 characters"
    ]


def test_validate_one_of():
    schema = {
        "oneOf": [
            {"type": "object", "properties": {"tool": {"const": "a"}}, "required": ["tool"]},
            {"type": "object", "properties": {"final": {"type": "string"}}, "required": ["final"]},
        ]
    }
    assert validate({"tool": "a"}, schema) == []
    assert validate({"final": "ok"}, schema) == []
    assert validate({"tool": "b"}, schema)[0] == "$: matches none of the allowed forms"


# ---------------------------------------------------------------- registry


def test_registry_names_and_conflicts():
    registry = builtin_registry()
    assert "order_status" in registry and len(registry) == len(BUILTIN_TOOLS)
    with pytest.raises(NotFoundError, match="no tool named 'nope'"):
        registry.get("nope")

    @tool(name="order_status")
    def impostor() -> str:
        """Not the real one."""
        return ""

    with pytest.raises(ConfigError, match="order_status"):
        registry.register(impostor)
    assert ToolRegistry([impostor]).get("order_status") is impostor


def test_builtin_tools_declare_data_and_side_effects():
    by_name = {t.name: t for t in BUILTIN_TOOLS}
    assert by_name["order_status"].data == ("orders",) and by_name["order_status"].idempotent
    assert not by_name["create_ticket"].idempotent
    assert not by_name["book_appointment"].idempotent
    assert by_name["system_diagnostics"].data == ()
    for item in BUILTIN_TOOLS:  # every example must satisfy its own schema
        for example in item.examples:
            assert validate(example.arguments, item.parameters) == [], item.name


# ---------------------------------------------------------------- the store and built-in tools


@pytest.fixture
def store(tmp_path):
    store = DemoStore(tmp_path / "data", now=lambda: "2025-03-07T10:00:00Z")
    assert store.open() is True
    return store


def test_store_seeds_once(store):
    assert store.open() is False  # second start: nothing seeded again
    assert store.count_tickets() == 1
    assert store.get_order(1042)["status"] == "shipped"
    assert store.find_customer("ANA@example.com")["orders"] == [1042, 1044]
    assert store.get_order(9) is None and store.find_customer("x@y.z") is None


def test_ticket_idempotency_key_inserts_once(store):
    first, created = store.create_ticket("bob@example.com", "Broken", "high", "task-1:0")
    again, created_again = store.create_ticket("bob@example.com", "Broken", "high", "task-1:0")
    assert created and not created_again
    assert again == first
    assert store.count_tickets() == 2
    _other, created_other = store.create_ticket("bob@example.com", "Broken", "high", "task-1:1")
    assert created_other and store.count_tickets() == 3


def test_slots_and_bookings(store):
    assert store.free_slots("monday") == ["10:30", "14:00", "16:30"]
    booking, created = store.book_slot("monday", "10:30", "ana@example.com", "t:0")
    assert created and booking == {
        "day": "monday",
        "time": "10:30",
        "booked_for": "ana@example.com",
    }
    assert store.book_slot("monday", "10:30", "ana@example.com", "t:0") == (booking, False)
    assert store.book_slot("monday", "10:30", "bob@example.com", "u:0") == (None, False)
    assert store.book_slot("monday", "23:00", "bob@example.com", "u:1") == (None, False)
    assert "10:30" not in store.free_slots("monday")


def test_builtin_tools_against_the_store(store):
    registry = builtin_registry()
    context = ToolContext(task_id="t", step_index=0, store=store, idempotency_key="t:0")

    def call(name, **arguments):
        return run(registry.get(name).call(arguments, context))

    assert call("order_status", order_id=1042)["status"] == "shipped"
    with pytest.raises(ToolError, match="no order 5"):
        call("order_status", order_id=5)
    ticket = call("create_ticket", customer_email="bob@example.com", subject="Broken")
    assert ticket["created_now"] and ticket["priority"] == "normal"
    assert call("create_ticket", customer_email="bob@example.com", subject="Broken") == {
        **ticket,
        "created_now": False,
    }
    assert call("appointment_slots", day="friday")["free"] == ["09:00", "10:30", "14:00", "16:30"]
    assert (
        call("search_knowledge_base", query="printer error E-04")[0]["title"]
        == "Printer error E-04"
    )
    report = call("system_diagnostics")
    assert report["status"] in ("healthy", "needs attention") and 0 <= report["cpu_percent"] <= 100
    with pytest.raises(ToolError, match="no data store"):
        run(registry.get("order_status").call({"order_id": 1}, ToolContext()))
