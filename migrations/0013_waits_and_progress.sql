-- Waiting for a person or an outside event (contract v1.6), and agents' live progress.
--
-- A work package with `wait_for` needs no agent: once its dependencies and lane let it go it
-- becomes `waiting` until an operator approves or rejects it, or an event with its `wait_key`
-- arrives, or its `wait_due_at` passes (then `on_timeout` decides). `waiting` is open work: it
-- holds its lane like `dispatched` does (the lane indexes count every status but completed
-- and cancelled), and no dispatch round reads it again.
ALTER TABLE work_packages DROP CONSTRAINT IF EXISTS work_packages_status_check;
ALTER TABLE work_packages ADD CONSTRAINT work_packages_status_check CHECK (status IN
    ('blocked', 'ready', 'dispatched', 'retry_wait', 'waiting', 'completed', 'failed', 'cancelled'));

ALTER TABLE work_packages
    ADD COLUMN wait_for        TEXT CHECK (wait_for IN ('approval', 'event')),
    ADD COLUMN wait_key        TEXT,
    ADD COLUMN wait_timeout_ms BIGINT,
    ADD COLUMN on_timeout      TEXT,
    ADD COLUMN wait_due_at     TIMESTAMPTZ;

-- An event completes the work packages waiting for its key: found by key, among waiting work only.
CREATE INDEX work_packages_waiting_key ON work_packages (wait_key) WHERE status = 'waiting';
-- The timeout sweep reads the head of this index: its size is the waiting work with a timeout.
CREATE INDEX work_packages_wait_due ON work_packages (wait_due_at) WHERE status = 'waiting' AND wait_due_at IS NOT NULL;

-- Events as they arrive, kept (bounded by age and count, GE_EVENT_MAX_AGE and
-- GE_EVENT_MAX_KEPT): one that no work package waited for stays unconsumed for the work package
-- that comes to wait for its key; every one, consumed or not, makes a redelivery of its stream
-- entry (same `source`) a no-op.
CREATE TABLE kept_events (
    id          BIGSERIAL PRIMARY KEY,
    key         TEXT NOT NULL,
    fields      JSONB NOT NULL,
    source      TEXT NOT NULL UNIQUE,   -- `stream:<entry id>`, or `api:<uuid>`
    received_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    consumed_at TIMESTAMPTZ             -- when it completed waiting work
);
CREATE INDEX kept_events_unconsumed ON kept_events (key, id) WHERE consumed_at IS NULL;
CREATE INDEX kept_events_received ON kept_events (received_at);

-- The latest progress an agent reported for a dispatch, one row per work package: a narrow
-- table, so a heartbeat's progress writes no new version of the work package's row (and its
-- indexes). Removed with its work package by retention.
CREATE TABLE work_package_progress (
    wp_id       TEXT PRIMARY KEY,
    dispatch_id TEXT NOT NULL,
    text        TEXT,
    fraction    REAL CHECK (fraction IS NULL OR (fraction >= 0 AND fraction <= 1)),
    at          TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX work_package_progress_at ON work_package_progress (at);
