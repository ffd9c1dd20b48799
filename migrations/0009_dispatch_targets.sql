-- Readiness per target (the dispatch path rebuilt). A work package is routed once, when it
-- arrives: `target` is where the router sends it (`explicit/agent:ada`, `work_type/role:developer`,
-- ...), `routed_by` the routing file's version that said so; a new version routes open work
-- again. A round reads ready work only of the targets whose agents can take some now, so a
-- paused, full or rate-limited agent's backlog is never read to be skipped.
--
-- `held_by` marks ready work a pause of its plan or lane holds (`plan:nightly`, `lane:l2`).
-- Such work leaves the index of ready work until the resume clears the mark, so however much
-- of it waits, no round reads it again.
ALTER TABLE work_packages
    ADD COLUMN target    TEXT,
    ADD COLUMN routed_by TEXT,
    ADD COLUMN held_by   TEXT;

CREATE INDEX work_packages_ready_target ON work_packages (target, fairness_key, priority DESC, source_ms, source_seq)
    WHERE status = 'ready' AND held_by IS NULL;
CREATE INDEX work_packages_held ON work_packages (held_by) WHERE held_by IS NOT NULL;
DROP INDEX work_packages_ready_fair;
