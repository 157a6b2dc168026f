-- Entitlement projection schema.
--
-- Purchases and subscriptions hold MERGED FACTS from Stripe events (see processor::projection):
-- every fact column only ever moves "up" (a flag turns true, an amount grows, a timestamp takes
-- the earliest seen, a status register takes the newest event), so applying a scenario's events
-- in any order, with duplicates, ends in the same row. `status` columns are derived from those
-- facts. Entitlements are derived from a user's purchases and subscriptions and recomputed after
-- every change; they are never patched event by event.
--
-- Stripe ids are the natural keys (text). Rows whose user is not known yet keep user_id NULL and
-- are attached when a later event links the customer, payment intent or session to a user.

-- Dedupe: one row per Stripe event id, inserted by the consumer in the same transaction that
-- applies the event.
CREATE TABLE processed_events (
    event_id      text PRIMARY KEY,
    event_type    text NOT NULL,
    event_created timestamptz,
    processed_at  timestamptz NOT NULL DEFAULT now()
);
-- Lets operators prune old dedupe rows by age.
CREATE INDEX processed_events_processed_at_idx ON processed_events (processed_at);

-- Stripe customer -> application user. A customer belongs to exactly one user; a user may own
-- several customers (for example one per livemode or after a support merge).
CREATE TABLE customers (
    customer_id text PRIMARY KEY,
    user_id     text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX customers_user_id_idx ON customers (user_id);

-- One-time purchases. A row exists as soon as any event mentions the payment, even before the
-- checkout completion (a refund or dispute may arrive first); such a row grants nothing until it
-- is both paid and known to be one of ours (product_key set by checkout or payment metadata).
CREATE TABLE purchases (
    id                     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id                text,
    customer_id            text,
    product_key            text,
    checkout_session_id    text UNIQUE,
    payment_intent_id      text UNIQUE,
    charge_id              text UNIQUE,
    amount_paid_cents      bigint CHECK (amount_paid_cents >= 0),
    currency               text,
    platform_fee_cents     bigint CHECK (platform_fee_cents >= 0),
    organization_fee_cents bigint CHECK (organization_fee_cents >= 0),
    creator_payout_cents   bigint CHECK (creator_payout_cents >= 0),
    status                 text NOT NULL
        CHECK (status IN ('pending', 'completed', 'refunded', 'failed', 'disputed')),
    -- merged facts the status is derived from
    paid                   boolean NOT NULL DEFAULT false,
    payment_failed         boolean NOT NULL DEFAULT false,
    fully_refunded         boolean NOT NULL DEFAULT false,
    dispute_status         text NOT NULL DEFAULT 'none'
        CHECK (dispute_status IN ('none', 'open', 'warning_closed', 'won', 'lost')),
    dispute_id             text,
    purchased_at           timestamptz,
    refunded_at            timestamptz,
    refund_reason          text,
    refund_amount_cents    bigint NOT NULL DEFAULT 0 CHECK (refund_amount_cents >= 0),
    stripe_refund_id       text,
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT purchases_has_stripe_key
        CHECK (num_nonnulls(checkout_session_id, payment_intent_id, charge_id) > 0),
    -- The split is all-or-nothing and always adds up to what was paid.
    CONSTRAINT purchases_split_complete
        CHECK (num_nulls(amount_paid_cents, platform_fee_cents, organization_fee_cents,
                         creator_payout_cents) IN (0, 4)),
    CONSTRAINT purchases_split_adds_up
        CHECK (amount_paid_cents IS NULL
               OR platform_fee_cents + organization_fee_cents + creator_payout_cents
                  = amount_paid_cents)
);
CREATE INDEX purchases_user_id_idx ON purchases (user_id);
CREATE INDEX purchases_customer_id_idx ON purchases (customer_id) WHERE user_id IS NULL;
-- At most one completed (not fully refunded, not disputed) purchase per user and product.
CREATE UNIQUE INDEX purchases_one_completed_per_user_product
    ON purchases (user_id, product_key)
    WHERE status = 'completed';

-- Subscriptions. `status_claim*` is a last-writer-wins register keyed by (event created, status
-- precedence): an older event never overwrites a newer one, and events of the same second are
-- ordered by the lifecycle precedence. `terminal_status` is set once the subscription ended and
-- wins over every claim. `status` is the derived, effective Stripe status.
CREATE TABLE subscriptions (
    id                    text PRIMARY KEY,
    user_id               text,
    customer_id           text,
    product_key           text,
    status                text NOT NULL
        CHECK (status IN ('trialing', 'active', 'past_due', 'unpaid', 'paused', 'incomplete',
                          'canceled', 'incomplete_expired')),
    status_claim          text
        CHECK (status_claim IN ('trialing', 'active', 'past_due', 'unpaid', 'paused', 'incomplete',
                                'canceled', 'incomplete_expired')),
    status_claim_at       timestamptz,
    terminal_status       text CHECK (terminal_status IN ('canceled', 'incomplete_expired')),
    current_period_end    timestamptz,
    cancel_at_period_end  boolean NOT NULL DEFAULT false,
    ended_at              timestamptz,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT subscriptions_claim_complete
        CHECK ((status_claim IS NULL) = (status_claim_at IS NULL))
);
CREATE INDEX subscriptions_user_id_idx ON subscriptions (user_id);
CREATE INDEX subscriptions_customer_id_idx ON subscriptions (customer_id) WHERE user_id IS NULL;

-- Derived access, one row per user and entitlement key: the best of the user's sources.
CREATE TABLE entitlements (
    user_id    text NOT NULL,
    key        text NOT NULL,
    status     text NOT NULL
        CHECK (status IN ('active', 'past_due', 'suspended', 'revoked', 'expired')),
    source     text NOT NULL CHECK (source IN ('purchase', 'subscription')),
    source_id  text NOT NULL,
    expires_at timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, key)
);

-- Per-user version of the entitlement set, bumped in the transaction that recomputes it; the
-- Redis cache refuses to overwrite a newer version with an older one.
CREATE TABLE user_entitlement_versions (
    user_id text PRIMARY KEY,
    version bigint NOT NULL CHECK (version > 0)
);

-- Outbox of user notifications. `dedupe_key` makes writes idempotent, so duplicates and
-- permutations of the same events never queue the same notification twice.
CREATE TABLE notifications (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind       text NOT NULL
        CHECK (kind IN ('entitlement_revoked', 'entitlement_suspended', 'checkout_abandoned')),
    user_id    text,
    dedupe_key text NOT NULL UNIQUE,
    payload    jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    sent_at    timestamptz
);
CREATE INDEX notifications_unsent_idx ON notifications (created_at) WHERE sent_at IS NULL;
