-- A count of unmet prerequisites on each open work package: how many of its `depends_on` are not
-- completed yet. Ingest counts them (under a share lock on each prerequisite's row, so a
-- completion running at the same time either commits first and is counted as done, or waits
-- and then sees the new edge); the statement after a completion decrements its dependents and
-- returns those whose count reached zero; an operator's retry counts again. So work whose
-- prerequisites are met is found by the count instead of a check of each edge, and a sweep
-- pages only through blocked work whose prerequisites are met (work behind its lane's head),
-- never through the backlog that waits for prerequisites.
ALTER TABLE work_packages ADD COLUMN unmet_deps INTEGER NOT NULL DEFAULT 0;

UPDATE work_packages w
SET unmet_deps = (SELECT count(*) FROM work_package_deps d LEFT JOIN work_packages p ON p.wp_id = d.depends_on
                  WHERE d.wp_id = w.wp_id AND p.status IS DISTINCT FROM 'completed')
WHERE w.status NOT IN ('completed', 'cancelled', 'failed')
  AND EXISTS (SELECT 1 FROM work_package_deps d WHERE d.wp_id = w.wp_id);

CREATE INDEX work_packages_blocked_met ON work_packages (source_ms, source_seq) WHERE status = 'blocked' AND unmet_deps = 0;
