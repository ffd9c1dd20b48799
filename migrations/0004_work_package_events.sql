-- Every status change of a work package, for the operators' view of its history. Written by
-- statement triggers, so no transition anywhere in the code can forget to record itself, and a
-- batch of 100 transitions costs one INSERT, not 100. No foreign key: a per-row check on the
-- hot path buys nothing, since work packages are never deleted.
CREATE TABLE work_package_events (
    id          BIGSERIAL PRIMARY KEY,
    wp_id       TEXT NOT NULL,
    at          TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    status      TEXT NOT NULL,
    agent_id    TEXT,
    dispatch_id TEXT,
    detail      TEXT
);

CREATE INDEX work_package_events_wp ON work_package_events (wp_id, id);

CREATE FUNCTION work_package_event_detail(status text, last_error text, wait_reason text) RETURNS text
    LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN status IN ('failed', 'retry_wait') THEN last_error ELSE wait_reason END
$$;

CREATE FUNCTION record_work_package_inserts() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO work_package_events (wp_id, status, agent_id, dispatch_id, detail)
    SELECT n.wp_id, n.status, n.agent_id, n.dispatch_id, work_package_event_detail(n.status, n.last_error, n.wait_reason)
    FROM new_rows n;
    RETURN NULL;
END $$;

CREATE FUNCTION record_work_package_updates() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO work_package_events (wp_id, status, agent_id, dispatch_id, detail)
    SELECT n.wp_id, n.status, n.agent_id, n.dispatch_id, work_package_event_detail(n.status, n.last_error, n.wait_reason)
    FROM new_rows n JOIN old_rows o USING (wp_id)
    WHERE n.status IS DISTINCT FROM o.status;
    RETURN NULL;
END $$;

CREATE TRIGGER work_packages_history_insert AFTER INSERT ON work_packages
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION record_work_package_inserts();
CREATE TRIGGER work_packages_history_update AFTER UPDATE ON work_packages
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION record_work_package_updates();
