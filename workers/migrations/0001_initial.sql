-- Applied inside the namespace's schema (search_path is set by the migrator).

CREATE TABLE call_events (
    event_id     text PRIMARY KEY,              -- {project}:{call_id}:{kind}, the idempotency key
    project      text NOT NULL,
    call_id      text NOT NULL,
    kind         text NOT NULL CHECK (kind IN ('start', 'end')),
    received_at  timestamptz NOT NULL,          -- when the ingress accepted the webhook
    processed_at timestamptz NOT NULL DEFAULT now(),
    payload      jsonb NOT NULL,                -- the webhook body as received
    event        jsonb,                         -- the envelope, set in the claiming transaction
    published_at timestamptz                    -- NULL until the broker confirmed the event
);

CREATE INDEX call_events_unpublished ON call_events (received_at) WHERE published_at IS NULL;
CREATE INDEX call_events_call ON call_events (project, call_id);

CREATE TABLE calls (
    project           text NOT NULL,
    call_id           text NOT NULL,
    caller            text,                     -- E.164
    callee            text,                     -- E.164
    called_at         timestamptz,
    status            text,                     -- Roistat's status, verbatim
    outcome           text,                     -- answered | missed | failed | blocked | unknown
    duration_s        integer,
    is_missed         boolean,
    recording_url     text,
    file_id           text,
    visit_id          text,
    order_id          text,
    marker            text,
    source_level_1    text,
    source_level_2    text,
    utm_source        text,
    utm_medium        text,
    utm_campaign      text,
    utm_term          text,
    utm_content       text,
    landing_page      text,
    domain            text,
    referrer          text,
    city              text,
    country           text,
    ip                text,
    google_client_id  text,
    metrika_client_id text,
    custom_fields     jsonb,
    caller_region     text,
    caller_carrier    text,
    is_repeat_caller  boolean NOT NULL DEFAULT false,
    previous_calls    integer NOT NULL DEFAULT 0,
    start_received_at timestamptz,
    end_received_at   timestamptz,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project, call_id)
);

-- Repeat-caller lookups and BI filters by caller over time.
CREATE INDEX calls_caller_called_at ON calls (project, caller, called_at);
CREATE INDEX calls_called_at ON calls (called_at);
