"""Which waiting ticket a counter calls next, decided without I/O.

`call-next` loads nothing itself: the database layer selects the waiting tickets
of the services the counter's staff can serve and takes the first one in the
order defined here, with the same order written as SQL (`SQL_ORDER_BY`) so that
``SELECT … ORDER BY … FOR UPDATE SKIP LOCKED LIMIT 1`` picks what `pick_next`
would pick among the rows no other counter holds locked. Everything here is
deterministic and works on UTC instants.

Tickets
-------
A `WaitingTicket` is a ticket in status ``waiting``: ``id``, ``service_id``,
``issued_at`` (when it joined the queue: printed at the kiosk, joined remotely,
or checked in for a booking; a transfer keeps it), ``priority`` and
``appointment_at``.

``priority`` is the rank of the ticket's priority class: 0 is the normal class
and a larger number is served earlier (say 1 for pregnancy, 2 for elderly,
3 for disability: the ranks are the branch's to choose; only their order
matters). It is a non-negative integer that fits a PostgreSQL ``integer``.

``appointment_at`` is set only for the ticket of a checked-in booking: the
booking's start. It is None for walk-ins.

Exact semantics
---------------
A call at instant ``now`` by a counter whose staff can serve the services ``S``
considers the *eligible* tickets, those with ``service_id`` in ``S``; other
tickets are never returned to that counter. Two instants are derived from
``now`` and the `PolicyConfig` (`cutoffs`):

* ``aged_cutoff = now - aging_bound``: a ticket with ``issued_at <= aged_cutoff``
  has waited at least the bound and is *aged*;
* ``due_cutoff = now + appointment_early``: an appointment ticket with
  ``appointment_at <= due_cutoff`` is *due* (booked for now, the next few
  minutes, or the past: a late customer is due at once).

Every eligible ticket falls in exactly one tier, the first that applies:

0. *aged*, whatever its class or appointment: by ``issued_at``;
1. *due appointment*: by ``appointment_at``, then ``issued_at``;
2. *priority class* (``priority > 0``): by ``priority`` descending, then
   ``issued_at``;
3. *normal*: by ``issued_at``.

Lower tiers go first, and ties left by all of the above go to the lower ``id``.
`sort_key` writes this as the tuple ``(tier, -priority in tiers 2-3 else 0,
appointment_at in tier 1 else issued_at, issued_at, id)``, a total order since
ids are unique; `pick_next` returns the eligible ticket with the least key and
`order` lists them all by key. An appointment that is not due yet is in tier 2
or 3 by its class like any ticket (a customer who checks in half an hour early
is not called ahead of the walk-ins until the booking is nearly due). Every
ticket, appointment or not, ages from its ``issued_at``: a customer who checked
in long before the booking and has waited the bound is called in issue order,
possibly before the booked time.

The guarantee
-------------
Write ``p(T) = (issued_at, id)`` for a ticket's place in issue order.

**No overtaking past the bound.** If a counter calls at ``now`` while an
eligible ticket ``T`` is aged (``T.issued_at <= now - aging_bound``), the ticket
it gets, ``U``, has ``p(U) <= p(T)``. So once a ticket has waited
``aging_bound``, no ticket issued after it, whatever its class or appointment,
is called ahead of it by a counter that can serve it. Priority classes and due
appointments reorder the queue only among tickets that have not yet waited the
bound. (Proof: ``T`` is in tier 0, so ``U`` is too, and tier 0 is in issue
order.)

**Bounded wait in calls.** Let ``n`` be the number of tickets issued before
``T`` (by ``p``) that are waiting, for any service, at the instant ``T`` ages
(``issued_at + aging_bound``). Every call made at or after that instant by a
counter that can serve ``T`` takes ``T`` or one of those ``n``, so ``T`` is
called by the (``n`` + 1)-th such call at the latest. Hence if some counter
that can serve ``T`` calls at least every ``Δ`` while ``T`` waits, ``T`` waits at
most ``aging_bound + (n + 1) * Δ``. Without transfers ``n`` never grows, since
no later ticket can be issued earlier; a ticket transferred in keeps its
``issued_at`` and so may add itself to the ``n`` ahead of ``T``.

Nothing bounds the wait itself when arrivals outrun the counters (no policy
can); what is bounded is how long later arrivals may be served first.

Why aged tickets beat due appointments. If due appointments came first, a
walk-in that has waited the bound could be passed, call after call, by
customers who checked in after it (a steady stream of bookings on one service
is enough), and no bound would hold for walk-ins at all. The price is small:
while nobody has waited the bound, a due appointment is called first; tickets
age only when the counters are behind, and then serving later arrivals first
only moves the wait onto earlier ones; and an appointment ticket ages like any
other, so a customer with a booking never waits past the bound behind anyone
who checked in after them either. The aged tier is kept in plain issue order
for the same reason: ordering it by class would let a later aged priority
ticket pass an earlier aged one.

SQL
---
`SQL_ORDER_BY` is the same key as PostgreSQL ``ORDER BY`` items over
``tickets.issued_at``, ``tickets.priority`` (integer), ``tickets.appointment_at``
(timestamptz, null for walk-ins) and ``tickets.id``, with ``$1`` for
``aged_cutoff`` and ``$2`` for ``due_cutoff`` (`sql_order_by` renumbers them).
The cutoffs are computed in Python by `cutoffs` and passed as timestamptz
parameters rather than ``now`` and intervals: PostgreSQL adds an interval's
day part in the session time zone (one day is not always 24 hours), and
``now()`` in SQL is the transaction's clock, not the caller's. Both sides then
compare the same microsecond instants, so they agree exactly, including at
the boundaries. A null ``appointment_at`` makes ``appointment_at <= $2`` null,
which a ``CASE`` treats as false, as Python treats None. The call itself is::

    SELECT … FROM tickets
    WHERE status = 'waiting' AND service_id = ANY($3)
    ORDER BY <SQL_ORDER_BY>
    FOR UPDATE SKIP LOCKED LIMIT 1

PostgreSQL sorts the candidates by the key, then locks them in that order,
skipping rows another transaction holds, and returns the first it locks: two
counters calling at once never get the same ticket, and each gets the first
ticket by this policy among those not being taken by the other.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import IntEnum

__all__ = [
    "DEFAULT_POLICY",
    "SQL_ORDER_BY",
    "PolicyConfig",
    "SortKey",
    "Tier",
    "WaitingTicket",
    "cutoffs",
    "eligible",
    "order",
    "pick_next",
    "sort_key",
    "sql_order_by",
    "tier",
]

PRIORITY_MAX = 2**31 - 1
"""The largest rank a PostgreSQL ``integer`` column holds."""


class Tier(IntEnum):
    """The tiers of the call order, first served first."""

    AGED = 0
    APPOINTMENT = 1
    PRIORITY = 2
    NORMAL = 3


SortKey = tuple[int, int, datetime, datetime, int]
"""(tier, -priority in tiers 2-3 else 0, appointment_at in tier 1 else issued_at,
issued_at, id)."""


def _aware(value: datetime, name: str) -> None:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware")


@dataclass(frozen=True, slots=True)
class WaitingTicket:
    id: int
    service_id: int
    issued_at: datetime
    """When the ticket joined the queue (aware; compared as an instant)."""
    priority: int = 0
    """Priority class rank: 0 normal, higher is served earlier."""
    appointment_at: datetime | None = None
    """The booked start, for the ticket of a checked-in booking; None for walk-ins."""

    def __post_init__(self) -> None:
        _aware(self.issued_at, "issued_at")
        if self.appointment_at is not None:
            _aware(self.appointment_at, "appointment_at")
        if not 0 <= self.priority <= PRIORITY_MAX:
            raise ValueError(f"priority must lie in [0, {PRIORITY_MAX}]")


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    aging_bound: timedelta = timedelta(minutes=20)
    """After waiting this long a ticket is called in issue order, ahead of any
    ticket issued after it (see the module docstring)."""
    appointment_early: timedelta = timedelta(minutes=5)
    """A checked-in appointment is due from this long before its booked start."""

    def __post_init__(self) -> None:
        if self.aging_bound <= timedelta(0):
            raise ValueError("aging_bound must be positive")
        if self.appointment_early < timedelta(0):
            raise ValueError("appointment_early must not be negative")


DEFAULT_POLICY = PolicyConfig()


def cutoffs(now: datetime, config: PolicyConfig = DEFAULT_POLICY) -> tuple[datetime, datetime]:
    """``(aged_cutoff, due_cutoff)`` for a call at `now`: the values of ``$1`` and
    ``$2`` in `SQL_ORDER_BY`."""
    _aware(now, "now")
    return now - config.aging_bound, now + config.appointment_early


def _tier(ticket: WaitingTicket, aged_cutoff: datetime, due_cutoff: datetime) -> Tier:
    if ticket.issued_at <= aged_cutoff:
        return Tier.AGED
    if ticket.appointment_at is not None and ticket.appointment_at <= due_cutoff:
        return Tier.APPOINTMENT
    if ticket.priority > 0:
        return Tier.PRIORITY
    return Tier.NORMAL


def _key(ticket: WaitingTicket, aged_cutoff: datetime, due_cutoff: datetime) -> SortKey:
    t = _tier(ticket, aged_cutoff, due_cutoff)
    rank = -ticket.priority if t >= Tier.PRIORITY else 0
    when = ticket.issued_at
    if t == Tier.APPOINTMENT and ticket.appointment_at is not None:
        when = ticket.appointment_at
    return (int(t), rank, when, ticket.issued_at, ticket.id)


def tier(ticket: WaitingTicket, now: datetime, config: PolicyConfig = DEFAULT_POLICY) -> Tier:
    """The tier `ticket` is in for a call at `now`."""
    return _tier(ticket, *cutoffs(now, config))


def sort_key(
    ticket: WaitingTicket, now: datetime, config: PolicyConfig = DEFAULT_POLICY
) -> SortKey:
    """The ticket's place in the call order at `now`: smaller is called first."""
    return _key(ticket, *cutoffs(now, config))


def eligible(ticket: WaitingTicket, counter_services: Collection[int]) -> bool:
    """Whether a counter whose staff serve `counter_services` may call `ticket`."""
    return ticket.service_id in counter_services


def order(
    tickets: Iterable[WaitingTicket],
    counter_services: Collection[int] | None,
    now: datetime,
    config: PolicyConfig = DEFAULT_POLICY,
) -> list[WaitingTicket]:
    """The tickets a counter serving `counter_services` may call (all of them when
    None), in call order at `now`."""
    aged_cutoff, due_cutoff = cutoffs(now, config)
    chosen = (t for t in tickets if counter_services is None or eligible(t, counter_services))
    return sorted(chosen, key=lambda t: _key(t, aged_cutoff, due_cutoff))


def pick_next(
    tickets: Iterable[WaitingTicket],
    counter_services: Collection[int],
    now: datetime,
    config: PolicyConfig = DEFAULT_POLICY,
) -> WaitingTicket | None:
    """The ticket a counter serving `counter_services` calls at `now`, or None."""
    aged_cutoff, due_cutoff = cutoffs(now, config)
    best: WaitingTicket | None = None
    best_key: SortKey | None = None
    for ticket in tickets:
        if not eligible(ticket, counter_services):
            continue
        key = _key(ticket, aged_cutoff, due_cutoff)
        if best_key is None or key < best_key:
            best, best_key = ticket, key
    return best


_SQL_TEMPLATE = """\
CASE WHEN tickets.issued_at <= {aged} THEN 0
     WHEN tickets.appointment_at <= {due} THEN 1
     WHEN tickets.priority > 0 THEN 2
     ELSE 3 END,
CASE WHEN tickets.issued_at <= {aged} THEN 0
     WHEN tickets.appointment_at <= {due} THEN 0
     ELSE -tickets.priority END,
CASE WHEN tickets.issued_at <= {aged} THEN tickets.issued_at
     WHEN tickets.appointment_at <= {due} THEN tickets.appointment_at
     ELSE tickets.issued_at END,
tickets.issued_at,
tickets.id"""


def sql_order_by(aged_cutoff: str = "$1", due_cutoff: str = "$2") -> str:
    """`sort_key` as PostgreSQL ``ORDER BY`` items (without the keyword), with the
    given placeholders for ``aged_cutoff`` and ``due_cutoff`` (both timestamptz)."""
    return _SQL_TEMPLATE.format(
        aged=f"{aged_cutoff}::timestamptz", due=f"{due_cutoff}::timestamptz"
    )


SQL_ORDER_BY = sql_order_by()
"""`sort_key` in SQL: ``$1`` = aged_cutoff, ``$2`` = due_cutoff, from `cutoffs`."""
