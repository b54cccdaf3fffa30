-- The webhook and its event are stored in one insert; at ~3 KB a row is compressed, and
-- lz4 does that at a fraction of the default pglz's cost (measured in bench/README.md).
-- Only rows written from now on use it: nothing is rewritten. A PostgreSQL built without
-- lz4 keeps pglz. Applied inside the namespace's schema.

DO $$
BEGIN
    ALTER TABLE call_events
        ALTER COLUMN payload SET COMPRESSION lz4,
        ALTER COLUMN event SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
    RAISE NOTICE 'lz4 not available: call_events keeps the default compression';
END $$;
