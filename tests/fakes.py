"""Fakes that implement the real interfaces (not mocks), for tests of the logic around them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from nodes.backends import Completion, GenerationInput, ModelDescriptor, ModelStatus, Piece


class FakeBackend:
    """A Backend that 'generates' the words of `reply`, one per `delay_s`."""

    def __init__(
        self,
        model_id: str = "fake",
        reply: str = "Paris is the capital of France.",
        *,
        delay_s: float = 0.0,
        context_length: int = 2048,
    ) -> None:
        self.descriptor = ModelDescriptor(
            model_id=model_id,
            backend="fake",
            source="memory",
            size_bytes=1,
            context_length=context_length,
            family="Fake",
            quantization="none",
        )
        self.status = ModelStatus.UNLOADED
        self.error = ""
        self.reply = reply
        self.delay_s = delay_s
        self.requests: list[GenerationInput] = []
        self.tokens_produced = 0
        self.active = 0

    async def load(self) -> None:
        self.status = ModelStatus.READY

    async def stream(self, request: GenerationInput) -> AsyncGenerator[Piece, None]:
        self.requests.append(request)
        self.active += 1
        try:
            words = self.reply.split(" ")
            produced = 0
            for i, word in enumerate(words[: request.max_tokens]):
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                self.tokens_produced += 1
                produced += 1
                yield Piece(word if i == 0 else " " + word, tokens=1)
            finish = "stop" if produced == len(words) else "length"
            yield Piece(
                "",
                Completion(
                    finish_reason=finish, prompt_tokens=3, completion_tokens=produced, decode_s=0.01
                ),
            )
        finally:
            self.active -= 1

    async def close(self) -> None:
        self.status = ModelStatus.UNLOADED
