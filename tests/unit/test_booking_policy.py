"""Booking policy from settings: reminder leads and which one asks for Y/N."""

from __future__ import annotations

from datetime import timedelta

import pytest

from selfserve.scheduling.policy import policy_of, reminders
from selfserve.settings import ConfigError, Settings, load_settings


def test_defaults_remind_at_24h_asking_for_a_reply_and_at_2h() -> None:
    policy = policy_of(Settings())
    assert [(r.kind, r.lead, r.template) for r in policy.reminders] == [
        ("reminder_24h", timedelta(hours=24), "confirm_request"),
        ("reminder_2h", timedelta(hours=2), "reminder"),
    ]
    assert policy.hold_ttl == timedelta(minutes=5)
    assert policy.waitlist_claim == timedelta(minutes=15)


def test_a_confirm_request_lead_that_is_no_reminder_gets_its_own_message() -> None:
    got = reminders((90,), 2880)
    assert [(r.kind, r.lead, r.template) for r in got] == [
        ("confirm_request_48h", timedelta(hours=48), "confirm_request"),
        ("reminder_90m", timedelta(minutes=90), "reminder"),
    ]
    assert [r.template for r in reminders((1440, 120), 0)] == ["reminder", "reminder"]
    assert reminders((), 0) == ()


def test_reminder_settings_are_parsed_and_checked() -> None:
    settings = load_settings(
        {"SELFSERVE_REMINDERS": "120, 1440,120", "SELFSERVE_CONFIRM_REQUEST": "0"}
    )
    assert settings.reminder_leads_min == (1440, 120)
    assert load_settings({"SELFSERVE_REMINDERS": ""}).reminder_leads_min == ()
    for bad in ("2h", "0", "-5"):
        with pytest.raises(ConfigError, match="SELFSERVE_REMINDERS"):
            load_settings({"SELFSERVE_REMINDERS": bad})
    with pytest.raises(ConfigError, match="SELFSERVE_HOLD_TTL"):
        load_settings({"SELFSERVE_HOLD_TTL": "10"})
