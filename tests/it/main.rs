//! The functional tests: one binary, so one PostgreSQL server for all of them (each test gets a
//! fresh database in it) and one link instead of one per file. Modules by subject; `harness`
//! starts what they run against. The timing-sensitive suites (`bench`, `chaos`, `browser`) are
//! binaries of their own, so nothing else runs beside them.

mod harness;

mod activity;
mod admin;
mod agent;
mod api_schema;
mod approvals;
mod architecture;
mod budgets;
mod cancel_running;
mod cli_ops;
mod controls;
mod dag;
mod deadlines;
mod deploy;
mod dev_stack;
mod events;
mod failover;
mod fnmatch;
mod held_backlog;
mod hostile;
mod http_limits;
mod ingest;
mod isolation;
mod lifecycle;
mod logs;
mod metrics;
mod operations;
mod operator_pool;
mod outages;
mod partitions;
mod prerequisites;
mod progress;
mod publication;
mod random_bytes;
mod recovery;
mod rerun;
mod retention;
mod routing;
mod schedules;
mod security;
mod security_http;
mod self_contained;
mod settings;
mod traces;
