"""GGUF models through llama-cpp-python.

A llama.cpp context is not safe for concurrent calls, so each instance has one
worker thread and requests for it are serialised; `instances` > 1 loads more
contexts over the same (memory-mapped) weights. Tokens travel from the worker
thread to the event loop through `call_soon_threadsafe`; closing the async
iterator sets a flag the worker checks after every token, so a cancelled or
timed-out request stops producing tokens at once and frees its instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import secrets
import threading
import time
from collections.abc import AsyncGenerator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from mesh.core.errors import InvalidRequestError, ModelLoadError
from nodes.backends import (
    ROLES,
    Completion,
    GenerationInput,
    ModelDescriptor,
    ModelStatus,
    Piece,
)
from nodes.backends.llama_interrupt import StopFlag, interruptible
from nodes.backends.prefix_states import PrefixStates
from nodes.backends.token_text import TokenText
from nodes.model_files import file_sha256, resolve_gguf

logger = logging.getLogger(__name__)

_END = object()


@dataclass(frozen=True)
class _Prompt:
    """What the model evaluates before it answers, and how its answer reads."""

    tokens: list[int]
    stops: list[str]
    healed: str = ""  # text backed off the end of `tokens`, which the model samples again
    own_tokens: bool = False  # the request's own tokens (no text tokenized again): ids go out


class _Instance:
    """One llama.cpp context, the single thread allowed to use it, and its warm prefixes."""

    def __init__(self, llama: Any, index: int, prefix_cache_bytes: int = 0) -> None:
        self.llama = llama
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama-{index}")
        self.prefixes = PrefixStates(prefix_cache_bytes) if prefix_cache_bytes > 0 else None


class LlamaBackend:
    """A GGUF model served by llama.cpp."""

    def __init__(
        self,
        model_id: str,
        source: str,
        *,
        n_ctx: int = 2048,
        n_threads: int = 2,
        n_batch: int = 256,
        instances: int = 1,
        system_prompt: str | None = None,
        kv_cache: str = "q8_0",
        stream_interval_s: float = 0.0,
        max_rendered_bytes: int | None = None,
        prefix_cache_mb: int = 0,
    ) -> None:
        self._prefix_cache_bytes = prefix_cache_mb * 1024 * 1024
        self._stream_interval_s = stream_interval_s
        self._max_rendered_bytes = max_rendered_bytes  # None: unbounded
        self._kv_cache = kv_cache
        self._system_prompt = system_prompt
        self._source = source
        self._n_ctx = n_ctx
        self._n_threads = n_threads
        self._n_batch = n_batch
        self._instance_count = instances
        self.descriptor = ModelDescriptor(
            model_id=model_id, backend="llama.cpp", source=source, context_length=n_ctx
        )
        self.status = ModelStatus.UNLOADED
        self.error = ""
        self._instances: list[_Instance] = []
        self._free: asyncio.Queue[_Instance] | None = None
        self._formatter: Any = None
        self._closing = StopFlag()  # set by close(): every generation stops

    # ------------------------------------------------------------------ loading

    def expected_bytes(self) -> int:
        return resolve_gguf(self._source).size_bytes

    async def load(self) -> None:
        self.status = ModelStatus.LOADING
        self._closing = StopFlag()  # loaded again after close(): generations may run again
        try:
            resolved = resolve_gguf(self._source)
            self.descriptor = ModelDescriptor(
                model_id=self.descriptor.model_id,
                backend="llama.cpp",
                source=resolved.source,
                size_bytes=resolved.size_bytes,
                context_length=self._n_ctx,
                family=resolved.family,
                quantization=resolved.quantization,
                sha256=await asyncio.to_thread(file_sha256, resolved.path),
            )
            for index in range(self._instance_count):
                llama = await asyncio.to_thread(self._load_one, str(resolved.path))
                self._instances.append(_Instance(llama, index, self._prefix_cache_bytes))
        except ModelLoadError as error:
            self.status, self.error = ModelStatus.FAILED, str(error)
            raise
        self._formatter = _chat_formatter(self._instances[0].llama)
        self._free = asyncio.Queue()
        for instance in self._instances:
            self._free.put_nowait(instance)
        self.status = ModelStatus.READY

    def _load_one(self, path: str) -> Any:
        try:
            import llama_cpp
        except ImportError:
            raise ModelLoadError(
                "llama-cpp-python is not installed; install the node extra: "
                "pip install 'edge-agent-mesh[node]'"
            ) from None
        kv: dict[str, Any] = {}
        if self._kv_cache == "q8_0":  # quantised V cache needs flash attention
            kv = {
                "flash_attn": True,
                "type_k": llama_cpp.GGML_TYPE_Q8_0,
                "type_v": llama_cpp.GGML_TYPE_Q8_0,
            }
        try:
            return llama_cpp.Llama(
                model_path=path,
                n_ctx=self._n_ctx,
                n_threads=self._n_threads,
                n_threads_batch=self._n_threads,
                n_batch=self._n_batch,
                verbose=False,
                **kv,
            )
        except (ValueError, RuntimeError) as error:  # llama.cpp refused the file
            raise ModelLoadError(f"llama.cpp could not load {path}: {error}") from None

    async def close(self) -> None:
        """Stop every generation at its next token, then release the contexts (off the loop)."""
        self._closing.set()
        for instance in self._instances:
            await asyncio.to_thread(instance.executor.shutdown, wait=True)
            with contextlib.suppress(AttributeError):  # older versions have no close()
                await asyncio.to_thread(instance.llama.close)
        self._instances.clear()
        self.status = ModelStatus.UNLOADED

    # ------------------------------------------------------------------ prompts

    def render_prompt(self, request: GenerationInput) -> tuple[list[Segment], list[str]]:
        """What the model sees (the prompt, then any continuation), as segments, and the
        stop strings.

        Only the chat template's own text may hold control tokens ("<|im_start|>system"):
        every text from a request (message contents, a raw prompt, the continuation) is a
        segment of its own, tokenized as plain text, so no nesting or spelling of a control
        string in it can become a real one."""
        segments, stops = self._render(request)
        return segments + _as_text(request.continuation), stops

    def _render(self, request: GenerationInput) -> tuple[list[Segment], list[str]]:
        """The prompt up to where the answer begins, as segments, and the stop strings."""
        stops = list(request.stop)
        if request.raw:
            return _as_text(request.prompt), stops
        for index, message in enumerate(request.messages):
            if message.role not in ROLES:
                raise InvalidRequestError(
                    f"messages[{index}].role {_shown(message.role)} is not one of "
                    f"{', '.join(sorted(ROLES))}"
                )
        if self._formatter is None:
            segments: list[Segment] = []
            for m in request.messages:
                segments += [Segment(f"{m.role}: "), *_as_text(m.content), Segment("\n")]
            return [*segments, Segment("assistant: ")], stops + ["\nuser:"]
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        if self._system_prompt and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": self._system_prompt})
        # Render with a unique marker for each content, then cut the rendering at the
        # markers: what lies between them is the template's.
        nonce = secrets.token_hex(8)
        markers = [f"\x1e{nonce}:{i}\x1e" for i in range(len(messages))]
        marked = [{**m, "content": marker} for m, marker in zip(messages, markers, strict=True)]
        response = self._formatter(messages=marked)
        template_stops = response.stop if isinstance(response.stop, list) else [response.stop]
        stops += [s for s in template_stops if s and s not in stops]
        rendered: str = response.prompt
        segments = []
        for chat_message, marker in zip(messages, markers, strict=True):
            before, found, rendered = rendered.partition(marker)
            if not found:  # the template changed the content (trimmed, say): refuse safely
                raise InvalidRequestError(
                    "this model's chat template rewrites message contents, which this node "
                    "cannot render safely; send a raw prompt instead"
                )
            segments += [Segment(before), *_as_text(chat_message["content"])]
        segments.append(Segment(rendered))
        return [segment for segment in segments if segment.text], stops

    def _check_rendered(self, segments: Sequence[Segment]) -> None:
        """InvalidRequestError when the rendered prompt is over the node's limit: checked
        before tokenizing, whose cost grows faster than its input."""
        limit = self._max_rendered_bytes
        if limit is None:
            return
        size = sum(len(segment.text.encode("utf-8")) for segment in segments)
        if size > limit:
            raise InvalidRequestError(
                f"the rendered prompt is {size} bytes, over this node's limit of {limit}; "
                "send fewer or shorter messages"
            )

    def tokenize(self, llama: Any, segments: Sequence[Segment]) -> list[int]:
        """The tokens of `segments`: control tokens are parsed in the template's text only."""
        tokens: list[int] = []
        for segment in segments:
            if segment.text:
                tokens += llama.tokenize(
                    segment.text.encode("utf-8"), add_bos=not tokens, special=segment.special
                )
        if not tokens:
            tokens = llama.tokenize(b"", add_bos=True, special=False)
        return tokens

    def _prompt_tokens(self, llama: Any, request: GenerationInput) -> _Prompt:
        """The tokens to evaluate, and how the answer's text follows from them.

        A continuation with its token ids (from a model file with the same hash) is appended
        to the prompt's tokens as it is: the answer goes on token for token. One from text
        is tokenized with the prompt, and its last token is backed off (token healing): the
        text so far may end inside what the model would have produced as one token (e.g. a
        trailing space), so the model samples it again and its text is dropped again.
        """
        segments, stops = self._render(request)
        self._check_rendered(segments + _as_text(request.continuation))
        ids = list(request.continuation_token_ids)
        if ids:
            tokens = self.tokenize(llama, segments)
            if max(ids) >= llama.n_vocab():
                raise InvalidRequestError(
                    f"continuation_token_ids has id {max(ids)}, but this model has only "
                    f"{llama.n_vocab()} tokens; send them only to a model with the same sha256"
                )
            spelled = llama.detokenize(ids, prev_tokens=tokens).decode("utf-8", errors="replace")
            if spelled == request.continuation:
                return _Prompt(tokens + ids, stops, own_tokens=True)
            logger.warning(
                "continuation_token_ids do not spell the continuation (%d ids, %d characters); "
                "continuing from the text",
                len(ids),
                len(request.continuation),
            )
        tokens = self.tokenize(llama, segments + _as_text(request.continuation))
        if not request.continuation or len(tokens) < 2:
            return _Prompt(tokens, stops, own_tokens=not request.continuation)
        healed = llama.detokenize(tokens[-1:]).decode("utf-8", errors="ignore")
        return _Prompt(tokens[:-1], stops, healed=healed)

    # ------------------------------------------------------------------ generation

    async def stream(self, request: GenerationInput) -> AsyncGenerator[Piece, None]:
        if self._free is None:
            raise ModelLoadError(f"model {self.descriptor.model_id} is not loaded")
        instance = await self._free.get()
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[Any] = asyncio.Queue()
        stop = StopFlag()

        def emit(item: Any) -> None:
            loop.call_soon_threadsafe(pieces.put_nowait, item)

        future = loop.run_in_executor(instance.executor, self._run, instance, request, stop, emit)
        pending: Any = None
        try:
            while True:
                item = pending if pending is not None else await pieces.get()
                pending = None
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                # Coalesce text already waiting into one piece (a slow reader gets fewer, larger pieces).
                while item.completion is None and not pieces.empty():
                    nxt = pieces.get_nowait()
                    if isinstance(nxt, Piece) and nxt.completion is None:
                        item = _joined(item, nxt)
                    else:
                        pending = nxt
                        break
                yield item
        finally:
            stop.set()
            # The instance goes back to the pool only when its thread is done with it.
            future.add_done_callback(lambda _f: self._free.put_nowait(instance))  # type: ignore[union-attr]

    def _run(
        self, instance: _Instance, request: GenerationInput, stop: threading.Event, emit: Any
    ) -> None:
        """Generate in the instance's thread; hand text to the loop at most every stream_interval_s.

        The first text goes at once (time to first token is unchanged); after that, text
        is batched so that the event loop, gRPC and the reader wake per chunk, not per
        token: on a small device their CPU time competes with inference itself.
        """
        held: Piece | None = None
        last_emit = 0.0
        try:
            for piece in self._generate(instance.llama, request, stop, instance.prefixes):
                if piece.completion is not None:
                    if held is not None:
                        emit(held)
                    emit(piece)
                    continue
                held = piece if held is None else _joined(held, piece)
                now = time.perf_counter()
                if now - last_emit >= self._stream_interval_s:
                    emit(held)
                    held, last_emit = None, now
        except InvalidRequestError as error:
            emit(error)
        except Exception as error:  # noqa: BLE001 - reported to the caller, never lost in a thread
            logger.exception("generation failed")
            emit(error)
        finally:
            emit(_END)

    def _generate(
        self,
        llama: Any,
        request: GenerationInput,
        stop: threading.Event,
        prefixes: PrefixStates | None = None,
    ) -> Iterator[Piece]:
        """Sample token after token (llama.generate), turning them into pieces (TokenText).

        Every sampled token is counted once; the token sampled in place of one backed off
        for healing is sampled on top of max_tokens and not counted, so usage says exactly
        the tokens the answer gained.
        """
        prompt = self._prompt_tokens(llama, request)
        tokens = prompt.tokens
        n_ctx = llama.n_ctx()
        if len(tokens) >= n_ctx:
            raise InvalidRequestError(
                f"the prompt is {len(tokens)} tokens, which does not fit the context window of "
                f"{n_ctx} tokens; shorten the prompt"
            )
        budget = min(request.max_tokens + (1 if prompt.healed else 0), n_ctx - len(tokens))
        text = TokenText(
            lambda ids, context: llama.detokenize(ids, prev_tokens=context),
            tokens,
            prompt.stops,
            healed=prompt.healed,
            with_ids=prompt.own_tokens,
        )
        completion = Completion(prompt_tokens=len(tokens))
        first_at = last_at = 0.0
        finish = "length"
        ends = _ends_generation(llama)
        flags = (stop, self._closing)  # also abort the prompt's evaluation (llama_interrupt)
        if prefixes is not None:  # a warm prefix of an earlier prompt (prefix_states.py)
            prefixes.restore(llama, tokens)
        sampled = llama.generate(tokens, **self._sampling(llama, request))
        kept = prefixes is None
        for token in interruptible(llama, sampled, flags):
            if not kept:  # the prompt is evaluated, nothing sampled evaluated yet: keep it
                prefixes.keep(llama, tokens)  # type: ignore[union-attr]
                kept = True
            if ends(token):
                finish = "stop"
                break
            piece = text.add(token)
            if piece is not None:
                last_at = time.perf_counter()
                first_at = first_at or last_at
                yield piece
            if text.stopped:
                finish = "stop"
                break
            if stop.is_set() or self._closing.is_set():
                finish = "cancelled"
                break
            if text.sampled >= budget:
                break
        if stop.is_set() or self._closing.is_set():  # also when stopped during the prompt
            finish = "cancelled"
        if finish != "cancelled" and (piece := text.flush()) is not None:
            yield piece
        completion.completion_tokens = text.counted
        completion.finish_reason = finish
        completion.decode_s = last_at - first_at
        yield Piece("", completion, text.counted - text.sent_tokens)

    @staticmethod
    def _sampling(llama: Any, request: GenerationInput) -> dict[str, Any]:
        """llama.generate's arguments, as create_completion would pass them (and seed it)."""
        # create_completion's seeding: the request's seed, else one drawn from the last.
        seed = request.seed
        llama.set_seed(seed if seed is not None else random.Random(llama._seed).randint(0, 2**32))
        kwargs: dict[str, Any] = {
            "temp": request.temperature,
            "top_p": request.top_p,
            "top_k": request.top_k,
        }
        if request.json_schema:  # constrained decoding: only JSON matching the schema
            kwargs["grammar"] = _grammar_for_schema(request.json_schema)
        return kwargs


def _joined(first: Piece, second: Piece) -> Piece:
    """Two pieces as one; its ids only where both pieces had the ids of all their tokens."""
    whole = len(first.token_ids) == first.tokens and len(second.token_ids) == second.tokens
    return Piece(
        first.text + second.text,
        tokens=first.tokens + second.tokens,
        token_ids=first.token_ids + second.token_ids if whole else (),
    )


def _ends_generation(llama: Any) -> Any:
    """A function telling whether a token ends generation (end of turn or of text)."""
    import llama_cpp

    vocab = llama._model.vocab
    return lambda token: llama_cpp.llama_vocab_is_eog(vocab, token)


@functools.lru_cache(maxsize=64)
def _grammar_for_schema(json_schema: str) -> Any:
    """A llama.cpp grammar for a JSON schema (cached: agents reuse a few schemas)."""
    from llama_cpp import LlamaGrammar

    try:
        return LlamaGrammar.from_json_schema(json_schema, verbose=False)
    except (ValueError, KeyError, TypeError) as error:  # schema features the converter lacks
        raise InvalidRequestError(f"cannot turn the JSON schema into a grammar: {error}") from None


@dataclass(frozen=True)
class Segment:
    """A piece of a prompt: the template's own text (`special`: control tokens are parsed) or
    text from a request (never)."""

    text: str
    special: bool = True


def _as_text(text: str) -> list[Segment]:
    """Request text (a message, a raw prompt, a continuation) as a segment: never special."""
    return [Segment(text, special=False)] if text else []


def _shown(text: str, limit: int = 40) -> str:
    """`text` as an error message may echo it: repr, cut to `limit` characters."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} chars)"


def _chat_formatter(llama: Any) -> Any:
    """The model's own chat template from its GGUF metadata, or None."""
    template = llama.metadata.get("tokenizer.chat_template")
    if not template:
        return None
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    def token_text(token_id: int) -> str:
        return llama._model.token_get_text(token_id) if token_id != -1 else ""

    eos = token_text(llama.token_eos())
    bos = token_text(llama.token_bos())
    return Jinja2ChatFormatter(
        template=template, eos_token=eos, bos_token=bos, stop_token_ids=[llama.token_eos()]
    )
