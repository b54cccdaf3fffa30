"""Plain SQL migrations, applied in file-name order under an advisory lock. Idempotent."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg

from infra.retry import retry_until_done
from infra.settings import Settings

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy

DATABASE_DOWN = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


def migration_files() -> list[Path]:
    return sorted(MIGRATIONS_DIR.glob("*.sql"))


async def migrate(conn: Connection, namespace: str) -> list[str]:
    """Create the namespace's schema and apply every migration not yet applied there.

    Concurrent callers (many worker replicas starting at once) wait on one advisory
    lock per namespace, so each file runs exactly once. Returns the versions applied.
    """
    applied_now: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"callpipe:{namespace}")
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{namespace}"')
        await conn.execute(f'SET LOCAL search_path TO "{namespace}"')
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
        for path in migration_files():
            if path.stem in done:
                continue
            await conn.execute(path.read_text(encoding="utf-8"))
            await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", path.stem)
            applied_now.append(path.stem)
    return applied_now


async def drop_schema(conn: Connection, namespace: str) -> None:
    """Remove the namespace's schema and everything in it (tests, `callpipe teardown`)."""
    await conn.execute(f'DROP SCHEMA IF EXISTS "{namespace}" CASCADE')


async def migrate_database(settings: Settings) -> list[str]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        return await migrate(conn, settings.namespace)
    finally:
        await conn.close()


async def migrate_when_up(settings: Settings, stop: asyncio.Event | None = None) -> list[str]:
    """Migrate once the database answers (retried with backoff until then, or until `stop`)."""
    return await retry_until_done(
        "database migration", lambda: migrate_database(settings), retry_on=DATABASE_DOWN, stop=stop
    )
