"""Inbound keywords: English and Chinese, case- and width-insensitive, single-word rule."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from selfserve.messaging.keywords import classify, guess_locale


@pytest.mark.parametrize(
    ("text", "intent"),
    [
        ("STOP", "opt_out"),
        ("stop", "opt_out"),
        (" Stop. ", "opt_out"),
        ("ＳＴＯＰ", "opt_out"),  # full-width
        ("td", "opt_out"),
        ("TD", "opt_out"),
        ("退订", "opt_out"),
        ("退订。", "opt_out"),
        ("unsubscribe", "opt_out"),
        ("START", "opt_in"),
        ("start!", "opt_in"),
        ("HELP", "help"),
        ("帮助", "help"),
        ("Y", "confirm"),
        ("y", "confirm"),
        ("Ｙ", "confirm"),
        ("C", "confirm"),
        ("确认", "confirm"),
        ("N", "cancel"),
        ("x", "cancel"),
        ("取消", "cancel"),
        ("STATUS", "status"),
        ("查询", "status"),
        ("status?", "status"),
        ("please stop", "unknown"),  # single-word rule: not an opt-out
        ("don't stop my booking", "unknown"),
        ("stop stop", "unknown"),
        ("Y please", "unknown"),
        ("hello", "unknown"),
        ("", "unknown"),
        ("我想改时间", "unknown"),
    ],
)
def test_classify(text: str, intent: str) -> None:
    assert classify(text).intent == intent


@pytest.mark.parametrize(("text", "rating"), [("1", 1), ("5", 5), ("３", 3), (" 4 ", 4)])
def test_ratings_include_full_width_digits(text: str, rating: int) -> None:
    result = classify(text)
    assert result.intent == "rating"
    assert result.rating == rating


@pytest.mark.parametrize("text", ["0", "6", "10", "4.5", "-1"])
def test_other_numbers_are_not_ratings(text: str) -> None:
    assert classify(text).intent == "unknown"


@given(st.text(max_size=40))
def test_text_with_inner_whitespace_is_never_an_opt_out(text: str) -> None:
    padded = f"stop {text} now"
    assert classify(padded).intent == "unknown"


@pytest.mark.parametrize(
    ("text", "intent", "code"),
    [
        ("N K7Q2XM", "cancel", "K7Q2XM"),
        ("n k7q2xm", "cancel", "K7Q2XM"),
        ("取消 K7Q2XM", "cancel", "K7Q2XM"),
        ("取消k7q2xm", "cancel", "K7Q2XM"),
        ("Ｙ　Ｋ７Ｑ２ＸＭ", "confirm", "K7Q2XM"),  # full-width, ideographic space
        ("确认K7Q2XM", "confirm", "K7Q2XM"),
        ("yes K7Q2XM.", "confirm", "K7Q2XM"),
        ("N", "cancel", None),
        ("Y please", "unknown", None),  # not a code (no L in codes)
        ("N K7Q2X", "unknown", None),  # too short
        ("N K7Q2XM now", "unknown", None),
        ("stop K7Q2XM", "unknown", None),  # only Y and N take a code
        ("K7Q2XM", "unknown", None),
    ],
)
def test_a_confirm_or_cancel_may_name_its_booking(text: str, intent: str, code: str | None) -> None:
    result = classify(text)
    assert (result.intent, result.code) == (intent, code)


def test_locale_guess_from_script() -> None:
    assert guess_locale("我想取消预约") == "zh-CN"
    assert guess_locale("cancel my booking") == "en"
    assert guess_locale("") == "en"
