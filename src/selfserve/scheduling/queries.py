"""SQL for the booking layer. Seats are changed only through `ledger`; these read
what availability needs and the rows the API shows."""

from __future__ import annotations

# The branch and service together; a service of another branch is not found.
BRANCH_SERVICE = """
SELECT b.timezone, b.name AS branch_name, b.opening_hours, b.closures,
       b.walk_in_reserve::float8 AS walk_in_reserve, b.active AS branch_active,
       s.id AS service_id, s.name AS service_name, s.duration_min, s.buffer_before_min,
       s.buffer_after_min, s.slot_interval_min, s.lead_time_min, s.horizon_days,
       s.min_party, s.max_party, s.deposit_minor, s.cancellation_window_min,
       s.active AS service_active
FROM services s JOIN branches b ON b.id = s.branch_id
WHERE s.id = $1 AND b.id = $2
"""

# Active resources of the branch skilled for the service.
RESOURCES = """
SELECT r.id, r.kind, r.capacity
FROM resources r JOIN resource_skills k ON k.resource_id = r.id
WHERE k.service_id = $1 AND r.branch_id = $2 AND r.active
ORDER BY r.id
"""

# Weekly shifts, and only the exceptions that touch [$2, $3).
SCHEDULES = """
SELECT resource_id, kind, weekday, start_minute, end_minute, starts_at, ends_at, available
FROM schedules
WHERE resource_id = ANY($1::bigint[]) AND active
  AND (kind = 'shift' OR tstzrange(starts_at, ends_at) && tstzrange($2, $3))
"""

# Live holds (not released, not expired at $4) and counting bookings (but booking
# $5, which a reschedule moves) overlapping [$2, $3) (GiST indexes, migration 0007). A hold past its expiry that the sweep has
# not released yet is not shown; a write that meets its seats in the ledger releases
# expired holds and tries once more (service.py).
COMMITMENTS = """
SELECT resource_id, lower(occupied) AS starts_at, upper(occupied) AS ends_at,
       party_size AS seats
FROM holds
WHERE resource_id = ANY($1::bigint[]) AND released_at IS NULL AND expires_at > $4
  AND occupied && tstzrange($2, $3)
UNION ALL
SELECT resource_id, lower(occupied), upper(occupied), party_size
FROM bookings
WHERE resource_id = ANY($1::bigint[]) AND id <> $5
  AND status IN ('pending_payment', 'confirmed', 'completed')
  AND occupied && tstzrange($2, $3)
"""

CUSTOMER = "SELECT phone, locale FROM customers WHERE id = $1"

HOLD_FOR_BOOKING = """
SELECT h.id, h.branch_id, h.service_id, h.customer_id, h.channel, h.released_at, h.expires_at,
       h.starts_at
FROM holds h WHERE h.id = $1
"""

BOOKING_VIEW = """
SELECT bk.id, bk.code, bk.status, bk.starts_at, bk.ends_at, bk.branch_id, bk.service_id,
       bk.party_size, bk.channel, bk.cancelled_at, bk.confirmed_by_sms_at,
       bk.late_cancellation, bk.customer_id, bk.phone, bk.checked_in_at, b.timezone, b.name AS branch_name,
       s.name AS service_name, s.cancellation_window_min
FROM bookings bk
JOIN branches b ON b.id = bk.branch_id
JOIN services s ON s.id = bk.service_id
"""

BOOKING_BY_ID = BOOKING_VIEW + " WHERE bk.id = $1"
# Taken before a change: a check-in (which locks the row too) is either before it,
# and seen, or after it.
BOOKING_FOR_UPDATE = BOOKING_BY_ID + " FOR UPDATE OF bk"

# Newest first by id; the cursor is the last id seen.
BOOKINGS_OF_CUSTOMER = (
    BOOKING_VIEW
    + """
WHERE bk.customer_id = $1 AND ($2::bigint IS NULL OR bk.id < $2)
ORDER BY bk.id DESC
LIMIT $3
"""
)

MARK_LATE_CANCELLATION = "UPDATE bookings SET late_cancellation = true WHERE id = $1"

# SMS replies. The messages actually sent to a phone that asked it about one of its
# bookings still open to an answer (active, and not started or checked in), newest
# first; `answered`: a reply from the phone was applied to that booking since.
ASKS_OF_PHONE = """
SELECT m.id, m.template, m.sent_at, b.id AS booking_id, b.checked_in_at,
       EXISTS (SELECT 1 FROM inbound_sms i
               WHERE i.from_phone = $1 AND i.booking_id = b.id AND i.received_at > m.sent_at)
       AS answered
FROM (SELECT id, template, sent_at,
             CASE WHEN dedupe_key ~ '^booking:[0-9]{1,18}:'
                  THEN split_part(dedupe_key, ':', 2)::bigint END AS booking_id
      FROM messages
      WHERE phone = $1 AND template = ANY($2::text[]) AND status IN ('sent', 'delivered')
        AND sent_at IS NOT NULL) m
JOIN bookings b ON b.id = m.booking_id
WHERE b.phone = $1 AND b.status IN ('pending_payment', 'confirmed')
  AND (b.starts_at > $3 OR b.checked_in_at IS NOT NULL)
ORDER BY m.sent_at DESC, m.id DESC
LIMIT 100
"""

# The booking a reply names by its code, among those texted to the phone.
BOOKING_BY_CODE_OF_PHONE = (
    BOOKING_VIEW
    + """
WHERE bk.code = $1 AND bk.phone = $2 AND bk.status IN ('pending_payment', 'confirmed')
FOR UPDATE OF bk
"""
)

# What a reply that cannot tell its booking lists: the phone's open bookings.
OPEN_BOOKINGS_OF_PHONE = (
    BOOKING_VIEW
    + """
WHERE bk.phone = $1 AND bk.status IN ('pending_payment', 'confirmed') AND bk.starts_at > $2
  AND bk.checked_in_at IS NULL
ORDER BY bk.starts_at, bk.id
LIMIT $3
"""
)

# The booking an inbound reply was applied to.
MARK_REPLY_APPLIED = "UPDATE inbound_sms SET booking_id = $2 WHERE message_sid = $1"

CONFIRM_BY_SMS = """
UPDATE bookings SET confirmed_by_sms_at = coalesce(confirmed_by_sms_at, $2), updated_at = now()
WHERE id = $1
"""

# No-shows of a customer or a phone since $3, counted up to $4.
RECENT_NO_SHOWS = """
SELECT count(*) FROM (
    SELECT 1 FROM bookings
    WHERE status = 'no_show' AND starts_at >= $3
      AND (customer_id = $1 OR phone = $2)
    LIMIT $4
) n
"""

# A second live entry for the same customer, service and day is refused (NULL).
INSERT_WAITLIST_ENTRY = """
INSERT INTO waitlist_entries (branch_id, service_id, customer_id, party_size, local_date,
                              earliest_local, latest_local, earliest_at, latest_at, channel)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
ON CONFLICT (customer_id, branch_id, service_id, local_date)
    WHERE status IN ('waiting', 'offered') DO NOTHING
RETURNING id
"""

WAITLIST_OF_CUSTOMER = """
SELECT w.*, b.timezone, h.starts_at AS offer_start, h.ends_at AS offer_end
FROM waitlist_entries w
JOIN branches b ON b.id = w.branch_id
LEFT JOIN holds h ON h.id = w.hold_id
WHERE w.customer_id = $1 AND ($2::bigint IS NULL OR w.id < $2)
ORDER BY w.id DESC
LIMIT $3
"""

# --- staff: the day sheet, search and changes ------------------------------------

ADMIN_BOOKING_VIEW = """
SELECT bk.id, bk.code, bk.status, bk.starts_at, bk.ends_at, bk.branch_id, bk.service_id,
       bk.resource_id, bk.party_size, bk.channel, bk.cancelled_at, bk.confirmed_by_sms_at,
       bk.checked_in_at, bk.late_cancellation, bk.customer_id, bk.phone, bk.created_at,
       b.timezone, b.name AS branch_name, s.name AS service_name
FROM bookings bk
JOIN branches b ON b.id = bk.branch_id
JOIN services s ON s.id = bk.service_id
"""

ADMIN_BOOKING_BY_ID = ADMIN_BOOKING_VIEW + " WHERE bk.id = $1"

# The caller's branches ($1, NULL: every branch) and the filters (NULL: any); by start,
# then id. The cursor is the (start, id) of the last row seen.
ADMIN_BOOKINGS = (
    ADMIN_BOOKING_VIEW
    + """
WHERE ($1::bigint[] IS NULL OR bk.branch_id = ANY($1))
  AND ($2::bigint IS NULL OR bk.branch_id = $2)
  AND ($3::bigint IS NULL OR bk.resource_id = $3)
  AND ($4::bigint IS NULL OR bk.service_id = $4)
  AND ($5::timestamptz IS NULL OR bk.starts_at >= $5)
  AND ($6::timestamptz IS NULL OR bk.starts_at < $6)
  AND ($7::text IS NULL OR bk.status = $7)
  AND ($8::text IS NULL OR bk.phone = $8)
  AND ($9::text IS NULL OR bk.code = $9)
  AND ($10::timestamptz IS NULL OR (bk.starts_at, bk.id) > ($10, $11::bigint))
ORDER BY bk.starts_at, bk.id
LIMIT $12
"""
)

INSERT_BOOKING_CHANGE = """
INSERT INTO booking_changes (booking_id, action, staff_id, reason, old_starts_at, new_starts_at)
VALUES ($1, $2, $3, $4, $5, $6)
RETURNING id
"""

BOOKING_CHANGES = """
SELECT c.id, c.action, c.staff_id, st.name AS staff_name, c.reason, c.old_starts_at,
       c.new_starts_at, c.created_at
FROM booking_changes c JOIN staff st ON st.id = c.staff_id
WHERE c.booking_id = $1
ORDER BY c.id
"""

LOCALE_OF_PHONE = "SELECT locale FROM customers WHERE phone = $1"
