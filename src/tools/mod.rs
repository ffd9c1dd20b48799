//! What is not the orchestrator but ships with it: the reference agent, plans and their
//! submission, the local stack (throwaway Redis and PostgreSQL, and their highly available
//! topology), and the chaos, benchmark and soak harnesses.

pub mod agent;
pub mod bench;
pub mod chaos;
pub mod dev;
pub mod localstack;
pub mod plan;
pub(crate) mod procs;
pub(crate) mod progress;
pub mod proxy;
pub mod soak;
pub mod topology;
