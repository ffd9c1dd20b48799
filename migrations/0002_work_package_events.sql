-- Every status change of a work package, for the operators' view of its history. Written by a
-- trigger, so no transition anywhere in the code can forget to record itself.
CREATE TABLE work_package_events (
    id          BIGSERIAL PRIMARY KEY,
    wp_id       TEXT NOT NULL REFERENCES work_packages (wp_id) ON DELETE CASCADE,
    at          TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    status      TEXT NOT NULL,
    agent_id    TEXT,
    dispatch_id TEXT,
    detail      TEXT
);

CREATE INDEX work_package_events_wp ON work_package_events (wp_id, id);

CREATE FUNCTION record_work_package_event() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.status IS DISTINCT FROM OLD.status THEN
        INSERT INTO work_package_events (wp_id, status, agent_id, dispatch_id, detail)
        VALUES (NEW.wp_id, NEW.status, NEW.agent_id, NEW.dispatch_id,
                CASE NEW.status WHEN 'failed' THEN NEW.last_error
                                WHEN 'retry_wait' THEN NEW.last_error
                                ELSE NEW.wait_reason END);
    END IF;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER work_packages_history AFTER INSERT OR UPDATE OF status ON work_packages
    FOR EACH ROW EXECUTE FUNCTION record_work_package_event();
