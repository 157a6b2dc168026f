-- The product registry's generation: bumped by every statement that writes `products`, in its
-- transaction. The store keeps the registry it loaded in memory, per database (`token`), and
-- reads only this row per batch: the table is read again only after it changed.
CREATE TABLE registry_generation (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    -- Tells databases apart (a database dropped and created again starts a new one).
    token      text NOT NULL DEFAULT gen_random_uuid()::text,
    generation bigint NOT NULL DEFAULT 0
);
INSERT INTO registry_generation DEFAULT VALUES;

CREATE FUNCTION registry_generation_bump() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE registry_generation SET generation = generation + 1;
    RETURN NULL;
END $$;
CREATE TRIGGER products_registry_generation
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON products
    FOR EACH STATEMENT EXECUTE FUNCTION registry_generation_bump();
