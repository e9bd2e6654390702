"""Interrupting llama.cpp while it evaluates a prompt: on cancellation, deadline and shutdown.

Generation stops between tokens: the backend checks its stop flags after each one. A prompt is
evaluated before the first token, one `llama_decode` per batch of up to n_batch tokens, each of
which takes seconds on a small device, with no check in between. llama.cpp asks an abort
callback between the operations of its compute graph, so while `interruptible` waits for the
first chunk a set stop flag ends the evaluation within one operation (milliseconds): decode
returns 2, llama-cpp-python raises RuntimeError, and the stream simply ends. The context keeps
only the batches it finished, and its next evaluation drops what was left half-done, so the
instance serves the next request as if nothing happened.

The callback is asked some hundreds of times per batch, from llama.cpp's thread. A Python
callback would need the GIL each time, and wait for it while the event loop is busy (up to the
5 ms switch interval, seconds per batch under load), so the callback is native: C's `strlen`
over a two-byte buffer [flag, NUL], which returns 1 (true: abort) once a `StopFlag` linked to
it is set and 0 before. Where that cannot be used (another ABI, no C library found, plain
`threading.Event`s) a Python callback checks the flags instead. Armed only until the first
chunk: during decoding it would be asked hundreds of times per token for nothing.

Not interruptible: tokenizing and rendering the chat template (one call each; bounded instead
by the message-count and rendered-size limits checked before them), and evaluation on a backend
that ignores the abort callback (llama.cpp's GPU backends): there, generation stops between
tokens only.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import platform
import threading
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

# ABIs where a `size_t f(const char *)` called as `bool f(void *)` reads the same register
# for its argument and its result (System V x86-64, AAPCS64).
_NATIVE_ABIS = frozenset({"x86_64", "amd64", "aarch64", "arm64"})


T = TypeVar("T")


class _AbortByte:
    """Two bytes [flag, NUL] that llama.cpp reads through `strlen`: 0 until raised, then 1."""

    def __init__(self) -> None:
        self.buffer = ctypes.create_string_buffer(2)

    def raise_flag(self) -> None:
        self.buffer[0] = b"\x01"


class StopFlag(threading.Event):
    """A threading.Event that, once set, also raises the abort bytes linked to it, so native
    code sees it without Python."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._linked: set[_AbortByte] = set()

    def set(self) -> None:
        super().set()
        with self._lock:
            for byte in self._linked:
                byte.raise_flag()

    def _link(self, byte: _AbortByte) -> None:
        with self._lock:
            self._linked.add(byte)
        if self.is_set():
            byte.raise_flag()

    def _unlink(self, byte: _AbortByte) -> None:
        with self._lock:
            self._linked.discard(byte)


@functools.cache
def _abort_api() -> tuple[Any, Any, Any] | None:
    """(`llama_set_abort_callback`, the callback type, native strlen as one or None) from
    llama-cpp-python, or None where this version does not export it (no interrupting)."""
    import llama_cpp

    library = getattr(llama_cpp.llama_cpp, "_lib", None)
    setter = getattr(library, "llama_set_abort_callback", None)
    callback_type = getattr(llama_cpp, "ggml_abort_callback", None)
    if setter is None or callback_type is None:
        return None
    setter.argtypes = [ctypes.c_void_p, callback_type, ctypes.c_void_p]
    setter.restype = None
    native = None
    if platform.machine().lower() in _NATIVE_ABIS:
        try:
            strlen = ctypes.CDLL(None).strlen  # the process's C library
        except (OSError, AttributeError):  # no C library to be found: Python callback
            strlen = None
        if strlen is not None:
            native = callback_type(ctypes.cast(strlen, ctypes.c_void_p).value)
    return setter, callback_type, native


@contextlib.contextmanager
def _armed(llama: Any, flags: Sequence[threading.Event]) -> Iterator[None]:
    """llama.cpp aborts any evaluation of `llama`'s context once one of `flags` is set."""
    api = _abort_api()
    context = getattr(getattr(llama, "_ctx", None), "ctx", None)
    if api is None or context is None:  # an older llama-cpp-python, or a fake in a test
        yield
        return
    setter, callback_type, native = api
    byte = _AbortByte()
    stop_flags = [f for f in flags if isinstance(f, StopFlag)]
    if native is not None and len(stop_flags) == len(flags):
        callback, data = native, ctypes.cast(byte.buffer, ctypes.c_void_p)
    else:  # needs the GIL at each call
        callback = callback_type(lambda _data: any(f.is_set() for f in flags))
        data, stop_flags = None, []
    for flag in stop_flags:
        flag._link(byte)
    setter(context, callback, data)
    try:
        yield
    finally:
        setter(context, callback_type(), None)  # no callback (NULL): llama.cpp's default
        for flag in stop_flags:
            flag._unlink(byte)


def interruptible(llama: Any, chunks: Iterator[T], flags: Sequence[threading.Event]) -> Iterator[T]:
    """`chunks` of `llama.create_completion(..., stream=True)`, with the prompt's evaluation
    (everything before the first chunk) aborted as soon as one of `flags` is set; then the
    stream ends early, without an error."""
    with _armed(llama, flags):
        try:
            first = next(chunks)
        except StopIteration:
            return
        except RuntimeError:  # llama_decode returned 2: aborted by the callback
            if any(flag.is_set() for flag in flags):
                return
            raise
    yield first
    yield from chunks
