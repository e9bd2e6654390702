"""Text from sampled tokens, piece by piece, with the tokens behind each piece.

`TokenText` turns the token ids a model samples into the pieces a node streams. It holds text
back while it may still change: bytes of a character not complete yet, the start of a stop
string, and, for a continuation from text, what the model regenerates of the token backed off
for healing (see `nodes.backends.llama`). Every piece says how many tokens it carries, so the
counts of an answer's pieces add up to its usage; and, where the tokens continue the prompt
token for token, their ids, which a continuation on the same model file passes back.

No llama.cpp here: `detokenize(ids, prev_ids) -> bytes` is handed in, so it is tested without
a model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from nodes.backends import Piece

Detokenize = Callable[[list[int], list[int]], bytes]

_MAX_CHAR_TOKENS = 4  # a UTF-8 character spans at most 4 bytes, so at most 4 byte tokens


class TokenText:
    """Pieces of an answer as its tokens are sampled: `add` each token, then `flush`."""

    def __init__(
        self,
        detokenize: Detokenize,
        prompt_ids: Sequence[int],
        stops: Sequence[str] = (),
        *,
        healed: str = "",
        with_ids: bool = True,
    ) -> None:
        """`healed`: text the caller already has, backed off from the end of the prompt: what
        the model regenerates of it is dropped, and the one token sampled in place of the
        backed-off one is not counted (it is not a new token). `with_ids`: the prompt is the
        request's own tokens (no retokenized text), so pieces may carry their ids."""
        self._detokenize = detokenize
        self._context = list(prompt_ids)  # prompt and every token already sent
        self._stops = [s for s in stops if s]
        self._healed = healed  # until the regenerated text has passed it
        self._heals = bool(healed)
        self._uncounted = 1 if healed else 0  # not yet taken off a piece's count
        self._with_ids = with_ids
        self._pending: list[int] = []  # sampled, not sent yet
        self._skip = 0  # characters of the pending text the caller already has
        self.sampled = 0
        self.sent_tokens = 0  # counted tokens the pieces so far carried
        self.stopped = False  # a stop string was reached: the answer ends before it

    @property
    def counted(self) -> int:
        """New tokens of the answer so far: its completion_tokens."""
        return max(0, self.sampled - (1 if self._heals else 0))

    def add(self, token: int) -> Piece | None:
        """The piece `token` completes, if any (None: its text is held back for now)."""
        self.sampled += 1
        self._pending.append(token)
        text = self._pending_text(final=False)
        if text is None:
            return None
        found = [text.index(s) for s in self._stops if s in text]
        if not found:
            return self._emit(text)
        # The answer ends before the stop string. Its tokens are counted, but the text shown
        # is not what they spell, so the piece carries no ids.
        self.stopped = True
        self._pending = []
        head = text[: min(found)]
        if not head:
            return None
        tokens = self.counted - self.sent_tokens
        self.sent_tokens += tokens
        return Piece(head, tokens=tokens)

    def flush(self) -> Piece | None:
        """What is still held once the answer ends (not at a stop string: nothing follows one)."""
        if self.stopped or not self._pending:
            return None
        text = self._pending_text(final=True)
        if not text:
            return None
        return self._emit(text, final=True)

    # ------------------------------------------------------------------ internals

    def _pending_text(self, *, final: bool) -> str | None:
        """The new text of the pending tokens; None while it cannot be shown yet."""
        raw = self._detokenize(self._pending, self._context)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            if not final and len(self._pending) < _MAX_CHAR_TOKENS:
                return None  # the rest of a character is still to come
            text = raw.decode("utf-8", errors="ignore")
        if self._healed:
            if len(text) < len(self._healed) and self._healed.startswith(text):
                return "" if final else None  # still inside the text the caller has
            self._skip = _common_prefix(text, self._healed)
            self._healed = ""
        return text[self._skip :]

    def _emit(self, text: str, *, final: bool = False) -> Piece | None:
        if not final and any(text.endswith(s[:i]) for s in self._stops for i in range(1, len(s))):
            return None  # may be the start of a stop string
        tokens = len(self._pending) - self._uncounted
        if not text or (tokens < 1 and not final):
            return None  # no text yet, or only the uncounted token's: it goes with the next
        self._uncounted = 0
        ids = tuple(self._pending) if self._with_ids else ()
        self._context += self._pending
        self._pending, self._skip = [], 0
        self.sent_tokens += max(0, tokens)
        return Piece(text, tokens=max(0, tokens), token_ids=ids)


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
