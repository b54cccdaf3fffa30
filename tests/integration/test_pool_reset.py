"""The workers' pool reset: a connection back in the pool is never left in a transaction, and
a clean release costs no round trip (asyncpg's default reset would send RESET ALL & co.)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from conftest import Services

from workers.storage import create_pool, reset_session


@pytest.fixture
async def one_connection_pool(services: Services) -> AsyncIterator[asyncpg.Pool]:
    """The workers' pool with a single connection: each acquire gets the one released last."""
    pool = await create_pool(services.database_url, "public", 1)
    try:
        yield pool
    finally:
        await pool.close()


async def test_reset_rolls_back_a_connection_still_in_a_transaction(services: Services) -> None:
    conn = await asyncpg.connect(services.database_url)
    try:
        await conn.execute("BEGIN")
        await conn.execute("CREATE TEMP TABLE left_open (x int)")
        await reset_session(conn)
        assert not conn.is_in_transaction()
        assert await conn.fetchval("SELECT to_regclass('pg_temp.left_open')") is None
    finally:
        await conn.close()


async def test_a_connection_released_in_a_transaction_comes_back_clean(
    one_connection_pool: asyncpg.Pool,
) -> None:
    async with one_connection_pool.acquire() as conn:
        pid = conn.get_server_pid()
        # A transaction whose end was never reached (its task cancelled between statements).
        transaction = conn.transaction()
        await transaction.start()
        await conn.execute("CREATE TEMP TABLE left_open (x int)")
    async with one_connection_pool.acquire() as conn:
        assert conn.get_server_pid() == pid  # the same connection, not a new one
        assert not conn.is_in_transaction()
        assert await conn.fetchval("SELECT to_regclass('pg_temp.left_open')") is None


async def test_a_clean_release_sends_nothing(
    one_connection_pool: asyncpg.Pool, db: asyncpg.Pool
) -> None:
    """The round trip saved per release: after it, the server's last statement is still ours."""
    probe = f"SELECT 'release-probe-{uuid.uuid4().hex}'"
    async with one_connection_pool.acquire() as conn:
        pid = conn.get_server_pid()
        await conn.fetchval(probe)
    # Released (the pool's reset has run); read from another session.
    activity = await db.fetchrow("SELECT state, query FROM pg_stat_activity WHERE pid = $1", pid)
    assert activity is not None
    assert (activity["state"], activity["query"]) == ("idle", probe)
