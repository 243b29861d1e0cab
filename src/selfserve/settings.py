"""Settings, read from the environment only (12-factor)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import msgspec

DEV_JWT_SECRET = "selfserve-dev-secret-change-me-0123456789abcdef"  # noqa: S105


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
    access_token_ttl_s: int = 900
    refresh_token_ttl_s: int = 30 * 24 * 3600
    public_base_url: str = "http://127.0.0.1:8000"
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 1_048_576
    db_pool_min: int = 1
    db_pool_max: int = 10
    data_dir: str = ".selfserve"
    log_format: str = "console"
    log_level: str = "INFO"
    twilio_account_sid: str | None = None
    twilio_auth_token: str | None = None
    twilio_from: str | None = None
    twilio_api_base_url: str = "https://api.twilio.com"
    trusted_proxies: tuple[str, ...] = ()

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
        access_token_ttl_s=_int(env, "SELFSERVE_ACCESS_TOKEN_TTL", 900),
        refresh_token_ttl_s=_int(env, "SELFSERVE_REFRESH_TOKEN_TTL", 30 * 24 * 3600),
        public_base_url=env.get("SELFSERVE_PUBLIC_BASE_URL", "http://127.0.0.1:8000").rstrip("/"),
        cors_origins=_list(env, "SELFSERVE_CORS_ORIGINS"),
        max_body_bytes=_int(env, "SELFSERVE_MAX_BODY_BYTES", 1_048_576),
        db_pool_min=_int(env, "SELFSERVE_DB_POOL_MIN", 1, minimum=0),
        db_pool_max=_int(env, "SELFSERVE_DB_POOL_MAX", 10),
        data_dir=env.get("SELFSERVE_DATA_DIR", ".selfserve"),
        log_format=log_format,
        log_level=env.get("SELFSERVE_LOG_LEVEL", "INFO").upper(),
        twilio_account_sid=env.get("TWILIO_ACCOUNT_SID") or None,
        twilio_auth_token=env.get("TWILIO_AUTH_TOKEN") or None,
        twilio_from=env.get("SELFSERVE_TWILIO_FROM") or None,
        twilio_api_base_url=env.get(
            "SELFSERVE_TWILIO_API_BASE_URL", "https://api.twilio.com"
        ).rstrip("/"),
        trusted_proxies=_list(env, "SELFSERVE_TRUSTED_PROXIES"),
    )
