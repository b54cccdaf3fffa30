-- Stale calls: a call start with no call end after CALLPIPE_STALE_AFTER_MIN is marked once and
-- its `call.stale` event claimed in call_events like a webhook's. Applied inside the
-- namespace's schema (search_path is set by the migrator).

-- No default: PostgreSQL adds the column without rewriting the table. NULL until marked.
ALTER TABLE calls ADD COLUMN stale_at timestamptz;

-- The event id `{project}:{call_id}:stale` is claimed with kind 'stale'. Every existing row
-- passed the stricter check this replaces, so it is not rescanned under the table lock.
ALTER TABLE call_events
    DROP CONSTRAINT call_events_kind_check,
    ADD CONSTRAINT call_events_kind_check CHECK (kind IN ('start', 'end', 'stale')) NOT VALID;

-- The sweep reads only the calls still waiting for their end: a small index however many
-- calls have ended.
CREATE INDEX calls_awaiting_end ON calls (start_received_at)
    WHERE end_received_at IS NULL AND stale_at IS NULL;
