-- Users whose entitlements changed and whose Redis entry is not yet known to hold the change.
-- Written in the transaction that bumps the version; removed by the cache healer once Redis
-- holds that version (or no entry at all). Durable, so neither a Redis outage nor a processor
-- killed between its commit and its cache write leaves a stale entry behind.
CREATE TABLE cache_pending (
    user_id   text PRIMARY KEY,
    version   bigint NOT NULL,
    marked_at timestamptz NOT NULL DEFAULT now()
);
