-- What this service offered at each Checkout Session it created: the user, the product and
-- exactly what the session charges (a Stripe price, or an amount and currency sold through
-- `price_data`). A completion of such a session is resolved from this row and the event
-- itself, with no request to Stripe; sessions without a row (Payment Links, the Dashboard,
-- another integration) are read from Stripe. Written after Stripe answered the creation,
-- idempotently (a double click returns the same session).
CREATE TABLE IF NOT EXISTS checkout_offers (
    session_id   text PRIMARY KEY,
    user_id      text NOT NULL,
    product_key  text NOT NULL,
    mode         text NOT NULL CHECK (mode IN ('payment', 'subscription')),
    price_id     text,
    amount_cents bigint,
    currency     text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    CHECK (price_id IS NOT NULL OR (amount_cents IS NOT NULL AND currency IS NOT NULL))
);
CREATE INDEX IF NOT EXISTS checkout_offers_created_at_idx ON checkout_offers (created_at);

-- The price each Payment Link sells, learned from the first of its sessions whose line items
-- were read from Stripe. A Payment Link's line items cannot change price (an update may only
-- change quantities), so later sessions of the link need no read.
CREATE TABLE IF NOT EXISTS payment_link_prices (
    payment_link text PRIMARY KEY,
    price_id     text NOT NULL,
    learned_at   timestamptz NOT NULL DEFAULT now()
);
