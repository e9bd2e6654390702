"""How the stream-cut benchmark judges a continued answer against the uninterrupted one."""

from __future__ import annotations

import pytest

from bench.cut_streams import judge

pytestmark = pytest.mark.unit

ANSWER = "Once upon a time, there was a dragon named Zorath who guarded a mountain of gold."


def test_a_seamless_continuation_is_equal():
    assert judge(ANSWER, ANSWER[:20], ANSWER[20:]).kind == "equal"


def test_text_sent_again_after_the_cut_is_duplicated():
    verdict = judge(ANSWER, ANSWER[:30], ANSWER[24:])
    assert verdict.kind == "duplicated" and verdict.duplicated_chars == 6


def test_text_skipped_at_the_cut_is_missing():
    verdict = judge(ANSWER, ANSWER[:30], ANSWER[35:])
    assert verdict.kind == "missing" and verdict.missing_chars == 5


def test_other_words_after_a_clean_seam_are_drift():
    assert judge(ANSWER, ANSWER[:30], ANSWER[30:50] + " and a sea of silver.").kind == "drift"
    assert judge(ANSWER, ANSWER[:30], " who sang to the moon.").kind == "drift"
