-- A Telegram alert's claim gets an id of its holder's own, and the moment its request to
-- Telegram went out: a claim left behind before that (the sink stopped, or PostgreSQL failed
-- and stayed away) is surely unsent, so a later delivery takes it over instead of giving the
-- alert up as one that "may have arrived". Both stay NULL on rows claimed before this
-- migration, which keep their old meaning (the request may be out). The state stays
-- 'sending' from the claim on, as sinks from before this migration expect during a rolling
-- upgrade. Applied inside the namespace's schema.

-- The ALTER takes the table's strongest lock for a moment; behind a long transaction (a BI
-- query) it gives up after 2 s instead of stalling every sink, and the migration is retried.
SET LOCAL lock_timeout = '2s';

-- No default: PostgreSQL adds the columns without rewriting the table.
ALTER TABLE telegram_alerts
    ADD COLUMN claim_id uuid,
    ADD COLUMN request_at timestamptz;

-- Only for this file: the migrations after it run in the same transaction.
RESET lock_timeout;
