-- Retention (contract v1.3): finished work packages are removed GE_RETENTION after they
-- finished. Their last transition set updated_at, so this index holds exactly the finished
-- work, oldest first: the retention batch reads its head, and its size is the history kept,
-- not all history. Open work never enters it, so dispatch and the sweep do not pay for it.
CREATE INDEX work_packages_finished ON work_packages (updated_at)
    WHERE status IN ('completed', 'failed', 'cancelled');
-- The outbox's rows of a removed work package go with it; found by wp_id.
CREATE INDEX dispatch_outbox_wp ON dispatch_outbox (wp_id);
