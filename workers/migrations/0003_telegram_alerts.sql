-- Missed-call alerts sent by Telegram sinks: at most one per call and sink, and the
-- follow-up once the caller got through. Applied inside the namespace's schema.

CREATE TABLE telegram_alerts (
    sink           text NOT NULL,
    project        text NOT NULL,
    call_id        text NOT NULL,
    caller         text,                         -- E.164, to find the callback
    called_at      timestamptz,
    state          text NOT NULL CHECK (state IN ('sending', 'sent', 'failed', 'unknown')),
    claimed_at     timestamptz NOT NULL,         -- when the current attempt began
    chat_id        text,
    message_id     bigint,                       -- Telegram's id of the alert, to edit it
    alert_text     text,
    sent_at        timestamptz,
    followed_up_by text,                         -- call_id of the answered call
    followed_up_at timestamptz,
    PRIMARY KEY (sink, project, call_id)
);

CREATE INDEX telegram_alerts_open ON telegram_alerts (sink, project, caller, called_at)
    WHERE state = 'sent';
