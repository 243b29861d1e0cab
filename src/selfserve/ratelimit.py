"""Fixed-window rate limits kept in Redis, shared by every API process."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from selfserve.errors import RateLimited, ServiceUnavailable

# INCR the window's counter, give it its lifetime on first use, report count and TTL.
_HIT = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
local ttl = redis.call('TTL', KEYS[1])
if ttl < 0 then redis.call('EXPIRE', KEYS[1], ARGV[1]); ttl = tonumber(ARGV[1]) end
return {count, ttl}
"""


@dataclass(frozen=True)
class Limit:
    name: str
    limit: int
    window_s: int


async def hit(
    redis: Any,
    limit: Limit,
    key: str,
    *,
    code: str | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Count one use; over the limit is 429 with Retry-After (`code`, default
    `rate_limited`, and `extra` members in the problem).

    If Redis cannot answer, the caller is refused (503): a limit that guards money or
    abuse must fail closed, never open.
    """
    try:
        count, ttl = await redis.eval(
            _HIT, 1, f"selfserve:rl:{limit.name}:{key}", str(limit.window_s)
        )
    except Exception as exc:  # any Redis failure: refuse rather than let it through
        raise ServiceUnavailable(detail="rate limiter unavailable") from exc
    if int(count) > limit.limit:
        raise RateLimited(headers={"retry-after": str(max(int(ttl), 1))}, code=code, extra=extra)


def client_address(peer: str | None, forwarded_for: str | None, trusted: tuple[str, ...]) -> str:
    """The caller's address: the peer, unless the peer is a trusted proxy, in which case
    the right-most X-Forwarded-For entry that is not itself a trusted proxy.

    A raw X-Forwarded-For from an untrusted peer is ignored: anyone can write one.
    """
    peer = peer or "unknown"
    networks = [ipaddress.ip_network(t, strict=False) for t in trusted]

    def is_trusted(address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in networks)

    if not networks or not is_trusted(peer) or not forwarded_for:
        return peer
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    for hop in reversed(hops):
        if not is_trusted(hop):
            return hop
    return hops[0] if hops else peer
