-- Subscriptions answer for their payments. A paid invoice (`invoice.paid`) is its subscription's
-- payment, known by its invoice id beside the payment intent and charge; `invoice_payment.paid`
-- ties a payment to its invoice (since API version basil a charge no longer names it). So a
-- dispute or refund of the payment reaches the subscription (processor::domain::projection).
ALTER TABLE purchases ADD COLUMN invoice_id text UNIQUE;
ALTER TABLE purchases ADD COLUMN subscription_id text;
CREATE INDEX purchases_subscription_id_idx ON purchases (subscription_id)
    WHERE subscription_id IS NOT NULL;
ALTER TABLE purchases DROP CONSTRAINT purchases_has_stripe_key;
ALTER TABLE purchases ADD CONSTRAINT purchases_has_stripe_key
    CHECK (num_nonnulls(checkout_session_id, payment_intent_id, charge_id, invoice_id) > 0);

-- When the subscription fell past due: the newest time it was paid up, and the past-due claims
-- since (processor::domain::projection::subscription).
ALTER TABLE subscriptions ADD COLUMN recovered_at timestamptz;
ALTER TABLE subscriptions ADD COLUMN past_due_claims timestamptz[] NOT NULL DEFAULT '{}';

-- The subscription policy, one per deployment, written at start-up from the configuration
-- (SUBSCRIPTION_REFUND_POLICY, SUBSCRIPTION_GRACE) and kept with the registry: a change bumps the
-- generation, so every process resolves with it.
ALTER TABLE registry_generation
    ADD COLUMN refund_policy text NOT NULL DEFAULT 'end_access'
        CHECK (refund_policy IN ('end_access', 'keep_until_period_end')),
    ADD COLUMN past_due_grace_seconds bigint CHECK (past_due_grace_seconds >= 0);
