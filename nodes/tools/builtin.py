"""The built-in tools of the demo scenarios: customer service, technical support, scheduling.

Each reads or writes the node's `DemoStore` (given through `ToolContext.store`),
except `system_diagnostics`, which reads the device itself through psutil. The
examples are shown to the model as worked exchanges; keep them short.

Who is asking (`ToolContext.subject`, an email, from the caller's API key): when it is set,
`customer_lookup` answers only for that email, `order_status` only for that customer's
orders (another's order and a missing one get the same answer, so nothing says whether it
exists), and `create_ticket` and `book_appointment` always act for the subject, whatever
email the model wrote (the caller need not type it, and a small model that garbles or copies
an email still files under the right customer; the result names the email used). With no
subject (an open mesh, or a key that names nobody) they answer for anyone, as before.
"""

from __future__ import annotations

from typing import Any, Literal

from nodes.tools._core import Tool, ToolAccessDenied, ToolContext, ToolError, tool
from nodes.tools.store import DemoStore

Weekday = Literal["monday", "tuesday", "wednesday", "thursday", "friday"]


def _store(context: ToolContext) -> DemoStore:
    if context.store is None:
        raise ToolError("this node holds no data store")
    store: DemoStore = context.store
    return store


def _same_email(first: str, second: str) -> bool:
    return first.strip().lower() == second.strip().lower()


def _acting_for(email: str, context: ToolContext) -> str:
    """The email a side-effecting tool acts for: the subject's when there is one."""
    return context.subject or email


@tool(
    idempotent=True,
    data=("customers",),
    keywords=("customer", "email", "account", "who"),
    examples=[
        {
            "request": "Who is sam@mail.test?",
            "arguments": {"email": "sam@mail.test"},
            "result": {"name": "Sam Roe", "email": "sam@mail.test", "tier": "gold"},
            "answer": "sam@mail.test is Sam Roe, a gold customer.",
        }
    ],
)
def customer_lookup(email: str, context: ToolContext) -> dict[str, Any]:
    """Find a customer by email address.

    Args:
        email: the customer's email address.
    """
    if context.subject and not _same_email(email, context.subject):
        # Refused before any look-up: the answer is the same whether that customer exists.
        raise ToolAccessDenied("you can only see your own customer record")
    customer = _store(context).find_customer(email)
    if customer is None:
        raise ToolError(f"no customer with email {email}")
    return customer


@tool(
    idempotent=True,
    data=("orders",),
    keywords=("order", "status", "shipped", "delivery", "package", "where", "track"),
    examples=[
        {
            "request": "Where is my order 77?",
            "arguments": {"order_id": 77},
            "result": {"order_id": 77, "status": "delivered"},
            "answer": "Order 77 is delivered.",
        }
    ],
)
def order_status(order_id: int, context: ToolContext) -> dict[str, Any]:
    """Get the status of an order.

    Args:
        order_id: the order number.
    """
    store = _store(context)
    if context.subject:
        owner = store.order_owner(order_id)
        refusal = f"no order {order_id} among your orders"  # the same whether it exists
        if owner is None:
            raise ToolError(refusal)
        if not _same_email(owner, context.subject):
            raise ToolAccessDenied(refusal)
    order = store.get_order(order_id)
    if order is None:
        raise ToolError(f"no order {order_id}")
    return order


@tool(
    idempotent=False,
    data=("tickets",),
    keywords=("ticket", "complaint", "broken", "issue", "report", "support", "open", "problem"),
    examples=[
        {
            "request": "My screen is cracked. I am kim@mail.test",
            "arguments": {"customer_email": "kim@mail.test", "subject": "Cracked screen"},
            "result": {"ticket_id": 12, "status": "open"},
            "answer": "I opened ticket 12 for you.",
        }
    ],
)
def create_ticket(
    customer_email: str,
    subject: str,
    context: ToolContext,
    priority: Literal["low", "normal", "high"] = "normal",
) -> dict[str, Any]:
    """Open a support ticket for a customer.

    Args:
        customer_email: the customer's email address.
        subject: a short summary of the problem.
        priority: how urgent it is.
    """
    if not subject.strip():
        raise ToolError("the subject is empty")
    ticket, created = _store(context).create_ticket(
        _acting_for(customer_email, context), subject, priority, context.idempotency_key
    )
    return {**ticket, "created_now": created}


@tool(
    idempotent=True,
    data=("appointments",),
    keywords=("slot", "slots", "free", "available", "appointment", "when", "time"),
    examples=[
        {
            "request": "Any free slots on monday?",
            "arguments": {"day": "monday"},
            "result": {"day": "monday", "free": ["08:00", "13:00"]},
            "answer": "On monday 08:00 and 13:00 are free.",
        }
    ],
)
def appointment_slots(day: Weekday, context: ToolContext) -> dict[str, Any]:
    """List the free appointment slots on a weekday.

    Args:
        day: the weekday.
    """
    return {"day": day, "free": _store(context).free_slots(day)}


@tool(
    idempotent=False,
    data=("appointments",),
    keywords=("book", "booking", "reserve", "schedule", "appointment"),
    examples=[
        {
            "request": "Book tuesday 08:00 for lee@mail.test",
            "arguments": {"day": "tuesday", "time": "08:00", "email": "lee@mail.test"},
            "result": {"day": "tuesday", "time": "08:00", "booked_for": "lee@mail.test"},
            "answer": "You are booked on tuesday at 08:00.",
        }
    ],
)
def book_appointment(day: Weekday, time: str, email: str, context: ToolContext) -> dict[str, Any]:
    """Book a free appointment slot for a customer.

    Args:
        day: the weekday.
        time: the slot's start time, e.g. 09:00.
        email: the customer's email address.
    """
    booking, created = _store(context).book_slot(
        day, time.strip(), _acting_for(email, context), context.idempotency_key
    )
    if booking is None:
        raise ToolError(f"{day} {time} is not a free slot")
    return {**booking, "created_now": created}


@tool(
    idempotent=True,
    data=("knowledge_base",),
    keywords=("error", "fix", "how", "printer", "wifi", "internet", "help", "troubleshoot"),
    examples=[
        {
            "request": "How do I fix scanner error S-1?",
            "arguments": {"query": "scanner error S-1"},
            "result": [{"title": "Scanner error S-1", "advice": "Clean the glass."}],
            "answer": "Scanner error S-1: clean the glass.",
        }
    ],
)
def search_knowledge_base(query: str, context: ToolContext) -> list[dict[str, str]]:
    """Search the troubleshooting articles.

    Args:
        query: words describing the problem.
    """
    articles = _store(context).search_articles(query)
    if not articles:
        raise ToolError(f"no article matches {query!r}")
    return articles


@tool(
    idempotent=True,
    keywords=(
        "system",
        "diagnostics",
        "slow",
        "cpu",
        "memory",
        "disk",
        "device",
        "health",
        "check",
        "computer",
        "laptop",
    ),
    examples=[
        {
            "request": "Is this device healthy?",
            "arguments": {"check": "all"},
            "result": {
                "status": "healthy",
                "cpu_percent": 12.0,
                "memory_percent": 40.0,
                "disk_percent": 55.0,
            },
            "answer": "The device is healthy: CPU 12%, memory 40%, disk 55%.",
        }
    ],
)
def system_diagnostics(check: Literal["all", "cpu", "memory", "disk"] = "all") -> dict[str, Any]:
    """Measure this device's CPU, memory and disk use.

    Args:
        check: which part to check.
    """
    import psutil

    report: dict[str, Any] = {"status": "healthy"}
    warnings = []
    if check in ("all", "cpu"):
        report["cpu_percent"] = psutil.cpu_percent(interval=0.2)
        if report["cpu_percent"] > 90:
            warnings.append("CPU is busy")
    if check in ("all", "memory"):
        report["memory_percent"] = psutil.virtual_memory().percent
        if report["memory_percent"] > 85:
            warnings.append("memory is almost full")
    if check in ("all", "disk"):
        report["disk_percent"] = psutil.disk_usage("/").percent
        if report["disk_percent"] > 90:
            warnings.append("disk is almost full")
    if warnings:  # only when there are any: small models repeat whatever list they see
        report["status"] = "needs attention"
        report["warnings"] = warnings
    return report


BUILTIN_TOOLS: tuple[Tool, ...] = (
    customer_lookup,
    order_status,
    create_ticket,
    appointment_slots,
    book_appointment,
    search_knowledge_base,
    system_diagnostics,
)
