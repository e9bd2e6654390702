"""The interface every model backend implements; one implementation per module.

- `llama.py`: GGUF models through llama-cpp-python.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


class ModelStatus(StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNLOADED = "unloaded"


@dataclass(frozen=True)
class ModelDescriptor:
    model_id: str
    backend: str
    source: str
    size_bytes: int = 0
    context_length: int = 0
    family: str = ""
    quantization: str = ""
    sha256: str = ""  # of the model file: same hash, same token ids (continuation_token_ids)


# The roles a chat message may have: an enumeration, never text that reaches a template.
ROLES = frozenset({"system", "user", "assistant", "tool"})


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class GenerationInput:
    """One generation, already validated for ranges that need no model."""

    messages: Sequence[Message] = ()
    prompt: str = ""  # used when raw is true
    raw: bool = False
    continuation: str = ""  # assistant text to continue from
    # Its token ids as sampled by a model with the same file (sha256); the backend appends
    # them to the prompt's tokens instead of tokenizing `continuation`, where it can.
    continuation_token_ids: Sequence[int] = ()
    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    seed: int | None = None
    stop: Sequence[str] = ()
    # Constrain the output to JSON matching this schema (JSON text; "" = free text).
    # llama.cpp turns it into a grammar; the agent runtime relies on it.
    json_schema: str = ""


@dataclass
class Completion:
    """What a finished generation reports."""

    finish_reason: str = "stop"  # "stop", "length", "cancelled"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    decode_s: float = 0.0  # time from first to last token


@dataclass(frozen=True)
class Piece:
    """New text from the model; the last piece of a generation carries `completion`."""

    text: str
    completion: Completion | None = field(default=None)
    tokens: int = 0  # model tokens behind `text` (a piece may batch several)
    # Their ids, where they continue the prompt token for token (else empty): a continuation
    # on the same model file passes them back as `continuation_token_ids`.
    token_ids: tuple[int, ...] = ()


class Backend(Protocol):
    """A loaded (or loading) model. `stream` must never block the event loop."""

    descriptor: ModelDescriptor
    status: ModelStatus
    error: str

    async def load(self) -> None:
        """Load the model; raise `mesh.core.errors.ModelLoadError` with a clear message on failure."""

    def expected_bytes(self) -> int:
        """The model's size before it loads (its file's; 0 where there is none): what the
        node's memory cap counts (nodes/model_manager.py)."""
        ...

    def stream(self, request: GenerationInput) -> AsyncGenerator[Piece, None]:
        """Generate; closing the iterator early stops generation and frees the model."""
        ...

    async def close(self) -> None:
        """Release the model."""
