-- Outbox of the messages the app receives: `entitlements.changed` after every committed change
-- of a user's entitlements, and one `notification.*` per notification. Rows are written in the
-- transaction that commits the change (so a message exists if and only if the change does) and
-- delivered by the relay (processor::outbox) at least once, per user in (version, seq) order.
--
-- `version` is the user's entitlement version after the writing transaction (rows written while
-- a user's version is bumped carry the bumped version; a checkout_abandoned notification carries
-- the version the user had when it was written). `seq` orders rows of one transaction, and is
-- the relay's FIFO cursor. Each channel keeps its own state: `amqp_*` (RabbitMQ, sent after the
-- broker's confirm) and `webhook_*` (own attempts, backoff and failure).
CREATE TABLE outbox (
    id                 uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    seq                bigint GENERATED ALWAYS AS IDENTITY,
    user_id            text NOT NULL,
    version            bigint NOT NULL,
    type               text NOT NULL,
    -- The type's own fields; the relay adds id, type, userId, version and occurredAt.
    body               jsonb NOT NULL,
    notification_id    bigint REFERENCES notifications (id) ON DELETE SET NULL,
    created_at         timestamptz NOT NULL DEFAULT now(),
    -- pending → sent (confirmed by the broker), or off (the channel was off when it was due).
    amqp_status        text NOT NULL DEFAULT 'pending'
        CHECK (amqp_status IN ('pending', 'sent', 'off')),
    amqp_at            timestamptz,
    -- pending → sent (a 2xx answer), failed (the last attempt failed; `outbox replay` sets it
    -- pending again), or off.
    webhook_status     text NOT NULL DEFAULT 'pending'
        CHECK (webhook_status IN ('pending', 'sent', 'failed', 'off')),
    webhook_at         timestamptz,
    webhook_attempts   integer NOT NULL DEFAULT 0,
    webhook_next_at    timestamptz NOT NULL DEFAULT now(),
    webhook_last_error text
);
CREATE INDEX outbox_amqp_pending_idx ON outbox (seq) WHERE amqp_status = 'pending';
CREATE INDEX outbox_webhook_pending_idx ON outbox (user_id, version, seq)
    WHERE webhook_status = 'pending';
CREATE INDEX outbox_webhook_failed_idx ON outbox (seq) WHERE webhook_status = 'failed';
CREATE INDEX outbox_created_at_idx ON outbox (created_at);

-- The abandoned-checkout notification is written by the merge, outside the recomputation that
-- writes the other outbox rows; this trigger gives it its outbox row in the same transaction.
-- (Revocations and suspensions get theirs from the recomputation, with the bumped version.)
CREATE FUNCTION outbox_checkout_abandoned() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO outbox (user_id, version, type, body, notification_id)
    VALUES (NEW.user_id,
            COALESCE((SELECT version FROM user_entitlement_versions WHERE user_id = NEW.user_id), 0),
            'notification.checkout_abandoned', NEW.payload, NEW.id);
    RETURN NULL;
END $$;
CREATE TRIGGER notifications_checkout_abandoned_outbox
    AFTER INSERT ON notifications
    FOR EACH ROW WHEN (NEW.kind = 'checkout_abandoned' AND NEW.user_id IS NOT NULL)
    EXECUTE FUNCTION outbox_checkout_abandoned();
