"""Settings, read from the environment only (12-factor)."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

DEV_JWT_SECRET = "selfserve-dev-secret-change-me-0123456789abcdef"  # noqa: S105
CLOCK = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$")
CHANNEL_PREFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")


class ConfigError(Exception):
    """A setting is missing or malformed; the message names it."""


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    environment: str = "development"
    database_url: str | None = None
    redis_url: str | None = None
    jwt_secret: str = DEV_JWT_SECRET
    jwt_algorithm: str = "HS256"
    jwt_private_key: str | None = None
    jwt_public_key: str | None = None
    jwt_issuer: str = "selfserve"
    jwt_audience: str = "selfserve-api"
    # HMAC key of stored sign-in codes; None: the HS256 signing secret (required
    # with ES256, which has no shared secret to fall back on).
    otp_secret: str | None = None
    access_token_ttl_s: int = 900
    refresh_token_ttl_s: int = 30 * 24 * 3600
    public_base_url: str = "http://127.0.0.1:8000"
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 1_048_576
    db_pool_min: int = 1
    db_pool_max: int = 10
    # While PostgreSQL is unreachable a request waits at most this long for a
    # connection before it is answered 503; a statement at most db_command_timeout_s.
    db_acquire_timeout_s: int = 10
    db_command_timeout_s: int = 30
    data_dir: str = ".selfserve"
    log_format: str = "console"
    log_level: str = "INFO"
    twilio_account_sid: str | None = None
    twilio_auth_token: str | None = None
    twilio_from: str | None = None
    twilio_api_base_url: str = "https://api.twilio.com"
    trusted_proxies: tuple[str, ...] = ()
    otp_resend_after_s: int = 60
    otp_per_phone_hour: int = 5
    otp_per_client_hour: int = 20
    sms_daily_budget: int = 10_000
    # No SMS between these local wall times (branch zone, else quiet_hours_tz) unless
    # the message is time-critical; equal start and end switch quiet hours off.
    quiet_hours_start: str = "21:00"
    quiet_hours_end: str = "08:00"
    quiet_hours_tz: str = "Asia/Shanghai"
    # A message claimed for sending longer ago than this is presumed abandoned by a
    # crashed worker and claimed again. Must exceed the send job's timeout.
    sms_send_lease_s: int = 300
    # Booking policy.
    hold_ttl_s: int = 300
    # Reminders go this many minutes before the start instant; the one whose lead
    # equals `confirm_request_min` asks for a Y/N reply (0: no confirm request).
    reminder_leads_min: tuple[int, ...] = (1440, 120)
    confirm_request_min: int = 1440
    waitlist_claim_min: int = 15
    # A booking nobody checked in for is a no-show this long after its start.
    no_show_grace_min: int = 15
    # This many no-shows in the window and the customer must be booked by staff
    # (0 switches the rule off).
    no_show_limit: int = 3
    no_show_window_days: int = 180
    # Walk-in queue.
    queue_aging_bound_min: int = 20
    check_in_early_min: int = 30
    check_in_late_min: int = 15
    recalls_before_no_show: int = 2
    turn_near_position: int = 3
    survey_delay_min: int = 30
    # Minutes a "go to counter" or "turn near" text may still go out after it is written.
    queue_text_ttl_min: int = 10
    # Live events: Redis pub/sub channels are global to a Redis server (not per db
    # index), so every deployment (or test run) sharing one server needs its own prefix.
    live_channel_prefix: str = "selfserve"
    # Abuse limits (staff are not limited by the first four). Per customer account, or
    # per walk-in phone a kiosk books or queues for.
    max_active_holds: int = 2
    max_bookings_per_day: int = 3  # upcoming, per branch, service and branch-local day
    max_open_tickets: int = 2
    max_waitlist_entries: int = 5
    # Bookings and tickets with a phone typed at a kiosk or desk (unverified numbers)
    # count against these and the daily SMS budget.
    sms_per_number_hour: int = 5
    sms_per_device_hour: int = 200
    # Staff login: failures before delays start, per account (in 15 minutes) and per
    # client address (in an hour); the delay doubles with each further failure, up to
    # the cap (seconds).
    login_failures_per_account: int = 5
    login_failures_per_client: int = 20
    login_delay_cap_s: int = 300
    # Password hashes computed at once per process (each argon2 hash uses 64 MiB).
    password_hash_threads: int = 2
    # Open boards and ticket streams re-check their caller's rights this often (and
    # end at the token's expiry): a revoked device or account is cut off within it.
    live_recheck_s: int = 5

    @property
    def is_production(self) -> bool:
        return self.environment == "production"

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def _list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    raw = env.get(name, "")
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _minutes_list(env: Mapping[str, str], name: str, default: tuple[int, ...]) -> tuple[int, ...]:
    raw = env.get(name)
    if raw is None:
        return default
    try:
        values = tuple(sorted({int(part) for part in raw.split(",") if part.strip()}, reverse=True))
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated whole minutes, got {raw!r}") from None
    if any(v < 1 for v in values):
        raise ConfigError(f"{name} minutes must be at least 1, got {raw!r}")
    return values


def _clock(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name) or default
    if not CLOCK.match(value):
        raise ConfigError(f"{name} must be a 24-hour time HH:MM, got {value!r}")
    return value


def _zone(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name) or default
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"{name} must be an IANA time zone, got {value!r}") from None
    return value


def _channel_prefix(env: Mapping[str, str]) -> str:
    value = env.get("SELFSERVE_LIVE_CHANNEL_PREFIX") or "selfserve"
    if not CHANNEL_PREFIX.match(value):
        raise ConfigError(
            "SELFSERVE_LIVE_CHANNEL_PREFIX must be 1-64 letters, digits or . _ : - "
            f"(starting with a letter or digit), got {value!r}"
        )
    return value


def _proxies(env: Mapping[str, str]) -> tuple[str, ...]:
    proxies = _list(env, "SELFSERVE_TRUSTED_PROXIES")
    for proxy in proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ConfigError(
                f"SELFSERVE_TRUSTED_PROXIES: {proxy!r} is not an IP address or network"
            ) from None
    return proxies


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build settings from environment variables; fail fast on anything unsafe."""
    env = os.environ if env is None else env
    environment = env.get("SELFSERVE_ENV", "development")
    if environment not in {"development", "test", "production"}:
        raise ConfigError(
            f"SELFSERVE_ENV must be development, test or production, got {environment!r}"
        )
    algorithm = env.get("SELFSERVE_JWT_ALGORITHM", "HS256")
    if algorithm not in {"HS256", "ES256"}:
        raise ConfigError(f"SELFSERVE_JWT_ALGORITHM must be HS256 or ES256, got {algorithm!r}")
    secret = env.get("SELFSERVE_JWT_SECRET") or None
    private_key = env.get("SELFSERVE_JWT_PRIVATE_KEY") or None
    public_key = env.get("SELFSERVE_JWT_PUBLIC_KEY") or None
    production = environment == "production"
    if production:
        required = ["DATABASE_URL", "REDIS_URL", "SELFSERVE_PUBLIC_BASE_URL"]
        if algorithm == "HS256":
            required.append("SELFSERVE_JWT_SECRET")
        else:
            required += ["SELFSERVE_JWT_PRIVATE_KEY", "SELFSERVE_JWT_PUBLIC_KEY"]
        missing = [name for name in required if not env.get(name)]
        if missing:
            raise ConfigError("missing required setting(s) for production: " + ", ".join(missing))
    if algorithm == "HS256" and secret is not None and len(secret.encode()) < 32:
        # Any environment: a short HMAC key is guessable (RFC 7518 section 3.2).
        raise ConfigError("SELFSERVE_JWT_SECRET must be at least 32 bytes")
    if algorithm == "ES256" and not (private_key and public_key):
        raise ConfigError("ES256 needs SELFSERVE_JWT_PRIVATE_KEY and SELFSERVE_JWT_PUBLIC_KEY")
    otp_secret = env.get("SELFSERVE_OTP_SECRET") or None
    if algorithm == "ES256" and otp_secret is None:
        raise ConfigError(
            "ES256 needs SELFSERVE_OTP_SECRET (the sign-in code key, at least 32 bytes)"
        )
    if otp_secret is not None and len(otp_secret.encode()) < 32:
        raise ConfigError("SELFSERVE_OTP_SECRET must be at least 32 bytes")
    log_format = env.get("SELFSERVE_LOG_FORMAT", "json" if production else "console")
    if log_format not in {"json", "console"}:
        raise ConfigError(f"SELFSERVE_LOG_FORMAT must be json or console, got {log_format!r}")
    return Settings(
        environment=environment,
        database_url=env.get("DATABASE_URL") or None,
        redis_url=env.get("REDIS_URL") or None,
        jwt_secret=secret or DEV_JWT_SECRET,
        jwt_algorithm=algorithm,
        jwt_private_key=private_key,
        jwt_public_key=public_key,
        jwt_issuer=env.get("SELFSERVE_JWT_ISSUER", "selfserve"),
        jwt_audience=env.get("SELFSERVE_JWT_AUDIENCE", "selfserve-api"),
        otp_secret=otp_secret,
        access_token_ttl_s=_int(env, "SELFSERVE_ACCESS_TOKEN_TTL", 900),
        refresh_token_ttl_s=_int(env, "SELFSERVE_REFRESH_TOKEN_TTL", 30 * 24 * 3600),
        public_base_url=env.get("SELFSERVE_PUBLIC_BASE_URL", "http://127.0.0.1:8000").rstrip("/"),
        cors_origins=_list(env, "SELFSERVE_CORS_ORIGINS"),
        max_body_bytes=_int(env, "SELFSERVE_MAX_BODY_BYTES", 1_048_576),
        db_pool_min=_int(env, "SELFSERVE_DB_POOL_MIN", 1, minimum=0),
        db_pool_max=_int(env, "SELFSERVE_DB_POOL_MAX", 10),
        db_acquire_timeout_s=_int(env, "SELFSERVE_DB_ACQUIRE_TIMEOUT", 10),
        db_command_timeout_s=_int(env, "SELFSERVE_DB_COMMAND_TIMEOUT", 30),
        data_dir=env.get("SELFSERVE_DATA_DIR", ".selfserve"),
        log_format=log_format,
        log_level=env.get("SELFSERVE_LOG_LEVEL", "INFO").upper(),
        twilio_account_sid=env.get("TWILIO_ACCOUNT_SID") or None,
        twilio_auth_token=env.get("TWILIO_AUTH_TOKEN") or None,
        twilio_from=env.get("SELFSERVE_TWILIO_FROM") or None,
        twilio_api_base_url=env.get(
            "SELFSERVE_TWILIO_API_BASE_URL", "https://api.twilio.com"
        ).rstrip("/"),
        trusted_proxies=_proxies(env),
        otp_resend_after_s=_int(env, "SELFSERVE_OTP_RESEND_AFTER", 60),
        otp_per_phone_hour=_int(env, "SELFSERVE_OTP_PER_PHONE_HOUR", 5),
        otp_per_client_hour=_int(env, "SELFSERVE_OTP_PER_CLIENT_HOUR", 20),
        sms_daily_budget=_int(env, "SELFSERVE_SMS_DAILY_BUDGET", 10_000, minimum=0),
        quiet_hours_start=_clock(env, "SELFSERVE_QUIET_HOURS_START", "21:00"),
        quiet_hours_end=_clock(env, "SELFSERVE_QUIET_HOURS_END", "08:00"),
        quiet_hours_tz=_zone(env, "SELFSERVE_QUIET_HOURS_TZ", "Asia/Shanghai"),
        sms_send_lease_s=_int(env, "SELFSERVE_SMS_SEND_LEASE", 300, minimum=120),
        hold_ttl_s=_int(env, "SELFSERVE_HOLD_TTL", 300, minimum=30),
        reminder_leads_min=_minutes_list(env, "SELFSERVE_REMINDERS", (1440, 120)),
        confirm_request_min=_int(env, "SELFSERVE_CONFIRM_REQUEST", 1440, minimum=0),
        waitlist_claim_min=_int(env, "SELFSERVE_WAITLIST_CLAIM", 15),
        no_show_grace_min=_int(env, "SELFSERVE_NO_SHOW_GRACE", 15, minimum=0),
        no_show_limit=_int(env, "SELFSERVE_NO_SHOW_LIMIT", 3, minimum=0),
        no_show_window_days=_int(env, "SELFSERVE_NO_SHOW_WINDOW_DAYS", 180),
        queue_aging_bound_min=_int(env, "SELFSERVE_QUEUE_AGING_BOUND", 20),
        check_in_early_min=_int(env, "SELFSERVE_CHECK_IN_EARLY", 30, minimum=0),
        check_in_late_min=_int(env, "SELFSERVE_CHECK_IN_LATE", 15, minimum=0),
        recalls_before_no_show=_int(env, "SELFSERVE_RECALLS_BEFORE_NO_SHOW", 2, minimum=0),
        turn_near_position=_int(env, "SELFSERVE_TURN_NEAR_POSITION", 3, minimum=0),
        survey_delay_min=_int(env, "SELFSERVE_SURVEY_DELAY", 30, minimum=0),
        queue_text_ttl_min=_int(env, "SELFSERVE_QUEUE_TEXT_TTL", 10, minimum=1),
        live_channel_prefix=_channel_prefix(env),
        max_active_holds=_int(env, "SELFSERVE_MAX_ACTIVE_HOLDS", 2),
        max_bookings_per_day=_int(env, "SELFSERVE_MAX_BOOKINGS_PER_DAY", 3),
        max_open_tickets=_int(env, "SELFSERVE_MAX_OPEN_TICKETS", 2),
        max_waitlist_entries=_int(env, "SELFSERVE_MAX_WAITLIST_ENTRIES", 5),
        sms_per_number_hour=_int(env, "SELFSERVE_SMS_PER_NUMBER_HOUR", 5),
        sms_per_device_hour=_int(env, "SELFSERVE_SMS_PER_DEVICE_HOUR", 200),
        login_failures_per_account=_int(env, "SELFSERVE_LOGIN_FAILURES_PER_ACCOUNT", 5),
        login_failures_per_client=_int(env, "SELFSERVE_LOGIN_FAILURES_PER_CLIENT", 20),
        login_delay_cap_s=_int(env, "SELFSERVE_LOGIN_DELAY_CAP", 300),
        password_hash_threads=_int(env, "SELFSERVE_PASSWORD_HASH_THREADS", 2),
        live_recheck_s=_int(env, "SELFSERVE_LIVE_RECHECK", 5),
    )
