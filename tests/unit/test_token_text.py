"""Pieces from sampled tokens (nodes.backends.token_text), with a toy vocabulary instead of a
model: held-back text, stop strings, token healing, and counts that add up to the usage."""

from __future__ import annotations

import pytest

from nodes.backends.token_text import TokenText

pytestmark = pytest.mark.unit

VOCAB = {
    1: b"Once",
    2: b" upon",
    3: b" a",
    4: b" time",
    5: b" ",
    6: b"\xc3",  # the two bytes of "\u00e9", one token each
    7: b"\xa9",
    8: b"\n",
    9: b"user",
    10: b":",
    11: b" w",
    12: b"or",
    13: b"ld",
    14: b"",  # a control token: no text
}
PROMPT = [100, 101]


def detokenize(ids: list[int], _context: list[int]) -> bytes:
    return b"".join(VOCAB[i] for i in ids)


def run(text: TokenText, tokens: list[int]):
    pieces = [p for t in tokens if (p := text.add(t)) is not None]
    if (last := text.flush()) is not None:
        pieces.append(last)
    return pieces


def test_each_piece_carries_its_tokens_and_their_ids():
    text = TokenText(detokenize, PROMPT)
    pieces = run(text, [1, 2, 3, 4])
    assert [(p.text, p.tokens, p.token_ids) for p in pieces] == [
        ("Once", 1, (1,)),
        (" upon", 1, (2,)),
        (" a", 1, (3,)),
        (" time", 1, (4,)),
    ]
    assert text.counted == text.sent_tokens == 4


def test_a_character_split_over_tokens_waits_for_its_last_byte():
    text = TokenText(detokenize, PROMPT)
    assert text.add(6) is None
    piece = text.add(7)
    assert piece is not None and (piece.text, piece.tokens, piece.token_ids) == (
        "\u00e9",
        2,
        (6, 7),
    )


def test_a_token_without_text_goes_with_the_next_piece():
    text = TokenText(detokenize, PROMPT)
    assert text.add(14) is None
    piece = text.add(1)
    assert piece is not None and (piece.text, piece.tokens, piece.token_ids) == ("Once", 2, (14, 1))


def test_a_stop_string_ends_the_answer_before_it_and_its_tokens_still_count():
    text = TokenText(detokenize, PROMPT, stops=["\nuser:"])
    pieces = run(text, [1, 8, 9, 10])
    assert [p.text for p in pieces] == ["Once"]  # "\n" and "user" were held: a stop may start
    assert text.stopped and text.counted == 4 and text.sent_tokens == 1


def test_text_held_as_a_possible_stop_goes_out_when_it_is_not_one():
    text = TokenText(detokenize, PROMPT, stops=["\nuser:"])
    pieces = run(text, [1, 8, 2])
    assert [(p.text, p.tokens) for p in pieces] == [("Once", 1), ("\n upon", 2)]


def test_healing_drops_the_regenerated_text_and_does_not_count_its_token():
    """The prompt's last token (" ") was backed off: the model samples " a" in its place. "a"
    is new text, but " a" is not a new token: it goes out with the next one, as 1 token."""
    text = TokenText(detokenize, PROMPT, healed=" ", with_ids=False)
    assert text.add(3) is None
    piece = text.add(4)
    assert piece is not None and (piece.text, piece.tokens, piece.token_ids) == ("a time", 1, ())
    assert text.counted == 1


def test_healing_over_several_tokens_waits_until_the_healed_text_has_passed():
    text = TokenText(detokenize, PROMPT, healed=" wor", with_ids=False)
    assert text.add(11) is None  # " w": still inside " wor"
    assert text.add(12) is None  # " wor": exactly what the caller has
    piece = text.add(13)
    assert piece is not None and (piece.text, piece.tokens) == ("ld", 2)
    assert text.counted == 2


def test_a_healed_answer_that_ends_at_once_counts_nothing():
    text = TokenText(detokenize, PROMPT, healed=" ", with_ids=False)
    assert run(text, []) == [] and text.counted == 0
    text = TokenText(detokenize, PROMPT, healed=" ", with_ids=False)
    pieces = run(text, [3])  # only the healing token, with new text: shown, counted as none
    assert [(p.text, p.tokens) for p in pieces] == [("a", 0)] and text.counted == 0
