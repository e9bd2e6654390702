"""The dashboard at `/dashboard` on the coordinator's HTTP app: static files and a JSON feed.

    GET /dashboard                 index.html (plain HTML/CSS/JS in ./dashboard, no build step)
    GET /dashboard/api/state       {"nodes": [...], "tasks": [...]}: this dispatcher's view
    GET /dashboard/events          the same state as server-sent events, every `interval_s`
    GET /dashboard/api/tasks/{id}  one task's attempts and steps

The task view also asks `/v1/mesh/traces/{id}` for the task's span tree (404: no trace).
With API keys, a key sees its own tasks only: the state lists them, and another key's task is
not found (404), as in DescribeTask; the nodes are everyone's.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from mesh.coordinator.dispatch import Dispatcher
from mesh.coordinator.pool import NodeRow
from mesh.coordinator.tasks import LedgerEntry, TaskState
from mesh.core.caller import current_caller, reader_of
from mesh.core.errors import MeshError

STATIC = pathlib.Path(__file__).parent / "dashboard"
_KEPT = 50
_OWNERS = 1000  # API keys whose recent tasks are kept (the most recently active ones)


def _node(row: NodeRow) -> dict[str, Any]:
    view = row.view
    ms = row.ewma_ms_per_token
    return {
        "name": view.name,
        "node_id": view.node_id,
        "address": view.address,
        "state": view.state.value,
        "labels": dict(view.labels),
        "models": list(view.models),
        "agents": list(view.agents),
        "in_flight": row.outstanding,
        "max_concurrent": view.max_concurrent,
        "cooling_down": row.cooling_down,
        "tokens_per_s": round(1000.0 / ms, 1) if ms else None,
    }


def _task(entry: LedgerEntry) -> dict[str, Any]:
    result = entry.result
    attempts = entry.attempts
    return {
        "task_id": entry.task_id,
        "state": entry.state.value,
        "agent": result.agent if result else "",
        "node": result.node_name if result else (attempts[-1].node_name if attempts else ""),
        "attempts": len(attempts),
        "failovers": sum(a.outcome.value != "ok" for a in attempts),
        "steps": len(result.steps) if result else 0,
        "tier": result.tier if result else "",
        "tokens": result.completion_tokens if result else 0,
        "error": str(entry.error or "")[:200] if entry.state is TaskState.FAILED else "",
    }


class RecentTasks:
    """The last `kept` tasks of each API key ("": an open mesh's) this dispatcher began or
    ended, newest first: a busy key does not push another's out of its view."""

    def __init__(self, kept: int = _KEPT, owners: int = _OWNERS) -> None:
        self._kept = kept
        self._owners = owners
        self._by_owner: OrderedDict[str, deque[LedgerEntry]] = OrderedDict()

    def on_entry(self, entry: LedgerEntry) -> None:
        entries = self._by_owner.get(entry.owner)
        if entries is None:
            entries = self._by_owner[entry.owner] = deque(maxlen=self._kept)
            while len(self._by_owner) > self._owners:
                self._by_owner.popitem(last=False)
        self._by_owner.move_to_end(entry.owner)
        if entry not in entries:
            entries.appendleft(entry)

    def summaries(self, reader: str | None = None) -> list[dict[str, Any]]:
        """Tasks of API key `reader` (None: every key's, an open mesh's)."""
        if reader is not None:
            return [_task(entry) for entry in self._by_owner.get(reader, ())]
        return [_task(entry) for entries in self._by_owner.values() for entry in entries]


def add_dashboard(app: FastAPI, dispatcher: Dispatcher, *, interval_s: float = 0.5) -> None:
    """Mount the dashboard's routes on `app` (the OpenAI HTTP app)."""
    recent = RecentTasks()
    dispatcher.ledger.listen(recent.on_entry)

    def state(reader: str | None) -> dict[str, Any]:
        """What `reader` may see (None: everything, an open mesh)."""
        return {
            "nodes": [_node(row) for row in dispatcher.node_rows()],
            "tasks": recent.summaries(reader),
        }

    @app.get("/dashboard", response_model=None)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/dashboard/api/state")
    async def current() -> dict[str, Any]:
        return state(reader_of(current_caller()))

    @app.get("/dashboard/api/tasks/{task_id}", response_model=None)
    async def task(task_id: str) -> JSONResponse:
        try:
            record = await dispatcher.describe_task(task_id, reader=reader_of(current_caller()))
        except MeshError as error:
            return JSONResponse({"error": str(error)}, status_code=404)
        steps = record.result.steps if record.result else ()
        return JSONResponse(
            {
                "task_id": record.task_id,
                "state": record.state.value,
                "error": record.error,
                "attempts": [
                    {"node": a.node_name, "outcome": a.outcome.value, "ms": round(a.duration_ms)}
                    for a in record.attempts
                ],
                "steps": [
                    {
                        "index": s.index,
                        "kind": s.kind,
                        "tool": s.call.tool,
                        "ms": round(s.duration_ms),
                        "error": s.error,
                    }
                    for s in steps
                ],
            }
        )

    async def events(reader: str | None) -> AsyncIterator[str]:
        while True:
            yield f"data: {json.dumps(state(reader))}\n\n"
            await asyncio.sleep(interval_s)

    @app.get("/dashboard/events", response_model=None)
    async def stream() -> StreamingResponse:
        return StreamingResponse(
            events(reader_of(current_caller())),  # whose: read here, in the request's context
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    app.mount("/dashboard/static", StaticFiles(directory=STATIC), name="dashboard")
