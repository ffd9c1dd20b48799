//! ge-orchestrator: routes work packages to AI agents over Redis Streams and enforces their
//! order (dependencies and lanes), with all state in PostgreSQL. See README.md and
//! ../shared/CONTRACT.md.

pub mod agent;
pub mod bench;
pub mod bench_ceiling;
pub mod bench_load;
pub mod bench_report;
pub mod chaos;
pub mod chaos_check;
pub mod completions;
pub mod config;
pub mod config_watch;
pub mod consumer;
pub mod context;
pub mod dev;
pub mod dispatch;
pub mod entry;
pub mod fnmatch;
pub mod health;
pub mod admin;
pub mod http;
pub mod ingest;
pub mod localstack;
pub mod metrics;
pub mod plan;
pub mod procs;
pub mod progress;
pub mod recover;
pub mod redact;
pub mod replica;
pub mod ops;
pub mod router;
pub mod scheduler;
pub mod settings;
pub mod status;
pub mod store;
pub mod streams;
pub mod takeover;
