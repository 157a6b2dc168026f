-- Price history: every Stripe price and every amount a product was ever sold at. A product sells
-- at its current price (or amount); the ones before it still resolve to it, so a price change,
-- a retired price or a changed amount never takes access from those who paid what was asked at
-- the time (processor::domain::projection::registry). A price belongs to one product for good:
-- it is never reused for another one.
CREATE TABLE product_prices (
    price_id      text PRIMARY KEY,
    product_key   text NOT NULL REFERENCES products (key) ON DELETE CASCADE,
    first_sold_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX product_prices_product_key_idx ON product_prices (product_key);

CREATE TABLE product_amounts (
    product_key   text NOT NULL REFERENCES products (key) ON DELETE CASCADE,
    amount_cents  bigint NOT NULL CHECK (amount_cents >= 0),
    currency      text NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
    first_sold_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (product_key, amount_cents, currency)
);

INSERT INTO product_prices (price_id, product_key)
SELECT price_id, key FROM products WHERE price_id IS NOT NULL;
INSERT INTO product_amounts (product_key, amount_cents, currency)
SELECT key, amount_cents, currency FROM products WHERE amount_cents IS NOT NULL;

-- Every write of a product's price or amount records it; a price another product was ever sold
-- at is refused (unique_violation on product_prices_pkey), whoever writes the row.
CREATE FUNCTION products_record_price() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    owner text;
BEGIN
    IF NEW.price_id IS NOT NULL THEN
        INSERT INTO product_prices (price_id, product_key) VALUES (NEW.price_id, NEW.key)
        ON CONFLICT (price_id) DO NOTHING;
        SELECT product_key INTO owner FROM product_prices WHERE price_id = NEW.price_id;
        IF owner <> NEW.key THEN
            RAISE EXCEPTION 'price % was sold as product %', NEW.price_id, owner
                USING ERRCODE = 'unique_violation', CONSTRAINT = 'product_prices_pkey';
        END IF;
    END IF;
    IF NEW.amount_cents IS NOT NULL THEN
        INSERT INTO product_amounts (product_key, amount_cents, currency)
        VALUES (NEW.key, NEW.amount_cents, NEW.currency)
        ON CONFLICT DO NOTHING;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER products_record_price
    AFTER INSERT OR UPDATE OF price_id, amount_cents, currency ON products
    FOR EACH ROW EXECUTE FUNCTION products_record_price();
