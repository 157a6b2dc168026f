-- Disputes by their lifecycle: each dispute of a payment on its own, by id, with its newest
-- status and its newest status the service knows (processor::domain::projection::purchase).
-- `dispute_status` stays as the summary of them all; `dispute_id` names the newest.
ALTER TABLE purchases ADD COLUMN disputes jsonb NOT NULL DEFAULT '{}';

ALTER TABLE purchases DROP CONSTRAINT purchases_dispute_status_check;
ALTER TABLE purchases ADD CONSTRAINT purchases_dispute_status_check
    CHECK (dispute_status IN ('none', 'warning_closed', 'prevented', 'won', 'unknown', 'inquiry',
                              'open', 'lost'));

-- What the single summary knew: an open dispute was a chargeback (inquiries were stored as
-- open too; a chargeback is the cautious reading), dated at the epoch so that any event of
-- that dispute is newer.
UPDATE purchases
   SET disputes = jsonb_build_object(dispute_id, jsonb_build_object(
         'status', CASE dispute_status WHEN 'open' THEN 'needs_response' ELSE dispute_status END,
         'at', 0,
         'known', CASE dispute_status WHEN 'open' THEN 'needs_response' ELSE dispute_status END,
         'knownAt', 0))
 WHERE dispute_id IS NOT NULL AND dispute_status <> 'none';
