//! Plans from files, and `submit`, which sends them to `ge:work:incoming` in order. The plan
//! itself (parsing, checks, entries) is `core::plan`.

use std::path::Path;

use anyhow::Context;

pub use crate::core::plan::{Plan, PlannedWp};

/// Reads and checks the plan at `path`; errors name the file, line and column.
pub fn load(path: &Path) -> anyhow::Result<Plan> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading plan {}", path.display()))?;
    Ok(crate::core::plan::parse(&text, &path.display().to_string(), 0)?)
}

impl Plan {
    pub fn load(path: &Path) -> anyhow::Result<Plan> {
        load(path)
    }
}

/// Sends the plan's work packages to the incoming stream in one pipeline, in plan order.
pub async fn submit<C: redis::aio::ConnectionLike>(con: &mut C, incoming: &str, plan: &Plan) -> redis::RedisResult<Vec<String>> {
    crate::engine::streams::xadd_many(con, incoming, &plan.entries()).await
}
