"""`--agent auto`: find a node that serves a classifier, ask it which agent a request is for.

The registry's NodeView lists model ids but not what each model does, so the first time a node
is considered its Describe is read once (ModelInfo.task == "text-classification"), and the
answer is kept for `ttl_s`; a node that fails to answer is forgotten at once.

    index = ClassifierIndex(clock=time.monotonic)
    found = await index.find(views, link_for, model=policy.router_model)  # (view, model) | None
    reply = await link_for(view).classify(text, model=model, timeout_s=5)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

from edgemesh.v1 import node_pb2
from mesh.core.errors import MeshError
from mesh.core.ids import NodeId
from mesh.nodes_view import NodeState, NodeView

logger = logging.getLogger("mesh.coordinator")

CLASSIFICATION_TASK = "text-classification"


class ClassifierLink(Protocol):
    async def describe(self, *, timeout_s: float | None = None) -> node_pb2.DescribeResponse: ...

    async def classify(
        self, text: str, *, model: str = "", timeout_s: float | None = None
    ) -> node_pb2.ClassifyResponse: ...


def classifier_models(describe: node_pb2.DescribeResponse) -> tuple[str, ...]:
    """Ids of the ready text-classification models a node describes."""
    return tuple(
        m.model_id
        for m in describe.models
        if m.task == CLASSIFICATION_TASK and m.state == node_pb2.MODEL_STATE_READY
    )


def routed_by(model: str, confidence: float) -> str:
    """How SubmitResponse.routed_by reads for a routed task."""
    return f"{model} (confidence {confidence:.2f})"


@dataclass(frozen=True, slots=True)
class _Known:
    address: str
    models: tuple[str, ...]
    until: float


class ClassifierIndex:
    """Which nodes serve a classifier, learned from one Describe per node (cached)."""

    def __init__(
        self,
        *,
        ttl_s: float = 60.0,
        describe_timeout_s: float = 3.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.describe_timeout_s = describe_timeout_s
        self._clock = clock
        self._known: dict[NodeId, _Known] = {}

    def forget(self, node_id: NodeId) -> None:
        self._known.pop(node_id, None)

    async def models_of(self, view: NodeView, link: ClassifierLink) -> tuple[str, ...]:
        known = self._known.get(view.node_id)
        now = self._clock()
        if known is not None and known.address == view.address and known.until > now:
            return known.models
        try:
            reply = await link.describe(timeout_s=self.describe_timeout_s)
        except MeshError as error:  # unreachable now: ask again next time
            logger.info("describe of %s for its classifiers failed: %s", view.name, error)
            self.forget(view.node_id)
            return ()
        models = classifier_models(reply)
        self._known[view.node_id] = _Known(view.address, models, now + self.ttl_s)
        return models

    async def find(
        self,
        views: Sequence[NodeView],
        link_for: Callable[[NodeView], ClassifierLink],
        *,
        model: str | None = None,
        exclude: Collection[NodeId] = (),
    ) -> tuple[NodeView, str] | None:
        """A ready node with a classifier (`model`, or any), and the classifier's id.

        A node whose view already lists `model` is taken without a Describe."""
        ready = [v for v in views if v.state is NodeState.READY and v.node_id not in exclude]
        if model is not None:
            for view in ready:
                if model in view.models:
                    return view, model
        for view in sorted(ready, key=lambda v: (v.in_flight + v.queued, v.node_id)):
            models = await self.models_of(view, link_for(view))
            if model is not None and model in models:
                return view, model
            if model is None and models:
                return view, models[0]
        return None
