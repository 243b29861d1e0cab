"""Abuse limits: how much one customer, or one walk-in phone, may hold at once, and how
many texts a number typed at a kiosk or desk may set off.

Holding limits (409 with a stable code, `max` in the problem):
- `too_many_holds`: live holds of a customer;
- `too_many_bookings`: upcoming bookings of one branch, service and branch-local day;
- `too_many_tickets`: open tickets (waiting, called, serving);
- `too_many_waitlist_entries`: open waitlist entries (waiting, offered).

The owner is the customer account (rows with its `customer_id`) or, for a kiosk acting
for a walk-in, the phone it typed (rows made for that phone without an account). Staff
are not limited, nor a kiosk that gives no phone. A check runs after the row is written,
in the same transaction (so a refusal for the request itself, e.g. `slot_full`, comes
first): it takes a transaction advisory lock keyed by the owner, then counts the
owner's rows, the new one included; over the limit it raises and the whole
transaction rolls back. Concurrent requests of one owner queue on the lock, each
counting after the one before it committed (READ COMMITTED takes a new snapshot per
statement), so they can never pass the limit together. The lock is taken after the
transaction's last row lock, so it cannot close a deadlock.

Texts to typed numbers (429 `sms_limit_reached` with `Retry-After`, `limit` in the
problem): a booking or ticket with a phone typed by a kiosk or staff counts once
against that number's and that device's (or staff account's) hourly limits and the
daily SMS budget shared with sign-in codes. Over a limit the request is refused before
anything is committed; the caller may try again without a phone.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

from selfserve.auth.tokens import Principal
from selfserve.db import Conn
from selfserve.errors import Conflict
from selfserve.ratelimit import Limit, hit
from selfserve.settings import Settings

STAFF_ROLES = ("staff", "manager", "admin")
# Namespace of the two-key advisory locks (a space of its own beside one-key locks).
LOCK_SPACE = 0x5351


@dataclass(frozen=True)
class Quotas:
    active_holds: int
    bookings_per_day: int
    open_tickets: int
    waitlist_entries: int
    sms_per_number_hour: int
    sms_per_device_hour: int
    sms_daily_budget: int


def quotas_of(settings: Settings) -> Quotas:
    return Quotas(
        active_holds=settings.max_active_holds,
        bookings_per_day=settings.max_bookings_per_day,
        open_tickets=settings.max_open_tickets,
        waitlist_entries=settings.max_waitlist_entries,
        sms_per_number_hour=settings.sms_per_number_hour,
        sms_per_device_hour=settings.sms_per_device_hour,
        sms_daily_budget=settings.sms_daily_budget,
    )


@dataclass(frozen=True)
class Owner:
    """Whose rows a limit counts: a customer account's, or a walk-in phone's."""

    kind: Literal["customer", "phone"]
    value: int | str

    @property
    def lock_key(self) -> str:
        return f"{self.kind}:{self.value}"

    def where(self, param: int) -> str:
        """The SQL condition selecting the owner's rows; `$param` is `value`."""
        if self.kind == "customer":
            return f"customer_id = ${param}"
        return f"customer_id IS NULL AND phone = ${param}"


def owner_of(principal: Principal, phone: str | None) -> Owner | None:
    """The owner limited for this caller, or None (staff; a kiosk without a phone)."""
    if principal.role in STAFF_ROLES:
        return None
    if principal.kind == "customer":
        return Owner("customer", principal.id)
    return Owner("phone", phone) if phone is not None else None


async def lock(conn: Conn, owner: Owner) -> None:
    """Serialise the owner's limited writes until this transaction ends."""
    await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", LOCK_SPACE, owner.lock_key)


def _refuse(code: str, limit: int) -> Conflict:
    return Conflict(code=code, extra={"max": limit})


ACTIVE_HOLDS = """
SELECT count(*) FROM holds
WHERE customer_id = $1 AND released_at IS NULL AND expires_at > $2
"""


async def check_holds(conn: Conn, principal: Principal, limit: int, now: datetime) -> None:
    """Holds carry no phone: only customers are limited."""
    owner = owner_of(principal, None)
    if owner is None or owner.kind != "customer":
        return
    await lock(conn, owner)
    if await conn.fetchval(ACTIVE_HOLDS, owner.value, now) > limit:
        raise _refuse("too_many_holds", limit)


def _bookings_on_day(owner: Owner) -> str:
    return f"""
SELECT count(*) FROM bookings
WHERE {owner.where(1)} AND branch_id = $2 AND service_id = $3
  AND status IN ('pending_payment', 'confirmed')
  AND starts_at >= $4 AND starts_at < $5 AND starts_at > $6
"""


def local_day(start: datetime, timezone: str) -> tuple[datetime, datetime]:
    """The branch-local day of `start` as UTC instants [from, to)."""
    zone = ZoneInfo(timezone)
    day = start.astimezone(zone).date()
    begin = datetime.combine(day, time(0), tzinfo=zone)
    end = datetime.combine(day + timedelta(days=1), time(0), tzinfo=zone)
    return begin.astimezone(UTC), end.astimezone(UTC)


async def check_bookings(
    conn: Conn,
    owner: Owner | None,
    limit: int,
    *,
    branch_id: int,
    service_id: int,
    start: datetime,
    timezone: str,
    now: datetime,
) -> None:
    if owner is None:
        return
    await lock(conn, owner)
    begin, end = local_day(start, timezone)
    count = await conn.fetchval(
        _bookings_on_day(owner), owner.value, branch_id, service_id, begin, end, now
    )
    if count > limit:
        raise _refuse("too_many_bookings", limit)


def _open_tickets(owner: Owner) -> str:
    return f"""
SELECT count(*) FROM tickets
WHERE {owner.where(1)} AND status IN ('waiting', 'called', 'serving')
"""


async def check_tickets(conn: Conn, owner: Owner | None, limit: int) -> None:
    if owner is None:
        return
    await lock(conn, owner)
    if await conn.fetchval(_open_tickets(owner), owner.value) > limit:
        raise _refuse("too_many_tickets", limit)


OPEN_WAITLIST_ENTRIES = """
SELECT count(*) FROM waitlist_entries WHERE customer_id = $1 AND status IN ('waiting', 'offered')
"""


async def check_waitlist(conn: Conn, principal: Principal, limit: int) -> None:
    owner = owner_of(principal, None)
    if owner is None or owner.kind != "customer":
        return
    await lock(conn, owner)
    if await conn.fetchval(OPEN_WAITLIST_ENTRIES, owner.value) > limit:
        raise _refuse("too_many_waitlist_entries", limit)


async def count_text(
    redis: Any, quotas: Quotas, principal: Principal, phone: str | None, now: datetime
) -> None:
    """A booking or ticket that will text a number a kiosk or staff typed: count it
    against the number, the device (or staff account) and the daily budget (last, so
    a refused request does not spend it). Fails closed (503) when Redis is down; no
    Redis at all (a service called directly, without the app) counts nothing."""
    if phone is None or principal.kind == "customer" or redis is None:
        return
    code = "sms_limit_reached"
    await hit(
        redis,
        Limit("sms-device-hour", quotas.sms_per_device_hour, 3600),
        principal.subject,
        code=code,
        extra={"limit": "per_device"},
    )
    await hit(
        redis,
        Limit("sms-number-hour", quotas.sms_per_number_hour, 3600),
        phone,
        code=code,
        extra={"limit": "per_number"},
    )
    await hit(
        redis,
        Limit("sms-day", quotas.sms_daily_budget, 86_400),
        now.astimezone(UTC).strftime("%Y%m%d"),
        code=code,
        extra={"limit": "daily_budget"},
    )
