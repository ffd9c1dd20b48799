//! Keeping the planner's statistics of `work_packages` up with its backlog. The dispatch path's
//! statements are shaped so that no stale statistic can turn a key lookup into a scan (see
//! `store`), but the planner still chooses between the indexes of open and of ready work, and
//! sizes the rest, by statistics that autovacuum refreshes only at its next look (a minute by
//! default) after a backlog of 200,000 arrived in seconds. So the scheduler analyzes the table
//! itself when more of it changed since the last analyze than a fifth of its rows, one replica
//! at a time (about 0.1 s at 200,000 rows, on the replica whose turn it is). Measured on the
//! bench's held-backlog (another agent's completion-to-dispatch behind 200,000 held): p99
//! 2,501 and 226 ms in two runs without it, 13 ms with it; p50 the same either way.

use crate::engine::context::Ctx;

/// Namespace of the lock that keeps two replicas from analyzing at once.
const ANALYZE_LOCK: i64 = 0x6765_0002;

/// Analyzes `work_packages` when its statistics lag: more rows changed since the last analyze
/// than 1,000 and a fifth of the rows it had then. Returns whether it did.
pub(crate) async fn keep_up(ctx: &Ctx) -> Result<bool, sqlx::Error> {
    let lagging: Option<bool> = sqlx::query_scalar(
        "SELECT s.n_mod_since_analyze > greatest(1000, 0.2 * greatest(c.reltuples, 0))
         FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid
         WHERE s.relid = 'work_packages'::regclass",
    )
    .fetch_optional(&ctx.pool)
    .await?;
    if lagging != Some(true) {
        return Ok(false);
    }
    let mut con = ctx.pool.acquire().await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(ANALYZE_LOCK).fetch_one(&mut *con).await?;
    if !locked {
        return Ok(false);
    }
    let analyzed = sqlx::query("ANALYZE work_packages").execute(&mut *con).await;
    sqlx::query("SELECT pg_advisory_unlock($1)").bind(ANALYZE_LOCK).execute(&mut *con).await?;
    analyzed?;
    tracing::debug!("work_packages analyzed: its statistics lagged behind the backlog");
    Ok(true)
}
