-- A Telegram alert is first 'claimed' (nothing sent yet), and 'sending' only from just before
-- its request goes out. A claim whose holder stopped before that is surely not sent, so a
-- later delivery takes it over once its lease is over; only a 'sending' one past its lease
-- reads as "may have arrived". Applied inside the namespace's schema.

-- The ALTER takes the table's strongest lock for a moment; behind a long transaction it
-- gives up after 2 s instead of stalling the sinks, and the migration is retried.
SET LOCAL lock_timeout = '2s';

-- Every existing row passed the stricter check this replaces, so it is not rescanned.
ALTER TABLE telegram_alerts
    DROP CONSTRAINT telegram_alerts_state_check,
    ADD CONSTRAINT telegram_alerts_state_check
        CHECK (state IN ('claimed', 'sending', 'sent', 'failed', 'unknown')) NOT VALID;
