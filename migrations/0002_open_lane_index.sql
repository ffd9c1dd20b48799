-- The lane condition asks "is any earlier work package of this lane still open?". Over an index
-- of open members only, the answer is the first entry of the lane, however long the lane's
-- history: without it, each check walked every completed predecessor and a backlog of long
-- lanes made dispatch rounds quadratic (found by a 10-minute chaos run).
CREATE INDEX work_packages_lane_open ON work_packages (lane, source_ms, source_seq)
    WHERE lane IS NOT NULL AND status NOT IN ('completed', 'cancelled');
