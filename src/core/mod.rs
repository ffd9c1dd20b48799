//! The rules of the orchestrator, with no I/O and no async runtime: the routing file, the
//! router, CPython-compatible fnmatch, validation of stream entries, the statuses of a work
//! package. Everything here is unit-tested on its own.

pub mod entry;
pub mod fnmatch;
pub(crate) mod limits;
pub mod plan;
pub(crate) mod redact;
pub mod retention;
pub(crate) mod router;
pub mod routing_file;
pub mod schedule;
pub mod status;
pub mod usage;
