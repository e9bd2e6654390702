"""GGUF models through llama-cpp-python.

A llama.cpp context is not safe for concurrent calls, so each instance has one
worker thread and requests for it are serialised; `instances` > 1 loads more
contexts over the same (memory-mapped) weights. Tokens travel from the worker
thread to the event loop through `call_soon_threadsafe`; closing the async
iterator sets a flag the worker checks after every token, and llama.cpp checks
while it evaluates the prompt (`llama_interrupt`), so a cancelled or timed-out
request stops at once and frees its instance. What a request may cost before
that is bounded: the rendered prompt's size is checked before tokenizing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import AsyncGenerator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mesh.core.errors import InvalidRequestError, ModelLoadError
from nodes.backends import Completion, GenerationInput, ModelDescriptor, ModelStatus, Piece
from nodes.backends.llama_interrupt import StopFlag, interruptible
from nodes.model_files import resolve_gguf

logger = logging.getLogger(__name__)

_END = object()


class _Instance:
    """One llama.cpp context and the single thread allowed to use it."""

    def __init__(self, llama: Any, index: int) -> None:
        self.llama = llama
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama-{index}")


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
    ) -> None:
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
        self._control_texts: tuple[str, ...] = ()
        self._closing = StopFlag()  # set by close(): every generation stops

    # ------------------------------------------------------------------ loading

    async def load(self) -> None:
        self.status = ModelStatus.LOADING
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
            )
            for index in range(self._instance_count):
                llama = await asyncio.to_thread(self._load_one, str(resolved.path))
                self._instances.append(_Instance(llama, index))
        except ModelLoadError as error:
            self.status, self.error = ModelStatus.FAILED, str(error)
            raise
        self._formatter = _chat_formatter(self._instances[0].llama)
        self._control_texts = await asyncio.to_thread(
            _control_token_texts, self._instances[0].llama
        )
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

    def render_prompt(self, request: GenerationInput) -> tuple[str, list[str]]:
        """The text the model sees (chat template applied, then any continuation) and stop strings."""
        stops = list(request.stop)
        if request.raw:
            return request.prompt + request.continuation, stops
        if self._formatter is None:
            text = "".join(f"{m.role}: {m.content}\n" for m in request.messages)
            return text + "assistant: " + request.continuation, stops + ["\nuser:"]
        # Text from users and tools must not smuggle in control tokens (a forged
        # "<|im_start|>system" turn): the rendered prompt is tokenized with special
        # tokens parsed, so they are removed from message contents first.
        messages = [
            {"role": m.role, "content": self._strip_control(m.content)} for m in request.messages
        ]
        if self._system_prompt and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": self._system_prompt})
        response = self._formatter(messages=messages)
        template_stops = response.stop if isinstance(response.stop, list) else [response.stop]
        stops += [s for s in template_stops if s and s not in stops]
        return response.prompt + request.continuation, stops

    def _check_rendered(self, prompt: str) -> None:
        limit = self._max_rendered_bytes
        size = len(prompt.encode("utf-8")) if limit is not None else 0
        if limit is not None and size > limit:
            raise InvalidRequestError(
                f"the rendered prompt is {size} bytes, over this node's limit of {limit}; "
                "send fewer or shorter messages"
            )

    def _strip_control(self, text: str) -> str:
        for control in self._control_texts:
            if control in text:
                text = text.replace(control, "")
        return text

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

        future = loop.run_in_executor(
            instance.executor, self._run, instance.llama, request, stop, emit
        )
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
                text, completion, count = item.text, item.completion, item.tokens
                while completion is None and not pieces.empty():
                    nxt = pieces.get_nowait()
                    if isinstance(nxt, Piece) and nxt.completion is None:
                        text += nxt.text
                        count += nxt.tokens
                    else:
                        pending = nxt
                        break
                yield Piece(text, completion, count)
        finally:
            stop.set()
            # The instance goes back to the pool only when its thread is done with it.
            future.add_done_callback(lambda _f: self._free.put_nowait(instance))  # type: ignore[union-attr]

    def _run(self, llama: Any, request: GenerationInput, stop: threading.Event, emit: Any) -> None:
        """Generate in the instance's thread; hand text to the loop at most every stream_interval_s.

        The first text goes at once (time to first token is unchanged); after that, text
        is batched so that the event loop, gRPC and the reader wake per chunk, not per
        token: on a small device their CPU time competes with inference itself.
        """
        held, held_tokens = "", 0
        last_emit = 0.0
        try:
            for piece in self._generate(llama, request, stop):
                if piece.completion is not None:
                    if held:
                        emit(Piece(held, tokens=held_tokens))
                    emit(piece)
                    continue
                held += piece.text
                held_tokens += piece.tokens
                now = time.perf_counter()
                if now - last_emit >= self._stream_interval_s:
                    emit(Piece(held, tokens=held_tokens))
                    held, held_tokens, last_emit = "", 0, now
        except InvalidRequestError as error:
            emit(error)
        except Exception as error:  # noqa: BLE001 - reported to the caller, never lost in a thread
            logger.exception("generation failed")
            emit(error)
        finally:
            emit(_END)

    def _generate(
        self, llama: Any, request: GenerationInput, stop: threading.Event
    ) -> Iterator[Piece]:
        prompt, stops = self.render_prompt(request)
        self._check_rendered(prompt)  # before tokenizing, whose cost grows faster than its input
        tokens = llama.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        n_ctx = llama.n_ctx()
        if len(tokens) >= n_ctx:
            raise InvalidRequestError(
                f"the prompt is {len(tokens)} tokens, which does not fit the context window of "
                f"{n_ctx} tokens; shorten the prompt"
            )
        # Token healing for continuations: the text so far may end inside what the
        # model would have produced as one token (e.g. a trailing space). Back off
        # the last token and drop its text again from what the model regenerates.
        healed = ""
        if request.continuation and len(tokens) > 1:
            healed = llama.detokenize(tokens[-1:]).decode("utf-8", errors="ignore")
            tokens = tokens[:-1]
        max_tokens = min(request.max_tokens + (1 if healed else 0), n_ctx - len(tokens))
        kwargs: dict[str, Any] = {
            "max_tokens": max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "top_k": request.top_k,
            "stop": stops or None,
            "stream": True,
        }
        if request.seed is not None:
            kwargs["seed"] = request.seed
        if request.json_schema:  # constrained decoding: only JSON matching the schema
            kwargs["grammar"] = _grammar_for_schema(request.json_schema)
        completion = Completion(prompt_tokens=len(tokens))
        first_at = last_at = 0.0
        finish = "length"
        pending = ""  # text held back until the healed prefix is matched
        unsent = 0  # tokens sampled since the last piece (some carry no text yet)
        flags = (stop, self._closing)
        for chunk in interruptible(llama, llama.create_completion(tokens, **kwargs), flags):
            choice = chunk["choices"][0]
            text = choice.get("text") or ""
            if text or not choice.get("finish_reason"):  # one chunk per sampled token
                completion.completion_tokens += 1
                unsent += 1
            if text:
                last_at = time.perf_counter()
                first_at = first_at or last_at
                if healed:
                    pending += text
                    if len(pending) < len(healed) and healed.startswith(pending):
                        text = ""
                    else:
                        text = pending[_common_prefix(pending, healed) :]
                        healed = pending = ""
                if text:
                    yield Piece(text, tokens=unsent)
                    unsent = 0
            if choice.get("finish_reason"):
                finish = choice["finish_reason"]
            if stop.is_set() or self._closing.is_set():
                finish = "cancelled"
                break
        if stop.is_set() or self._closing.is_set():  # also when stopped during the prompt
            finish = "cancelled"
        completion.finish_reason = finish
        completion.decode_s = last_at - first_at
        yield Piece("", completion, unsent)


@functools.lru_cache(maxsize=64)
def _grammar_for_schema(json_schema: str) -> Any:
    """A llama.cpp grammar for a JSON schema (cached: agents reuse a few schemas)."""
    from llama_cpp import LlamaGrammar

    try:
        return LlamaGrammar.from_json_schema(json_schema, verbose=False)
    except (ValueError, KeyError, TypeError) as error:  # schema features the converter lacks
        raise InvalidRequestError(f"cannot turn the JSON schema into a grammar: {error}") from None


def _control_token_texts(llama: Any) -> tuple[str, ...]:
    """The texts of the model's control tokens (e.g. "<|im_start|>"), longest first."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llama._model.model)
    texts = set()
    for token in range(llama_cpp.llama_vocab_n_tokens(vocab)):
        if llama_cpp.llama_vocab_get_attr(vocab, token) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL:
            text = llama._model.token_get_text(token)
            if len(text) > 1:
                texts.add(text)
    return tuple(sorted(texts, key=len, reverse=True))


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


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
