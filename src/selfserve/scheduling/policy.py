"""The booking policy an operator sets through settings, in the shape the use cases need."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from functools import cache

from selfserve.limits import Quotas, quotas_of
from selfserve.settings import Settings


@dataclass(frozen=True)
class Reminder:
    """A message sent `lead` before a booking's start instant.

    `kind` names it in the outbox dedupe key (`booking:<id>:<kind>:<start>`), so a
    reschedule finds and moves the pending one; `template` is what it says."""

    kind: str
    lead: timedelta
    template: str


@dataclass(frozen=True)
class BookingPolicy:
    hold_ttl: timedelta
    reminders: tuple[Reminder, ...]
    waitlist_claim: timedelta
    no_show_grace: timedelta
    no_show_limit: int
    no_show_window: timedelta
    quotas: Quotas


def _label(minutes: int) -> str:
    return f"{minutes // 60}h" if minutes % 60 == 0 else f"{minutes}m"


def reminders(leads_min: tuple[int, ...], confirm_request_min: int) -> tuple[Reminder, ...]:
    """Reminders at each lead (latest first); the one at the confirm-request lead asks
    for Y/N, and a confirm-request lead that is no reminder gets a message of its own."""
    out = [
        Reminder(
            kind=f"reminder_{_label(m)}",
            lead=timedelta(minutes=m),
            template="confirm_request" if m == confirm_request_min else "reminder",
        )
        for m in leads_min
    ]
    if confirm_request_min and confirm_request_min not in leads_min:
        out.append(
            Reminder(
                kind=f"confirm_request_{_label(confirm_request_min)}",
                lead=timedelta(minutes=confirm_request_min),
                template="confirm_request",
            )
        )
    return tuple(sorted(out, key=lambda r: r.lead, reverse=True))


@cache
def policy_of(settings: Settings) -> BookingPolicy:
    return BookingPolicy(
        hold_ttl=timedelta(seconds=settings.hold_ttl_s),
        reminders=reminders(settings.reminder_leads_min, settings.confirm_request_min),
        waitlist_claim=timedelta(minutes=settings.waitlist_claim_min),
        no_show_grace=timedelta(minutes=settings.no_show_grace_min),
        no_show_limit=settings.no_show_limit,
        no_show_window=timedelta(days=settings.no_show_window_days),
        quotas=quotas_of(settings),
    )


DEFAULT_POLICY = policy_of(Settings())
