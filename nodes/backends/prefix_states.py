"""Warm prefixes: the KV state of recent prompts, so that a prompt sharing a long prefix with one
of them evaluates only what differs.

An agent's prompt is a long fixed prefix (system prompt, tool list, worked example: some
hundreds of tokens) and a short request. llama.cpp already reuses the part of its context that
the next prompt shares, but one context serves every agent in turn, so the prefix of the agent
that ran before last is gone. After a prompt is evaluated its sequence state (the KV cells of
the prompt's tokens: about 12 KB a token for the bundled model, with a q8_0 cache) is kept
here; before a prompt is evaluated, the kept state that shares the longest prefix with it is
put back when that beats what the context holds already. llama.cpp then evaluates only the
rest (llama_cpp.Llama.generate keeps the common prefix of its context).

Bounded by `capacity_bytes` (least recently used first out), one per llama.cpp context, freed
with the model. Restoring costs about a millisecond; evaluating 300 tokens on 2 cores, seconds.
"""

from __future__ import annotations

import ctypes
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

_SEQUENCE = 0  # llama-cpp-python runs everything as sequence 0


@dataclass
class _Kept:
    ids: np.ndarray  # the prompt's tokens
    data: Any  # ctypes buffer of the sequence state
    size: int


def common_prefix(a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray) -> int:
    """How many leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    same = np.asarray(a[:n]) == np.asarray(b[:n])
    return n if bool(same.all()) else int(np.argmin(same))


class PrefixStates:
    """Kept KV states of one llama.cpp context's recent prompts, by their tokens."""

    def __init__(self, capacity_bytes: int, *, min_tokens: int = 32) -> None:
        self.capacity_bytes = capacity_bytes
        self.min_tokens = min_tokens  # shorter shared prefixes are not worth a restore
        self._kept: OrderedDict[int, _Kept] = OrderedDict()
        self._next = 0
        self.bytes = 0
        self.restored = 0  # how many prompts started from a kept state (tests, Describe)

    def __len__(self) -> int:
        return len(self._kept)

    def restore(self, llama: Any, tokens: Sequence[int]) -> int:
        """Put back the kept state sharing the longest prefix with `tokens`, if it shares more
        than the context holds now; the tokens it saves evaluating (0: none restored)."""
        if not self._kept:
            return 0
        held = common_prefix(llama.input_ids[: llama.n_tokens], tokens)
        key, shared = max(
            ((k, common_prefix(kept.ids, tokens)) for k, kept in self._kept.items()),
            key=lambda item: item[1],
        )
        if shared < self.min_tokens or shared <= held:
            return 0
        kept = self._kept[key]
        import llama_cpp

        context = llama._ctx.ctx
        if hasattr(llama_cpp, "llama_get_memory"):  # empty the sequence before filling it
            llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(context), _SEQUENCE, -1, -1)
        if llama_cpp.llama_state_seq_set_data(context, kept.data, kept.size, _SEQUENCE) == 0:
            logger.warning("llama.cpp refused a kept prefix state; evaluating the prompt whole")
            llama.n_tokens = 0
            return 0
        n = len(kept.ids)
        llama.input_ids[:n] = kept.ids
        llama.n_tokens = n
        llama._requires_eval = True  # logits are not in the state: evaluate at least one token
        self._kept.move_to_end(key)
        self.restored += 1
        return shared

    def keep(self, llama: Any, tokens: Sequence[int]) -> None:
        """Keep the state of the context, which holds exactly `tokens` evaluated (call when the
        prompt's first token is sampled), unless a kept state already covers them."""
        n = len(tokens)
        if n < self.min_tokens or llama.n_tokens != n:
            return
        for key, kept in self._kept.items():
            if len(kept.ids) >= n and common_prefix(kept.ids, tokens) >= n:
                self._kept.move_to_end(key)
                return  # already kept, as this prompt or a longer one
        import llama_cpp

        context = llama._ctx.ctx
        size = int(llama_cpp.llama_state_seq_get_size(context, _SEQUENCE))
        if size <= 0 or size > self.capacity_bytes:
            return
        data = (ctypes.c_uint8 * size)()
        written = int(llama_cpp.llama_state_seq_get_data(context, data, size, _SEQUENCE))
        if written <= 0:
            return
        self._kept[self._next] = _Kept(np.array(tokens, dtype=np.intc), data, written)
        self._next += 1
        self.bytes += written
        while self.bytes > self.capacity_bytes and self._kept:
            _key, oldest = self._kept.popitem(last=False)
            self.bytes -= oldest.size

    def clear(self) -> None:
        self._kept.clear()
        self.bytes = 0
