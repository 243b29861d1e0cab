"""Twilio webhooks signed by the real twilio library's RequestValidator."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from urllib.parse import urlencode

import asyncpg
import httpx
import msgspec
import pytest
from arq.connections import ArqRedis
from twilio.request_validator import RequestValidator

from selfserve.app import create_app
from selfserve.messaging import inbound
from selfserve.messaging.inbound import InboundSms
from tests.conftest import ModuleEnv

TOKEN = "twilio-auth-token-for-tests"
PUBLIC = "https://hall.example.com"  # what Twilio calls; the app itself sits behind TLS
SMS_PATH = "/v1/webhooks/twilio/sms"
STATUS_PATH = "/v1/webhooks/twilio/status"
PHONE = "+8613800138000"


@pytest.fixture(scope="module")
async def hook(
    module_env: ModuleEnv, pool: asyncpg.Pool, redis: ArqRedis
) -> AsyncIterator[httpx.AsyncClient]:
    settings = msgspec.structs.replace(
        module_env.settings, public_base_url=PUBLIC, twilio_auth_token=TOKEN
    )
    app = create_app(settings, pool=pool, redis=redis)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://10.0.0.7:8000") as c:
        yield c


_sid = iter(range(1, 1_000_000))


def form(body: str, phone: str = PHONE, sid: str | None = None) -> dict[str, str]:
    return {
        "MessageSid": sid or f"SM{next(_sid):032d}",
        "AccountSid": "AC" + "0" * 32,
        "From": phone,
        "To": "+8610690000",
        "Body": body,
        "NumMedia": "0",
    }


def signed(
    params: dict[str, str], *, url: str = PUBLIC + SMS_PATH, token: str = TOKEN
) -> dict[str, str]:
    return {
        "X-Twilio-Signature": RequestValidator(token).compute_signature(url, params),
        "Content-Type": "application/x-www-form-urlencoded",
    }


async def post(
    c: httpx.AsyncClient, params: dict[str, str], headers: dict[str, str], path: str = SMS_PATH
) -> httpx.Response:
    return await c.post(path, content=urlencode(params), headers=headers)


async def counts(pool: asyncpg.Pool) -> tuple[int, int, int]:
    row = await pool.fetchrow(
        "SELECT (SELECT count(*) FROM inbound_sms) a, (SELECT count(*) FROM sms_inbox) b,"
        " (SELECT count(*) FROM sms_opt_outs) c"
    )
    assert row is not None
    return row["a"], row["b"], row["c"]


async def test_signed_stop_opts_out_and_answers_twiml(
    hook: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    params = form("STOP", phone="+447700900001")
    resp = await post(hook, params, signed(params))
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/xml")
    assert "<Response><Message>You will get no more messages" in resp.text
    assert (
        await pool.fetchval("SELECT source FROM sms_opt_outs WHERE phone = '+447700900001'")
        == "sms"
    )


async def test_chinese_opt_out_and_start_restore(
    hook: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    phone = "+8613900139000"
    stop = form("退订", phone=phone)
    resp = await post(hook, stop, signed(stop))
    assert "您已退订" in resp.text
    assert await pool.fetchval("SELECT count(*) FROM sms_opt_outs WHERE phone = $1", phone) == 1
    start = form("START", phone=phone)
    resp = await post(hook, start, signed(start))
    assert resp.status_code == 200
    assert await pool.fetchval("SELECT count(*) FROM sms_opt_outs WHERE phone = $1", phone) == 0


@pytest.mark.parametrize(
    "forge",
    ["tampered_body", "wrong_url", "wrong_token", "missing_header", "http_url", "extra_param"],
)
async def test_bad_signatures_are_403_and_change_nothing(
    hook: httpx.AsyncClient, pool: asyncpg.Pool, forge: str
) -> None:
    params = form("STOP", phone="+447700900099")
    headers = signed(params)
    if forge == "tampered_body":
        params = {**params, "From": "+447700900098"}
    elif forge == "wrong_url":
        headers = signed(params, url=PUBLIC + "/v1/webhooks/twilio/other")
    elif forge == "wrong_token":
        headers = signed(params, token="not-the-token")
    elif forge == "missing_header":
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
    elif forge == "http_url":
        headers = signed(params, url="http://hall.example.com" + SMS_PATH)
    elif forge == "extra_param":
        params = {**params, "Body2": "x"}
    before = await counts(pool)
    resp = await post(hook, params, headers)
    assert resp.status_code == 403
    assert resp.headers["content-type"] == "application/problem+json"
    assert resp.json()["code"] == "invalid_signature"
    assert await counts(pool) == before


async def test_replayed_message_sid_changes_nothing(
    hook: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    phone = "+447700900002"
    stop = form("STOP", phone=phone, sid="SM" + "a" * 32)
    first = await post(hook, stop, signed(stop))
    start = form("START", phone=phone)
    await post(hook, start, signed(start))
    before = await counts(pool)
    replay = await post(hook, stop, signed(stop))
    assert replay.status_code == 200
    assert replay.text == first.text  # the first answer, again
    assert await counts(pool) == before
    assert await pool.fetchval("SELECT count(*) FROM sms_opt_outs WHERE phone = $1", phone) == 0


async def test_unrecognised_text_is_kept_for_staff_in_the_senders_language(
    hook: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    zh = form("我想把预约改到下午", phone="+8613700137000")
    resp = await post(hook, zh, signed(zh))
    assert "已收到您的留言" in resp.text
    en = form("Can I bring my passport copy instead?", phone="+447700900003")
    resp = await post(hook, en, signed(en))
    assert "we have your message" in resp.text
    rows = await pool.fetch("SELECT phone, body, locale, status FROM sms_inbox ORDER BY id")
    assert [(r["phone"], r["locale"], r["status"]) for r in rows[-2:]] == [
        ("+8613700137000", "zh-CN", "open"),
        ("+447700900003", "en", "open"),
    ]


async def test_known_customer_gets_answers_in_their_locale(
    hook: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    phone = "+447700900004"
    await pool.execute("INSERT INTO customers (phone, locale) VALUES ($1, 'zh-CN')", phone)
    params = form("HELP", phone=phone)
    resp = await post(hook, params, signed(params))
    assert "回复Y确认预约" in resp.text


@contextmanager
def handler_for_confirm(seen: list[InboundSms]) -> Iterator[None]:
    async def confirm(conn: object, sms: InboundSms) -> str:
        seen.append(sms)
        return "Confirmed."

    previous = inbound.registered("confirm")
    inbound.register("confirm", confirm)
    try:
        yield
    finally:
        inbound._HANDLERS.pop("confirm", None)
        if previous is not None:
            inbound.register("confirm", previous)


async def test_keywords_reach_the_handler_a_domain_registered(
    hook: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    seen: list[InboundSms] = []
    with handler_for_confirm(seen):
        params = form("ｙ", phone="+447700900005")  # full-width, lower case
        resp = await post(hook, params, signed(params))
    assert "<Message>Confirmed.</Message>" in resp.text
    assert [(s.phone, s.classified.intent) for s in seen] == [("+447700900005", "confirm")]
    # With no handler registered, the same word is kept for staff instead.
    before = await counts(pool)
    params = form("Y", phone="+447700900005")
    await post(hook, params, signed(params))
    assert (await counts(pool))[1] == before[1] + 1


async def sent_message(pool: asyncpg.Pool, phone: str, sid: str) -> int:
    message_id: int = await pool.fetchval(
        "INSERT INTO messages (dedupe_key, phone, template, locale, body, segments, encoding,"
        " status, provider_sid, sent_at) VALUES ($1, $2, 'reminder', 'en', 'Reminder', 1,"
        " 'GSM-7', 'sent', $3, now()) RETURNING id",
        f"test:{sid}",
        phone,
        sid,
    )
    return message_id


def status_form(sid: str, status: str, error_code: str | None = None) -> dict[str, str]:
    params = {"MessageSid": sid, "MessageStatus": status, "AccountSid": "AC" + "0" * 32}
    if error_code:
        params["ErrorCode"] = error_code
    return params


async def callback(hook: httpx.AsyncClient, params: dict[str, str]) -> httpx.Response:
    return await post(hook, params, signed(params, url=PUBLIC + STATUS_PATH), path=STATUS_PATH)


async def test_status_callbacks_never_move_a_message_backwards(
    hook: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    sid = "SM" + "b" * 32
    message_id = await sent_message(pool, "+447911123456", sid)
    for status in ("queued", "delivered", "sent", "undelivered", "delivered"):
        resp = await callback(hook, status_form(sid, status))
        assert resp.status_code == 204
    row = await pool.fetchrow("SELECT status, error_code FROM messages WHERE id = $1", message_id)
    assert row is not None
    assert row["status"] == "delivered"
    # Unknown sids and states are acknowledged (Twilio would retry) and change nothing.
    assert (await callback(hook, status_form("SM" + "c" * 32, "delivered"))).status_code == 204
    assert (await callback(hook, status_form(sid, "receiving"))).status_code == 204


async def test_failed_with_21610_opts_the_number_out(
    hook: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    sid = "SM" + "d" * 32
    phone = "+447911123457"
    message_id = await sent_message(pool, phone, sid)
    resp = await callback(hook, status_form(sid, "failed", "21610"))
    assert resp.status_code == 204
    row = await pool.fetchrow("SELECT status, error_code FROM messages WHERE id = $1", message_id)
    assert row is not None
    assert (row["status"], row["error_code"]) == ("failed", "21610")
    assert (
        await pool.fetchval("SELECT source FROM sms_opt_outs WHERE phone = $1", phone) == "carrier"
    )


async def test_unsigned_status_callback_is_403_and_changes_nothing(
    hook: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    sid = "SM" + "e" * 32
    message_id = await sent_message(pool, "+447911123458", sid)
    params = status_form(sid, "delivered")
    headers = signed(params, url=PUBLIC + SMS_PATH)  # signed for the other endpoint
    resp = await post(hook, params, headers, path=STATUS_PATH)
    assert resp.status_code == 403
    assert await pool.fetchval("SELECT status FROM messages WHERE id = $1", message_id) == "sent"
