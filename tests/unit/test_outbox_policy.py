"""Outbox policy without I/O: backoff, Retry-After, dedupe prefixes, transport choice."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from selfserve.messaging.service import BACKOFF_CAP_S, _like_prefix, backoff_s, job_id
from selfserve.messaging.transport import (
    MAX_RETRY_AFTER_S,
    ConsoleTransport,
    TwilioTransport,
    build_transport,
    parse_retry_after,
)
from selfserve.settings import ConfigError, Settings


def test_backoff_doubles_and_is_capped() -> None:
    assert [backoff_s(n) for n in range(1, 9)] == [15, 30, 60, 120, 240, 480, 600, 600]
    assert backoff_s(1000) == BACKOFF_CAP_S


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("7", 7.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        ("999999", MAX_RETRY_AFTER_S),
        ("Wed, 25 Nov 2026 10:00:30 GMT", 30.0),
        ("Wed, 25 Nov 2026 09:59:00 GMT", 0.0),  # already past
        ("", None),
        (None, None),
        ("soon", None),
        ("-5", None),
    ],
)
def test_retry_after(header: str | None, expected: float | None) -> None:
    now = datetime(2026, 11, 25, 10, 0, 0, tzinfo=UTC)
    assert parse_retry_after(header, now) == expected


def test_dedupe_prefixes_name_whole_segments_and_escape_like() -> None:
    assert _like_prefix("booking:12:") == "booking:12:%"
    assert _like_prefix("wait_list:5:") == "wait\\_list:5:%"
    assert _like_prefix("a%b\\c:") == "a\\%b\\\\c:%"
    for bad in ("booking:12", "", ":"):
        with pytest.raises(ValueError, match="ends with ':'"):
            _like_prefix(bad)


def test_job_ids_are_the_row_ids() -> None:
    assert job_id(42) == "message:42"


async def test_transport_follows_the_credentials() -> None:
    console = build_transport(Settings())
    assert isinstance(console, ConsoleTransport)
    assert console.show_body
    quiet = build_transport(Settings(environment="production"))
    assert isinstance(quiet, ConsoleTransport)
    assert not quiet.show_body  # a sign-in code never reaches production logs

    twilio = build_transport(
        Settings(
            twilio_account_sid="AC" + "0" * 32,
            twilio_auth_token="token",
            twilio_from="+15005550006",
            twilio_api_base_url="http://127.0.0.1:9",
            public_base_url="https://hall.example.com",
        )
    )
    try:
        assert isinstance(twilio, TwilioTransport)
        assert twilio.status_callback == "https://hall.example.com/v1/webhooks/twilio/status"
        assert twilio._client.api.base_url == "http://127.0.0.1:9"
    finally:
        await twilio.close()

    with pytest.raises(ConfigError, match="SELFSERVE_TWILIO_FROM"):
        build_transport(Settings(twilio_account_sid="AC1", twilio_auth_token="t"))
    with pytest.raises(ConfigError, match="TWILIO_AUTH_TOKEN"):
        build_transport(Settings(twilio_account_sid="AC1"))
