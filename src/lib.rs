//! ge-orchestrator: routes work packages to AI agents over Redis Streams and enforces their
//! order (dependencies and lanes), with all state in PostgreSQL. See README.md and
//! docs/CONTRACT.md.
//!
//! The layers, each depending only on those above it in this list:
//! - [`core`]: the rules, with no I/O: routing file, router, fnmatch, entry validation, statuses.
//! - [`engine`]: one replica's state machine: PostgreSQL store, Redis streams, and the loops.
//! - [`ops`]: the operators' surface: HTTP, admin API, metrics, dashboard, status, actions.
//! - [`replica`]: wires the engine's loops and the operators' HTTP surface into one process.
//! - [`tools`]: what is not the orchestrator: reference agent, plans, local stack, chaos, bench.
//! - [`cli`]: the command line over all of them.

pub mod cli;
pub mod core;
pub mod engine;
pub mod ops;
pub mod replica;
pub mod tools;
