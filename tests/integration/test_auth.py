"""Identity over HTTP: bearer tokens, device and staff login, refresh rotation, branch scope.

Everything runs against the real app, PostgreSQL and Redis. Bad tokens are built by
re-signing the claims of a real token with one thing changed, so each case fails for
the reason it names (a re-signed copy of the unchanged claims is accepted).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from httpx import AsyncClient

from selfserve.auth.tokens import Principal, hash_secret, issue_access_token
from selfserve.settings import Settings
from tests.conftest import ModuleEnv
from tests.helpers import (
    BRANCH,
    PASSWORD,
    bearer,
    create_branch,
    create_service,
    login,
    make_staff,
)

PROTECTED = "/v1/admin/branches"
PROBLEM = "application/problem+json"


# --- helpers -----------------------------------------------------------------


def assert_problem(resp: httpx.Response, status: int, *codes: str) -> dict[str, Any]:
    """An RFC 9457 problem with the given status and one of the given machine codes."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith(PROBLEM), resp.headers["content-type"]
    body: dict[str, Any] = resp.json()
    assert body["status"] == status
    assert body["code"] in codes, body
    assert body["type"].endswith("/" + body["code"])
    assert body["title"]
    assert body["detail"]
    return body


def assert_unauthorized(resp: httpx.Response, *codes: str) -> dict[str, Any]:
    body = assert_problem(resp, 401, *(codes or ("invalid_token",)))
    assert resp.headers["www-authenticate"].startswith("Bearer")
    return body


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def sign(claims: dict[str, Any], key: Any, algorithm: str, **header: Any) -> str:
    """Encode with PyJWT, quiet about deliberately weak keys (forging is the point)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jwt.warnings.InsecureKeyLengthWarning)
        return jwt.encode(claims, key, algorithm=algorithm, headers=header or None)


def unsigned(claims: dict[str, Any], alg: str = "none", signature: str = "") -> str:
    header = b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    payload = b64url(json.dumps(claims).encode())
    return f"{header}.{payload}.{signature}"


def claims_of(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def without(claims: dict[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in claims.items() if k != name}


def pem_private(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


async def staff_id(pool: asyncpg.Pool, email: str) -> int:
    sid: int = await pool.fetchval("SELECT id FROM staff WHERE email = $1", email)
    return sid


async def refresh(client: AsyncClient, token: str) -> httpx.Response:
    return await client.post("/v1/auth/refresh", json={"refresh_token": token})


async def staff_pair(client: AsyncClient, email: str, password: str = PASSWORD) -> dict[str, Any]:
    resp = await client.post("/v1/auth/staff/login", json={"email": email, "password": password})
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


# --- shared records ----------------------------------------------------------


@dataclass
class World:
    settings: Settings
    admin_email: str
    admin_id: int
    admin_token: str
    b1: int
    b2: int


@pytest.fixture(scope="module")
async def world(client: AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv) -> World:
    email = await make_staff(pool, "admin")
    token = await login(client, email)
    b1 = await create_branch(client, token, name="Branch One")
    b2 = await create_branch(client, token, name="Branch Two")
    return World(
        settings=module_env.settings,
        admin_email=email,
        admin_id=await staff_id(pool, email),
        admin_token=token,
        b1=b1["id"],
        b2=b2["id"],
    )


async def create_device(client: AsyncClient, token: str, branch_id: int) -> dict[str, Any]:
    resp = await client.post(
        "/v1/admin/devices",
        json={"branch_id": branch_id, "name": "Kiosk by the door"},
        headers=bearer(token),
    )
    assert resp.status_code == 201, resp.text
    body: dict[str, Any] = resp.json()
    return body


async def device_login(client: AsyncClient, device_id: int, secret: str) -> httpx.Response:
    return await client.post("/v1/auth/device", json={"device_id": device_id, "secret": secret})


# --- 1. bearer token validation ----------------------------------------------

_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_EC_KEY = ec.generate_private_key(ec.SECP256R1())


@dataclass
class TokenCase:
    world: World
    admin_claims: dict[str, Any]
    admin_token: str
    manager_token: str
    ghost_token: str

    def resign(self, claims: dict[str, Any]) -> str:
        return sign(claims, self.world.settings.jwt_secret, "HS256")


@pytest.fixture(scope="module")
async def token_case(client: AsyncClient, pool: asyncpg.Pool, world: World) -> TokenCase:
    manager = await make_staff(pool, "manager", [world.b1])
    ghost = Principal(kind="staff", id=10**9, role="admin", channel="staff", branches=None)
    return TokenCase(
        world=world,
        admin_claims=claims_of(world.admin_token),
        admin_token=world.admin_token,
        manager_token=await login(client, manager),
        ghost_token=issue_access_token(world.settings, ghost),
    )


def _tampered(token: str, **changes: Any) -> str:
    """The same header and signature around a payload with some claims changed."""
    header, payload, signature = token.split(".")
    claims = json.loads(unb64url(payload))
    claims.update(changes)
    return ".".join([header, b64url(json.dumps(claims).encode()), signature])


def _expired(c: TokenCase) -> str:
    admin = Principal(
        kind="staff", id=c.world.admin_id, role="admin", channel="staff", branches=None
    )
    return issue_access_token(c.world.settings, admin, now=time.time() - 3600)


def _just_expired(c: TokenCase) -> str:
    now = int(time.time())
    return c.resign({**c.admin_claims, "iat": now - 960, "nbf": now - 960, "exp": now - 60})


BAD_TOKENS: dict[str, Callable[[TokenCase], str]] = {
    "expired": _expired,
    "expired_a_minute_ago": _just_expired,
    "wrong_audience": lambda c: c.resign({**c.admin_claims, "aud": "some-other-api"}),
    "wrong_issuer": lambda c: c.resign({**c.admin_claims, "iss": "https://evil.example"}),
    "not_yet_valid": lambda c: c.resign({**c.admin_claims, "nbf": int(time.time()) + 3600}),
    "alg_none": lambda c: unsigned(c.admin_claims),
    "alg_None": lambda c: unsigned(c.admin_claims, alg="None"),
    "alg_none_keeping_signature": lambda c: unsigned(
        c.admin_claims, signature=c.admin_token.rsplit(".", 1)[1]
    ),
    "pyjwt_alg_none": lambda c: sign(c.admin_claims, None, "none"),
    "hs512_same_secret": lambda c: sign(c.admin_claims, c.world.settings.jwt_secret, "HS512"),
    "hs384_same_secret": lambda c: sign(c.admin_claims, c.world.settings.jwt_secret, "HS384"),
    "rs256_own_key": lambda c: sign(c.admin_claims, pem_private(_RSA_KEY), "RS256"),
    "es256_own_key": lambda c: sign(c.admin_claims, pem_private(_EC_KEY), "ES256"),
    "hs256_other_secret": lambda c: sign(c.admin_claims, "x" * 64, "HS256"),
    "tampered_role": lambda c: _tampered(c.manager_token, role="admin", branches="*"),
    "tampered_subject": lambda c: _tampered(c.manager_token, sub=c.admin_claims["sub"]),
    "no_exp": lambda c: c.resign(without(c.admin_claims, "exp")),
    "no_iat": lambda c: c.resign(without(c.admin_claims, "iat")),
    "no_iss": lambda c: c.resign(without(c.admin_claims, "iss")),
    "no_aud": lambda c: c.resign(without(c.admin_claims, "aud")),
    "no_sub": lambda c: c.resign(without(c.admin_claims, "sub")),
    "no_role": lambda c: c.resign(without(c.admin_claims, "role")),
    "no_channel": lambda c: c.resign(without(c.admin_claims, "channel")),
    "unknown_role": lambda c: c.resign({**c.admin_claims, "role": "root"}),
    "non_admin_spanning_all_branches": lambda c: c.resign(
        {**c.admin_claims, "role": "manager", "branches": "*"}
    ),
    "account_does_not_exist": lambda c: c.ghost_token,
    "not_a_jwt": lambda c: "not.a.jwt",
    "truncated": lambda c: c.admin_token[:-10],
}


@pytest.mark.parametrize("case", list(BAD_TOKENS))
async def test_bad_bearer_token_is_401_problem(
    client: AsyncClient, token_case: TokenCase, case: str
) -> None:
    token = BAD_TOKENS[case](token_case)
    resp = await client.get(PROTECTED, headers=bearer(token))
    assert_unauthorized(resp, "invalid_token")


@pytest.mark.parametrize(
    "header",
    [None, "Basic YWRtaW46YWRtaW4=", "Bearer", "Bearer ", "Token {token}", "{token}"],
    ids=["missing", "basic", "bearer_without_token", "bearer_blank", "token_scheme", "bare"],
)
async def test_missing_or_foreign_authorization_is_401_problem(
    client: AsyncClient, token_case: TokenCase, header: str | None
) -> None:
    headers = (
        {} if header is None else {"Authorization": header.format(token=token_case.admin_token)}
    )
    resp = await client.get(PROTECTED, headers=headers)
    assert_unauthorized(resp, "unauthorized")


async def test_valid_token_and_faithful_resign_are_accepted(
    client: AsyncClient, token_case: TokenCase
) -> None:
    # The real token, a re-signed copy of its unchanged claims (so the forgeries above
    # fail only for what they change) and a lower-case scheme are all accepted.
    resigned = token_case.resign(token_case.admin_claims)
    for header in (
        f"Bearer {token_case.admin_token}",
        f"Bearer {resigned}",
        f"bearer {token_case.admin_token}",
    ):
        resp = await client.get(PROTECTED, headers={"Authorization": header})
        assert resp.status_code == 200, resp.text
        assert token_case.world.b1 in [b["id"] for b in resp.json()["items"]]


async def test_problem_detail_follows_accept_language(client: AsyncClient) -> None:
    en = await client.get(PROTECTED, headers={"Authorization": "Bearer x.y.z"})
    zh = await client.get(
        PROTECTED, headers={"Authorization": "Bearer x.y.z", "Accept-Language": "zh-CN"}
    )
    assert assert_unauthorized(en)["detail"] != assert_unauthorized(zh)["detail"]
    assert zh.headers["content-language"] == "zh-CN"


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/auth/device", {"device_id": 2**63, "secret": "s"}, "device_id"),
        ("/v1/auth/device", {"device_id": 2**64, "secret": "s"}, "device_id"),
        ("/v1/auth/device", {"device_id": 0, "secret": "s"}, "device_id"),
        ("/v1/auth/device", {"device_id": 1, "secret": ""}, "secret"),
        ("/v1/auth/staff/login", {"email": "a\u0000b@example.test", "password": "p"}, "email"),
        ("/v1/auth/staff/login", {"email": "no-at-sign", "password": "p"}, "email"),
        ("/v1/auth/staff/login", {"email": "a@example.test", "password": ""}, "password"),
        ("/v1/auth/refresh", {"refresh_token": ""}, "refresh_token"),
        ("/v1/auth/refresh", {"refresh_token": "t", "extra": 1}, "extra"),
    ],
    ids=[
        "device_id_past_bigint",
        "device_id_past_uint64",
        "device_id_zero",
        "empty_secret",
        "nul_in_email",
        "not_an_email",
        "empty_password",
        "empty_refresh_token",
        "unknown_field",
    ],
)
async def test_bad_login_input_is_422_naming_the_field(
    client: AsyncClient, path: str, body: dict[str, Any], field: str
) -> None:
    problem = assert_problem(await client.post(path, json=body), 422, "validation_error")
    assert [e["field"] for e in problem["errors"]] == [field]


# --- 2. devices ----------------------------------------------------------------


async def test_device_secret_is_shown_once_and_stored_hashed(
    client: AsyncClient, pool: asyncpg.Pool, world: World
) -> None:
    device = await create_device(client, world.admin_token, world.b1)
    secret = device["secret"]
    assert len(secret) >= 32
    stored = bytes(
        await pool.fetchval("SELECT secret_hash FROM devices WHERE id = $1", device["id"])
    )
    assert stored != secret.encode()
    assert secret.encode() not in stored
    assert stored == hash_secret(secret)  # only a digest is kept

    one = await client.get(f"/v1/admin/devices/{device['id']}", headers=bearer(world.admin_token))
    listed = await client.get(
        "/v1/admin/devices", params={"branch_id": world.b1}, headers=bearer(world.admin_token)
    )
    assert one.status_code == 200
    assert listed.status_code == 200
    assert "secret" not in one.json()
    assert device["id"] in [d["id"] for d in listed.json()["items"]]
    assert all("secret" not in d for d in listed.json()["items"])
    assert secret not in one.text
    assert secret not in listed.text


async def test_device_login_needs_the_right_secret(client: AsyncClient, world: World) -> None:
    device = await create_device(client, world.admin_token, world.b1)
    other = await create_device(client, world.admin_token, world.b1)
    for device_id, secret in (
        (device["id"], device["secret"] + "x"),
        (device["id"], other["secret"]),
        (10**9, device["secret"]),
    ):
        assert_problem(await device_login(client, device_id, secret), 401, "invalid_credentials")
    assert (await device_login(client, device["id"], device["secret"])).status_code == 200


async def test_revoked_device_is_locked_out_at_once(
    client: AsyncClient, pool: asyncpg.Pool, world: World
) -> None:
    device = await create_device(client, world.admin_token, world.b1)
    resp = await device_login(client, device["id"], device["secret"])
    assert resp.status_code == 200, resp.text
    pair = resp.json()
    assert pair["role"] == "kiosk"
    assert pair["branch_ids"] == [world.b1]

    # Authenticated (a kiosk may not use the admin area, but it gets past the token check).
    before = await client.get(PROTECTED, headers=bearer(pair["access_token"]))
    assert_problem(before, 403, "forbidden")
    rotated = await refresh(client, pair["refresh_token"])
    assert rotated.status_code == 200, rotated.text
    pair = rotated.json()
    assert pair["channel"] == "kiosk"

    deactivated = await client.post(
        f"/v1/admin/devices/{device['id']}/deactivate", headers=bearer(world.admin_token)
    )
    assert deactivated.status_code == 200, deactivated.text
    assert deactivated.json()["active"] is False
    assert deactivated.json()["revoked_at"] is not None

    # The same, still unexpired access token is now refused as a credential.
    assert_unauthorized(await client.get(PROTECTED, headers=bearer(pair["access_token"])))
    assert_problem(
        await device_login(client, device["id"], device["secret"]), 401, "invalid_credentials"
    )
    assert_problem(await refresh(client, pair["refresh_token"]), 401, "invalid_refresh_token")
    live = await pool.fetchval(
        "SELECT count(*) FROM refresh_tokens WHERE principal_kind = 'device' "
        "AND principal_id = $1 AND revoked_at IS NULL",
        device["id"],
    )
    assert live == 0


# --- 3. refresh rotation ---------------------------------------------------------


async def test_refresh_rotates_the_pair(client: AsyncClient, pool: asyncpg.Pool) -> None:
    email = await make_staff(pool, "admin")
    first = await staff_pair(client, email)
    resp = await refresh(client, first["refresh_token"])
    assert resp.status_code == 200, resp.text
    second = resp.json()
    assert second["refresh_token"] != first["refresh_token"]
    assert second["access_token"] != first["access_token"]
    assert second["expires_in"] == 900
    assert second["channel"] == "staff"
    assert claims_of(second["access_token"])["sub"] == claims_of(first["access_token"])["sub"]
    ok = await client.get(PROTECTED, headers=bearer(second["access_token"]))
    assert ok.status_code == 200, ok.text


async def test_reused_refresh_token_revokes_its_family(
    client: AsyncClient, pool: asyncpg.Pool
) -> None:
    email = await make_staff(pool, "admin")
    first = await staff_pair(client, email)
    other_session = await staff_pair(client, email)
    second = (await refresh(client, first["refresh_token"])).json()
    third_resp = await refresh(client, second["refresh_token"])
    assert third_resp.status_code == 200, third_resp.text
    third = third_resp.json()

    # Someone replays the first, long spent token: the whole chain ends.
    assert_problem(await refresh(client, first["refresh_token"]), 401, "refresh_token_reused")
    assert_problem(await refresh(client, third["refresh_token"]), 401, "invalid_refresh_token")
    assert_problem(await refresh(client, second["refresh_token"]), 401, "refresh_token_reused")

    # Another login of the same person is a different family and keeps working.
    still = await refresh(client, other_session["refresh_token"])
    assert still.status_code == 200, still.text


async def test_concurrent_refresh_with_one_token_issues_one_pair(
    client: AsyncClient, pool: asyncpg.Pool
) -> None:
    email = await make_staff(pool, "admin")
    pair = await staff_pair(client, email)
    results = await asyncio.gather(*(refresh(client, pair["refresh_token"]) for _ in range(2)))
    statuses = sorted(r.status_code for r in results)
    assert statuses == [200, 401], [r.text for r in results]


async def test_unknown_or_expired_refresh_token_is_refused(
    client: AsyncClient, pool: asyncpg.Pool
) -> None:
    for garbage in ("garbage", "x" * 43, "a.b.c"):
        assert_problem(await refresh(client, garbage), 401, "invalid_refresh_token")
    # An access token is not a refresh token.
    email = await make_staff(pool, "admin")
    pair = await staff_pair(client, email)
    assert_problem(await refresh(client, pair["access_token"]), 401, "invalid_refresh_token")

    await pool.execute(
        "UPDATE refresh_tokens SET expires_at = now() - interval '1 second' WHERE token_hash = $1",
        hash_secret(pair["refresh_token"]),
    )
    assert_problem(await refresh(client, pair["refresh_token"]), 401, "invalid_refresh_token")


# --- 4. staff login ----------------------------------------------------------------


async def test_staff_password_is_stored_as_argon2id(
    client: AsyncClient, pool: asyncpg.Pool, world: World
) -> None:
    password = "a long and secret passphrase"
    resp = await client.post(
        "/v1/admin/staff",
        json={
            "email": "hashed.person@example.test",
            "name": "Hashed Person",
            "password": password,
            "role": "staff",
            "branch_ids": [world.b1],
        },
        headers=bearer(world.admin_token),
    )
    assert resp.status_code == 201, resp.text
    assert password not in resp.text
    assert "password" not in json.dumps(list(resp.json()))
    stored = await pool.fetchval("SELECT password_hash FROM staff WHERE id = $1", resp.json()["id"])
    assert stored.startswith("$argon2id$")
    assert password not in stored
    login_resp = await staff_pair(client, "Hashed.Person@Example.test", password)
    assert login_resp["role"] == "staff"
    assert login_resp["branch_ids"] == [world.b1]


async def test_wrong_password_and_unknown_email_look_the_same(
    client: AsyncClient, pool: asyncpg.Pool
) -> None:
    email = await make_staff(pool, "staff", [])
    wrong = await client.post(
        "/v1/auth/staff/login", json={"email": email, "password": PASSWORD + "!"}
    )
    unknown = await client.post(
        "/v1/auth/staff/login", json={"email": "nobody@example.test", "password": PASSWORD}
    )
    a = assert_problem(wrong, 401, "invalid_credentials")
    b = assert_problem(unknown, 401, "invalid_credentials")
    assert a["detail"] == b["detail"]
    assert "access_token" not in wrong.text


async def test_deactivated_staff_is_locked_out_at_once(
    client: AsyncClient, pool: asyncpg.Pool, world: World
) -> None:
    email = await make_staff(pool, "manager", [world.b1])
    pair = await staff_pair(client, email)
    assert (await client.get(PROTECTED, headers=bearer(pair["access_token"]))).status_code == 200

    sid = await staff_id(pool, email)
    resp = await client.post(f"/v1/admin/staff/{sid}/deactivate", headers=bearer(world.admin_token))
    assert resp.status_code == 200, resp.text
    assert resp.json()["active"] is False

    assert_unauthorized(await client.get(PROTECTED, headers=bearer(pair["access_token"])))
    login_resp = await client.post(
        "/v1/auth/staff/login", json={"email": email, "password": PASSWORD}
    )
    assert_problem(login_resp, 401, "invalid_credentials")
    assert_problem(await refresh(client, pair["refresh_token"]), 401, "invalid_refresh_token")


# --- 5. branch scope -----------------------------------------------------------------


@dataclass
class Scope:
    manager: str
    staff: str
    service2: dict[str, Any]
    resource2: dict[str, Any]


@pytest.fixture(scope="module")
async def scope(client: AsyncClient, pool: asyncpg.Pool, world: World) -> Scope:
    service2 = await create_service(client, world.admin_token, world.b2, name="Far away")
    res = await client.post(
        "/v1/admin/resources",
        json={"branch_id": world.b2, "kind": "counter", "name": "Far counter"},
        headers=bearer(world.admin_token),
    )
    assert res.status_code == 201, res.text
    manager = await login(client, await make_staff(pool, "manager", [world.b1]))
    staff = await login(client, await make_staff(pool, "staff", [world.b1]))
    return Scope(manager=manager, staff=staff, service2=service2, resource2=res.json())


async def test_manager_writes_inside_own_branch(
    client: AsyncClient, world: World, scope: Scope
) -> None:
    patched = await client.patch(
        f"/v1/admin/branches/{world.b1}",
        json={"address": "2 Managed Street"},
        headers=bearer(scope.manager),
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["address"] == "2 Managed Street"
    service = await create_service(client, scope.manager, world.b1, name="Local service")
    assert service["branch_id"] == world.b1
    staff = await client.post(
        "/v1/admin/staff",
        json={
            "email": "local.clerk@example.test",
            "name": "Local Clerk",
            "password": "clerk password 1",
            "role": "staff",
            "branch_ids": [world.b1],
        },
        headers=bearer(scope.manager),
    )
    assert staff.status_code == 201, staff.text


async def _count(pool: asyncpg.Pool, table: str, branch_id: int) -> int:
    n: int = await pool.fetchval(f"SELECT count(*) FROM {table} WHERE branch_id = $1", branch_id)
    return n


async def test_manager_cannot_create_in_another_branch(
    client: AsyncClient, pool: asyncpg.Pool, world: World, scope: Scope
) -> None:
    before = {t: await _count(pool, t, world.b2) for t in ("services", "resources", "devices")}
    attempts = {
        "/v1/admin/services": {"branch_id": world.b2, "name": "Sneaky", "duration_min": 10},
        "/v1/admin/resources": {"branch_id": world.b2, "kind": "counter", "name": "Sneaky"},
        "/v1/admin/devices": {"branch_id": world.b2, "name": "Sneaky kiosk"},
    }
    # another branch is refused exactly as a missing one would be
    for path, body in attempts.items():
        resp = await client.post(path, json=body, headers=bearer(scope.manager))
        problem = assert_problem(resp, 422, "validation_error")
        missing = await client.post(
            path, json={**body, "branch_id": 10**12}, headers=bearer(scope.manager)
        )
        assert missing.json()["errors"] == problem["errors"]
    after = {t: await _count(pool, t, world.b2) for t in ("services", "resources", "devices")}
    assert after == before
    clerk = await client.post(
        "/v1/admin/staff",
        json={
            "email": "far.clerk@example.test",
            "name": "Far Clerk",
            "password": "clerk password 2",
            "role": "staff",
            "branch_ids": [world.b2],
        },
        headers=bearer(scope.manager),
    )
    assert_problem(clerk, 422, "validation_error")


async def test_other_branch_records_look_missing_to_a_manager(
    client: AsyncClient, world: World, scope: Scope
) -> None:
    missing = 10**9
    for kind, record, patch_body in (
        ("services", scope.service2, {"name": "Renamed"}),
        ("resources", scope.resource2, {"name": "Renamed"}),
    ):
        for rid in (record["id"], missing):
            h = bearer(scope.manager)
            assert_problem(await client.get(f"/v1/admin/{kind}/{rid}", headers=h), 404, "not_found")
            assert_problem(
                await client.patch(f"/v1/admin/{kind}/{rid}", json=patch_body, headers=h),
                404,
                "not_found",
            )
            assert_problem(
                await client.post(f"/v1/admin/{kind}/{rid}/deactivate", headers=h),
                404,
                "not_found",
            )
        # Untouched, as the admin sees it.
        seen = await client.get(
            f"/v1/admin/{kind}/{record['id']}", headers=bearer(world.admin_token)
        )
        assert seen.status_code == 200
        assert seen.json()["name"] == record["name"]
        assert seen.json()["active"] is True
    for request in (
        client.get(f"/v1/admin/branches/{world.b2}", headers=bearer(scope.manager)),
        client.patch(
            f"/v1/admin/branches/{world.b2}", json={"name": "Mine"}, headers=bearer(scope.manager)
        ),
    ):
        assert_problem(await request, 404, "not_found")


async def test_manager_lists_only_own_branch(
    client: AsyncClient, world: World, scope: Scope
) -> None:
    admin_view = await client.get(PROTECTED, headers=bearer(world.admin_token))
    assert {world.b1, world.b2} <= {b["id"] for b in admin_view.json()["items"]}
    branches = await client.get(PROTECTED, headers=bearer(scope.manager))
    assert branches.status_code == 200
    assert [b["id"] for b in branches.json()["items"]] == [world.b1]
    for params in ({}, {"branch_id": world.b2}):
        services = await client.get(
            "/v1/admin/services", params=params, headers=bearer(scope.manager)
        )
        assert services.status_code == 200
        assert world.b2 not in {s["branch_id"] for s in services.json()["items"]}


async def test_manager_cannot_create_branches_or_privileged_accounts(
    client: AsyncClient, world: World, scope: Scope
) -> None:
    assert_problem(
        await client.post(PROTECTED, json=BRANCH, headers=bearer(scope.manager)), 403, "forbidden"
    )
    for role, branch_ids in (("admin", []), ("manager", [world.b1])):
        resp = await client.post(
            "/v1/admin/staff",
            json={
                "email": f"new.{role}@example.test",
                "name": "Climber",
                "password": "climbing password",
                "role": role,
                "branch_ids": branch_ids,
            },
            headers=bearer(scope.manager),
        )
        assert_problem(resp, 403, "forbidden")


async def test_staff_role_reads_but_cannot_write(
    client: AsyncClient, world: World, scope: Scope
) -> None:
    listed = await client.get(PROTECTED, headers=bearer(scope.staff))
    assert listed.status_code == 200
    assert [b["id"] for b in listed.json()["items"]] == [world.b1]
    writes = [
        client.patch(
            f"/v1/admin/branches/{world.b1}", json={"name": "Mine"}, headers=bearer(scope.staff)
        ),
        client.post(
            "/v1/admin/services",
            json={"branch_id": world.b1, "name": "Nope", "duration_min": 5},
            headers=bearer(scope.staff),
        ),
        client.post(
            "/v1/admin/devices",
            json={"branch_id": world.b1, "name": "Nope"},
            headers=bearer(scope.staff),
        ),
    ]
    for request in writes:
        assert_problem(await request, 403, "forbidden", "branch_forbidden")


# --- 6. token claims -------------------------------------------------------------------


def _verified(settings: Settings, token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(
        token,
        settings.jwt_secret,
        algorithms=["HS256"],
        audience=settings.jwt_audience,
        issuer=settings.jwt_issuer,
    )
    return claims


async def test_tokens_carry_channel_issuer_audience_and_lifetime(
    client: AsyncClient, pool: asyncpg.Pool, world: World
) -> None:
    email = await make_staff(pool, "manager", [world.b1, world.b2])
    pair = await staff_pair(client, email)
    staff = _verified(world.settings, pair["access_token"])
    assert jwt.get_unverified_header(pair["access_token"])["alg"] == "HS256"
    assert staff["channel"] == "staff"
    assert staff["role"] == "manager"
    assert staff["sub"] == f"staff:{await staff_id(pool, email)}"
    assert sorted(staff["branches"]) == sorted([world.b1, world.b2])
    assert staff["iss"] == "selfserve"
    assert staff["aud"] == "selfserve-api"
    assert staff["exp"] - staff["iat"] == 900
    assert abs(staff["iat"] - time.time()) < 60
    assert pair["expires_in"] == 900
    assert pair["token_type"] == "bearer"
    admin = _verified(world.settings, world.admin_token)
    assert admin["role"] == "admin"
    assert admin["branches"] == "*"

    device = await create_device(client, world.admin_token, world.b2)
    resp = await device_login(client, device["id"], device["secret"])
    assert resp.status_code == 200, resp.text
    kiosk = _verified(world.settings, resp.json()["access_token"])
    assert kiosk["channel"] == "kiosk"
    assert kiosk["role"] == "kiosk"
    assert kiosk["sub"] == f"device:{device['id']}"
    assert kiosk["branches"] == [world.b2]
    assert kiosk["iss"] == "selfserve"
    assert kiosk["aud"] == "selfserve-api"
    assert kiosk["exp"] - kiosk["iat"] == 900
    assert staff["jti"] != kiosk["jti"]
