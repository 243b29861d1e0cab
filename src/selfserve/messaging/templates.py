"""SMS templates per locale (channels/sms/<locale>.toml), rendered at enqueue time
(and again, while still pending, when their cause changes: see `rewrite_messages`).

Every template declares its placeholders here; a locale file that misses a key or
uses a placeholder the code does not pass is refused when templates are loaded.
"""

from __future__ import annotations

import math
import string
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

from selfserve.paths import project_dir

LOCALES: tuple[str, ...] = ("zh-CN", "en")
DEFAULT_LOCALE = "en"

# Template key -> the placeholders it must use (and may only use).
PLACEHOLDERS: dict[str, frozenset[str]] = {
    "sign_in_code": frozenset({"code", "minutes"}),
    "booking_confirmation": frozenset({"service", "branch", "local_time", "code"}),
    "reminder": frozenset({"service", "branch", "local_time", "code"}),
    "confirm_request": frozenset({"service", "local_time", "code"}),
    "booking_confirmed_reply": frozenset({"service", "local_time", "code"}),
    "booking_cancelled_reply": frozenset({"service", "local_time", "code"}),
    "booking_checked_in_reply": frozenset({"service", "local_time", "code"}),
    "booking_choose_reply": frozenset({"bookings", "example"}),
    "waitlist_offer": frozenset({"service", "branch", "local_time", "minutes"}),
    "ticket_called": frozenset({"ticket", "counter"}),
    "turn_near": frozenset({"ticket", "ahead"}),
    "turn_near_next": frozenset({"ticket"}),
    "survey": frozenset({"branch"}),
    "opt_out_reply": frozenset(),
    "opt_in_reply": frozenset(),
    "help_reply": frozenset(),
    "received_reply": frozenset(),
    "waitlist_declined_reply": frozenset({"service"}),
    "queue_status_reply": frozenset({"ticket", "ahead", "eta"}),
    "queue_status_next_reply": frozenset({"ticket", "eta"}),
    "queue_status_none_reply": frozenset(),
    "survey_thanks_reply": frozenset(),
    "ticket_closed": frozenset({"ticket", "branch"}),
    "booking_cancelled_by_branch": frozenset({"service", "branch", "local_time", "code"}),
    "booking_moved_by_branch": frozenset({"service", "branch", "local_time", "code"}),
}

# GSM 03.38 default alphabet; the extension table costs two septets per character.
GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION = frozenset("^{}\\[~]|€\f")


class TemplateError(Exception):
    pass


@dataclass(frozen=True)
class RenderedSms:
    body: str
    encoding: Literal["GSM-7", "UCS-2"]
    segments: int


def sms_encoding(text: str) -> tuple[Literal["GSM-7", "UCS-2"], int]:
    """The encoding a phone network uses for `text` and how many SMS segments it takes.

    GSM-7: 160 septets in one message, 153 per part when concatenated.
    UCS-2: 70 UTF-16 code units in one message, 67 per part (characters outside the
    BMP, such as most emoji, take two units).
    """
    if all(ch in GSM7_BASIC or ch in GSM7_EXTENSION for ch in text):
        septets = sum(2 if ch in GSM7_EXTENSION else 1 for ch in text)
        return "GSM-7", 1 if septets <= 160 else math.ceil(septets / 153)
    units = len(text.encode("utf-16-le")) // 2
    return "UCS-2", 1 if units <= 70 else math.ceil(units / 67)


def placeholders_of(text: str) -> set[str]:
    names: set[str] = set()
    for _, field, spec, conversion in string.Formatter().parse(text):
        if field is None:
            continue
        if not field.isidentifier() or spec or conversion:
            raise TemplateError(f"placeholder {{{field}}} must be a plain name")
        names.add(field)
    return names


def load_locale(path: Path) -> dict[str, str]:
    """Read and check one locale file: every key present, placeholders exact."""
    with path.open("rb") as fh:
        data = tomllib.load(fh)
    locale = path.stem
    problems: list[str] = []
    for key, wanted in PLACEHOLDERS.items():
        text = data.get(key)
        if not isinstance(text, str) or not text.strip():
            problems.append(f"{locale}: missing template {key!r}")
            continue
        used = placeholders_of(text)
        if used != wanted:
            missing, unknown = sorted(wanted - used), sorted(used - wanted)
            problems.append(f"{locale}.{key}: missing {missing}, unknown {unknown}")
    for key in data:
        if key not in PLACEHOLDERS:
            problems.append(f"{locale}: unknown template {key!r}")
    if problems:
        raise TemplateError("; ".join(problems))
    return {k: str(v) for k, v in data.items()}


@cache
def catalogue(directory: Path | None = None) -> Mapping[str, Mapping[str, str]]:
    root = directory or project_dir("channels") / "sms"
    out: dict[str, Mapping[str, str]] = {}
    for locale in LOCALES:
        out[locale] = load_locale(root / f"{locale}.toml")
    return out


def pick_locale(locale: str | None) -> str:
    """Customer locale -> a locale we have templates for (zh, zh-Hans… -> zh-CN)."""
    if locale:
        if locale in LOCALES:
            return locale
        if locale.lower().startswith("zh"):
            return "zh-CN"
    return DEFAULT_LOCALE


def render(key: str, locale: str | None, **params: object) -> RenderedSms:
    if key not in PLACEHOLDERS:
        raise TemplateError(f"unknown template {key!r}")
    wanted = PLACEHOLDERS[key]
    given = set(params)
    if given != wanted:
        raise TemplateError(
            f"{key}: missing {sorted(wanted - given)}, unexpected {sorted(given - wanted)}"
        )
    text = catalogue()[pick_locale(locale)][key].format(**params)
    encoding, segments = sms_encoding(text)
    return RenderedSms(body=text, encoding=encoding, segments=segments)
