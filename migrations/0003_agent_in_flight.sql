-- Work in flight per agent, kept by statement triggers so that a dispatch round reads a few
-- rows instead of counting every dispatched work package (a count that grows with the
-- backlog). The rows are signed deltas, only ever inserted by the triggers: a completion never
-- waits on a counter row that a dispatch round holds (row counters did, and deadlocked when one
-- transaction completed work of two agents in the opposite order of another). The dispatch
-- round, which runs under its own lock, folds them into one row per agent as it reads them.
CREATE TABLE agent_in_flight (
    agent_id  TEXT NOT NULL,
    n         INTEGER NOT NULL
);

CREATE INDEX agent_in_flight_agent ON agent_in_flight (agent_id);

INSERT INTO agent_in_flight (agent_id, n)
SELECT agent_id, count(*) FROM work_packages WHERE status = 'dispatched' AND agent_id IS NOT NULL GROUP BY agent_id;

CREATE FUNCTION agent_in_flight_on_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO agent_in_flight (agent_id, n)
    SELECT agent, sum(d) FROM (
        SELECT o.agent_id AS agent, -1 AS d FROM old_rows o JOIN new_rows n USING (wp_id)
         WHERE o.status = 'dispatched' AND o.agent_id IS NOT NULL
           AND (n.status <> 'dispatched' OR n.agent_id IS DISTINCT FROM o.agent_id)
        UNION ALL
        SELECT n.agent_id, 1 FROM old_rows o JOIN new_rows n USING (wp_id)
         WHERE n.status = 'dispatched' AND n.agent_id IS NOT NULL
           AND (o.status <> 'dispatched' OR n.agent_id IS DISTINCT FROM o.agent_id)) x
    GROUP BY agent HAVING sum(d) <> 0;
    RETURN NULL;
END $$;

CREATE FUNCTION agent_in_flight_on_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO agent_in_flight (agent_id, n)
    SELECT agent_id, count(*) FROM new_rows WHERE status = 'dispatched' AND agent_id IS NOT NULL GROUP BY agent_id;
    RETURN NULL;
END $$;

CREATE FUNCTION agent_in_flight_on_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO agent_in_flight (agent_id, n)
    SELECT agent_id, -count(*) FROM old_rows WHERE status = 'dispatched' AND agent_id IS NOT NULL GROUP BY agent_id;
    RETURN NULL;
END $$;

CREATE TRIGGER agent_in_flight_update AFTER UPDATE ON work_packages
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION agent_in_flight_on_update();
CREATE TRIGGER agent_in_flight_insert AFTER INSERT ON work_packages
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION agent_in_flight_on_insert();
CREATE TRIGGER agent_in_flight_delete AFTER DELETE ON work_packages
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION agent_in_flight_on_delete();
-- TRUNCATE fires no row-level logic; it empties the counters with the table.
CREATE FUNCTION agent_in_flight_on_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM agent_in_flight;
    RETURN NULL;
END $$;
CREATE TRIGGER agent_in_flight_truncate AFTER TRUNCATE ON work_packages
    FOR EACH STATEMENT EXECUTE FUNCTION agent_in_flight_on_truncate();
