"""Staff login throttle: growing delays per account and per client address, in Redis.

- Per account (the email as typed, lower-cased, known or not): after
  `SELFSERVE_LOGIN_FAILURES_PER_ACCOUNT` failures within 15 minutes of each other,
  each further failure locks the account for 1 s, then 2, 4, ... up to
  `SELFSERVE_LOGIN_DELAY_CAP` seconds. The count ends 15 minutes after the last
  failure and a successful login clears it.
- Per client address: the same with `SELFSERVE_LOGIN_FAILURES_PER_CLIENT` failures
  within an hour, across all accounts (password spraying).
- While locked, a login is refused with 429 `login_throttled` and `Retry-After`
  before its password is checked (no hashing spent, nothing learnt).
- Lock-out of a real user is bounded: the account delay never exceeds the cap, and an
  address that signed in to the account successfully in the last 30 days (a
  known-good address) is not held by the account's delay, only by its own
  per-address one. An attacker elsewhere cannot keep a clerk at their usual desk out.
- Redis down: refused with 503 (fails closed, like every limit).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from selfserve.errors import RateLimited, ServiceUnavailable
from selfserve.settings import Settings

ACCOUNT_WINDOW_S = 900
CLIENT_WINDOW_S = 3600
KNOWN_GOOD_S = 30 * 24 * 3600
BASE_DELAY_MS = 1000
PREFIX = "selfserve:login"

# KEYS: failure counter, lock. ARGV: window s, failures before delays, base ms, cap ms.
# The window runs from the last failure; from the threshold on, each failure locks for
# base * 2^(failures - threshold), capped.
_FAIL = """
local n = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[1])
local over = n - tonumber(ARGV[2])
if over < 0 then return 0 end
local delay = tonumber(ARGV[3]) * math.pow(2, math.min(over, 30))
delay = math.min(delay, tonumber(ARGV[4]))
redis.call('SET', KEYS[2], '1', 'PX', math.floor(delay))
return math.floor(delay)
"""


@dataclass(frozen=True)
class Keys:
    account_failures: str
    account_lock: str
    client_failures: str
    client_lock: str
    known_good: str


def keys(email: str, address: str) -> Keys:
    account = hashlib.sha256(email.strip().lower().encode()).hexdigest()[:32]
    return Keys(
        account_failures=f"{PREFIX}:acct-fail:{account}",
        account_lock=f"{PREFIX}:acct-lock:{account}",
        client_failures=f"{PREFIX}:ip-fail:{address}",
        client_lock=f"{PREFIX}:ip-lock:{address}",
        known_good=f"{PREFIX}:good:{account}",
    )


def _refuse(ms: int) -> RateLimited:
    seconds = max(1, -(-ms // 1000))
    return RateLimited(code="login_throttled", headers={"retry-after": str(seconds)})


async def check(redis: Any, k: Keys, address: str) -> None:
    """Refuse (429) while the address, or the account for an address not known to it,
    is in a delay."""
    try:
        client_ms, account_ms, known = await (
            redis.pipeline(transaction=False)
            .pttl(k.client_lock)
            .pttl(k.account_lock)
            .sismember(k.known_good, address)
            .execute()
        )
    except Exception as exc:
        raise ServiceUnavailable(detail="login throttle unavailable") from exc
    if int(client_ms) > 0:
        raise _refuse(int(client_ms))
    if int(account_ms) > 0 and not known:
        raise _refuse(int(account_ms))


async def failed(redis: Any, settings: Settings, k: Keys) -> None:
    cap_ms = str(settings.login_delay_cap_s * 1000)
    try:
        await redis.eval(
            _FAIL,
            2,
            k.account_failures,
            k.account_lock,
            str(ACCOUNT_WINDOW_S),
            str(settings.login_failures_per_account),
            str(BASE_DELAY_MS),
            cap_ms,
        )
        await redis.eval(
            _FAIL,
            2,
            k.client_failures,
            k.client_lock,
            str(CLIENT_WINDOW_S),
            str(settings.login_failures_per_client),
            str(BASE_DELAY_MS),
            cap_ms,
        )
    except Exception as exc:
        raise ServiceUnavailable(detail="login throttle unavailable") from exc


async def succeeded(redis: Any, k: Keys, address: str) -> None:
    """Clear the account's failures and remember the address as known-good for it."""
    try:
        await (
            redis.pipeline(transaction=True)
            .delete(k.account_failures, k.account_lock)
            .sadd(k.known_good, address)
            .expire(k.known_good, KNOWN_GOOD_S)
            .execute()
        )
    except Exception as exc:
        raise ServiceUnavailable(detail="login throttle unavailable") from exc
