-- Marking a claim published is the one write of the hot path that changes no state: it can be
-- a HOT update (no index entry written) when no index names `published` and the page has room.
-- The index of unpublished claims named it, so every mark wrote a new entry into each of the
-- table's indexes. The scheduler finds unconfirmed claims among the dispatched ones instead,
-- through an index of dispatches by age, whose size is the work in flight.
DROP INDEX work_packages_unpublished;
CREATE INDEX work_packages_dispatched_at ON work_packages (dispatched_at) WHERE status = 'dispatched';
ALTER TABLE work_packages SET (fillfactor = 80);
