//! The statuses of a work package, as stored in `work_packages.status` and shown to operators.

/// Every status a work package can have, in the order of its life.
///
/// (v1.6) `waiting`: waits for an operator's approval or an outside event instead of an agent.
pub(crate) const STATUSES: [&str; 8] = ["blocked", "ready", "dispatched", "retry_wait", "waiting", "completed", "failed", "cancelled"];

/// The statuses a work package ends in; nothing moves it out of them but an operator.
pub(crate) const FINISHED: [&str; 3] = ["completed", "failed", "cancelled"];
