"""The outbox: queue messages inside the caller's transaction, enqueue them after
commit, and send each one exactly once from an arq job.

How a message is never lost
  The row is written in the same transaction as its cause. After commit it is
  enqueued in arq (`_job_id` = `message:<id>`, deferred to `send_at`). Redis may lose
  that job; `sweep_outbox` (every minute) enqueues again every pending row that is
  due, so losing Redis delays a message and loses none.

How a message is never doubled
  - arq refuses a second job with the same id while one is queued or running, and
    `send_message` is registered with `keep_result=0`, so a finished job frees its
    id at once for the next legitimate enqueue (after a crash, a reschedule).
  - Whatever arq does, a send starts with a claim: `UPDATE ... SET status='sending',
    attempts=attempts+1 WHERE status='pending' AND send_at <= now() RETURNING`.
    Only one job wins; a duplicate job or a job for a finished row does nothing.
  - Every write after the claim is fenced by the claim's `attempts`, so a worker
    whose claim was taken over cannot overwrite the row.
  - Order is claim, send, mark. A worker that dies between claim and mark leaves
    the row 'sending'; once the claim is older than the lease
    (SELFSERVE_SMS_SEND_LEASE, longer than the job timeout, which is longer than
    the HTTP timeout, so the dead worker's request is long finished) the sweep
    enqueues it and a new claim takes it with `maybe_sent` set. Before sending
    again, that attempt asks the provider for a message to the same number with
    the same body created since the row was written and not already recorded
    against another row; if there is one, the row is marked sent with its sid and
    nothing is sent. The same check follows a 5xx or a lost answer.
  Remaining window, stated plainly: the lookup can only find what the provider
  lists. If it cannot list (a gateway without the Messages list endpoint answers
  4xx; that is logged) or does not yet show an accepted message, or a worker that
  was frozen rather than dead delivers its request after the lease ran out, a
  message whose answer was lost is sent again: at-least-once at the provider
  boundary, as any HTTP API without idempotency keys allows (Twilio's create has
  none). Outside these cases each message is handed to the provider once.

How a late message is dropped
  A message that is only worth something at its moment ("go to counter 3 now",
  "your turn is near", a sign-in code, a waitlist offer) carries a deadline,
  `expires_at`, set when the row is written. A job that claims the row after it
  sends nothing and records it 'expired' (error_code 'deadline_passed'); a quiet-hours
  hold that would end after it expires the row at once; the sweep expires pending
  rows past their deadline without enqueueing them. A row whose earlier attempt may
  have reached the provider (`maybe_sent`) is first looked up there, and recorded
  sent if it was. So after an outage the worker catches up on what still matters
  and drops the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import asyncpg
import structlog
from arq import Retry
from arq.connections import ArqRedis
from arq.utils import to_unix_ms
from redis.exceptions import RedisError

from selfserve.db import Conn, to_struct, transaction
from selfserve.logs import mask_phone
from selfserve.messaging import queries as q
from selfserve.messaging.inbound import apply_early_status
from selfserve.messaging.log import SECRET_TEMPLATES, masked_body
from selfserve.messaging.models import (
    ENCODINGS,
    LOCALES,
    ClaimedMessage,
    SendReceipt,
    SmsRequest,
)
from selfserve.messaging.quiet_hours import next_allowed_send_time, parse_clock
from selfserve.messaging.templates import PLACEHOLDERS, render
from selfserve.messaging.transport import (
    ProviderError,
    ProviderRejected,
    ProviderUnavailable,
    SmsTransport,
)
from selfserve.settings import Settings

log = structlog.get_logger("selfserve.sms")

SEND_JOB = "send_message"
# Provider attempts per message before it is marked failed.
MAX_SEND_ATTEMPTS = 8
# Backoff after a 5xx or network error (and a 429 without Retry-After): 15 s, 30 s,
# 1 min, ... capped at 10 min.
BACKOFF_BASE_S = 15.0
BACKOFF_CAP_S = 600.0
# arq limits for send_message. A job may also be retried for quiet hours or for
# running early, so arq's try limit sits well above MAX_SEND_ATTEMPTS, which is
# the real limit (kept in the row, so it survives Redis).
SEND_JOB_TIMEOUT_S = 60
SEND_JOB_MAX_TRIES = 30
# A job that runs before its row is due waits in arq when the wait is short; a
# longer wait is left to the sweep.
MAX_EARLY_WAIT_S = 12 * 3600
# The sweep also enqueues rows due within its own period, so they go on time.
SWEEP_LOOKAHEAD_S = 60.0
SWEEP_PAGE = 1000
SWEEP_MAX_ROWS = 50_000
# Provider clocks differ from ours: look this far before the row's creation.
LOOKUP_SKEW = timedelta(minutes=5)
UNSUBSCRIBED_ERROR = "21610"

Clock = Callable[[], datetime]


def job_id(message_id: int) -> str:
    return f"message:{message_id}"


def backoff_s(attempt: int) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based)."""
    return min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2.0 ** max(attempt - 1, 0))


# --- writing the outbox (caller's transaction) -------------------------------


async def queue_message(
    conn: Conn,
    *,
    phone: str,
    body: str,
    segments: int,
    encoding: str,
    template: str,
    locale: str,
    send_at: datetime,
    dedupe_key: str,
    branch_id: int | None = None,
    customer_id: int | None = None,
    time_critical: bool = False,
    expires_at: datetime | None = None,
) -> int | None:
    """Write one outbox row in the caller's transaction; None if `dedupe_key` exists.

    The body is rendered by the caller and stored as is; only `rewrite_messages` (its
    cause changed while it was pending) renders it again. `expires_at`: the deadline
    after which the message is dropped unsent (recorded 'expired'); None: no deadline.
    After the transaction commits, pass the id to `enqueue_after_commit`.
    """
    if send_at.tzinfo is None:
        raise ValueError("send_at must be timezone-aware")
    if expires_at is not None and expires_at.tzinfo is None:
        raise ValueError("expires_at must be timezone-aware")
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown SMS encoding {encoding!r}")
    if locale not in LOCALES:
        raise ValueError(f"unknown locale {locale!r}")
    message_id: int | None = await conn.fetchval(
        q.INSERT_MESSAGE,
        dedupe_key,
        customer_id,
        phone,
        branch_id,
        template,
        locale,
        body,
        segments,
        encoding,
        time_critical,
        send_at,
        expires_at,
    )
    return message_id


async def queue_template(
    conn: Conn,
    template: str,
    locale: str,
    params: dict[str, object],
    *,
    phone: str,
    send_at: datetime,
    dedupe_key: str,
    branch_id: int | None = None,
    customer_id: int | None = None,
    time_critical: bool = False,
    expires_at: datetime | None = None,
) -> int | None:
    """Render a template now and write its outbox row (see `queue_message`)."""
    sms = render(template, locale, **params)
    return await queue_message(
        conn,
        phone=phone,
        body=sms.body,
        segments=sms.segments,
        encoding=sms.encoding,
        template=template,
        locale=locale,
        send_at=send_at,
        dedupe_key=dedupe_key,
        branch_id=branch_id,
        customer_id=customer_id,
        time_critical=time_critical,
        expires_at=expires_at,
    )


def _like_prefix(dedupe_prefix: str) -> str:
    # 'booking:12' would also match 'booking:123:…': a prefix names whole segments.
    if not dedupe_prefix.endswith(":") or len(dedupe_prefix) < 2:
        raise ValueError("a dedupe prefix ends with ':' (e.g. 'booking:123:')")
    escaped = dedupe_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"


async def cancel_messages(conn: Conn, dedupe_prefix: str) -> list[int]:
    """Cancel the pending messages whose dedupe key starts with `dedupe_prefix`, in the
    caller's transaction. A message already being sent is not stopped."""
    rows = await conn.fetch(q.CANCEL_PENDING, _like_prefix(dedupe_prefix))
    return [r["id"] for r in rows]


async def reschedule_messages(
    conn: Conn,
    dedupe_prefix: str,
    new_send_at: datetime,
    *,
    new_expires_at: datetime | None = None,
) -> list[int]:
    """Move the pending messages under `dedupe_prefix` to `new_send_at` (and their
    deadline to `new_expires_at` when given), in the caller's transaction. After
    commit, pass the ids and time to `enqueue_after_commit`."""
    if new_send_at.tzinfo is None or (new_expires_at is not None and new_expires_at.tzinfo is None):
        raise ValueError("new_send_at and new_expires_at must be timezone-aware")
    rows = await conn.fetch(
        q.RESCHEDULE_PENDING, _like_prefix(dedupe_prefix), new_send_at, new_expires_at
    )
    return [r["id"] for r in rows]


async def rewrite_messages(
    conn: Conn, dedupe_prefix: str, params: Mapping[str, object]
) -> list[int]:
    """Render the pending messages under `dedupe_prefix` again, each from its own
    template and locale, with `params` (each template takes the placeholders it
    declares), in the caller's transaction: a change to their cause (a booking moved
    to another time) reaches what is still to be sent. Returns the ids rewritten; a
    row whose template needs a placeholder not in `params` is left as it is."""
    rewritten: list[int] = []
    for r in await conn.fetch(q.PENDING_FOR_UPDATE, _like_prefix(dedupe_prefix)):
        wanted = PLACEHOLDERS.get(r["template"])
        if wanted is None or not wanted <= params.keys():
            continue
        sms = render(r["template"], r["locale"], **{k: params[k] for k in wanted})
        await conn.execute(q.REWRITE_PENDING, r["id"], sms.body, sms.segments, sms.encoding)
        rewritten.append(r["id"])
    return rewritten


# --- enqueueing ---------------------------------------------------------------

# Pull an already queued job earlier (never later). A message moved earlier must
# not wait for the job queued at its old time, whose id blocks a new enqueue.
_PULL_EARLIER = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) > tonumber(ARGV[2]) then
    redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
    return 1
end
return 0
"""


async def _enqueue(redis: ArqRedis, message_id: int, send_at: datetime | None) -> bool:
    """Enqueue the send job; True if a new job was queued."""
    now = datetime.now(UTC)
    # Only a future time defers: arq derives the job key's expiry from it, and a
    # time more than a day past (a row found by the sweep after a long outage)
    # would make that expiry negative.
    defer_until = send_at if send_at is not None and send_at > now else None
    job = await redis.enqueue_job(
        SEND_JOB, message_id, _job_id=job_id(message_id), _defer_until=defer_until
    )
    if job is not None:
        return True
    due_ms = to_unix_ms(defer_until or now)
    await redis.eval(  # type: ignore[misc]
        _PULL_EARLIER, 1, redis.default_queue_name, job_id(message_id), str(due_ms)
    )
    return False


async def enqueue_after_commit(
    redis: ArqRedis, message_ids: Iterable[int | None], send_at: datetime | None = None
) -> int:
    """Enqueue send jobs for committed outbox rows; returns how many were queued.

    Ids that are None (duplicates refused by `queue_message`) are skipped. A Redis
    failure is logged, not raised: the rows are safe in PostgreSQL and the sweep
    enqueues them when they are due.
    """
    queued = 0
    for message_id in message_ids:
        if message_id is None:
            continue
        try:
            queued += await _enqueue(redis, message_id, send_at)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning(
                "sms_enqueue_failed",
                message_id=message_id,
                error=type(exc).__name__,
                detail=str(exc),
            )
    return queued


# --- the send job -------------------------------------------------------------


def _now(ctx: dict[str, Any]) -> datetime:
    clock: Clock | None = ctx.get("clock")
    return clock() if clock is not None else datetime.now(UTC)


def _zone(name: str | None, settings: Settings) -> ZoneInfo:
    try:
        return ZoneInfo(name or settings.quiet_hours_tz)
    except (ZoneInfoNotFoundError, ValueError):
        log.warning("sms_unknown_zone", zone=name)
        return ZoneInfo(settings.quiet_hours_tz)


def _error_code(exc: ProviderError) -> str:
    if exc.code:
        return exc.code
    return f"http_{exc.status}" if exc.status else "network"


async def send_message(ctx: dict[str, Any], message_id: int) -> str:
    """arq job: send one outbox row. Returns what happened (for logs and tests)."""
    pool: asyncpg.Pool = ctx["pool"]
    settings: Settings = ctx["settings"]
    transport: SmsTransport = ctx["sms"]

    row = await pool.fetchrow(q.CLAIM, message_id, float(settings.sms_send_lease_s))
    if row is None:
        return await _unclaimed(pool, message_id)
    msg = to_struct(row, ClaimedMessage)
    bound = log.bind(message_id=msg.id, phone=mask_phone(msg.phone), attempt=msg.attempts)

    if msg.past_deadline:
        return await _past_deadline(pool, transport, msg)

    if await pool.fetchval(q.IS_OPTED_OUT, msg.phone):
        await pool.execute(q.MARK_SKIPPED, msg.id, msg.attempts, "opted_out", _scrubbed(msg))
        bound.info("sms_skipped", reason="opted_out")
        return "skipped"

    if not msg.time_critical:
        now = _now(ctx)
        allowed = next_allowed_send_time(
            now,
            _zone(msg.branch_timezone, settings),
            parse_clock(settings.quiet_hours_start),
            parse_clock(settings.quiet_hours_end),
        )
        if allowed > now:
            if msg.expires_at is not None and allowed >= msg.expires_at:
                await _expire(pool, msg, "quiet hours last past its deadline")
                return "expired"
            await pool.execute(q.DEFER, msg.id, msg.attempts, allowed)
            bound.info("sms_quiet_hours", until=allowed.isoformat())
            raise Retry(defer=allowed - now)  # the same job, again in the morning

    request = SmsRequest(message_id=msg.id, phone=msg.phone, body=msg.body)
    try:
        receipt = await _earlier_send(pool, transport, msg, request) if msg.maybe_sent else None
        if receipt is not None:
            await _mark_sent(pool, msg, receipt, sent_at=receipt.created_at)
            bound.info("sms_found_already_sent", provider_sid=receipt.provider_sid)
            return "sent"
        # The side effect. Everything before is undoable; from here until the row is
        # marked, a crash leaves 'sending' for the lease and the lookup to resolve.
        receipt = await transport.send(request)
    except ProviderUnavailable as exc:
        return await _retry_later(pool, msg, exc)
    except ProviderRejected as exc:
        await _fail(pool, msg, _error_code(exc), exc.message)
        bound.warning("sms_rejected", code=exc.code, status=exc.status)
        return "failed"
    await _mark_sent(pool, msg, receipt, sent_at=None)
    bound.info("sms_sent", provider_sid=receipt.provider_sid, transport=transport.name)
    return "sent"


async def _expire(pool: asyncpg.Pool, msg: ClaimedMessage, why: str) -> None:
    deadline = msg.expires_at.isoformat() if msg.expires_at is not None else "?"
    await pool.execute(
        q.MARK_EXPIRED, msg.id, msg.attempts, f"{why} (deadline {deadline})", _scrubbed(msg)
    )
    log.info("sms_expired", message_id=msg.id, phone=mask_phone(msg.phone), reason=why)


async def _past_deadline(pool: asyncpg.Pool, transport: SmsTransport, msg: ClaimedMessage) -> str:
    """Claimed after its deadline: never sent now. If an earlier attempt may have
    reached the provider, what the provider holds decides between sent and expired."""
    if msg.maybe_sent:
        request = SmsRequest(message_id=msg.id, phone=msg.phone, body=msg.body)
        try:
            receipt = await _earlier_send(pool, transport, msg, request)
        except ProviderUnavailable as exc:
            return await _retry_later(pool, msg, exc)
        if receipt is not None:
            await _mark_sent(pool, msg, receipt, sent_at=receipt.created_at)
            log.info("sms_found_already_sent", message_id=msg.id, provider_sid=receipt.provider_sid)
            return "sent"
    await _expire(pool, msg, "not sent by its deadline")
    return "expired"


async def _unclaimed(pool: asyncpg.Pool, message_id: int) -> str:
    """Nothing to claim: finished, canceled, held by another job, or not due yet."""
    row = await pool.fetchrow(q.PEEK, message_id)
    if row is None:
        return "missing"
    due_in_s: float = row["due_in_s"]
    if row["status"] == "pending" and due_in_s > 0:
        # Moved later after this job was queued, or waiting out a backoff.
        if due_in_s <= MAX_EARLY_WAIT_S:
            raise Retry(defer=due_in_s)
        return "not_due"
    return "not_claimed"


async def _earlier_send(
    pool: asyncpg.Pool, transport: SmsTransport, msg: ClaimedMessage, request: SmsRequest
) -> SendReceipt | None:
    """The provider's record of this message from an attempt whose outcome we lost."""
    try:
        found = await transport.find_sent(request, since=msg.created_at - LOOKUP_SKEW)
    except ProviderRejected as exc:
        log.warning(
            "sms_lookup_unavailable_sending_again",
            message_id=msg.id,
            status=exc.status,
            code=exc.code,
        )
        return None
    except ProviderUnavailable as exc:
        # Cannot tell yet: try later, still unsure.
        raise ProviderUnavailable(
            exc.message,
            status=exc.status,
            code=exc.code,
            retry_after=exc.retry_after,
            maybe_sent=True,
        ) from exc
    if not found:
        return None
    # Skip sids another row already owns (two rows may carry the same text).
    taken = {
        r["provider_sid"] for r in await pool.fetch(q.SIDS_IN_USE, [f.provider_sid for f in found])
    }
    return next((f for f in found if f.provider_sid not in taken), None)


def _scrubbed(msg: ClaimedMessage) -> str | None:
    """The body to keep once a message is finished: a one-time code is masked as soon
    as the provider holds it (or it will never be sent), so the database never keeps
    it in clear. Until then it stays whole: a retry after a crash must find the sent
    text at the provider (`_earlier_send` compares bodies) or send it again."""
    if msg.template not in SECRET_TEMPLATES:
        return None
    return masked_body(msg.template, msg.body)


async def _mark_sent(
    pool: asyncpg.Pool, msg: ClaimedMessage, receipt: SendReceipt, *, sent_at: datetime | None
) -> None:
    async with transaction(pool) as conn:
        result: str = await conn.execute(
            q.MARK_SENT, msg.id, msg.attempts, receipt.provider_sid, sent_at, _scrubbed(msg)
        )
        if not result.endswith(" 0"):
            # A delivery callback may have beaten us here; it waited for this sid.
            await apply_early_status(conn, receipt.provider_sid)
    if result.endswith(" 0"):
        # Our claim was taken over (we outlived the lease); the new claim's lookup
        # will find this sid and record it.
        log.error("sms_claim_lost", message_id=msg.id, provider_sid=receipt.provider_sid)


async def _fail(pool: asyncpg.Pool, msg: ClaimedMessage, code: str, message: str) -> None:
    async with transaction(pool) as conn:
        phone = await conn.fetchval(
            q.MARK_FAILED, msg.id, msg.attempts, code, message, _scrubbed(msg)
        )
        if phone is not None and code == UNSUBSCRIBED_ERROR:
            # The recipient replied STOP to our number at the carrier: remember it.
            await conn.execute(q.OPT_OUT, phone, "carrier")


async def _retry_later(pool: asyncpg.Pool, msg: ClaimedMessage, exc: ProviderUnavailable) -> str:
    code = _error_code(exc)
    if msg.attempts >= MAX_SEND_ATTEMPTS:
        await _fail(pool, msg, code, f"gave up after {msg.attempts} attempts: {exc.message}")
        log.warning("sms_gave_up", message_id=msg.id, code=code, attempts=msg.attempts)
        return "failed"
    # Retry-After is the provider's instruction; otherwise capped exponential backoff.
    delay = exc.retry_after if exc.retry_after is not None else backoff_s(msg.attempts)
    await pool.execute(
        q.RETRY_LATER, msg.id, msg.attempts, delay, code, exc.message, exc.maybe_sent
    )
    log.info("sms_retry_later", message_id=msg.id, code=code, delay_s=delay)
    raise Retry(defer=delay)


# --- the sweep ------------------------------------------------------------------


async def expire_overdue(pool: asyncpg.Pool) -> int:
    """Record every pending row whose deadline passed as 'expired' (never sent);
    returns how many. Rows a job holds are left to that job."""
    expired = 0
    while expired < SWEEP_MAX_ROWS:
        async with transaction(pool) as conn:
            rows = await conn.fetch(q.EXPIRE_PENDING, SWEEP_PAGE)
            # a one-time code that will never be sent is not kept in clear either
            for r in rows:
                if r["template"] in SECRET_TEMPLATES:
                    await conn.execute(q.SET_BODY, r["id"], masked_body(r["template"], r["body"]))
        expired += len(rows)
        if len(rows) < SWEEP_PAGE:
            break
    if expired:
        log.info("sms_expired_swept", count=expired)
    return expired


async def sweep_outbox(ctx: dict[str, Any]) -> int:
    """arq cron: enqueue every pending row due now (or within the next minute) and
    every row whose claim outlived the lease. Jobs already queued are left alone
    (arq refuses the duplicate id). Returns how many jobs were queued."""
    pool: asyncpg.Pool = ctx["pool"]
    redis: ArqRedis = ctx["redis"]
    settings: Settings = ctx["settings"]
    await expire_overdue(pool)
    queued = 0
    seen = 0
    after: tuple[datetime, int] = (datetime(1, 1, 1, tzinfo=UTC), 0)
    while seen < SWEEP_MAX_ROWS:
        rows = await pool.fetch(q.DUE_PENDING, SWEEP_LOOKAHEAD_S, *after, SWEEP_PAGE)
        for r in rows:
            queued += await _enqueue(redis, r["id"], r["send_at"])
        seen += len(rows)
        if len(rows) < SWEEP_PAGE:
            break
        after = (rows[-1]["send_at"], rows[-1]["id"])
    for r in await pool.fetch(q.STALE_SENDING, float(settings.sms_send_lease_s), SWEEP_PAGE):
        queued += await _enqueue(redis, r["id"], None)
    if queued:
        log.info("sms_outbox_swept", queued=queued)
    return queued
