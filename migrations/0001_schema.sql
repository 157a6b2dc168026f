-- Interim schema: only what the consumer needs. Replaced by the projection's full schema.
CREATE TABLE processed_events (
    event_id      text PRIMARY KEY,
    event_type    text NOT NULL,
    event_created timestamptz,
    processed_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE user_entitlement_versions (
    user_id text PRIMARY KEY,
    version bigint NOT NULL
);
