"""Rights come from the database on every request, not from the token's snapshot."""

from __future__ import annotations

import asyncpg
import httpx

from tests.helpers import bearer, create_branch, login, make_staff


async def test_scope_and_role_changes_apply_to_live_tokens(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    admin = await login(client, await make_staff(pool, "admin"))
    b1 = (await create_branch(client, admin, name="One"))["id"]
    b2 = (await create_branch(client, admin, name="Two"))["id"]
    email = await make_staff(pool, "manager", [b1])
    manager = await login(client, email)
    staff_id = await pool.fetchval("SELECT id FROM staff WHERE email = $1", email)

    listed = await client.get("/v1/admin/branches", headers=bearer(manager))
    assert [b["id"] for b in listed.json()["items"]] == [b1]

    # Admin moves the manager to branch 2: the same access token now sees branch 2 only.
    moved = await client.patch(
        f"/v1/admin/staff/{staff_id}", json={"branch_ids": [b2]}, headers=bearer(admin)
    )
    assert moved.status_code == 200, moved.text
    listed = await client.get("/v1/admin/branches", headers=bearer(manager))
    assert [b["id"] for b in listed.json()["items"]] == [b2]
    assert (
        await client.patch(f"/v1/admin/branches/{b1}", json={"name": "x"}, headers=bearer(manager))
    ).status_code == 404

    # Demoted to staff: writes are refused at once with the same token.
    demoted = await client.patch(
        f"/v1/admin/staff/{staff_id}", json={"role": "staff"}, headers=bearer(admin)
    )
    assert demoted.status_code == 200, demoted.text
    resp = await client.patch(
        f"/v1/admin/branches/{b2}", json={"name": "y"}, headers=bearer(manager)
    )
    assert resp.status_code == 403
    assert await pool.fetchval("SELECT name FROM branches WHERE id = $1", b2) == "Two"
