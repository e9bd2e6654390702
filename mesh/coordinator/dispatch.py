"""The dispatcher: a task submitted once is answered once. No Ray here.

    dispatcher = Dispatcher(DispatcherSettings(policy="least_loaded"))
    dispatcher.update_nodes(registry.snapshot())      # whenever the node table changes
    result = await dispatcher.submit(task)            # one answer, or one MeshError
    async for item in dispatcher.stream(task):        # str pieces, then the TaskResult
        ...

The flow of one task: the ledger (record, idempotency; with several replicas the shared task
directory) -> a run (`runs.TaskRun`, `agent_run.AgentRun`) -> the one attempt loop
(`attempts.Attempts`) -> the node pool (`pool.NodePool`: choose, links, in-flight counts,
cool-downs, EWMA) -> a node. This module is the first arrow: it keeps the ledger and hands each
task to its run, and appends a line per agent task to the audit summary (`audit.py`) when the
settings name one.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import time
from collections.abc import AsyncGenerator, Callable, Sequence

from mesh.coordinator.agent_run import AgentItem, AgentRun
from mesh.coordinator.audit import TaskAudit
from mesh.coordinator.pool import NodeConnector, NodePool, NodeRow, connect_grpc
from mesh.coordinator.runs import TaskRun
from mesh.coordinator.settings import DispatcherSettings
from mesh.coordinator.shared_tasks import DirectoryClient, SharedTasks
from mesh.coordinator.tasks import (
    LedgerEntry,
    TaskLedger,
    TaskRecord,
    TaskResult,
    TaskSpec,
    TaskState,
    TaskUsage,
    check_caller_ids,
    check_deadline_s,
    check_max_tokens,
    check_prompt_limits,
)
from mesh.core.errors import MeshError, NotFoundError, UnavailableError
from mesh.core.tracing import SpanRecord
from mesh.core.untrusted import quoted
from mesh.nodes_view import NodeView
from mesh.observe.metrics import CoordinatorMetrics


class Dispatcher:
    def __init__(
        self,
        settings: DispatcherSettings | None = None,
        *,
        connect: NodeConnector = connect_grpc,
        clock: Callable[[], float] = time.monotonic,
        directory: DirectoryClient | None = None,
        metrics: CoordinatorMetrics | None = None,
    ) -> None:
        """`directory`: the task directory shared with other replicas (none with one replica)."""
        self.settings = settings = settings or DispatcherSettings()
        self.pool = NodePool(settings, connect=connect, clock=clock, metrics=metrics)
        self.ledger = TaskLedger(settings.ledger_size, clock=clock)
        self.metrics = self.pool.metrics
        self.ledger.listen(self._ended)
        self.shared: SharedTasks | None = None
        if directory is not None:
            self.shared = SharedTasks(
                directory, self.ledger, default_deadline_s=settings.deadline_s
            )
        # The audit summary: a line per agent task (created now: a small blocking open).
        self.audit = (
            TaskAudit.open(pathlib.Path(settings.audit_log)) if settings.audit_log else None
        )
        self._closed = False

    def _ended(self, entry: LedgerEntry) -> None:
        """Count a task that ended (the ledger also tells when one begins)."""
        if entry.state is TaskState.DONE:
            self.metrics.task_ended("ok")
        elif entry.state is TaskState.FAILED:
            error = entry.error
            code = error.grpc_code_name if error is not None else "CANCELLED"
            self.metrics.task_ended(code.lower())

    # ------------------------------------------------------------------ node table

    def update_nodes(self, views: Sequence[NodeView]) -> None:
        """Adopt a registry snapshot (see `NodePool.update`)."""
        self.pool.update(views)

    def node_rows(self) -> list[NodeRow]:
        return self.pool.rows()

    def models(self) -> list[str]:
        """Model aliases served by at least one ready node."""
        return self.pool.models()

    def agents(self) -> list[str]:
        """Agents offered by at least one ready node ("auto" lets the intent router pick)."""
        return self.pool.agents()

    # ------------------------------------------------------------------ tasks

    async def _begin(self, task: TaskSpec) -> tuple[LedgerEntry, TaskRun | AgentRun | None]:
        """The task's ledger entry and the run that will answer it. No run when another replica
        ran or runs the same key: the entry then holds that run's outcome."""
        entry = self.ledger.begin(task)
        if self.shared is not None:
            runnable = await self.shared.claim_or_wait(task, entry)
            if runnable is None:
                return entry, None
            task = runnable  # its deadline less the time spent waiting for another replica
        try:
            kind = AgentRun if task.agent else TaskRun
            run = kind(self.pool, self.settings, task, entry)
        except MeshError as error:  # e.g. an agent task with no user message
            self.ledger.fail(entry, error, ())
            raise
        return entry, run

    async def submit(self, task: TaskSpec, *, usage: TaskUsage | None = None) -> TaskResult:
        """Run `task` to one answer, retrying elsewhere on failure; raises one MeshError.
        `usage` gets the tokens the run produced, however it ended (`TaskUsage`)."""
        _check(task, self.settings)
        while (existing := self.ledger.find(task.dedup_key)) is not None:
            try:
                return await self._replay(existing)
            except asyncio.CancelledError:
                if not self._run_again(existing):
                    raise
        entry, run = await self._begin(task)
        if run is None:
            return await self._replay(entry)
        result = None
        try:
            result = await run.unary()
        except MeshError as error:
            run.attempts.finish(error.grpc_code_name.lower())
            self.ledger.fail(entry, error, tuple(run.attempts.records))
            self._audit(run, "failed", error=error)
            raise
        except asyncio.CancelledError:
            run.attempts.finish("cancelled")
            self.ledger.abandon(entry, tuple(run.attempts.records))
            self._audit(run, "cancelled")
            raise
        finally:
            _count(usage, run, result)
        run.attempts.finish("ok")
        self.ledger.succeed(entry, result)
        self._audit(run, "ok", result=result)
        return result

    async def stream(
        self, task: TaskSpec, *, usage: TaskUsage | None = None
    ) -> AsyncGenerator[AgentItem, None]:
        """Text pieces as they come, then the TaskResult; a broken stream continues elsewhere.
        Agent tasks also yield each step (`node_pb2.AgentStep`) as the node completes it.
        `usage` gets the tokens the run produced, however it ended: also when the stream is
        closed early (`TaskUsage`)."""
        _check(task, self.settings)
        while (existing := self.ledger.find(task.dedup_key)) is not None:
            try:
                result = await self._replay(existing)
            except asyncio.CancelledError:
                if not self._run_again(existing):
                    raise
                continue
            if result.text:
                yield result.text
            yield result
            return
        entry, run = await self._begin(task)
        if run is None:
            result = await self._replay(entry)
            if result.text:
                yield result.text
            yield result
            return
        answer = None
        try:
            # Closed as soon as this generator is: the attempt is cancelled and its slot freed
            # at once (not when the garbage collector finds it), and recorded as CANCELLED.
            async with contextlib.aclosing(run.stream()) as items:
                async for item in items:
                    if isinstance(item, TaskResult):
                        answer = item
                        run.attempts.finish("ok")
                        self.ledger.succeed(entry, item)
                        self._audit(run, "ok", result=item)
                    yield item
        except MeshError as error:
            run.attempts.finish(error.grpc_code_name.lower())
            self.ledger.fail(entry, error, tuple(run.attempts.records))
            self._audit(run, "failed", error=error)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            run.attempts.finish("cancelled")
            if entry.state is TaskState.RUNNING:
                self.ledger.abandon(entry, tuple(run.attempts.records))
                self._audit(run, "cancelled")
            raise
        finally:
            _count(usage, run, answer)

    def _audit(
        self,
        run: TaskRun | AgentRun,
        outcome: str,
        *,
        result: TaskResult | None = None,
        error: MeshError | None = None,
    ) -> None:
        """Append the audit summary line of an agent task that ended (model tasks have none)."""
        if self.audit is None or not isinstance(run, AgentRun):
            return
        attempts = run.attempts
        self.audit.task_ended(
            task_id=run.task.task_id,
            caller=attempts.caller,
            agent=run.agent,
            outcome=outcome,
            steps=result.steps if result is not None else run.steps,
            attempts=attempts.records,
            duration_ms=(attempts.clock() - attempts.started_at) * 1000.0,
            finish_reason=result.finish_reason if result is not None else "",
            error=error.grpc_code_name.lower() if error is not None else "",
            tier=result.tier if result is not None else "",
        )

    async def _replay(self, entry: LedgerEntry) -> TaskResult:
        if entry.state is TaskState.DONE and entry.result is not None:
            return entry.result
        if entry.state is TaskState.FAILED and entry.error is not None:
            raise entry.error
        return await asyncio.shield(entry.future)

    def _run_again(self, entry: LedgerEntry) -> bool:
        """After a wait on `entry` ended in CancelledError: whether the task should run afresh
        for this caller because the caller that ran it went away (not this caller)."""
        current = asyncio.current_task()
        if not entry.future.cancelled() or (current is not None and current.cancelling()):
            return False
        if self._closed:
            raise UnavailableError("the coordinator is shutting down")
        return True

    async def describe_task(self, task_id: str, *, reader: str | None = None) -> TaskRecord:
        """The task's record, from this replica's ledger or, with several replicas, any's.
        `reader`: the API key asking (its name); another key's task is not found. None: any
        task (an open mesh)."""
        if self.shared is not None:
            return await self.shared.record(task_id, reader)
        return self.ledger.record(task_id, reader)

    async def trace(
        self, task_id: str, *, reader: str | None = None
    ) -> tuple[str, list[SpanRecord]]:
        """(trace id, spans) of a task this replica ran: its own spans and those the nodes of
        its attempts still keep. NotFoundError for a task it does not know or did not trace,
        or that is not `reader`'s (as `describe_task`)."""
        entry = self.ledger.entry(task_id, reader)
        if entry is None or not entry.trace_id:
            raise NotFoundError(
                f"no trace of task {quoted(task_id, 64)} here (unknown, not sampled, or "
                "run by another dispatcher replica)"
            )
        nodes = {attempt.node_id for attempt in entry.attempts}
        spans = self.pool.tracing.spans(entry.trace_id)
        spans += await self.pool.node_spans(nodes, entry.trace_id)
        spans.sort(key=lambda span: span.start_ns)
        return entry.trace_id, spans

    async def close(self) -> None:
        self._closed = True
        await self.pool.close()
        if self.shared is not None:
            await self.shared.close()
        self.ledger.close()


def _count(usage: TaskUsage | None, run: TaskRun | AgentRun, result: TaskResult | None) -> None:
    """Add what `run` produced to `usage`: its answer's tokens, else its attempts' (the tokens
    each streamed before it failed or was cancelled) and, for an agent, the prompts of the
    tiers it left."""
    if usage is None:
        return
    if result is not None:
        usage.prompt_tokens += result.prompt_tokens
        usage.completion_tokens += result.completion_tokens
        return
    usage.completion_tokens += sum(a.completion_tokens for a in run.attempts.records)
    if isinstance(run, AgentRun):
        usage.prompt_tokens += run.prompt_tokens


def _check(task: TaskSpec, settings: DispatcherSettings) -> None:
    """InvalidRequestError for what no node could honour and for what is over the coordinator's
    bounds (the ingresses check them first): before the ledger, so it keeps nothing of it."""
    check_caller_ids(task.task_id, task.idempotency_key)
    check_deadline_s(task.deadline_s)
    sampling = task.request.sampling
    check_max_tokens(sampling.max_tokens if sampling.HasField("max_tokens") else None)
    check_prompt_limits(
        task.request, max_prompt_bytes=settings.max_prompt_bytes, max_messages=settings.max_messages
    )
