-- The product registry: the only map from what Stripe charged to the entitlement keys it grants
-- (processor::registry). `config` rows mirror STRIPE_PRICE_PRO_LIFETIME and CATALOG_FILE and are
-- rewritten at start-up; `admin` rows are registered through PUT /v1/products/{key}. A product
-- is sold at a Stripe price (`price_id`) or, for Checkout `price_data`, at `amount_cents` in
-- `currency`. Unpublished products cannot be bought; their buyers keep what they bought, so a
-- product row is never deleted.
CREATE TABLE products (
    key                  text PRIMARY KEY,
    origin               text NOT NULL CHECK (origin IN ('config', 'admin')),
    title                text,
    price_id             text UNIQUE,
    amount_cents         bigint CHECK (amount_cents >= 0),
    currency             text CHECK (currency ~ '^[a-z]{3}$'),
    mode                 text NOT NULL DEFAULT 'payment' CHECK (mode IN ('payment', 'subscription')),
    grants               text[] NOT NULL CHECK (cardinality(grants) > 0),
    creator_id           text,
    platform_fee_bps     integer NOT NULL DEFAULT 0 CHECK (platform_fee_bps BETWEEN 0 AND 10000),
    organization_fee_bps integer NOT NULL DEFAULT 0
        CHECK (organization_fee_bps BETWEEN 0 AND 10000),
    status               text NOT NULL DEFAULT 'published'
        CHECK (status IN ('published', 'unpublished')),
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT products_fees_fit CHECK (platform_fee_bps + organization_fee_bps <= 10000),
    CONSTRAINT products_amount_has_currency CHECK ((amount_cents IS NULL) = (currency IS NULL)),
    -- An admin product names how it is charged; the built-in `pro` may wait for its price.
    CONSTRAINT products_priced
        CHECK (origin = 'config' OR price_id IS NOT NULL OR amount_cents IS NOT NULL)
);

-- The contract's one-time Pro product always exists. STRIPE_PRICE_PRO_LIFETIME sets its price at
-- start-up; until then it is matched only through the metadata this service's checkout sets.
INSERT INTO products (key, origin, title, mode, grants)
VALUES ('pro', 'config', 'Pro (lifetime)', 'payment', ARRAY['pro']);

-- What was paid, as Stripe reported it: the price of the purchase's line item when known.
ALTER TABLE purchases ADD COLUMN price_id text;

-- The subscription's price is a last-writer-wins register like the status: (price_claim_at,
-- price_id, quantity) of the newest subscription event, so a stale update never undoes a newer
-- plan.
ALTER TABLE subscriptions
    ADD COLUMN price_id       text,
    ADD COLUMN price_claim_at timestamptz,
    ADD COLUMN quantity       bigint CHECK (quantity >= 0),
    ADD CONSTRAINT subscriptions_price_claim_complete
        CHECK ((price_id IS NULL) = (price_claim_at IS NULL));
CREATE INDEX subscriptions_price_id_idx ON subscriptions (price_id)
    WHERE terminal_status IS NULL;

-- Every source granting an entitlement (purchases, subscriptions), best first, as the API shows
-- them; `source`/`source_id` stay the best one's.
ALTER TABLE entitlements ADD COLUMN sources jsonb NOT NULL DEFAULT '[]';

-- Stripe Entitlements: a product may be granted by a Stripe feature (its `lookup_key`).
ALTER TABLE products ADD COLUMN feature_lookup_key text UNIQUE;
ALTER TABLE entitlements DROP CONSTRAINT entitlements_source_check;
ALTER TABLE entitlements ADD CONSTRAINT entitlements_source_check
    CHECK (source IN ('purchase', 'subscription', 'stripe_feature'));

-- A customer's active Stripe features: a last-writer-wins register by the summary event's
-- `created` (then the sorted list), always a complete list.
CREATE TABLE stripe_features (
    customer_id  text PRIMARY KEY,
    user_id      text,
    lookup_keys  text[] NOT NULL,
    claim_at     timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX stripe_features_user_id_idx ON stripe_features (user_id);
