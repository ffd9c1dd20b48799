//! An operator among the faults (contract v1.6): now and then, a cancel of a recent work
//! package (waiting, running or done), through the same door as the CLI and the admin API.
//! What it cancels (and the dependents that go with it) is exempt from "completed exactly
//! once": it ends `cancelled`, or `completed` when it finished first; it is dispatched at
//! most once, and a trigger of it may have gone out before the cancel.

use std::collections::HashSet;
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
    let cause: std::collections::HashMap<String, String> = rows
        .into_iter()
        .filter_map(|(wp, reason)| {
            let by = reason.as_deref()?.strip_prefix("cancelled because ")?.strip_suffix(" was cancelled")?.to_string();
            Some((wp, by))
        })
        .collect();
    let mut out: HashSet<String> = roots.clone();
    for wp in cause.keys() {
        let mut at = wp;
        for _ in 0..cause.len() {
            match cause.get(at) {
                _ if out.contains(at) => {
                    out.insert(wp.clone());
                    break;
                }
                Some(next) => at = next,
                None => break,
            }
        }
    }
    Ok(out)
}
