-- Every payment recorded: a second payment for something the user already owns is a purchase
-- of its own (it was refused by a unique index, retried, then parked). `duplicate` marks it:
-- paid while an earlier paid purchase of the same product still held it, set by the
-- recomputation (processor::domain::projection::duplicate_payments).
DROP INDEX purchases_one_completed_per_user_product;
ALTER TABLE purchases ADD COLUMN duplicate boolean NOT NULL DEFAULT false;
CREATE INDEX purchases_duplicate_idx ON purchases (purchased_at DESC) WHERE duplicate;
