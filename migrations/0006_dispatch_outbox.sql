-- Claims whose trigger Redis has not confirmed yet: the outbox of dispatch. A row is written by
-- the claim, in its statement, and deleted once the trigger is published; the scheduler
-- publishes again (idempotently) whatever stays longer than GE_REPUBLISH_AFTER. It replaces the
-- `published` flag: setting that flag wrote a new version of the work package's row, an entry
-- in each of its indexes, and waited for a completion holding the row; deleting from this
-- narrow table does none of that. Its size is the claims between PostgreSQL and Redis.
CREATE TABLE dispatch_outbox (
    dispatch_id  TEXT PRIMARY KEY,
    wp_id        TEXT NOT NULL,
    claimed_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX dispatch_outbox_claimed_at ON dispatch_outbox (claimed_at);

INSERT INTO dispatch_outbox (dispatch_id, wp_id, claimed_at)
SELECT dispatch_id, wp_id, dispatched_at FROM work_packages WHERE status = 'dispatched' AND NOT published;

DROP INDEX work_packages_unpublished;
ALTER TABLE work_packages DROP COLUMN published;
