"""The node's local data: one SQLite file in its data directory, seeded with demo data on first start.

Every method is blocking and opens its own short-lived connection, so tools can
call it from worker threads without sharing a connection. Writes that come from
side-effecting tools carry an idempotency key with a UNIQUE constraint: the same
key inserts at most once, whatever the number of attempts.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import pathlib
import re
import sqlite3
from collections.abc import Callable, Iterator
from typing import Any

logger = logging.getLogger(__name__)

DATABASE_FILE = "agents.sqlite3"
# The datasets this store holds; tools name them in `@tool(data=...)`.
DATASETS = ("customers", "orders", "tickets", "appointments", "knowledge_base")
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday")
SLOT_TIMES = ("09:00", "10:30", "14:00", "16:30")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS customers (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT NOT NULL UNIQUE, tier TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS orders (
    id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL REFERENCES customers(id),
    item TEXT NOT NULL, status TEXT NOT NULL, carrier TEXT, updated TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tickets (
    id INTEGER PRIMARY KEY AUTOINCREMENT, customer_email TEXT NOT NULL, subject TEXT NOT NULL,
    priority TEXT NOT NULL, status TEXT NOT NULL, created TEXT NOT NULL,
    idempotency_key TEXT UNIQUE
);
CREATE TABLE IF NOT EXISTS appointment_slots (
    id INTEGER PRIMARY KEY, day TEXT NOT NULL, time TEXT NOT NULL, booked_by TEXT,
    idempotency_key TEXT UNIQUE, UNIQUE (day, time)
);
CREATE TABLE IF NOT EXISTS articles (
    id INTEGER PRIMARY KEY, title TEXT NOT NULL, keywords TEXT NOT NULL, body TEXT NOT NULL
);
"""

_CUSTOMERS = [
    (1, "Ana Lima", "ana@example.com", "gold"),
    (2, "Bob Stone", "bob@example.com", "silver"),
    (3, "Chen Wei", "chen@example.com", "bronze"),
]
_ORDERS = [
    (1041, 2, "USB-C dock", "delivered", "UPS", "2025-03-02"),
    (1042, 1, "Wireless headset", "shipped", "DHL", "2025-03-05"),
    (1043, 3, "Laptop stand", "processing", None, "2025-03-06"),
    (1044, 1, "Mechanical keyboard", "cancelled", None, "2025-03-04"),
]
_TICKETS = [
    ("bob@example.com", "Printer shows error E-04", "normal", "open", "2025-03-01T09:12:00Z")
]
_BOOKED = {("monday", "09:00"): "chen@example.com", ("wednesday", "14:00"): "bob@example.com"}
_ARTICLES = [
    (
        "Printer error E-04",
        "printer error e-04 paper jam",
        "E-04 means a paper jam: open tray 2, remove the sheet, close the tray and restart.",
    ),
    (
        "Slow computer",
        "slow laptop computer performance memory cpu",
        "Close unused programs, check that memory use is under 80% and restart the device.",
    ),
    (
        "Wi-Fi keeps dropping",
        "wifi wi-fi network internet connection drop",
        "Move closer to the router, forget the network and join it again, then update the driver.",
    ),
    (
        "Disk almost full",
        "disk storage space full",
        "Empty the trash and remove large downloads; keep at least 10% of the disk free.",
    ),
]


def _utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class DemoStore:
    """The SQLite store behind the built-in tools."""

    datasets = DATASETS

    def __init__(self, directory: pathlib.Path | str, *, now: Callable[[], str] = _utc_now) -> None:
        self.path = pathlib.Path(directory) / DATABASE_FILE
        self._now = now

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        connection = sqlite3.connect(self.path, timeout=5.0)
        connection.row_factory = sqlite3.Row
        try:
            with connection:  # commits on success, rolls back on an exception
                yield connection
        finally:
            connection.close()

    def open(self) -> bool:
        """Create the tables, and seed the demo data the first time. True if it seeded now."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(_SCHEMA)
            if db.execute("SELECT 1 FROM meta WHERE key = 'seeded'").fetchone():
                return False
            db.executemany("INSERT INTO customers VALUES (?, ?, ?, ?)", _CUSTOMERS)
            db.executemany("INSERT INTO orders VALUES (?, ?, ?, ?, ?, ?)", _ORDERS)
            db.executemany(
                "INSERT INTO tickets (customer_email, subject, priority, status, created) "
                "VALUES (?, ?, ?, ?, ?)",
                _TICKETS,
            )
            db.executemany(
                "INSERT INTO appointment_slots (day, time, booked_by) VALUES (?, ?, ?)",
                [(d, t, _BOOKED.get((d, t))) for d in WEEKDAYS for t in SLOT_TIMES],
            )
            db.executemany(
                "INSERT INTO articles (title, keywords, body) VALUES (?, ?, ?)", _ARTICLES
            )
            db.execute("INSERT INTO meta VALUES ('seeded', ?)", (self._now(),))
        logger.info("seeded demo data in %s", self.path)
        return True

    # ------------------------------------------------------------------ reads

    def find_customer(self, email: str) -> dict[str, Any] | None:
        with self._connect() as db:
            row = db.execute(
                "SELECT * FROM customers WHERE lower(email) = lower(?)", (email.strip(),)
            ).fetchone()
            if row is None:
                return None
            orders = [
                r["id"]
                for r in db.execute(
                    "SELECT id FROM orders WHERE customer_id = ? ORDER BY id", (row["id"],)
                )
            ]
        return {"name": row["name"], "email": row["email"], "tier": row["tier"], "orders": orders}

    def get_order(self, order_id: int) -> dict[str, Any] | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM orders WHERE id = ?", (order_id,)).fetchone()
        if row is None:
            return None
        order = {
            "order_id": row["id"],
            "status": row["status"],
            "item": row["item"],
            "updated": row["updated"],
        }
        if row["carrier"]:
            order["carrier"] = row["carrier"]
        return order

    def order_owner(self, order_id: int) -> str | None:
        """The email of the customer who placed the order; None when there is no such order."""
        with self._connect() as db:
            row = db.execute(
                "SELECT customers.email FROM orders JOIN customers "
                "ON customers.id = orders.customer_id WHERE orders.id = ?",
                (order_id,),
            ).fetchone()
        return None if row is None else str(row["email"])

    def free_slots(self, day: str) -> list[str]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT time FROM appointment_slots WHERE day = ? AND booked_by IS "
                "NULL ORDER BY time",
                (day,),
            ).fetchall()
        return [r["time"] for r in rows]

    def search_articles(self, query: str, limit: int = 2) -> list[dict[str, str]]:
        words = set(re.findall(r"[a-z0-9-]+", query.lower()))
        with self._connect() as db:
            rows = db.execute("SELECT title, keywords, body FROM articles").fetchall()
        scored = []
        for row in rows:
            score = len(words & set(row["keywords"].split()))
            if score:
                scored.append((score, row["title"], row["body"]))
        scored.sort(key=lambda item: -item[0])
        return [{"title": title, "advice": body} for _score, title, body in scored[:limit]]

    def count_tickets(self) -> int:
        with self._connect() as db:
            return int(db.execute("SELECT count(*) FROM tickets").fetchone()[0])

    # ------------------------------------------------------------------ writes (idempotent by key)

    def create_ticket(
        self, customer_email: str, subject: str, priority: str, idempotency_key: str
    ) -> tuple[dict[str, Any], bool]:
        """(the ticket, whether it was created now); an already used key returns the first ticket."""
        with self._connect() as db:
            if idempotency_key:
                row = db.execute(
                    "SELECT * FROM tickets WHERE idempotency_key = ?", (idempotency_key,)
                ).fetchone()
                if row is not None:
                    return _ticket(row), False
            cursor = db.execute(
                "INSERT INTO tickets (customer_email, subject, priority, status, created, "
                "idempotency_key) VALUES (?, ?, ?, 'open', ?, ?)",
                (
                    customer_email.strip(),
                    subject.strip(),
                    priority,
                    self._now(),
                    idempotency_key or None,
                ),
            )
            row = db.execute("SELECT * FROM tickets WHERE id = ?", (cursor.lastrowid,)).fetchone()
        return _ticket(row), True

    def book_slot(
        self, day: str, time: str, email: str, idempotency_key: str
    ) -> tuple[dict[str, Any] | None, bool]:
        """(the booking, whether it was made now); None when the slot does not exist or is taken."""
        with self._connect() as db:
            if idempotency_key:
                row = db.execute(
                    "SELECT * FROM appointment_slots WHERE idempotency_key = ?", (idempotency_key,)
                ).fetchone()
                if row is not None:
                    return _booking(row), False
            cursor = db.execute(
                "UPDATE appointment_slots SET booked_by = ?, idempotency_key = ? "
                "WHERE day = ? AND time = ? AND booked_by IS NULL",
                (email.strip(), idempotency_key or None, day, time),
            )
            if cursor.rowcount == 0:
                return None, False
            row = db.execute(
                "SELECT * FROM appointment_slots WHERE day = ? AND time = ?", (day, time)
            ).fetchone()
        return _booking(row), True


def _ticket(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "ticket_id": row["id"],
        "status": row["status"],
        "subject": row["subject"],
        "priority": row["priority"],
        "customer_email": row["customer_email"],
    }


def _booking(row: sqlite3.Row) -> dict[str, Any]:
    return {"day": row["day"], "time": row["time"], "booked_for": row["booked_by"]}
