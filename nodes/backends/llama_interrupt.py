"""Interrupting llama.cpp while it evaluates a prompt: on cancellation, deadline and shutdown.

Generation stops between tokens: the backend checks its stop flags after each one. A prompt is
evaluated before the first token, one `llama_decode` per batch of up to n_batch tokens, each of
which takes seconds on a small device, with no check in between. llama.cpp asks an abort
callback between the operations of its compute graph, so while `interruptible` waits for the
first chunk a set stop flag ends the evaluation within one operation (milliseconds): decode
returns 2, llama-cpp-python raises RuntimeError, and the stream simply ends. The context keeps
only the batches it finished, and its next evaluation drops what was left half-done, so the
instance serves the next request as if nothing happened. The callback is armed only until the
first chunk: while decoding it would be called some hundreds of times per token.

Not interruptible: tokenizing and rendering the chat template (one call each; bounded instead
by the message-count and rendered-size limits checked before them), and evaluation on a backend
that ignores the abort callback (llama.cpp's GPU backends): there, generation stops between
tokens only.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Callable, Iterator
from typing import Any

ShouldStop = Callable[[], bool]


@functools.cache
def _abort_setter() -> tuple[Any, Any] | None:
    """(`llama_set_abort_callback`, its callback type) from llama-cpp-python's library, or None
    where this version does not export it (then prompts are not interruptible)."""
    import llama_cpp

    library = getattr(llama_cpp.llama_cpp, "_lib", None)
    setter = getattr(library, "llama_set_abort_callback", None)
    callback_type = getattr(llama_cpp, "ggml_abort_callback", None)
    if setter is None or callback_type is None:
        return None
    setter.argtypes = [ctypes.c_void_p, callback_type, ctypes.c_void_p]
    setter.restype = None
    return setter, callback_type


@contextlib.contextmanager
def _armed(llama: Any, should_stop: ShouldStop) -> Iterator[None]:
    """llama.cpp aborts any evaluation of `llama`'s context once `should_stop()` is true."""
    found = _abort_setter()
    context = getattr(getattr(llama, "_ctx", None), "ctx", None)
    if found is None or context is None:  # an older llama-cpp-python, or a fake in a test
        yield
        return
    setter, callback_type = found
    callback = callback_type(lambda _data: bool(should_stop()))  # alive while armed
    setter(context, callback, None)
    try:
        yield
    finally:
        setter(context, callback_type(), None)  # no callback: NULL, llama.cpp's default


def interruptible(
    llama: Any, chunks: Iterator[dict[str, Any]], should_stop: ShouldStop
) -> Iterator[dict[str, Any]]:
    """`chunks` of `llama.create_completion(..., stream=True)`, with the prompt's evaluation
    (everything before the first chunk) aborted as soon as `should_stop()` is true; then the
    stream ends early, without an error."""
    with _armed(llama, should_stop):
        try:
            first = next(chunks)
        except StopIteration:
            return
        except RuntimeError:  # llama_decode returned 2: aborted by the callback
            if should_stop():
                return
            raise
    yield first
    yield from chunks
