-- The webhook and its event are stored in one insert; at ~3 KB a row is compressed, and
-- lz4 does that at a fraction of the default pglz's cost (measured in bench/README.md).
-- Only rows written from now on use it: nothing is rewritten. A PostgreSQL built without
-- lz4, or older than 14 (no per-column compression), keeps pglz. Applied inside the
-- namespace's schema.

-- The ALTER takes the table's strongest lock for a moment; behind a long transaction it
-- gives up after 2 s instead of stalling every writer, and the migration is retried.
SET LOCAL lock_timeout = '2s';

DO $$
BEGIN
    -- EXECUTE: parsed here, so that a server without the syntax lands in the handler.
    EXECUTE 'ALTER TABLE call_events
        ALTER COLUMN payload SET COMPRESSION lz4,
        ALTER COLUMN event SET COMPRESSION lz4';
EXCEPTION WHEN feature_not_supported OR syntax_error THEN
    RAISE NOTICE 'lz4 not available: call_events keeps the default compression';
END $$;
