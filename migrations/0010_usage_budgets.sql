-- Usage and budgets (contract v1.6). Money is NUMERIC (exact), in USD.

-- What each dispatch used, as its report said: one row per dispatch_id, written in the
-- transaction that applies the report. A second report of the same dispatch adds nothing.
CREATE TABLE dispatch_usage (
    dispatch_id   TEXT PRIMARY KEY,
    wp_id         TEXT NOT NULL,
    plan          TEXT,
    agent_id      TEXT NOT NULL,
    fairness_key  TEXT NOT NULL DEFAULT '',
    input_tokens  BIGINT,
    output_tokens BIGINT,
    cost          NUMERIC NOT NULL DEFAULT 0,
    model         TEXT,
    at            TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX dispatch_usage_wp ON dispatch_usage (wp_id);

-- Spend summed per plan, agent and fairness key and UTC day, kept with the usage rows so that
-- budgets are read from a few rows whatever the history: a plan's spend is the sum of its
-- days, an agent's of the days of its period.
CREATE TABLE spend_totals (
    scope         TEXT NOT NULL CHECK (scope IN ('plan', 'agent', 'fairness_key')),
    name          TEXT NOT NULL,
    day           DATE NOT NULL,
    cost          NUMERIC NOT NULL DEFAULT 0,
    input_tokens  BIGINT NOT NULL DEFAULT 0,
    output_tokens BIGINT NOT NULL DEFAULT 0,
    reports       BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, name, day)
);

-- A plan's budget: set by the first entry of the plan that carries `budget`, or by an operator.
-- No limit: an operator removed it (and later entries' `budget` sets none).
CREATE TABLE plan_budgets (
    plan       TEXT PRIMARY KEY,
    limit_usd  NUMERIC CHECK (limit_usd >= 0),
    set_by     TEXT NOT NULL,
    set_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Warnings already given, so each crossing is logged once across replicas: (scope, name, the
-- period, 'warning' | 'reached'). A new budget for a plan clears its rows.
CREATE TABLE budget_warnings (
    scope   TEXT NOT NULL,
    name    TEXT NOT NULL,
    period  TEXT NOT NULL,
    level   TEXT NOT NULL,
    at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, name, period, level)
);

-- An amount as operators read it: exact, with at least two decimals (1.2 -> 1.20, 25 -> 25.00,
-- 0.0125 as it is).
CREATE FUNCTION ge_usd(x NUMERIC) RETURNS TEXT LANGUAGE sql IMMUTABLE AS
$$ SELECT CASE WHEN scale(trim_scale(x)) < 2 THEN round(x, 2)::text ELSE trim_scale(x)::text END $$;
