-- A Checkout Session Stripe answers `resource_missing` for (another account or mode): nothing
-- it says can be checked, so its purchase grants nothing (processor::complete).
ALTER TABLE purchases ADD COLUMN unknown_to_stripe boolean NOT NULL DEFAULT false;
