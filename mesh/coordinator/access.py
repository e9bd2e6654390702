"""Who may use the coordinator's ingress: API keys, their scopes and their rate limits.

    access = AccessControl.for_cluster_dir(cluster_dir)        # None on an open mesh
    caller = access.authenticate(request.headers.get("authorization"))   # 401 / UNAUTHENTICATED
    task = await access.admit(caller, task)                     # 403 scope, 429 over a limit
    token = CALLER.set(caller)                                  # for the runs below
    usage = TaskUsage()
    try:
        result = await dispatcher.submit(task, usage=usage)
    finally:                                                    # answered, failed or cut off:
        access.spend(caller, usage.total_tokens)                # the tokens it produced

The keys live in `<cluster dir>/keys.json` (mesh/cluster/keys.py), the counters in a
`RateLimiter` (mesh/cluster/limits.py): this dispatcher's own, or the node-table owner's when
several replicas must share one (`Limits` is the seam; mesh/coordinator/app.py). The HTTP side
(a middleware that sets the caller) is mesh/coordinator/http_access.py; the gRPC side is
`MeshHandlers` (mesh/coordinator/service.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
from collections.abc import AsyncGenerator, Iterable
from typing import Protocol

from mesh.cluster import KEYS
from mesh.cluster.keys import ApiKey, KeyRing
from mesh.cluster.limits import RateLimiter, Refusal
from mesh.coordinator.agent_run import AgentItem
from mesh.coordinator.tasks import TaskSpec, TaskUsage
from mesh.core.caller import CALLER, Caller, current_caller
from mesh.core.errors import PermissionDeniedError, RateLimitedError, UnauthenticatedError
from mesh.core.untrusted import quoted

AUTHORIZATION = "authorization"  # the HTTP header, and the gRPC metadata key
_SCHEME = "bearer"
_LISTED = 8  # allowed names an error lists


class Limits(Protocol):
    """Where the rate counters live: this process, or a process the replicas share."""

    async def admit(self, key: str, rpm: int | None, tpm: int | None) -> Refusal | None: ...
    def spend(self, key: str, tokens: int) -> None: ...


class LocalLimits:
    """The counters in this dispatcher (one replica: no hop per request)."""

    def __init__(self, limiter: RateLimiter | None = None) -> None:
        self.limiter = limiter or RateLimiter()

    async def admit(self, key: str, rpm: int | None, tpm: int | None) -> Refusal | None:
        return self.limiter.admit(key, rpm, tpm)

    def spend(self, key: str, tokens: int) -> None:
        self.limiter.spend(key, tokens)


def bearer_token(value: str | bytes | None) -> str:
    """The key in an `Authorization: Bearer KEY` value; UnauthenticatedError when there is none.
    Never quotes the value: it may be a key."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if not value or not value.strip():
        raise UnauthenticatedError(
            "an API key is required: send it as 'Authorization: Bearer KEY' "
            "(mesh CLI: --api-key or MESH_API_KEY)"
        )
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != _SCHEME or not token.strip():
        raise UnauthenticatedError("the Authorization header must be 'Bearer KEY'")
    return token.strip()


def _listed(names: Iterable[str]) -> str:
    names = sorted(names)
    shown = ", ".join(quoted(name, 64) for name in names[:_LISTED])
    return shown + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")


class AccessControl:
    """API keys at the ingress: authenticate, check scope and limits, count tokens."""

    def __init__(self, keys: KeyRing, limits: Limits | None = None) -> None:
        self.keys = keys
        self.limits: Limits = limits or LocalLimits()

    @classmethod
    def for_cluster_dir(
        cls, directory: str | pathlib.Path, limits: Limits | None = None
    ) -> AccessControl:
        return cls(KeyRing(pathlib.Path(directory).resolve() / KEYS), limits)

    def authenticate(self, authorization: str | bytes | None) -> Caller:
        """The caller an `Authorization` value names; UnauthenticatedError otherwise."""
        key = self.keys.verify(bearer_token(authorization))
        return caller_of(key)

    def authenticate_metadata(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Caller:
        """The caller named by gRPC invocation metadata (`authorization: Bearer KEY`)."""
        for name, value in metadata or ():
            if name == AUTHORIZATION:
                return self.authenticate(value)
        return self.authenticate(None)

    async def admit(self, caller: Caller, task: TaskSpec) -> TaskSpec:
        """`task` as `caller`'s (its idempotency keys apart from other keys'), once its agent
        and model are within the caller's scope (PermissionDeniedError) and the key is under
        its limits (RateLimitedError: counts the request when admitted)."""
        check_scope(caller, task.agent, task.model)
        key = self.keys.get(caller.key_name)
        if key is not None and (key.rpm is not None or key.tpm is not None):
            refusal = await self.limits.admit(key.name, key.rpm, key.tpm)
            if refusal is not None:
                raise RateLimitedError(
                    refusal.describe(key.name),
                    retry_after_s=refusal.retry_after_s,
                    over=refusal.over,
                )
        return dataclasses.replace(task, owner=caller.key_name)

    async def admit_current(self, task: TaskSpec) -> TaskSpec:
        """`admit` for the caller the HTTP middleware set (UnauthenticatedError: none)."""
        caller = current_caller()
        if caller is None:
            raise UnauthenticatedError("an API key is required")
        return await self.admit(caller, task)

    def spend(self, caller: Caller, tokens: int) -> None:
        """Count `tokens` a task of `caller` produced against its key's tpm. Called in a
        `finally` with the task's `TaskUsage`: an answer, a failure and a stream the client
        cut all count what was produced."""
        key = self.keys.get(caller.key_name)
        if tokens > 0 and key is not None and key.tpm is not None:
            self.limits.spend(key.name, tokens)

    async def as_caller(
        self, caller: Caller, items: AsyncGenerator[AgentItem, None], usage: TaskUsage
    ) -> AsyncGenerator[AgentItem, None]:
        """`items` (a dispatcher's stream that fills `usage`) with CALLER set to `caller`
        during each step (whichever task or context iterates it: a streaming response's body
        may run in another one); once it is closed, however it ended, the tokens it
        produced are counted."""
        try:
            async with contextlib.aclosing(items):
                while True:
                    token = CALLER.set(caller)
                    try:
                        item = await anext(items)
                    except StopAsyncIteration:
                        return
                    finally:
                        CALLER.reset(token)
                    yield item
        finally:
            self.spend(caller, usage.total_tokens)


def caller_of(key: ApiKey) -> Caller:
    return Caller(
        key_name=key.name,
        subject=key.subject,
        agents=frozenset(key.agents),
        models=frozenset(key.models),
    )


def check_scope(caller: Caller, agent: str | None, model: str | None) -> None:
    """PermissionDeniedError when `caller` may not run `agent` or use `model`. An empty scope
    allows all; "auto" (the intent router picks the agent) must be listed to be allowed."""
    if agent and caller.agents and agent not in caller.agents:
        raise PermissionDeniedError(
            f"the API key {caller.key_name!r} may not run agent {quoted(agent, 64)}; "
            f"it may run {_listed(caller.agents)}"
        )
    if caller.models and (model or not agent) and model not in caller.models:
        what = f"model {quoted(model, 64)}" if model else "a model it does not name"
        raise PermissionDeniedError(
            f"the API key {caller.key_name!r} may not use {what}; "
            f"it may use {_listed(caller.models)}"
        )


def allowed(
    caller: Caller | None, models: list[str], agents: list[str]
) -> tuple[list[str], list[str]]:
    """The models and agents (incl. "auto") of a listing that `caller` may use."""
    if caller is None:
        return models, agents
    return (
        [m for m in models if not caller.models or m in caller.models],
        [a for a in agents if not caller.agents or a in caller.agents],
    )
