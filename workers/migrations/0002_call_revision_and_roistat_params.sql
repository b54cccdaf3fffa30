-- The event carries the merged row: `revision` tells a subscriber which of a call's two
-- events is newer, and the Roistat fields that only lived in `call_events.payload` become
-- columns. Applied inside the namespace's schema (search_path is set by the migrator).

-- Constant defaults: PostgreSQL 11+ adds these without rewriting the table.
ALTER TABLE calls
    ADD COLUMN first_visit     text,
    ADD COLUMN roistat_param_1 text,
    ADD COLUMN roistat_param_2 text,
    ADD COLUMN roistat_param_3 text,
    ADD COLUMN roistat_param_4 text,
    ADD COLUMN roistat_param_5 text,
    ADD COLUMN revision        integer NOT NULL DEFAULT 1;  -- webhooks of this call stored: 1 or 2

-- Existing rows: revision is the number of halves received (the default 1 fits one half),
-- and the new columns come from the stored payloads, merged as the workers merge: a
-- non-empty value from the call end wins over the call start. Only rows that change are
-- written. Text is read as the payload has it (trimmed; empty is NULL), close to the
-- workers' lenient parsing.
WITH found AS (
    SELECT project, call_id,
        COALESCE(max(NULLIF(btrim(payload->>'first_visit'), '')) FILTER (WHERE kind = 'end'),
                 max(NULLIF(btrim(payload->>'first_visit'), '')) FILTER (WHERE kind = 'start')) AS first_visit,
        COALESCE(max(NULLIF(btrim(payload->>'roistat_param_1'), '')) FILTER (WHERE kind = 'end'),
                 max(NULLIF(btrim(payload->>'roistat_param_1'), '')) FILTER (WHERE kind = 'start')) AS roistat_param_1,
        COALESCE(max(NULLIF(btrim(payload->>'roistat_param_2'), '')) FILTER (WHERE kind = 'end'),
                 max(NULLIF(btrim(payload->>'roistat_param_2'), '')) FILTER (WHERE kind = 'start')) AS roistat_param_2,
        COALESCE(max(NULLIF(btrim(payload->>'roistat_param_3'), '')) FILTER (WHERE kind = 'end'),
                 max(NULLIF(btrim(payload->>'roistat_param_3'), '')) FILTER (WHERE kind = 'start')) AS roistat_param_3,
        COALESCE(max(NULLIF(btrim(payload->>'roistat_param_4'), '')) FILTER (WHERE kind = 'end'),
                 max(NULLIF(btrim(payload->>'roistat_param_4'), '')) FILTER (WHERE kind = 'start')) AS roistat_param_4,
        COALESCE(max(NULLIF(btrim(payload->>'roistat_param_5'), '')) FILTER (WHERE kind = 'end'),
                 max(NULLIF(btrim(payload->>'roistat_param_5'), '')) FILTER (WHERE kind = 'start')) AS roistat_param_5
    FROM call_events
    WHERE payload ?| ARRAY['first_visit', 'roistat_param_1', 'roistat_param_2',
                           'roistat_param_3', 'roistat_param_4', 'roistat_param_5']
    GROUP BY project, call_id
),
changed AS (
    SELECT k.project, k.call_id,
        CASE WHEN k.start_received_at IS NOT NULL AND k.end_received_at IS NOT NULL
            THEN 2 ELSE 1 END AS revision,
        f.first_visit, f.roistat_param_1, f.roistat_param_2, f.roistat_param_3,
        f.roistat_param_4, f.roistat_param_5
    FROM calls AS k
    LEFT JOIN found AS f ON f.project = k.project AND f.call_id = k.call_id
    WHERE (k.start_received_at IS NOT NULL AND k.end_received_at IS NOT NULL)
       OR f.call_id IS NOT NULL
)
UPDATE calls AS c SET
    revision = changed.revision,
    first_visit = changed.first_visit,
    roistat_param_1 = changed.roistat_param_1,
    roistat_param_2 = changed.roistat_param_2,
    roistat_param_3 = changed.roistat_param_3,
    roistat_param_4 = changed.roistat_param_4,
    roistat_param_5 = changed.roistat_param_5
FROM changed
WHERE c.project = changed.project AND c.call_id = changed.call_id;
