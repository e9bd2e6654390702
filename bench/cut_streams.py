"""Streams cut mid-answer and continued elsewhere: what the benchmark and its test share.

- `judge(reference, before, after)`: does the continued answer equal the uninterrupted one, and
  if not, was text sent twice (duplicated) or never (missing) at the seam, or did the
  continuation go another way (drift)?
- `RecordingConnector`: the Dispatcher's `connect` that remembers, per call, which node sent which
  text and tokens, so a run knows what came before the cut and what after it; with `cut_after`
  it also cuts a task's first call after some tokens (UNAVAILABLE, the node's call cancelled).
- `node_view(address, describe)`: the NodeView a registry would build from a node's Describe.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from edgemesh.v1 import node_pb2
from mesh.coordinator.pool import NodeLink, connect_grpc
from mesh.core.errors import UnavailableError
from mesh.core.ids import NodeId
from mesh.health import details_from_describe
from mesh.nodes_view import NodeSource, NodeState, NodeView

SEAM_SEARCH_CHARS = 64  # how far around the seam duplicated or missing text is looked for
ALIGN_CHARS = 12  # characters that must agree for two texts to be "back in step"


@dataclass(frozen=True)
class Verdict:
    """One cut stream judged against the uninterrupted answer."""

    equal: bool
    duplicated_chars: int = 0  # text already sent, sent again right after the cut
    missing_chars: int = 0  # text of the answer skipped at the cut
    drifted: bool = False  # continued with other words (neither of the above)

    @property
    def kind(self) -> str:
        if self.equal:
            return "equal"
        if self.duplicated_chars:
            return "duplicated"
        if self.missing_chars:
            return "missing"
        return "drift"


def _in_step(text: str, expected: str) -> bool:
    n = min(ALIGN_CHARS, len(text), len(expected))
    return n > 0 and text[:n] == expected[:n]


def judge(reference: str, before: str, after: str) -> Verdict:
    """`before`: the text the first node sent before it was cut; `after`: what the mesh sent
    after the cut. The answer is `before + after`; `reference` is the uninterrupted answer."""
    if before + after == reference:
        return Verdict(equal=True)
    if not reference.startswith(before):  # the first node already went another way
        return Verdict(equal=False, drifted=True)
    expected = reference[len(before) :]
    if _in_step(after, expected) or not after:
        return Verdict(equal=False, drifted=True)  # the seam is right; it parts later
    for d in range(1, min(len(before), SEAM_SEARCH_CHARS) + 1):
        if after.startswith(before[-d:]) and _in_step(after[d:], expected):
            return Verdict(equal=False, duplicated_chars=d)
    for m in range(1, min(len(expected), SEAM_SEARCH_CHARS) + 1):
        if _in_step(after, expected[m:]):
            return Verdict(equal=False, missing_chars=m)
    return Verdict(equal=False, drifted=True)


@dataclass
class Call:
    """One GenerateStream call the coordinator made: to which node, what came back."""

    node_id: NodeId
    task_id: str
    attempt: int
    texts: list[str] = field(default_factory=list)
    tokens: int = 0
    used_token_ids: bool = False  # the request carried the continuation's token ids

    @property
    def text(self) -> str:
        return "".join(self.texts)


class _RecordingLink:
    """A real link whose streams are recorded (and, when asked, cut)."""

    def __init__(self, view: NodeView, owner: RecordingConnector) -> None:
        self._link = connect_grpc(view)
        self._node_id = view.node_id
        self._owner = owner

    def __getattr__(self, name: str) -> object:
        return getattr(self._link, name)

    async def stream_request(
        self, request: node_pb2.GenerateRequest, *, timeout_s: float | None = None
    ) -> AsyncIterator[node_pb2.GenerateChunk]:
        call = Call(self._node_id, request.task.task_id, request.task.attempt)
        call.used_token_ids = bool(getattr(request, "continuation_token_ids", ()))
        self._owner.calls.append(call)
        cut = self._owner.cut_after.get(call.task_id) if call.attempt == 1 else None
        chunks = self._link.stream_request(request, timeout_s=timeout_s)
        try:
            async for chunk in chunks:
                if chunk.text:
                    call.texts.append(chunk.text)
                    call.tokens += chunk.tokens or 1
                yield chunk
                if cut is not None and call.tokens >= cut:
                    raise UnavailableError(f"cut after {call.tokens} tokens (test)")
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]

    async def close(self) -> None:
        await self._link.close()


class RecordingConnector:
    """`Dispatcher(connect=RecordingConnector())`: real gRPC links that record every stream."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.cut_after: dict[str, int] = {}  # task id -> cut its first call after this many tokens

    def __call__(self, view: NodeView) -> NodeLink:
        return _RecordingLink(view, self)  # type: ignore[return-value]

    def of_task(self, task_id: str) -> list[Call]:
        return [call for call in self.calls if call.task_id == task_id]


def node_view(address: str, describe: node_pb2.DescribeResponse) -> NodeView:
    """The READY view a registry would hold for the node at `address`."""
    details = details_from_describe(describe)
    fields = details.model_dump()
    fields.pop("protocol_version", None)
    return NodeView(**fields, address=address, state=NodeState.READY, source=NodeSource.STATIC)


def seam_split(calls: list[Call]) -> tuple[str, str]:
    """(text of the first call, text of every later call): before and after the cut."""
    if not calls:
        return "", ""
    return calls[0].text, "".join(call.text for call in calls[1:])


Judge = Callable[[str, str, str], Verdict]
