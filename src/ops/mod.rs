//! The operators' surface, shared by the HTTP server and the command line: health probes,
//! the admin API, Prometheus metrics, the dashboard, status views and operator actions.

pub(crate) mod actions;
pub mod activity;
pub mod admin;
pub mod http;
pub mod metrics;
pub(crate) mod operations;
pub mod reads;
pub(crate) mod schedules;
pub mod status;
pub(crate) mod waits_api;
