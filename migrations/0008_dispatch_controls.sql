-- Dispatch controls (contract v1.4): priorities, fair share, delayed work, pauses and rate
-- limits. Adding columns with constant defaults rewrites no rows.
ALTER TABLE work_packages
    ADD COLUMN priority     SMALLINT NOT NULL DEFAULT 0,   -- -100..100, higher first
    ADD COLUMN plan         TEXT,                          -- the entry's plan, or its wp_id up to the last dot
    ADD COLUMN fairness_key TEXT NOT NULL DEFAULT '',      -- round-robin group: fairness_key, else plan, else ''
    ADD COLUMN not_before   TIMESTAMPTZ;                   -- may not run before

-- Ready work by fairness key, best first: a round takes a few from every key (a skip scan
-- over the keys, then the head of each), so a small plan is not hidden behind a large one.
-- Its size is the ready work.
CREATE INDEX work_packages_ready_fair ON work_packages (fairness_key, priority DESC, source_ms, source_seq)
    WHERE status = 'ready';

-- Work in flight by fairness key: a round counts it for the keys it looks at, so that a key
-- with nothing running goes first. Its size is the work in flight.
CREATE INDEX work_packages_dispatched_fair ON work_packages (fairness_key) WHERE status = 'dispatched';

-- Paused agents, lanes and plans. Held here so that a pause outlives every replica.
CREATE TABLE dispatch_pauses (
    scope      TEXT NOT NULL CHECK (scope IN ('agent', 'lane', 'plan')),
    name       TEXT NOT NULL,
    reason     TEXT,
    paused_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, name)
);

-- The token bucket of each agent with a rate_limit: tokens left at `at` (epoch seconds of the
-- database's clock). Read and written only under the agent's advisory lock, so the limit holds
-- across replicas.
CREATE TABLE agent_rate_buckets (
    agent_id  TEXT PRIMARY KEY,
    tokens    FLOAT8 NOT NULL,
    at        FLOAT8 NOT NULL
);
