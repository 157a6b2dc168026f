-- A customer Stripe answered `resource_missing` for (deleted in the Dashboard, or created under
-- another account or mode). The row stays, since it still attributes that customer's past events
-- to the user; checkout, the billing portal and restore stop using it, and the next checkout
-- creates a new customer in its place.
ALTER TABLE customers ADD COLUMN gone_at timestamptz;
