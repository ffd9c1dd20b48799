//! The engine of one replica: the PostgreSQL store, the Redis streams, and the loops that read
//! the input streams, dispatch work, sweep for what became due, recover abandoned entries,
//! take over dead replicas, report health, and remove what retention allows.

pub mod backoff;
pub mod budgets;
pub(crate) mod completions;
pub(crate) mod config_watch;
pub(crate) mod consume;
pub(crate) mod context;
pub mod controls;
pub(crate) mod deadlines;
pub mod dispatch;
pub mod duty;
pub mod health;
pub mod ingest;
pub mod input;
pub mod kept_events;
pub mod metrics;
pub(crate) mod postgres_probe;
pub mod progress;
pub(crate) mod recover;
pub mod retention;
pub mod schedule_store;
pub(crate) mod scheduler;
pub(crate) mod schedules;
pub mod settings;
pub(crate) mod statistics;
pub mod store;
pub mod streams;
pub mod takeover;
pub mod traces;
pub(crate) mod trimming;
pub mod waits;
pub(crate) mod wake;
