-- Work in flight per agent, kept by statement triggers so that a dispatch round reads a few
-- rows instead of counting every dispatched work package (a count that grows with the fleet's
-- backlog). The triggers see every change of status or agent, whoever makes it.
CREATE TABLE agent_in_flight (
    agent_id  TEXT PRIMARY KEY,
    n         INTEGER NOT NULL
);

INSERT INTO agent_in_flight (agent_id, n)
SELECT agent_id, count(*) FROM work_packages WHERE status = 'dispatched' AND agent_id IS NOT NULL GROUP BY agent_id;

-- Agents in a fixed order, so two transactions that both move counters lock them alike.
CREATE FUNCTION agent_in_flight_apply(deltas jsonb) RETURNS void LANGUAGE sql AS $$
    INSERT INTO agent_in_flight AS a (agent_id, n)
    SELECT key, value::int FROM jsonb_each_text(deltas) WHERE value::int <> 0 ORDER BY key
    ON CONFLICT (agent_id) DO UPDATE SET n = a.n + excluded.n
$$;

CREATE FUNCTION agent_in_flight_on_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM agent_in_flight_apply(coalesce((
        SELECT jsonb_object_agg(agent, d) FROM (
            SELECT agent, sum(d) AS d FROM (
                SELECT o.agent_id AS agent, -1 AS d FROM old_rows o JOIN new_rows n USING (wp_id)
                 WHERE o.status = 'dispatched' AND o.agent_id IS NOT NULL
                   AND (n.status <> 'dispatched' OR n.agent_id IS DISTINCT FROM o.agent_id)
                UNION ALL
                SELECT n.agent_id, 1 FROM old_rows o JOIN new_rows n USING (wp_id)
                 WHERE n.status = 'dispatched' AND n.agent_id IS NOT NULL
                   AND (o.status <> 'dispatched' OR n.agent_id IS DISTINCT FROM o.agent_id)) x
            GROUP BY agent) y), '{}'));
    RETURN NULL;
END $$;

CREATE FUNCTION agent_in_flight_on_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM agent_in_flight_apply(coalesce((
        SELECT jsonb_object_agg(agent_id, c) FROM (
            SELECT agent_id, count(*) AS c FROM new_rows WHERE status = 'dispatched' AND agent_id IS NOT NULL GROUP BY agent_id) y), '{}'));
    RETURN NULL;
END $$;

CREATE FUNCTION agent_in_flight_on_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM agent_in_flight_apply(coalesce((
        SELECT jsonb_object_agg(agent_id, -c) FROM (
            SELECT agent_id, count(*) AS c FROM old_rows WHERE status = 'dispatched' AND agent_id IS NOT NULL GROUP BY agent_id) y), '{}'));
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
