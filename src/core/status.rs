//! The statuses of a work package, as stored in `work_packages.status` and shown to operators.

/// Every status a work package can have, in the order of its life.
pub(crate) const STATUSES: [&str; 7] = ["blocked", "ready", "dispatched", "retry_wait", "completed", "failed", "cancelled"];

/// The statuses a work package ends in; nothing moves it out of them but an operator.
pub(crate) const FINISHED: [&str; 3] = ["completed", "failed", "cancelled"];
