"""A Backend that replies with scripted text, for tests of the agent loop without a model."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Iterable
from typing import Any

from nodes.backends import Completion, GenerationInput, ModelDescriptor, ModelStatus, Piece


class ScriptedBackend:
    """Implements the Backend protocol; each generation returns the next scripted reply.

    A reply may be a dict (sent as JSON) or a string (sent as is, e.g. broken JSON).
    Every request is kept, so tests can check the prompt and the schema sent.
    """

    def __init__(self, replies: Iterable[Any], model_id: str = "scripted") -> None:
        self.descriptor = ModelDescriptor(
            model_id=model_id, backend="fake", source="memory", context_length=2048
        )
        self.status = ModelStatus.READY
        self.error = ""
        self.replies = [r if isinstance(r, str) else json.dumps(r) for r in replies]
        self.requests: list[GenerationInput] = []

    async def load(self) -> None:
        self.status = ModelStatus.READY

    async def stream(self, request: GenerationInput) -> AsyncGenerator[Piece, None]:
        self.requests.append(request)
        if not self.replies:
            raise AssertionError("the model was asked more often than the script allows")
        reply = self.replies.pop(0)
        half = len(reply) // 2
        yield Piece(reply[:half])
        yield Piece(reply[half:])
        yield Piece(
            "",
            Completion(
                finish_reason="stop",
                prompt_tokens=50,
                completion_tokens=max(1, len(reply) // 4),
                decode_s=0.01,
            ),
        )

    async def close(self) -> None:
        self.status = ModelStatus.UNLOADED

    def schema(self, index: int) -> dict[str, Any]:
        """The JSON schema sent with request `index`."""
        return dict(json.loads(self.requests[index].json_schema))
