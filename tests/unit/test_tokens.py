"""Access tokens: what is signed in, and what decoding refuses."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from selfserve.auth.tokens import (
    Principal,
    TokenError,
    decode_access_token,
    hash_secret,
    issue_access_token,
    new_refresh_token,
)
from selfserve.settings import Settings

SETTINGS = Settings(jwt_secret="k" * 48)
MANAGER = Principal(kind="staff", id=7, role="manager", channel="staff", branches=(3, 5))
ADMIN = Principal(kind="staff", id=1, role="admin", channel="staff", branches=None)
KIOSK = Principal(kind="device", id=9, role="kiosk", channel="kiosk", branches=(3,))


def _pem_pair() -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public


def _claims(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def _resign(claims: dict[str, Any], settings: Settings = SETTINGS) -> str:
    return jwt.encode(claims, settings.jwt_secret, algorithm="HS256")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.mark.parametrize("principal", [MANAGER, ADMIN, KIOSK], ids=["manager", "admin", "kiosk"])
def test_issued_token_decodes_to_the_same_principal(principal: Principal) -> None:
    token = issue_access_token(SETTINGS, principal)
    assert decode_access_token(SETTINGS, token) == principal


def test_claims_name_issuer_audience_channel_and_lifetime() -> None:
    now = time.time()
    claims = _claims(issue_access_token(SETTINGS, KIOSK, now=now))
    assert claims["iss"] == SETTINGS.jwt_issuer
    assert claims["aud"] == SETTINGS.jwt_audience
    assert claims["sub"] == "device:9"
    assert claims["channel"] == "kiosk"
    assert claims["iat"] == int(now)
    assert claims["exp"] - claims["iat"] == 900
    assert claims["branches"] == [3]
    assert _claims(issue_access_token(SETTINGS, ADMIN))["branches"] == "*"
    short = msgspec.structs.replace(SETTINGS, access_token_ttl_s=60)
    claims = _claims(issue_access_token(short, KIOSK))
    assert claims["exp"] - claims["iat"] == 60


def test_expired_token_is_refused() -> None:
    old = issue_access_token(SETTINGS, MANAGER, now=time.time() - 900 - 30)
    with pytest.raises(TokenError):
        decode_access_token(SETTINGS, old)
    # Inside its lifetime the same principal is fine.
    recent = issue_access_token(SETTINGS, MANAGER, now=time.time() - 600)
    assert decode_access_token(SETTINGS, recent) == MANAGER


def test_token_from_other_issuer_audience_or_secret_is_refused() -> None:
    token = issue_access_token(SETTINGS, MANAGER)
    for other in (
        msgspec.structs.replace(SETTINGS, jwt_issuer="other"),
        msgspec.structs.replace(SETTINGS, jwt_audience="other"),
        msgspec.structs.replace(SETTINGS, jwt_secret="q" * 48),
    ):
        with pytest.raises(TokenError):
            decode_access_token(other, token)


@pytest.mark.parametrize(
    "changes",
    [
        {"role": "manager", "branches": "*"},
        {"role": "superuser"},
        {"channel": "carrier_pigeon"},
        {"sub": "robot:7"},
        {"sub": "staff:seven"},
        {"sub": "staff"},
        {"branches": ["x"]},
    ],
    ids=[
        "non_admin_all_branches",
        "unknown_role",
        "unknown_channel",
        "unknown_subject_kind",
        "non_numeric_subject",
        "subject_without_id",
        "non_numeric_branch",
    ],
)
def test_signed_but_malformed_claims_are_refused(changes: dict[str, Any]) -> None:
    claims = {**_claims(issue_access_token(SETTINGS, MANAGER)), **changes}
    with pytest.raises(TokenError):
        decode_access_token(SETTINGS, _resign(claims))


@pytest.mark.parametrize("claim", ["exp", "iat", "iss", "aud", "sub", "role", "channel"])
def test_missing_required_claim_is_refused(claim: str) -> None:
    claims = _claims(issue_access_token(SETTINGS, MANAGER))
    assert decode_access_token(SETTINGS, _resign(claims)) == MANAGER
    del claims[claim]
    with pytest.raises(TokenError):
        decode_access_token(SETTINGS, _resign(claims))


def test_missing_branches_means_no_branch() -> None:
    claims = _claims(issue_access_token(SETTINGS, MANAGER))
    del claims["branches"]
    assert decode_access_token(SETTINGS, _resign(claims)).branches == ()


def test_es256_round_trip_and_algorithm_confusion() -> None:
    private, public = _pem_pair()
    es = Settings(jwt_algorithm="ES256", jwt_private_key=private, jwt_public_key=public)
    token = issue_access_token(es, KIOSK)
    assert jwt.get_unverified_header(token)["alg"] == "ES256"
    assert decode_access_token(es, token) == KIOSK

    # Signed by somebody else's key pair.
    other_private, _ = _pem_pair()
    forged = jwt.encode(_claims(token), other_private, algorithm="ES256")
    with pytest.raises(TokenError):
        decode_access_token(es, forged)

    # The public key used as an HMAC secret (the classic confusion attack).
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = _b64(json.dumps(_claims(token)).encode())
    mac = hmac.new(public.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    with pytest.raises(TokenError):
        decode_access_token(es, f"{header}.{payload}.{_b64(mac)}")

    # And an HS256 deployment does not take ES256 tokens.
    with pytest.raises(TokenError):
        decode_access_token(SETTINGS, token)


def test_refresh_tokens_are_random_and_stored_as_digests() -> None:
    tokens = {new_refresh_token() for _ in range(50)}
    assert len({t for t, _ in tokens}) == 50
    for token, digest in tokens:
        assert len(token) >= 43  # 256 bits, URL-safe base64
        assert digest == hash_secret(token) == hashlib.sha256(token.encode()).digest()
        assert token.encode() not in digest
