"""Idempotency-Key while the first request is still running: duplicates racing it get
its answer or 409 `idempotency_key_in_progress`, never a second run; a reservation
left by a dead request expires; a refused request leaves the key free."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections import Counter
from collections.abc import Sequence
from typing import Any

import asyncpg
import httpx
import msgspec

from selfserve import idempotency
from selfserve.scheduling.models import BookingCreate
from tests.booking_helpers import at_hour, customer, invariant_holds, iso, seed
from tests.conftest import ModuleEnv
from tests.helpers import bearer
from tests.queue_helpers import hall

DUPLICATES = 24
_keys = itertools.count(1)


def outcome(responses: Sequence[httpx.Response]) -> Counter[tuple[int, str | None]]:
    assert all(r.status_code < 500 for r in responses), [r.text for r in responses]
    return Counter(
        (r.status_code, r.json().get("code") if r.status_code >= 400 else None) for r in responses
    )


async def duplicates(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], token: str, key: str
) -> list[httpx.Response]:
    """The same request with the same key DUPLICATES times at once (each request on a
    pool connection of its own), as a client retrying after timeouts would send it."""
    headers = {**bearer(token), "Idempotency-Key": key}
    return await asyncio.gather(
        *(client.post(path, json=body, headers=headers) for _ in range(DUPLICATES))
    )


def check_answers(responses: Sequence[httpx.Response]) -> dict[str, Any]:
    """Every answer is the first 201 (or its replay) or 409 in progress with
    Retry-After; returns the one body created."""
    counts = outcome(responses)
    assert set(counts) <= {(201, None), (409, "idempotency_key_in_progress")}, counts
    created = [r for r in responses if r.status_code == 201]
    assert created
    assert len({r.content for r in created}) == 1
    assert sum(r.headers.get("idempotent-replayed") != "true" for r in created) <= 1
    for r in responses:
        if r.status_code == 409:
            assert r.headers["retry-after"] == "1"
            assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = created[0].json()
    return body


async def test_duplicates_of_a_booking_racing_the_first_never_answer_slot_full(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    bid, sid, _ = await seed(pool, capacity=1)
    _, _, token = await customer(pool, module_env)
    body = {"branch_id": bid, "service_id": sid, "start": iso(at_hour(2))}
    key = f"retry-{next(_keys)}"

    booking = check_answers(await duplicates(client, "/v1/bookings", body, token, key))

    ids = await pool.fetch("SELECT id FROM bookings WHERE service_id = $1", sid)
    assert [r["id"] for r in ids] == [booking["id"]]
    # Once it has finished, the retry gets the first answer.
    headers = {**bearer(token), "Idempotency-Key": key}
    again = await client.post("/v1/bookings", json=body, headers=headers)
    assert (again.status_code, again.headers.get("idempotent-replayed")) == (201, "true")
    assert again.json() == booking
    await invariant_holds(pool)


async def test_duplicates_of_a_hold_and_of_a_ticket_run_once(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    bid, sid, _ = await seed(pool, capacity=1)
    _, _, token = await customer(pool, module_env)
    body = {"branch_id": bid, "service_id": sid, "start": iso(at_hour(2))}
    hold = check_answers(await duplicates(client, "/v1/holds", body, token, "hold-1"))
    holds = await pool.fetch("SELECT id FROM holds WHERE service_id = $1", sid)
    assert [r["id"] for r in holds] == [hold["id"]]

    h = await hall(pool, module_env)
    ticket_body = {"queue_id": h.queues["A"]}
    ticket = check_answers(await duplicates(client, "/v1/tickets", ticket_body, token, "t-1"))
    tickets = await pool.fetch("SELECT id FROM tickets WHERE branch_id = $1", h.branch_id)
    assert [r["id"] for r in tickets] == [ticket["id"]]
    await invariant_holds(pool)


async def reserve(
    pool: asyncpg.Pool, customer_id: int, key: str, operation: str, body: dict[str, Any]
) -> None:
    """The reservation a request makes first, as if that request were still running
    (or had died with it)."""
    data = msgspec.json.decode(msgspec.json.encode(body), type=BookingCreate)
    digest = idempotency.request_hash(operation, data)
    await pool.execute(
        idempotency.RESERVE, f"customer:{customer_id}", key, digest, 3600.0, uuid.uuid4()
    )


async def test_a_reservation_left_by_a_dead_request_expires(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    bid, sid, _ = await seed(pool, capacity=1)
    cid, _, token = await customer(pool, module_env)
    body = {"branch_id": bid, "service_id": sid, "start": iso(at_hour(3))}
    headers = {**bearer(token), "Idempotency-Key": "dead-1"}
    await reserve(pool, cid, "dead-1", "createBooking", body)

    busy = await client.post("/v1/bookings", json=body, headers=headers)
    assert (busy.status_code, busy.json()["code"]) == (409, "idempotency_key_in_progress")
    assert busy.headers["retry-after"] == "1"
    other = await client.post(
        "/v1/bookings", json={**body, "party_size": 1}, headers=headers
    )  # another body under a key in use is still a 422
    assert (other.status_code, other.json()["code"]) == (422, "idempotency_key_reused")

    # The request holding it died: once its reservation has expired, a retry runs.
    await pool.execute(
        "UPDATE idempotency_keys SET reserved_until = now() - interval '1 second' "
        "WHERE principal = $1 AND key = 'dead-1'",
        f"customer:{cid}",
    )
    first = await client.post("/v1/bookings", json=body, headers=headers)
    assert first.status_code == 201, first.text
    assert first.headers.get("idempotent-replayed") is None
    again = await client.post("/v1/bookings", json=body, headers=headers)
    assert (again.status_code, again.headers.get("idempotent-replayed")) == (201, "true")
    assert again.json() == first.json()


async def test_a_refused_request_leaves_its_key_free_for_the_retry(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    bid, sid, _ = await seed(pool, capacity=1)
    cid, _, token = await customer(pool, module_env)
    _, _, other = await customer(pool, module_env)
    start = at_hour(4)
    body = {"branch_id": bid, "service_id": sid, "start": iso(start)}
    taken = await client.post("/v1/bookings", json=body, headers=bearer(other))
    assert taken.status_code == 201
    headers = {**bearer(token), "Idempotency-Key": "full-1"}
    full = await client.post("/v1/bookings", json=body, headers=headers)
    assert (full.status_code, full.json()["code"]) == (409, "slot_full")
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM idempotency_keys WHERE principal = $1", f"customer:{cid}"
        )
        == 0
    )
    cancel = await client.post(f"/v1/bookings/{taken.json()['id']}/cancel", headers=bearer(other))
    assert cancel.status_code == 200
    retry = await client.post("/v1/bookings", json=body, headers=headers)
    assert retry.status_code == 201, retry.text
    assert retry.headers.get("idempotent-replayed") is None
