-- Dispatch deadlines (contract v1.1). A dispatch whose agent has a timeout must be reported on
-- by deadline_at; an agent's heartbeat moves it to now + timeout_ms. Past it, the scheduler
-- counts the attempt as a retryable failure and frees its slot. The index holds only
-- dispatches that have a deadline, so the sweep costs what is running, not all history.
ALTER TABLE work_packages ADD COLUMN timeout_ms BIGINT, ADD COLUMN deadline_at TIMESTAMPTZ;

CREATE INDEX work_packages_deadline ON work_packages (deadline_at) WHERE status = 'dispatched' AND deadline_at IS NOT NULL;
