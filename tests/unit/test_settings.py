"""Settings come from the environment and fail fast, naming what is wrong."""

from __future__ import annotations

import pytest

from selfserve.auth.otp import otp_key
from selfserve.settings import DEV_JWT_SECRET, ConfigError, Settings, load_settings

SECRET = "s" * 32
PRODUCTION = {
    "SELFSERVE_ENV": "production",
    "DATABASE_URL": "postgresql://app@db.internal/selfserve",
    "REDIS_URL": "redis://cache.internal:6379/0",
    "SELFSERVE_PUBLIC_BASE_URL": "https://hall.example.com/",
    "SELFSERVE_JWT_SECRET": SECRET,
}


def test_complete_production_settings_load() -> None:
    settings = load_settings(PRODUCTION)
    assert settings.is_production
    assert settings.jwt_secret == SECRET
    assert settings.jwt_algorithm == "HS256"
    assert settings.public_base_url == "https://hall.example.com"
    assert settings.log_format == "json"
    assert settings.access_token_ttl_s == 900


@pytest.mark.parametrize("value", [None, ""])
def test_production_without_jwt_secret_names_it(value: str | None) -> None:
    env = {k: v for k, v in PRODUCTION.items() if k != "SELFSERVE_JWT_SECRET"}
    if value is not None:
        env["SELFSERVE_JWT_SECRET"] = value
    with pytest.raises(ConfigError, match="SELFSERVE_JWT_SECRET"):
        load_settings(env)


def test_production_names_every_missing_setting() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"SELFSERVE_ENV": "production"})
    message = str(info.value)
    for name in (
        "DATABASE_URL",
        "REDIS_URL",
        "SELFSERVE_PUBLIC_BASE_URL",
        "SELFSERVE_JWT_SECRET",
    ):
        assert name in message


@pytest.mark.parametrize("missing", ["DATABASE_URL", "REDIS_URL", "SELFSERVE_PUBLIC_BASE_URL"])
def test_production_names_the_one_missing_setting(missing: str) -> None:
    env = {k: v for k, v in PRODUCTION.items() if k != missing}
    with pytest.raises(ConfigError, match=missing) as info:
        load_settings(env)
    assert "SELFSERVE_JWT_SECRET" not in str(info.value)


@pytest.mark.parametrize("environment", ["production", "development", "test"])
def test_short_jwt_secret_is_refused(environment: str) -> None:
    env = {**PRODUCTION, "SELFSERVE_ENV": environment, "SELFSERVE_JWT_SECRET": "s" * 31}
    with pytest.raises(ConfigError, match="SELFSERVE_JWT_SECRET"):
        load_settings(env)
    env["SELFSERVE_JWT_SECRET"] = "s" * 32
    assert load_settings(env).jwt_secret == "s" * 32


def test_development_falls_back_to_the_dev_secret() -> None:
    settings = load_settings({})
    assert not settings.is_production
    assert settings.jwt_secret == DEV_JWT_SECRET
    assert len(settings.jwt_secret) >= 32


@pytest.mark.parametrize("environment", ["development", "production"])
@pytest.mark.parametrize(
    "keys",
    [{}, {"SELFSERVE_JWT_PRIVATE_KEY": "pem"}, {"SELFSERVE_JWT_PUBLIC_KEY": "pem"}],
    ids=["no_keys", "private_only", "public_only"],
)
def test_es256_without_both_keys_is_refused(environment: str, keys: dict[str, str]) -> None:
    env = {**PRODUCTION, "SELFSERVE_ENV": environment, "SELFSERVE_JWT_ALGORITHM": "ES256", **keys}
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    message = str(info.value)
    for name in ("SELFSERVE_JWT_PRIVATE_KEY", "SELFSERVE_JWT_PUBLIC_KEY"):
        if name not in keys:
            assert name in message


def test_es256_with_both_keys_loads() -> None:
    env = {
        **PRODUCTION,
        "SELFSERVE_JWT_ALGORITHM": "ES256",
        "SELFSERVE_JWT_PRIVATE_KEY": "private-pem",
        "SELFSERVE_JWT_PUBLIC_KEY": "public-pem",
        "SELFSERVE_OTP_SECRET": "o" * 32,
    }
    del env["SELFSERVE_JWT_SECRET"]  # not needed with keys
    settings = load_settings(env)
    assert settings.jwt_algorithm == "ES256"
    assert settings.jwt_private_key == "private-pem"
    assert settings.jwt_public_key == "public-pem"


@pytest.mark.parametrize("algorithm", ["none", "HS512", "RS256", "hs256"])
def test_unsupported_jwt_algorithm_is_refused(algorithm: str) -> None:
    with pytest.raises(ConfigError, match="SELFSERVE_JWT_ALGORITHM"):
        load_settings({"SELFSERVE_JWT_ALGORITHM": algorithm})


def test_unknown_environment_is_refused() -> None:
    with pytest.raises(ConfigError, match="SELFSERVE_ENV"):
        load_settings({"SELFSERVE_ENV": "prod"})


def test_non_integer_ttl_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="SELFSERVE_ACCESS_TOKEN_TTL"):
        load_settings({"SELFSERVE_ACCESS_TOKEN_TTL": "15m"})
    assert load_settings({"SELFSERVE_ACCESS_TOKEN_TTL": "300"}).access_token_ttl_s == 300


@pytest.mark.parametrize(
    "name",
    ["SELFSERVE_ACCESS_TOKEN_TTL", "SELFSERVE_REFRESH_TOKEN_TTL", "SELFSERVE_MAX_BODY_BYTES"],
)
@pytest.mark.parametrize("value", ["0", "-5"])
def test_non_positive_sizes_and_lifetimes_are_refused(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load_settings({name: value})


def test_live_channel_prefix_defaults_and_is_checked() -> None:
    assert load_settings({}).live_channel_prefix == "selfserve"
    assert load_settings({"SELFSERVE_LIVE_CHANNEL_PREFIX": ""}).live_channel_prefix == "selfserve"
    custom = load_settings({"SELFSERVE_LIVE_CHANNEL_PREFIX": "hall-7.prod:v2"})
    assert custom.live_channel_prefix == "hall-7.prod:v2"
    for bad in ("with space", "-leading", "x" * 65, "star*"):
        with pytest.raises(ConfigError, match="SELFSERVE_LIVE_CHANNEL_PREFIX"):
            load_settings({"SELFSERVE_LIVE_CHANNEL_PREFIX": bad})


@pytest.mark.parametrize("environment", ["development", "test", "production"])
def test_es256_needs_its_own_sign_in_code_secret(environment: str) -> None:
    """With ES256 there is no shared secret: the code hash must not fall back to the
    built-in development key."""
    env = {
        **PRODUCTION,
        "SELFSERVE_ENV": environment,
        "SELFSERVE_JWT_ALGORITHM": "ES256",
        "SELFSERVE_JWT_PRIVATE_KEY": "private-pem",
        "SELFSERVE_JWT_PUBLIC_KEY": "public-pem",
    }
    del env["SELFSERVE_JWT_SECRET"]
    with pytest.raises(ConfigError, match="SELFSERVE_OTP_SECRET"):
        load_settings(env)
    with pytest.raises(ConfigError, match="SELFSERVE_OTP_SECRET"):
        load_settings({**env, "SELFSERVE_OTP_SECRET": "short"})
    settings = load_settings({**env, "SELFSERVE_OTP_SECRET": "s" * 32})
    assert settings.otp_secret == "s" * 32


def test_sign_in_code_key_is_never_the_built_in_secret_with_es256() -> None:
    es = Settings(jwt_algorithm="ES256", jwt_private_key="k", jwt_public_key="k")
    with pytest.raises(RuntimeError, match="SELFSERVE_OTP_SECRET"):
        otp_key(es)
    own = Settings(
        jwt_algorithm="ES256", jwt_private_key="k", jwt_public_key="k", otp_secret="s" * 32
    )
    assert otp_key(own) == b"s" * 32
    assert otp_key(Settings()) == DEV_JWT_SECRET.encode()  # HS256: the signing secret
