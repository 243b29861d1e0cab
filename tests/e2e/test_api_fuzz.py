"""Property-based fuzzing of every operation against a live server: never a 5xx.

Two kinds of generators drive a real `selfserve serve` process over a real socket:

- schemathesis generates requests from the committed OpenAPI document (valid and
  invalid bodies, parameters and headers) for every documented operation, sent as an
  admin, a customer, a kiosk or nobody (chosen from the case itself, so a failure
  replays), and with a valid Twilio signature on most webhook calls, so the
  form-encoded webhooks are fuzzed past their signature check too;
- hypothesis strategies of our own aim at what schema-driven generation rarely
  produces: nesting deeper than any schema, integers past 64 bits, instants and dates
  at the edges of the calendar, NUL and lone surrogates, bodies that are not UTF-8 (or
  are UTF-16 or carry a BOM), query strings and path segments with non-ASCII digits,
  thousands of digits and percent-escapes of invalid UTF-8, and webhook forms signed
  or not.

Every answer must be below 500, and every 4xx an RFC 9457 problem document.
"""

from __future__ import annotations

import asyncio
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import asyncpg
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from twilio.request_validator import RequestValidator

from selfserve.auth.passwords import hash_password
from selfserve.auth.tokens import Principal, issue_access_token
from selfserve.settings import Settings
from tests.conftest import ModuleEnv
from tests.e2e.processes import api_processes

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
DOCUMENT = json.loads((ROOT / "openapi" / "openapi.json").read_text(encoding="utf-8"))
schema = schemathesis.openapi.from_dict(DOCUMENT)
# Examples and random generation (positive and negative); the deterministic coverage
# phase (~100 boundary cases per operation) is left to the strategies below, which aim
# at the same edges for a fraction of the time.
schema.config.phases.update(phases=["examples", "fuzzing"])
ADMIN, PASSWORD = "fuzz-admin@example.test", "fuzz admin password"
SECRET = "fuzz-secret-" + "y" * 40
TWILIO_TOKEN = "e2e-twilio-token"  # what tests.e2e.processes gives every process
PROBLEM = "application/problem+json"
FUZZ = settings(
    deadline=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported as found
    database=None,
)


@dataclass
class Live:
    base: str
    tokens: list[str | None]  # admin, customer, kiosk, nobody
    client: httpx.Client

    def token_for(self, *parts: object) -> str | None:
        return self.tokens[zlib.crc32(repr(parts).encode()) % len(self.tokens)]


async def _seed(database_url: str) -> tuple[int, int, int]:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO staff (email, name, password_hash, role) VALUES ($1, 'Fuzz', $2, 'admin')",
            ADMIN,
            hash_password(PASSWORD),
        )
        week = [{"weekday": d, "opens": "00:00", "closes": "24:00"} for d in range(1, 8)]
        branch = await conn.fetchval(
            "INSERT INTO branches (name, timezone, opening_hours) "
            "VALUES ('Fuzz Hall', 'Europe/London', $1::jsonb) RETURNING id",
            json.dumps(week),
        )
        service = await conn.fetchval(
            "INSERT INTO services (branch_id, name, duration_min, max_party) "
            "VALUES ($1, 'Fuzz', 30, 4) RETURNING id",
            branch,
        )
        resource = await conn.fetchval(
            "INSERT INTO resources (branch_id, kind, name, capacity) "
            "VALUES ($1, 'counter', 'C1', 2) RETURNING id",
            branch,
        )
        await conn.execute(
            "INSERT INTO resource_skills (resource_id, service_id) VALUES ($1, $2)",
            resource,
            service,
        )
        queue = await conn.fetchval(
            "INSERT INTO queues (branch_id, name, prefix) VALUES ($1, 'Q', 'A') RETURNING id",
            branch,
        )
        await conn.execute(
            "INSERT INTO queue_services (queue_id, service_id) VALUES ($1, $2)", queue, service
        )
        customer = await conn.fetchval(
            "INSERT INTO customers (phone, locale) VALUES ('+447911123456', 'en') RETURNING id"
        )
        device = await conn.fetchval(
            "INSERT INTO devices (branch_id, name, secret_hash) VALUES ($1, 'K', '\\x00') "
            "RETURNING id",
            branch,
        )
    finally:
        await conn.close()
    return branch, customer, device


@pytest.fixture(scope="module")
def live(module_env: ModuleEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    branch, customer, device = asyncio.run(_seed(module_env.database_url))
    signer = Settings(environment="production", jwt_secret=SECRET)
    customer_token = issue_access_token(
        signer, Principal(kind="customer", id=customer, role="customer", channel="app", branches=())
    )
    kiosk_token = issue_access_token(
        signer,
        Principal(kind="device", id=device, role="kiosk", channel="kiosk", branches=(branch,)),
    )
    with api_processes(module_env, 1, SECRET, tmp_path_factory.mktemp("logs")) as (base,):
        admin = httpx.post(
            base + "/v1/auth/staff/login", json={"email": ADMIN, "password": PASSWORD}
        ).json()["access_token"]
        with httpx.Client(base_url=base, timeout=10) as client:
            yield Live(base, [admin, customer_token, kiosk_token, None], client)


def _twilio_signature(url: str, body: Any) -> str | None:
    """A valid X-Twilio-Signature for a form body, when the body is a plain form."""
    if not isinstance(body, dict):
        return None
    params: dict[str, str] = {}
    for key, value in body.items():
        if not isinstance(key, str) or not isinstance(value, str):
            return None
        params[key] = value
    return RequestValidator(TWILIO_TOKEN).compute_signature(url, params)


def check_answer(response: httpx.Response, what: object) -> None:
    assert response.status_code < 500, (what, response.status_code, response.text[:500])
    if response.status_code >= 400 and response.request.method != "HEAD":
        assert response.headers["content-type"].startswith(PROBLEM), (what, response.text[:300])
        assert response.json()["request_id"], what


# --- schemathesis: every documented operation ----------------------------------------------


@schema.parametrize()
@settings(FUZZ, max_examples=15)
def test_no_generated_request_makes_the_server_fail(case: schemathesis.Case, live: Live) -> None:
    headers: dict[str, str] = {}
    token = live.token_for(case.path_parameters, case.query, case.body)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if case.path.startswith("/v1/webhooks/twilio"):
        # most calls signed (the form is then parsed and applied), the rest not (403)
        signature = _twilio_signature(live.base + case.path, case.body)
        if signature and zlib.crc32(repr(case.body).encode()) % 4:
            headers["X-Twilio-Signature"] = signature
    response = case.call(base_url=live.base, headers=headers, timeout=10)
    case.validate_response(response, checks=[not_a_server_error])


# --- our own strategies: hostile values ---------------------------------------------------

METHODS = ("get", "post", "patch", "put", "delete")
OPERATIONS = [
    (method.upper(), path, op)
    for path, item in DOCUMENT["paths"].items()
    for method, op in item.items()
    if method in METHODS
]


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = DOCUMENT["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]]
    return node


def _property_names(node: dict[str, Any]) -> list[str]:
    node = _resolve(node)
    names = list(node.get("properties", {}))
    for part in node.get("oneOf", []) + node.get("anyOf", []):
        names += _property_names(part)
    return sorted(set(names))


def _body_fields(op: dict[str, Any]) -> list[str] | None:
    content = (op.get("requestBody") or {}).get("content", {})
    for media_type, spec in content.items():
        if media_type == "application/json":
            return _property_names(spec.get("schema", {}))
    return None


JSON_OPERATIONS = [
    (m, p, _body_fields(op)) for m, p, op in OPERATIONS if _body_fields(op) is not None
]
QUERY_OPERATIONS = [
    (m, p, [x["name"] for x in op.get("parameters", []) if x.get("in") == "query"])
    for m, p, op in OPERATIONS
]

EDGE_TIMES = [
    "0001-01-01T00:00:00+14:00",
    "0001-01-01T00:00:00Z",
    "9999-12-31T23:59:59-14:00",
    "9999-12-31T23:59:59.999999Z",
    "1969-12-31T23:59:59Z",
    "2999-12-31T23:59:59Z",
    "2030-02-30T10:00:00Z",
    "2030-06-30T23:59:60Z",
    "2030-03-04T10:00:00+24:00",
    "2030-03-04",
    "2030-03-04T10:00:00",
    "0001-01-01",
    "9999-12-31",
    "10000-01-01",
    "24:00",
    "23:59",
]
EXTREME_SCALARS: list[Any] = [
    0,
    -1,
    2**31,
    2**53 + 1,
    2**63 - 1,
    2**63,
    -(2**63) - 1,
    2**64,
    10**40,
    1e308,
    -0.0,
    0.5,
    True,
    False,
    None,
    "",
    " ",
    "\x00",
    "a\x00b",
    "\ud800",
    "\u202e\u0662\u0663",
    "١٢٣",
    "²",
    "🙂" * 50,
    "x" * 5000,
    "9" * 5000,
    "+8613800138000",
    "+447911123456",
    "localtime",
    "Factory",
    "Europe/London",
    *EDGE_TIMES,
]
scalars = st.one_of(
    st.sampled_from(EXTREME_SCALARS),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def hostile_bodies(draw: st.DrawFn) -> tuple[str, str, bytes]:
    method, path, fields = draw(st.sampled_from(JSON_OPERATIONS))
    assert fields is not None
    names = st.sampled_from(fields) if fields else st.text(max_size=8)
    obj = draw(st.dictionaries(names | st.text(max_size=8), json_values, max_size=6))
    value: Any = draw(st.sampled_from([obj, obj, obj, [obj], "x", 1, None]))
    raw = json.dumps(value).encode()
    depth = draw(st.sampled_from([0, 0, 0, 31, 32, 33, 200, 5000]))
    raw = b"[" * depth + raw + b"]" * depth
    shape = draw(
        st.sampled_from(["plain", "plain", "utf16", "bom", "latin1", "truncated", "bignum", "nan"])
    )
    if shape == "utf16":
        raw = raw.decode().encode("utf-16")
    elif shape == "bom":
        raw = b"\xef\xbb\xbf" + raw
    elif shape == "latin1":
        raw = raw.replace(b'"', b'"\xe9', 1)
    elif shape == "truncated":
        raw = raw[: max(1, len(raw) // 2)]
    elif shape == "bignum":
        raw = re.sub(rb"(?<![\w.\"])\d+(?![\w.\"])", b"1" * 400, raw, count=2)
    elif shape == "nan":
        raw = raw.replace(b"null", b"NaN", 1).replace(b"0", b"1e999999", 1)
    return method, path, raw


QUERY_VALUES = st.one_of(
    st.sampled_from(
        [
            "",
            "0",
            "-1",
            "١٢",
            "²",
            "9" * 5000,
            "%FF%FE",
            "%00",
            "MTI",
            "MTI=",
            "LTU",
            "true",
            "maybe",
            "null",
            *EDGE_TIMES,
        ]
    ),
    st.text(max_size=30).map(quote),
    st.integers().map(str),
)
PATH_VALUES = st.sampled_from(
    [
        "0",
        "-1",
        "1",
        "9223372036854775807",
        "9223372036854775808",
        "9" * 400,
        "%FF",
        "١",
        "x",
        "%2F",
    ]
)


# what HTTP/1.1 lets a header carry: visible Latin-1, inner spaces, no edges of space
HEADER_VALUES = st.one_of(
    st.sampled_from(["", "x" * 300, "é", "\u00ff" * 10, "Bearer", "Bearer x", "zh-CN;q=nan"]),
    st.text(
        st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
        max_size=40,
    ).map(str.strip),
)


@st.composite
def hostile_queries(draw: st.DrawFn) -> tuple[str, str, dict[str, str]]:
    method, path, names = draw(st.sampled_from(QUERY_OPERATIONS))
    url = re.sub(r"\{[^}]+\}", lambda _: draw(PATH_VALUES), path)
    keys = st.sampled_from([*names, "from", "to", "cursor", "limit", "x"])
    pairs = draw(st.lists(st.tuples(keys, QUERY_VALUES), max_size=6))
    query = "&".join(f"{quote(k)}={v}" for k, v in pairs)  # values already escaped
    headers = draw(
        st.dictionaries(
            st.sampled_from(
                ["Idempotency-Key", "Accept-Language", "X-Request-ID", "Authorization"]
            ),
            HEADER_VALUES,
            max_size=3,
        )
    )
    return method, url + ("?" + query if query else ""), headers


@given(hostile_bodies())
@settings(FUZZ, max_examples=250)
def test_hostile_json_bodies_never_make_the_server_fail(
    live: Live, request_: tuple[str, str, bytes]
) -> None:
    method, path, raw = request_
    url = re.sub(r"\{[^}]+\}", "1", path)
    headers = {"content-type": "application/json"}
    token = live.token_for(path, raw)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    check_answer(
        live.client.request(method, url, content=raw, headers=headers), (method, url, raw[:200])
    )


@given(hostile_queries())
@settings(FUZZ, max_examples=250)
def test_hostile_query_strings_paths_and_headers_never_make_the_server_fail(
    live: Live, request_: tuple[str, str, dict[str, str]]
) -> None:
    method, url, odd_headers = request_
    token = live.token_for(url)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    # headers go out as raw Latin-1 bytes, as a client may send them
    sent: dict[str, Any] = {k: v.encode("latin-1") for k, v in {**headers, **odd_headers}.items()}
    content = b"{}" if method in ("POST", "PATCH", "PUT") else None
    response = live.client.request(method, live.base + url, headers=sent, content=content)
    check_answer(response, (method, url[:300]))


FORM_KEYS = ["MessageSid", "From", "To", "Body", "MessageStatus", "ErrorCode", "AccountSid", "X"]
FORM_VALUES = st.one_of(
    st.sampled_from(
        [
            "",
            "+447911123456",
            "+8613800138000",
            "Y",
            "N",
            "STOP",
            "退订",
            "delivered",
            "failed",
            "21610",
            "9" * 500,
            "\x00",
        ]
    ),
    st.text(max_size=40),
)


@st.composite
def webhook_calls(draw: st.DrawFn) -> tuple[str, bytes, bool, dict[str, str] | None]:
    path = draw(st.sampled_from(["/v1/webhooks/twilio/sms", "/v1/webhooks/twilio/status"]))
    form = draw(st.dictionaries(st.sampled_from(FORM_KEYS), FORM_VALUES, max_size=6))
    raw = urlencode(form).encode()
    odd = draw(st.sampled_from([None, None, None, "not-utf8", "repeat", "percent"]))
    if odd == "not-utf8":
        raw += b"&Body=\xff\xfe"
    elif odd == "repeat":
        raw += b"&MessageSid=SM1&MessageSid=SM2"
    elif odd == "percent":
        raw += b"&From=%FF"
    sign = draw(st.booleans())
    return path, raw, sign, form if odd is None else None


@given(webhook_calls())
@settings(FUZZ, max_examples=150)
def test_webhook_forms_never_make_the_server_fail(
    live: Live, call: tuple[str, bytes, bool, dict[str, str] | None]
) -> None:
    path, raw, sign, form = call
    headers = {"content-type": "application/x-www-form-urlencoded"}
    if sign and form is not None:
        headers["X-Twilio-Signature"] = RequestValidator(TWILIO_TOKEN).compute_signature(
            live.base + path, form
        )
    response = live.client.post(path, content=raw, headers=headers)
    check_answer(response, (path, raw[:200]))
    if "X-Twilio-Signature" not in headers:
        assert response.status_code == 403, response.text
