"""SMS templates: every locale complete and exact, segment counts right at the edges."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from selfserve.messaging.templates import (
    GSM7_BASIC,
    LOCALES,
    PLACEHOLDERS,
    TemplateError,
    catalogue,
    load_locale,
    pick_locale,
    render,
    sms_encoding,
)
from selfserve.paths import project_dir

SAMPLE = {
    "code": "482913",
    "minutes": 5,
    "service": "Open an account",
    "branch": "Holborn",
    "local_time": "Tue 3 Mar 10:30",
    "ticket": "A023",
    "counter": "Counter 4",
    "ahead": 2,
    "eta": "10-15 min",
    "bookings": "K7Q2XM Open an account 2027-03-02 10:30; P3RT9W Open an account 2027-03-04 09:00",
    "example": "K7Q2XM",
}


def test_a_called_ticket_hears_the_counters_display_name_as_it_is() -> None:
    assert render("ticket_called", "en", ticket="A023", counter="Counter 1").body == (
        "Ticket A023: please go to Counter 1 now."
    )
    assert render("ticket_called", "zh-CN", ticket="A023", counter="3号窗口").body == (
        "请A023号到3号窗口办理。"
    )
    assert render("ticket_called", "zh-CN", ticket="A023", counter="Counter 1").body == (
        "请A023号到Counter 1办理。"
    )


@pytest.mark.parametrize("locale", LOCALES)
def test_the_next_in_line_is_told_they_are_next_not_zero_ahead(locale: str) -> None:
    near = render("turn_near_next", locale, ticket="A023").body
    status = render("queue_status_next_reply", locale, ticket="A023", eta="5 min").body
    for body in (near, status):
        assert "0" not in body.replace("A023", "")
        assert ("you are next" if locale == "en" else "下一位就是您") in body


def test_every_locale_has_every_template_with_exact_placeholders() -> None:
    loaded = catalogue()
    assert set(loaded) == set(LOCALES) == {"zh-CN", "en"}
    for locale in LOCALES:
        assert set(loaded[locale]) == set(PLACEHOLDERS)


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("key", sorted(PLACEHOLDERS))
def test_each_template_renders_fully(locale: str, key: str) -> None:
    params = {name: SAMPLE[name] for name in PLACEHOLDERS[key]}
    sms = render(key, locale, **params)
    assert "{" not in sms.body
    assert "}" not in sms.body
    for value in params.values():
        assert str(value) in sms.body
    assert sms.segments >= 1
    if locale == "zh-CN":
        assert sms.encoding == "UCS-2"


def test_english_templates_fit_gsm7_and_one_or_two_segments() -> None:
    for key, names in PLACEHOLDERS.items():
        sms = render(key, "en", **{n: SAMPLE[n] for n in names})
        assert sms.encoding == "GSM-7", key
        assert sms.segments <= 2, key


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "en.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _complete_file() -> str:
    return (project_dir("channels") / "sms" / "en.toml").read_text(encoding="utf-8")


def test_a_missing_key_is_refused(tmp_path: Path) -> None:
    text = re.sub(r"(?m)^survey = .*\n", "", _complete_file())
    with pytest.raises(TemplateError, match="missing template 'survey'"):
        load_locale(_write(tmp_path, text))


def test_a_missing_placeholder_is_refused(tmp_path: Path) -> None:
    text = _complete_file().replace("{code}", "CODE", 1)
    with pytest.raises(TemplateError, match=r"sign_in_code: missing \['code'\]"):
        load_locale(_write(tmp_path, text))


def test_an_unknown_placeholder_or_key_is_refused(tmp_path: Path) -> None:
    text = _complete_file().replace("{minutes}", "{minutes} {name}", 1)
    with pytest.raises(TemplateError, match=r"unknown \['name'\]"):
        load_locale(_write(tmp_path, text))
    with pytest.raises(TemplateError, match="unknown template 'promo'"):
        load_locale(_write(tmp_path, _complete_file() + 'promo = "Sale!"\n'))


def test_formatting_tricks_in_placeholders_are_refused(tmp_path: Path) -> None:
    text = _complete_file().replace("{code}", "{code!r}", 1)
    with pytest.raises(TemplateError, match="plain name"):
        load_locale(_write(tmp_path, text))


def test_render_demands_exactly_the_declared_parameters() -> None:
    with pytest.raises(TemplateError, match="missing"):
        render("sign_in_code", "en", code="1")
    with pytest.raises(TemplateError, match="unexpected"):
        render("sign_in_code", "en", code="1", minutes=5, name="x")
    with pytest.raises(TemplateError, match="unknown template"):
        render("promo", "en")


@pytest.mark.parametrize(
    ("locale", "expected"),
    [
        ("zh-CN", "zh-CN"),
        ("zh", "zh-CN"),
        ("zh-Hans", "zh-CN"),
        ("en", "en"),
        ("en-GB", "en"),
        ("fr", "en"),
        (None, "en"),
        ("", "en"),
    ],
)
def test_locale_choice(locale: str | None, expected: str) -> None:
    assert pick_locale(locale) == expected


@pytest.mark.parametrize(
    ("text", "encoding", "segments"),
    [
        ("a" * 160, "GSM-7", 1),
        ("a" * 161, "GSM-7", 2),
        ("a" * 306, "GSM-7", 2),
        ("a" * 307, "GSM-7", 3),
        ("€" * 80, "GSM-7", 1),  # extension characters take two septets
        ("€" * 81, "GSM-7", 2),
        ("[" * 77 + "a" * 7, "GSM-7", 2),
        ("é" * 160, "GSM-7", 1),  # in the GSM basic alphabet
        ("你" * 70, "UCS-2", 1),
        ("你" * 71, "UCS-2", 2),
        ("你" * 134, "UCS-2", 2),
        ("你" * 135, "UCS-2", 3),
        ("a" * 69 + "你", "UCS-2", 1),  # one non-GSM character switches the whole message
        ("😀" * 35, "UCS-2", 1),  # outside the BMP: two UTF-16 units each
        ("😀" * 36, "UCS-2", 2),
        ("", "GSM-7", 1),
    ],
)
def test_segment_counts_at_the_edges(text: str, encoding: str, segments: int) -> None:
    assert sms_encoding(text) == (encoding, segments)


@given(st.text(alphabet=sorted(GSM7_BASIC - {"\r"}), max_size=600))
def test_gsm_text_never_needs_ucs2_and_segments_grow_with_length(text: str) -> None:
    encoding, segments = sms_encoding(text)
    assert encoding == "GSM-7"
    assert sms_encoding(text + "a")[1] >= segments
    assert segments == (1 if len(text) <= 160 else -(-len(text) // 153))
