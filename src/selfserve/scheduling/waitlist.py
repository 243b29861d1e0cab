"""Waitlist matching: when seats free up, the oldest matching entry gets a hold.

An entry waits for a seat of one service on one branch-local date, starting between
two wall times. Whenever capacity frees at a branch (a cancel, a reschedule, an
expired hold, a declined offer) the freeing transaction calls `offer_freed`, which
walks the branch's waiting entries oldest first and, for each, looks for the
earliest slot of its window with room for its party. The first one that fits gets
a hold on that slot whose expiry is the claim deadline
(`SELFSERVE_WAITLIST_CLAIM`, cut to the slot's start) and an SMS offer through the
outbox; everything happens in the freeing transaction, so a seat freed for the
waitlist cannot be taken by anyone else in between.

Claiming books the hold (`POST /v1/bookings {hold_id}`, or an SMS `Y`); declining
(SMS `N`) or leaving the waitlist gives the seat back and offers it to the next
entry. An offer nobody claims lapses when its hold expires: the expiry releases
the seat and offers it on in the same transaction.

Offers are texted even in quiet hours (`time_critical`): the customer asked to be
told, and the claim deadline would pass before morning.

Concurrency. Entries are taken one at a time, oldest first, with
`FOR UPDATE SKIP LOCKED`, so two transactions freeing seats at once never offer to
the same entry twice and never wait on each other (waiting could deadlock with the
ledger's unit locks). The price: an entry the other transaction is looking at is
skipped by this one; if it gets no offer there, the minute sweep (`sweep_waitlist`)
comes back to it. Seats are taken through the ledger's guarded update like any hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import structlog

from selfserve.db import Conn, Record
from selfserve.errors import NotFound, SlotFull
from selfserve.messaging.service import queue_template
from selfserve.messaging.templates import pick_locale
from selfserve.scheduling import ledger
from selfserve.scheduling.models import WaitlistOffer, WaitlistOut
from selfserve.scheduling.policy import BookingPolicy
from selfserve.scheduling.slots import (
    Context,
    Outbox,
    compute_slots,
    first_that_fits,
    fitting_resources,
    load_context,
    local_iso,
)

log = structlog.get_logger("selfserve.waitlist")

LIVE_STATUSES = ("waiting", "offered")
MATCH_BATCH = 20
_TINY = timedelta(microseconds=1)

# The oldest waiting entry of a branch not looked at yet ($3) and not locked by
# another transaction.
NEXT_WAITING = """
SELECT id, branch_id, service_id, customer_id, party_size, earliest_at, latest_at, channel
FROM waitlist_entries
WHERE branch_id = $1 AND status = 'waiting' AND latest_at >= $2
  AND NOT (id = ANY($3::bigint[]))
ORDER BY created_at, id
LIMIT 1
FOR UPDATE SKIP LOCKED
"""

MARK_OFFERED = """
UPDATE waitlist_entries
SET status = 'offered', hold_id = $2, offered_at = $3, offer_expires_at = $4, updated_at = now()
WHERE id = $1
"""

ENTRY_VIEW = """
SELECT w.*, b.timezone,
       h.starts_at AS offer_start, h.ends_at AS offer_end
FROM waitlist_entries w
JOIN branches b ON b.id = w.branch_id
LEFT JOIN holds h ON h.id = w.hold_id
"""


def window_instants(
    timezone: str, local_date: date, earliest: str, latest: str
) -> tuple[datetime, datetime]:
    """The wall-time window as instants: a repeated wall time (fall-back) opens the
    window at its first occurrence and closes it at its second, so both are inside;
    a skipped one (spring-forward) maps to the instant after the gap."""
    tz = ZoneInfo(timezone)

    def at(clock: str, fold: int) -> datetime:
        hours, minutes = (int(p) for p in clock.split(":"))
        naive = datetime.combine(local_date, time(hours, minutes))
        instant = naive.replace(tzinfo=tz, fold=fold).astimezone(UTC)
        if instant.astimezone(tz).replace(tzinfo=None) != naive:  # in a spring-forward gap
            instant = naive.replace(tzinfo=tz, fold=1 - fold).astimezone(UTC)
        return instant

    return at(earliest, 0), at(latest, 1)


def entry_out(row: Record) -> WaitlistOut:
    offer = None
    if row["status"] == "offered" and row["offer_start"] is not None:
        offer = WaitlistOffer(
            hold_id=row["hold_id"],
            start=row["offer_start"],
            end=row["offer_end"],
            local_start=local_iso(row["offer_start"], row["timezone"]),
            expires_at=row["offer_expires_at"],
        )
    return WaitlistOut(
        id=row["id"],
        status=row["status"],
        branch_id=row["branch_id"],
        service_id=row["service_id"],
        date=row["local_date"],
        earliest=row["earliest_local"].strftime("%H:%M"),
        latest=row["latest_local"].strftime("%H:%M"),
        party_size=row["party_size"],
        timezone=row["timezone"],
        channel=row["channel"],
        offer=offer,
        booking_id=row["booking_id"],
        created_at=row["created_at"],
    )


async def entry_row(conn: Conn, entry_id: int) -> Record:
    row = await conn.fetchrow(ENTRY_VIEW + " WHERE w.id = $1", entry_id)
    if row is None:
        raise NotFound()
    return row


@dataclass
class _Matcher:
    conn: Conn
    policy: BookingPolicy
    now: datetime
    outbox: Outbox
    contexts: dict[int, Context | None]

    async def context(self, branch_id: int, service_id: int) -> Context | None:
        if service_id not in self.contexts:
            try:
                self.contexts[service_id] = await load_context(self.conn, branch_id, service_id)
            except NotFound:  # service or branch deactivated: its entries wait in vain
                self.contexts[service_id] = None
        return self.contexts[service_id]

    async def offer(self, entry: Record) -> bool:
        ctx = await self.context(entry["branch_id"], entry["service_id"])
        if ctx is None:
            return False
        party = entry["party_size"]
        if not ctx.rules.min_party <= party <= ctx.rules.max_party:
            return False
        slots = await compute_slots(
            self.conn,
            ctx,
            party_size=party,
            window_from=entry["earliest_at"],
            window_to=entry["latest_at"] + _TINY,
            now=self.now,
        )
        for slot in slots:
            ttl = min(self.policy.waitlist_claim, slot.start - self.now)
            if ttl <= timedelta(0):
                continue

            async def attempt(
                rid: int, start: datetime = slot.start, ttl: timedelta = ttl
            ) -> ledger.Hold:
                return await ledger.create_hold(
                    self.conn,
                    service_id=ctx.service_id,
                    resource_id=rid,
                    starts_at=start,
                    party_size=party,
                    channel=entry["channel"],
                    now=self.now,
                    ttl=ttl,
                    customer_id=entry["customer_id"],
                    check_shift=True,
                )

            try:
                hold = await first_that_fits(fitting_resources(slot, party), attempt)
            except SlotFull:
                continue
            await self.conn.execute(MARK_OFFERED, entry["id"], hold.id, self.now, hold.expires_at)
            await self._text(entry, ctx, hold)
            log.info("waitlist_offered", entry_id=entry["id"], hold_id=hold.id)
            return True
        return False

    async def _text(self, entry: Record, ctx: Context, hold: ledger.Hold) -> None:
        customer = await self.conn.fetchrow(
            "SELECT phone, locale FROM customers WHERE id = $1", entry["customer_id"]
        )
        if customer is None or customer["phone"] is None:
            return
        minutes = max(1, round((hold.expires_at - self.now).total_seconds() / 60))
        message_id = await queue_template(
            self.conn,
            "waitlist_offer",
            pick_locale(customer["locale"]),
            {
                "service": ctx.service_name,
                "branch": ctx.branch_name,
                "local_time": hold.starts_at.astimezone(ZoneInfo(ctx.timezone)).strftime(
                    "%Y-%m-%d %H:%M"
                ),
                "minutes": minutes,
            },
            phone=customer["phone"],
            send_at=self.now,
            dedupe_key=f"waitlist:{entry['id']}:offer:{hold.id}",
            branch_id=entry["branch_id"],
            customer_id=entry["customer_id"],
            time_critical=True,
            expires_at=hold.expires_at,  # the offer lapses with its hold
        )
        self.outbox.append((message_id, self.now))


async def offer_freed(
    conn: Conn,
    policy: BookingPolicy,
    now: datetime,
    branch_ids: set[int] | list[int],
    outbox: Outbox,
    *,
    batch: int = MATCH_BATCH,
) -> int:
    """Offer free seats at these branches to their waiting entries, oldest first, in the
    caller's transaction; returns how many offers were made. At most `batch` entries
    per branch are looked at (the minute sweep goes on from there)."""
    matcher = _Matcher(conn, policy, now, outbox, {})
    offered = 0
    for branch_id in sorted(branch_ids):
        matcher.contexts = {}
        seen: list[int] = []
        while len(seen) < batch:
            entry = await conn.fetchrow(NEXT_WAITING, branch_id, now, seen)
            if entry is None:
                break
            seen.append(entry["id"])
            if await matcher.offer(entry):
                offered += 1
    return offered


async def lapse_offers(conn: Conn, expired_hold_ids: list[int]) -> int:
    """Offers whose hold expired unclaimed lapse (the seat was given back with it)."""
    result: str = await conn.execute(
        """
        UPDATE waitlist_entries SET status = 'lapsed', updated_at = now()
        WHERE hold_id = ANY($1::bigint[]) AND status = 'offered'
        """,
        expired_hold_ids,
    )
    return int(result.split()[-1])


async def mark_booked(conn: Conn, hold_id: int, booking_id: int) -> None:
    """The hold of an offer became a booking: the entry is done."""
    await conn.execute(
        """
        UPDATE waitlist_entries SET status = 'booked', booking_id = $2, updated_at = now()
        WHERE hold_id = $1 AND status = 'offered'
        """,
        hold_id,
        booking_id,
    )


async def live_offer_of_phone(conn: Conn, phone: str, now: datetime) -> Record | None:
    """The phone's most recent offer still open, locked for the caller's transaction."""
    return await conn.fetchrow(
        """
        SELECT w.id, w.hold_id, w.branch_id, w.service_id, w.customer_id
        FROM waitlist_entries w JOIN customers c ON c.id = w.customer_id
        WHERE c.phone = $1 AND w.status = 'offered' AND w.offer_expires_at > $2
        ORDER BY w.offered_at DESC, w.id DESC
        LIMIT 1
        FOR UPDATE OF w
        """,
        phone,
        now,
    )


async def close_entry(
    conn: Conn,
    entry_id: int,
    status: str,
    now: datetime,
    policy: BookingPolicy,
    outbox: Outbox,
) -> bool:
    """End a live entry (`cancelled` by its owner, `declined` offer); an offered seat is
    given back and offered to the next entry. False when the entry was not live."""
    row = await conn.fetchrow(
        "SELECT status, branch_id, hold_id FROM waitlist_entries WHERE id = $1 FOR UPDATE",
        entry_id,
    )
    if row is None or row["status"] not in LIVE_STATUSES:
        return False
    await conn.execute(
        "UPDATE waitlist_entries SET status = $2, updated_at = now() WHERE id = $1",
        entry_id,
        status,
    )
    if (
        row["status"] == "offered"
        and row["hold_id"] is not None
        and await ledger.release_hold(conn, row["hold_id"], now)
    ):
        await offer_freed(conn, policy, now, {row["branch_id"]}, outbox)
    return True


async def expire_windows(conn: Conn, now: datetime) -> int:
    """Waiting entries whose window has passed are closed as `expired`."""
    result: str = await conn.execute(
        """
        UPDATE waitlist_entries SET status = 'expired', updated_at = now()
        WHERE status = 'waiting' AND latest_at < $1
        """,
        now,
    )
    return int(result.split()[-1])


async def branches_waiting(conn: Conn, now: datetime) -> list[int]:
    rows = await conn.fetch(
        "SELECT DISTINCT branch_id FROM waitlist_entries "
        "WHERE status = 'waiting' AND latest_at >= $1",
        now,
    )
    return [r["branch_id"] for r in rows]
