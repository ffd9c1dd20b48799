-- Schedules (contract v1.6): cron expressions that submit a plan, and one row per firing.

CREATE TABLE schedules (
    name          TEXT PRIMARY KEY,
    cron          TEXT NOT NULL,
    timezone      TEXT NOT NULL,
    plan          TEXT NOT NULL,                 -- the plan file's text (YAML), checked when the schedule was added
    plan_source   TEXT NOT NULL,                 -- the file it was read from, for errors and operators
    missed        TEXT NOT NULL,                 -- skip | catch_up:N
    overlap       TEXT NOT NULL CHECK (overlap IN ('skip', 'start')),
    paused        BOOLEAN NOT NULL DEFAULT false,
    -- The first firing no replica has decided yet. A decision moves it past the database's
    -- now, under the row's lock, in the transaction that records the firings: so each firing
    -- is decided once, whatever replica and whenever.
    next_fire_at  TIMESTAMPTZ NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The due schedules a replica's round locks (FOR UPDATE SKIP LOCKED): only those not paused.
CREATE INDEX schedules_due ON schedules (next_fire_at) WHERE NOT paused;

-- One row per decided firing. `outcome` submitted: its entries go to ge:work:incoming, and
-- `published_at` stays NULL until Redis took them (any replica finishes a firing left
-- unpublished); skipped_overlap: the previous firing's run was still open.
CREATE TABLE schedule_firings (
    schedule      TEXT NOT NULL,
    fire_at       TIMESTAMPTZ NOT NULL,
    outcome       TEXT NOT NULL CHECK (outcome IN ('submitted', 'skipped_overlap')),
    prefix        TEXT NOT NULL,
    wp_ids        TEXT[] NOT NULL,
    entries       JSONB NOT NULL,                -- the incoming entries, as published (field pairs)
    decided_by    TEXT NOT NULL,                 -- the replica (consumer name)
    decided_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    published_at  TIMESTAMPTZ,
    PRIMARY KEY (schedule, fire_at)
);

-- Firings still to publish: what every replica's round looks for.
CREATE INDEX schedule_firings_unpublished ON schedule_firings (decided_at) WHERE published_at IS NULL AND outcome = 'submitted';
