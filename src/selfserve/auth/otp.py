"""Customer sign-in by SMS code: request a code, exchange it for tokens.

A code is six digits, lives five minutes, allows five tries and is stored only as an
HMAC. Requests are rate-limited in Redis per phone, per client address and by a
global daily SMS budget, all shared by every API process.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import structlog

from selfserve.auth.models import TokenPair
from selfserve.auth.service import issue_tokens
from selfserve.auth.tokens import Principal
from selfserve.db import transaction
from selfserve.errors import Unauthorized
from selfserve.logs import mask_phone
from selfserve.messaging.templates import pick_locale
from selfserve.ratelimit import Limit, hit
from selfserve.settings import Settings

log = structlog.get_logger("selfserve.auth.otp")

CODE_TTL_S = 300
MAX_TRIES = 5

LATEST_CODE = """
SELECT id, code_hash, expires_at, attempts, consumed_at
FROM otp_codes WHERE phone = $1 ORDER BY id DESC LIMIT 1 FOR UPDATE
"""
RETIRE_CODES = """
UPDATE otp_codes SET consumed_at = now() WHERE phone = $1 AND consumed_at IS NULL
"""
INSERT_CODE = """
INSERT INTO otp_codes (phone, code_hash, expires_at) VALUES ($1, $2, $3) RETURNING id
"""
UPSERT_CUSTOMER = """
INSERT INTO customers (phone, locale) VALUES ($1, $2)
ON CONFLICT (phone) DO UPDATE SET phone = excluded.phone
RETURNING id
"""


def otp_key(settings: Settings) -> bytes:
    """The key of stored code hashes: never a built-in key when tokens are ES256."""
    if settings.otp_secret is not None:
        return settings.otp_secret.encode()
    if settings.jwt_algorithm != "HS256":
        raise RuntimeError("SELFSERVE_OTP_SECRET is required with ES256")
    return settings.jwt_secret.encode()


def _code_hash(settings: Settings, phone: str, code: str) -> bytes:
    key = otp_key(settings)
    return hmac.new(key, f"otp:{phone}:{code}".encode(), hashlib.sha256).digest()


def limits(settings: Settings) -> tuple[Limit, Limit, Limit, Limit]:
    return (
        Limit("otp-phone-burst", 1, settings.otp_resend_after_s),
        Limit("otp-phone-hour", settings.otp_per_phone_hour, 3600),
        Limit("otp-ip-hour", settings.otp_per_client_hour, 3600),
        Limit("sms-day", settings.sms_daily_budget, 86_400),
    )


async def request_code(
    pool: asyncpg.Pool,
    redis: Any,
    settings: Settings,
    *,
    phone: str,
    client_address: str,
    accept_locale: str,
) -> int:
    """Text a fresh code; returns its lifetime in seconds."""
    from selfserve.messaging.service import enqueue_after_commit, queue_template

    burst, per_phone, per_client, budget = limits(settings)
    await hit(redis, per_client, client_address)
    await hit(redis, burst, phone)
    await hit(redis, per_phone, phone)
    day = datetime.now(UTC).strftime("%Y%m%d")
    await hit(redis, budget, day)  # last: refused requests do not spend the budget

    code = f"{secrets.randbelow(1_000_000):06d}"
    now = datetime.now(UTC)
    async with transaction(pool) as conn:
        known = await conn.fetchval("SELECT locale FROM customers WHERE phone = $1", phone)
        locale = pick_locale(known or accept_locale)
        await conn.execute(RETIRE_CODES, phone)
        code_id = await conn.fetchval(
            INSERT_CODE,
            phone,
            _code_hash(settings, phone, code),
            now + timedelta(seconds=CODE_TTL_S),
        )
        message_id = await queue_template(
            conn,
            "sign_in_code",
            locale,
            {"code": code, "minutes": CODE_TTL_S // 60},
            phone=phone,
            send_at=now,
            dedupe_key=f"otp:{code_id}",
            time_critical=True,
            expires_at=now + timedelta(seconds=CODE_TTL_S),  # a dead code is not sent
        )
    if message_id is not None:
        await enqueue_after_commit(redis, [message_id], now)
    log.info("otp_requested", phone=mask_phone(phone))
    return CODE_TTL_S


async def exchange_code(
    pool: asyncpg.Pool, settings: Settings, *, phone: str, code: str, channel: str, locale: str
) -> TokenPair:
    """Check the latest code for the phone; the sixth try is refused even if right."""
    async with pool.acquire() as conn:
        async with conn.transaction():
            row = await conn.fetchrow(LATEST_CODE, phone)
            if row is None or row["consumed_at"] is not None:
                failure = "invalid_code"
            elif row["expires_at"] <= datetime.now(UTC):
                failure = "code_expired"
            elif row["attempts"] >= MAX_TRIES:
                failure = "code_locked"
            else:
                await conn.execute(
                    "UPDATE otp_codes SET attempts = attempts + 1 WHERE id = $1", row["id"]
                )
                expected = bytes(row["code_hash"])
                if hmac.compare_digest(expected, _code_hash(settings, phone, code)):
                    await conn.execute(
                        "UPDATE otp_codes SET consumed_at = now() WHERE id = $1", row["id"]
                    )
                    customer_id = await conn.fetchval(UPSERT_CUSTOMER, phone, pick_locale(locale))
                    principal = Principal(
                        kind="customer",
                        id=customer_id,
                        role="customer",
                        channel=channel,  # type: ignore[arg-type]  # validated by the body
                        branches=(),
                    )
                    return await issue_tokens(conn, settings, principal)
                failure = "invalid_code"
        # The failed try is committed above; only then is the caller refused.
        raise Unauthorized(code=failure)
