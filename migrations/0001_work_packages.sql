-- The state of every work package, and the DAG edges between them (see CONTRACT.md).
CREATE TABLE work_packages (
    wp_id            TEXT PRIMARY KEY,
    status           TEXT NOT NULL CHECK (status IN
                       ('blocked', 'ready', 'dispatched', 'retry_wait', 'completed', 'failed', 'cancelled')),
    agent_id         TEXT,            -- agent of the current or last dispatch
    requested_agent  TEXT,            -- the entry's agent_id field, if any
    work_type        TEXT,
    trigger_subject  TEXT,
    lane             TEXT,
    route            TEXT,            -- explicit | work_type | trigger | default
    fields           JSONB NOT NULL,  -- the incoming entry's fields, passed through to triggers
    source_id        TEXT NOT NULL,   -- id of the ge:work:incoming entry
    source_ms        BIGINT NOT NULL, -- that id as numbers: the lane order
    source_seq       BIGINT NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    retry_base       INTEGER NOT NULL DEFAULT 0, -- attempts already used when an operator last retried
    dispatch_id      TEXT,
    published        BOOLEAN NOT NULL DEFAULT FALSE, -- trigger confirmed in Redis
    next_attempt_at  TIMESTAMPTZ,
    wait_reason      TEXT,
    last_error       TEXT,
    result           TEXT,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    ready_at         TIMESTAMPTZ,
    dispatched_at    TIMESTAMPTZ,
    completed_at     TIMESTAMPTZ,
    failed_at        TIMESTAMPTZ,
    cancelled_at     TIMESTAMPTZ,
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE work_package_deps (
    wp_id       TEXT NOT NULL REFERENCES work_packages (wp_id) ON DELETE CASCADE,
    depends_on  TEXT NOT NULL,  -- may name a work package not seen yet
    PRIMARY KEY (wp_id, depends_on)
);

CREATE INDEX work_package_deps_depends_on ON work_package_deps (depends_on);
CREATE INDEX work_packages_lane_order ON work_packages (lane, source_ms, source_seq) WHERE lane IS NOT NULL;
CREATE INDEX work_packages_open ON work_packages (status, source_ms, source_seq)
    WHERE status IN ('blocked', 'ready', 'retry_wait', 'dispatched');
CREATE INDEX work_packages_unpublished ON work_packages (dispatched_at) WHERE status = 'dispatched' AND NOT published;
