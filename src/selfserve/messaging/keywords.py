"""Inbound SMS keywords, English and Chinese: pure classification, no I/O.

Text is NFKC-normalised (full-width "ＳＴＯＰ" or "１" read as "STOP" and "1"),
trimmed of spaces and punctuation and case-folded. Opt-out and opt-in follow the
single-word rule: only a message that is the keyword alone counts, so "don't stop
my booking" never unsubscribes anyone. A confirm or cancel keyword may be followed by
a booking code ("N K7Q2XM", "取消 K7Q2XM") to say which booking it is about.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Literal

Intent = Literal["opt_out", "opt_in", "help", "confirm", "cancel", "rating", "status", "unknown"]

OPT_OUT = frozenset({"stop", "stopall", "unsubscribe", "end", "quit", "td", "退订", "退定"})
OPT_IN = frozenset({"start", "unstop", "subscribe", "订阅"})
HELP = frozenset({"help", "info", "帮助"})
CONFIRM = frozenset({"y", "yes", "c", "confirm", "确认", "是"})
CANCEL = frozenset({"n", "no", "x", "取消"})
STATUS = frozenset({"status", "查询"})
RATINGS = frozenset({"1", "2", "3", "4", "5"})

CJK_KEYWORDS = ("确认", "是", "取消")
# A booking code as bookings are given them (no 0/O, 1/I/L), case-insensitive.
BOOKING_CODE = re.compile(r"[abcdefghjkmnpqrstuvwxyz2-9]{6}")

_TRIM = " \t\r\n.,!?;:'\"()[]{}<>~*#。，！？；：、“”‘’（）【】《》…·"


@dataclass(frozen=True)
class Classified:
    intent: Intent
    token: str
    rating: int | None = None
    code: str | None = None  # the booking a confirm or cancel names (upper case)


def normalise(text: str) -> str:
    return unicodedata.normalize("NFKC", text).strip(_TRIM).casefold()


def _with_code(token: str) -> Classified | None:
    """ "<confirm or cancel keyword> <booking code>" (Chinese keywords also without the
    space, "取消K7Q2XM"): which booking the answer is about."""
    words = token.split()
    if len(words) != 2:
        words = next(
            (
                [k, token[len(k) :]]
                for k in CJK_KEYWORDS
                if token.startswith(k) and " " not in token
            ),
            words,
        )
    if len(words) != 2 or not BOOKING_CODE.fullmatch(words[1]):
        return None
    keyword = words[0].strip(_TRIM)
    if keyword in CONFIRM:
        return Classified("confirm", token, code=words[1].upper())
    if keyword in CANCEL:
        return Classified("cancel", token, code=words[1].upper())
    return None


def classify(text: str) -> Classified:
    token = normalise(text)
    named = _with_code(token)
    if named is not None:
        return named
    if " " in token or "\n" in token:
        # Several words: never a keyword (single-word rule), kept for a person to read.
        return Classified("unknown", token)
    if token in OPT_OUT:
        return Classified("opt_out", token)
    if token in OPT_IN:
        return Classified("opt_in", token)
    if token in HELP:
        return Classified("help", token)
    if token in CONFIRM:
        return Classified("confirm", token)
    if token in CANCEL:
        return Classified("cancel", token)
    if token in STATUS:
        return Classified("status", token)
    if token in RATINGS:
        return Classified("rating", token, rating=int(token))
    return Classified("unknown", token)


def guess_locale(text: str) -> str:
    """Language of an unknown sender, from the script of what they wrote."""
    for ch in text:
        if "\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf":
            return "zh-CN"
    return "en"
