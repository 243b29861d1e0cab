"""Staff message log: filters, branch scope, newest first, secrets masked."""

from __future__ import annotations

import asyncpg
import httpx

from tests.helpers import bearer, create_branch, login, make_staff

PHONE = "+8613800138001"


async def add(
    pool: asyncpg.Pool,
    key: str,
    template: str,
    body: str,
    status: str,
    branch_id: int | None,
    phone: str = PHONE,
) -> int:
    message_id: int = await pool.fetchval(
        "INSERT INTO messages (dedupe_key, phone, branch_id, template, locale, body, segments,"
        " encoding, status, provider_sid) VALUES ($1, $2, $3, $4, 'zh-CN', $5, 1, 'UCS-2', $6,"
        " CASE WHEN $6 IN ('sent', 'delivered') THEN 'SM' || $1 END) RETURNING id",
        key,
        phone,
        branch_id,
        template,
        body,
        status,
    )
    return message_id


async def test_message_log(client: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    admin = await login(client, await make_staff(pool, "admin"))
    b1 = (await create_branch(client, admin, name="One"))["id"]
    b2 = (await create_branch(client, admin, name="Two"))["id"]
    otp = await add(
        pool, "otp:1", "sign_in_code", "您的登录验证码为482913，5分钟内有效。", "sent", None
    )
    r1 = await add(pool, "b:1:r", "reminder", "提醒一", "delivered", b1)
    r2 = await add(pool, "b:2:r", "reminder", "提醒二", "failed", b2)
    other = await add(pool, "b:3:r", "reminder", "提醒三", "pending", b1, phone="+8613800138002")

    resp = await client.get("/v1/admin/messages", params={"phone": PHONE}, headers=bearer(admin))
    assert resp.status_code == 200, resp.text
    items = resp.json()["items"]
    assert [m["id"] for m in items] == [r2, r1, otp]  # newest first, one phone only
    assert items[-1]["body"] == "您的登录验证码为******，5分钟内有效。"
    assert "482913" not in resp.text

    failed = await client.get(
        "/v1/admin/messages", params={"status": "failed"}, headers=bearer(admin)
    )
    assert [m["id"] for m in failed.json()["items"]] == [r2]

    manager = await login(client, await make_staff(pool, "staff", [b1]))
    mine = await client.get("/v1/admin/messages", headers=bearer(manager))
    # only their branch's messages: sign-in codes (tied to no branch) are for admins
    assert [m["id"] for m in mine.json()["items"]] == [other, r1]

    page1 = await client.get("/v1/admin/messages", params={"limit": 2}, headers=bearer(admin))
    page2 = await client.get(
        "/v1/admin/messages",
        params={"limit": 2, "cursor": page1.json()["next_cursor"]},
        headers=bearer(admin),
    )
    ids = [m["id"] for m in page1.json()["items"] + page2.json()["items"]]
    assert ids == [other, r2, r1, otp]
    assert page2.json()["next_cursor"] is None

    spaced = await client.get(
        "/v1/admin/messages", params={"phone": "+86 138 0013 8001"}, headers=bearer(admin)
    )
    assert len(spaced.json()["items"]) == 3
    bad = await client.get("/v1/admin/messages", params={"status": "lost"}, headers=bearer(admin))
    assert bad.status_code == 422
    assert (await client.get("/v1/admin/messages")).status_code == 401
