"""An HTTP client that hangs up: an ASGI app called directly, the connection cut on cue.

    status, chunks = await call_until(app, "GET", "/dashboard/events", enough=lambda c: c)

Starlette's TestClient reads a whole response before it returns, so it can neither cut a
stream short (what a user closing a tab, or a client timing out, does) nor read an endless one
(`/dashboard/events`). Here the app sees `http.disconnect` once `enough(body chunks so far)`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any


async def call_until(
    app: Any,
    method: str,
    path: str,
    *,
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    enough: Callable[[list[bytes]], object] = lambda chunks: False,
    timeout_s: float = 5.0,
) -> tuple[int, list[bytes]]:
    """(status, body chunks) of one call to `app`, cut once `enough(chunks)` is true."""
    hang_up = asyncio.Event()
    request_sent = False
    status = 0
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await hang_up.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            if message.get("body"):
                chunks.append(message["body"])
            if enough(chunks) or not message.get("more_body"):
                hang_up.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},  # spec 2.0: a streaming response listens for the hang-up
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (name.lower().encode(), value.encode())
            for name, value in {"content-type": "application/json", **(headers or {})}.items()
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    async with asyncio.timeout(timeout_s):
        await app(scope, receive, send)
    return status, chunks
