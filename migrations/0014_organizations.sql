-- Organisations: access that belongs to a company. The organisation is a subject of its own,
-- `org:{organization_id}`, in every table a user is (its purchases, subscriptions, customers and
-- entitlements), so it is projected, cached and announced exactly as a user is. Its members are
-- the app's to name (admin API, processor::store::members): a member's access is their own
-- entitlements and those of every organisation they belong to, seat-bound keys only for the
-- first `quantity` members by seat (processor::domain::organization).
--
-- `version` is the app's: a write lands only with a higher version than the row holds, so a
-- late write never undoes a newer one, and a removal stays as a tombstone (`removed`) for that
-- reason. `seat` is the member's place among the organisation's current members, ordered by
-- (joined_at, user_id) from 0, rewritten with every membership change of the organisation;
-- NULL once removed.
CREATE TABLE organization_members (
    organization_id text NOT NULL,
    user_id         text NOT NULL,
    role            text NOT NULL CHECK (role IN ('admin', 'member')),
    joined_at       timestamptz NOT NULL,
    version         bigint NOT NULL CHECK (version >= 0),
    removed         boolean NOT NULL DEFAULT false,
    seat            integer CHECK (seat >= 0),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, user_id)
);
CREATE INDEX organization_members_user_idx ON organization_members (user_id) WHERE NOT removed;
