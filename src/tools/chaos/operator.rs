//! An operator among the faults (contract v1.6): now and then, a cancel of a recent work
//! package (waiting, running or done), through the same door as the CLI and the admin API.
//! What it cancels (and the dependents that go with it) is exempt from "completed exactly
//! once": it ends `cancelled`, or `completed` when it finished first; it is dispatched at
//! most once, and a trigger of it may have gone out before the cancel.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;

use super::check::Submitted;
use crate::engine::settings::Names;
use crate::engine::store::Roots;
use crate::engine::streams::{Endpoint, MasterConnection};
use crate::ops::operations::{self, Door};

/// What the operator did: cancels tried, work packages they cancelled, of which running.
#[derive(Debug, Default)]
pub(super) struct Cancels {
    pub tried: usize,
    pub cancelled: usize,
    pub running: usize,
}

/// Cancels one of the last `RECENT` work packages submitted every `every` (on average) until
/// `token`. Each one tried is kept as a root: a cancel whose answer a fault cut off may have
/// been committed all the same.
pub(super) async fn cancel_now_and_then(
    pool: sqlx::PgPool,
    endpoint: Endpoint,
    submitted: Arc<Mutex<Submitted>>,
    every: Duration,
    token: CancellationToken,
) -> Cancels {
    // The last second or so of work at the usual rates: most of it still waiting or running.
    const RECENT: usize = 30;
    let names = Names::default();
    let mut redis: Option<MasterConnection> = None;
    let mut done = Cancels::default();
    loop {
        let wait = every.mul_f64(rand::rng().random_range(0.5..1.5));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = token.cancelled() => return done,
        }
        if redis.is_none() {
            redis = MasterConnection::connect(&endpoint).await.ok();
        }
        let Some(con) = redis.clone() else { continue };
        let wp = {
            let mut s = submitted.lock().unwrap_or_else(|p| p.into_inner());
            let n = s.wp_ids.len();
            if n == 0 {
                continue;
            }
            let wp = s.wp_ids[n - 1 - rand::rng().random_range(0..n.min(RECENT))].clone();
            // The probes measure how soon work resumes after a failover: they must complete.
            if wp.starts_with("probe-") {
                continue;
            }
            s.cancel_roots.insert(wp.clone());
            wp
        };
        let mut door = Door { pool: &pool, redis: con, names: &names, replica: None };
        done.tried += 1;
        match operations::cancel(&mut door, Roots::One(&wp)).await {
            Ok(out) => {
                done.cancelled += out.cancelled.len();
                done.running += out.running.len();
                tracing::info!(wp_id = %wp, cancelled = out.cancelled.len(), running = out.running.len(), "chaos: cancelled");
            }
            Err(e) => tracing::info!(wp_id = %wp, error = %e, "chaos: cancel did nothing"),
        }
    }
}

/// The work packages the operator's cancels reached, from PostgreSQL once the run is over:
/// the roots tried, and each work package cancelled because one of them was, directly or
/// through a chain of dependents.
pub(super) async fn cancelled(pool: &sqlx::PgPool, roots: &HashSet<String>) -> anyhow::Result<HashSet<String>> {
    let rows: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT wp_id, wait_reason FROM work_packages WHERE status = 'cancelled'").fetch_all(pool).await?;
    // Each names the one it was cancelled with; a chain leads back to a root (a dependent
    // ingested after its dependency was cancelled names that dependency).
    let cause: HashMap<String, String> = rows
        .into_iter()
        .filter_map(|(wp, reason)| {
            let by = reason.as_deref()?.strip_prefix("cancelled because ")?.strip_suffix(" was cancelled")?.to_string();
            Some((wp, by))
        })
        .collect();
    Ok(reached(roots, &cause))
}

/// The roots, and every work package whose chain of causes (`cause`: cancelled because of)
/// leads to one of them.
fn reached(roots: &HashSet<String>, cause: &HashMap<String, String>) -> HashSet<String> {
    let mut out: HashSet<String> = roots.clone();
    for wp in cause.keys() {
        let mut at = wp;
        // A chain has at most one step per cause, and its end must be looked at too.
        for _ in 0..=cause.len() {
            if out.contains(at) {
                out.insert(wp.clone());
                break;
            }
            match cause.get(at) {
                Some(next) => at = next,
                None => break,
            }
        }
    }
    out
}

/// Prints, for each `cancelled` work package that no cancel of the operator explains, its
/// reason and history: what a person needs to see why it ended so.
pub(super) async fn explain_untraced(pool: &sqlx::PgPool, reached: &HashSet<String>) -> anyhow::Result<()> {
    let rows: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT wp_id, wait_reason FROM work_packages WHERE status = 'cancelled' ORDER BY wp_id").fetch_all(pool).await?;
    for (wp, reason) in rows.into_iter().filter(|(w, _)| !reached.contains(w)) {
        let history: Vec<(String, String, Option<String>, Option<String>)> = sqlx::query_as(
            "SELECT to_char(at, 'HH24:MI:SS.US'), status, dispatch_id, detail FROM work_package_events WHERE wp_id = $1 ORDER BY at",
        )
        .bind(&wp)
        .fetch_all(pool)
        .await?;
        let deps: Vec<(String, String, Option<String>)> = sqlx::query_as(
            "SELECT d.depends_on, coalesce(p.status, 'missing'), p.wait_reason FROM work_package_deps d
             LEFT JOIN work_packages p ON p.wp_id = d.depends_on WHERE d.wp_id = $1",
        )
        .bind(&wp)
        .fetch_all(pool)
        .await?;
        println!("  cancelled, no operator's cancel explains it: {wp} ({reason:?}); dependencies {deps:?}; history {history:?}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &[&str]) -> HashSet<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    /// A run with a single chained cancel: its one step must still reach the root (the checker
    /// once walked one step fewer than a chain can have, and called such a cancel unexplained).
    #[test]
    fn a_chain_of_causes_leads_back_to_the_root_however_short() {
        let cause: HashMap<String, String> = [("p8.9".to_string(), "p8.7".to_string())].into();
        assert_eq!(reached(&set(&["p8.7"]), &cause), set(&["p8.7", "p8.9"]));
        let chain: HashMap<String, String> =
            [("c", "b"), ("b", "a"), ("x", "y")].iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert_eq!(reached(&set(&["a"]), &chain), set(&["a", "b", "c"]), "x leads to no root");
    }
}
