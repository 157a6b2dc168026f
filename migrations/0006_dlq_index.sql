-- The dead-letter commands' index of parked events (processor/src/dlq/index.rs), one per queue.
-- Unlogged: it is a cache of what the queue holds, rebuilt by the next pass after a crash.
-- Earlier versions created these tables on first use; IF NOT EXISTS keeps those.
CREATE UNLOGGED TABLE IF NOT EXISTS dlq_index (
    queue       text   NOT NULL,
    fingerprint uuid   NOT NULL,
    -- queue order: rows are added in the order a pass meets them, new ones at the tail
    seq         bigint GENERATED ALWAYS AS IDENTITY,
    event_id    text,
    event_type  text,
    parked_at   timestamptz,
    record      text   NOT NULL,
    body        bytea  NOT NULL,
    PRIMARY KEY (queue, fingerprint)
);
CREATE INDEX IF NOT EXISTS dlq_index_event ON dlq_index (queue, event_id);
CREATE INDEX IF NOT EXISTS dlq_index_order ON dlq_index (queue, seq);
CREATE UNLOGGED TABLE IF NOT EXISTS dlq_index_state (
    queue   text    PRIMARY KEY,
    trusted boolean NOT NULL
);
