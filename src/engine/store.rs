//! PostgreSQL state transitions of work packages: ingest, completion, failure and the
//! operators' retry and cancel. Dispatch, which needs Redis too, is in `dispatch`.
//!
//! Statements that act on work packages named by key test their status as
//! `status COLLATE "C"`: the same test (equality of text is bytewise in either collation) that
//! no index on `status` can answer. The statistics of `status` lag far behind a backlog that
//! moves through it (autovacuum samples it a minute later, when most of it is `completed`), so
//! the planner took `status = 'dispatched'` for one row and scanned the open-work index by
//! status, with the keys as a filter: 20-100 ms per statement where the primary key answers
//! in under one. Written this way, the key is the only way in. Lookups of edges by key go key
//! by key (a LATERAL subquery that `OFFSET 0` keeps from being flattened into a join), for
//! the same reason: `depends_on = ANY($1)`, and then a hash join with the keys, on a table
//! the planner thought small became a sequential scan of every edge ever stored.

use std::collections::{BTreeMap, HashMap, HashSet};

use sqlx::{PgPool, Postgres, Row, Transaction};

use crate::core::entry::{Rejection, WorkPackageSpec};
use crate::core::routing_file::RetryPolicy;

/// Guards the DAG against cycles closed by concurrent batches: batches that cannot close one
/// take it shared and run side by side; a batch that might takes it exclusively and is checked
/// against everything committed before it.
const DAG_LOCK: i64 = 0x6765_0001;

pub(crate) static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// Connects and applies the embedded migrations. sqlx takes an advisory lock around them, so
/// replicas that start together apply each migration once.
pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    connect_with(url, max_connections, None).await
}

/// The options of a session for `url`: named `application_name` in `pg_stat_activity`, and
/// with a `statement_timeout` when given, so that no statement holds a connection, or the
/// locks it took, for longer.
pub fn session_options(
    url: &str,
    application_name: &str,
    statement_timeout: Option<std::time::Duration>,
) -> anyhow::Result<sqlx::postgres::PgConnectOptions> {
    use anyhow::Context;
    let options: sqlx::postgres::PgConnectOptions =
        url.parse().with_context(|| format!("invalid DATABASE_URL {}", crate::core::redact::url(url)))?;
    // No JIT: the engine's statements are short, but the planner's estimate for a round's
    // candidates (a recursive skip scan per target) crossed `jit_above_cost` behind a large
    // backlog, and compiling the plan took 3 s of every round (auto_explain, held-backlog).
    let options = options.application_name(application_name).options([("jit", "off")]);
    Ok(match statement_timeout {
        Some(t) => options.options([("statement_timeout", format!("{}ms", t.as_millis()))]),
        None => options,
    })
}

/// `connect` with a `statement_timeout` on every connection of the pool. The migrations run on
/// a connection of their own without it: one on a large table may rightly take longer than
/// any statement of the engine.
pub async fn connect_with(url: &str, max_connections: u32, statement_timeout: Option<std::time::Duration>) -> anyhow::Result<PgPool> {
    use anyhow::Context;
    let connecting = format!("connecting to PostgreSQL at {}", crate::core::redact::url(url));
    let pool = |size: u32| sqlx::postgres::PgPoolOptions::new().max_connections(size).acquire_timeout(std::time::Duration::from_secs(10));
    let migrating = pool(1).connect_with(session_options(url, "ge-orchestrator", None)?).await.context(connecting.clone())?;
    MIGRATOR.run(&migrating).await.context("applying database migrations")?;
    migrating.close().await;
    pool(max_connections).connect_with(session_options(url, "ge-orchestrator", statement_timeout)?).await.context(connecting)
}

/// The wait reason of delayed work (v1.4), from the SQL expression of its `not_before`. Work
/// that may not run yet waits as `retry_wait` with `next_attempt_at` at its `not_before`, so the
/// scheduler's sweep reads it only once it is due.
macro_rules! delayed_reason {
    ($nb:literal) => {
        concat!("'delayed: not before ' || to_char(", $nb, " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')")
    };
}

/// (v1.6) The wait reason of a waiting work package, from the SQL of its `wait_for` and
/// `wait_key` (as `core::wait::reason` words it).
macro_rules! waiting_reason {
    ($for:literal, $key:literal) => {
        concat!("CASE WHEN ", $for, " = 'event' THEN 'waiting for event ' || ", $key, " ELSE 'waiting for ' || ", $for, " END")
    };
}
pub(crate) use waiting_reason;
/// The unmet prerequisites of the work package `w`, counted from its edges: for a work package
/// that opens again (an operator's retry), whose count no completion kept while it was closed.
macro_rules! unmet_count {
    () => {
        "(SELECT count(*) FROM work_package_deps d LEFT JOIN work_packages p ON p.wp_id = d.depends_on
           WHERE d.wp_id = w.wp_id AND p.status IS DISTINCT FROM 'completed')"
    };
}

// After the macros, which they use.
mod cancel;
mod rerun;
mod unblocked;
pub(crate) use cancel::record_late_reports;
pub use cancel::{Cancelled, Roots, cancel_many};
pub use rerun::{RerunRefused, rerun};
pub(crate) use unblocked::{Unblocked, ids_of, lane_successors, unblocked_by};

#[derive(Debug, Clone, PartialEq)]
pub enum IngestOutcome {
    Inserted,
    /// Same wp_id, same fields: a producer's retry, nothing to do.
    Duplicate,
    Rejected(Rejection),
}

fn fields_json(fields: &BTreeMap<String, String>) -> serde_json::Value {
    serde_json::Value::Object(fields.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect())
}

/// Fields a producer's retry may change without making it other work (v1.6): the W3C trace
/// context, whose span id is new at each attempt of a traced producer.
const NOT_COMPARED: [&str; 2] = ["traceparent", "tracestate"];

fn differing_keys(old: &serde_json::Value, new: &serde_json::Value) -> Vec<String> {
    let (Some(a), Some(b)) = (old.as_object(), new.as_object()) else { return vec!["(all)".into()] };
    let mut keys: Vec<String> =
        a.keys().chain(b.keys()).filter(|k| a.get(*k) != b.get(*k) && !NOT_COMPARED.contains(&k.as_str())).cloned().collect();
    keys.sort();
    keys.dedup();
    keys
}

/// Persists a batch of validated entries in one transaction, in stream order. Each is
/// inserted, recognised as a duplicate, or rejected (`conflict`, `cycle`).
///
/// Most batches cannot close a cycle and go in a few set-based statements under the shared DAG
/// lock (`ingest_acyclic`). The rest take the lock exclusively and are checked and inserted one
/// by one, in stream order (`ingest_in_order`), so the entry that closes a cycle is the one
/// refused.
///
/// `routes` gives each spec's target (`router::Target::key`) under the routing file whose
/// version `routes.version` is: work is routed once, when it arrives.
pub async fn ingest(pool: &PgPool, specs: &[WorkPackageSpec], routes: &Routes<'_>) -> Result<Ingested, sqlx::Error> {
    if let Some(out) = ingest_acyclic(pool, specs, routes).await? {
        return Ok(out);
    }
    ingest_in_order(pool, specs, routes).await
}

/// Where each work package of an ingest batch goes, in the batch's order, and under which
/// routing file's version; and which of them are claimed in the transaction that stores them
/// (`at_once`, in the same order; missing or None: stored to wait for a dispatch round).
pub struct Routes<'a> {
    pub targets: &'a [String],
    pub version: &'a str,
    pub at_once: &'a [Option<AtOnce>],
}

/// A claim made at ingest: the agent a work package that may run at once goes to, decided
/// before its batch is stored (see `dispatch::at_once`). It is stored `dispatched`, attempt 1,
/// with its outbox row, in the statement that inserts it, unless a pause of its agent or plan
/// is committed by then: then it is stored `ready`, and the round after the ingest decides.
#[derive(Debug, Clone, PartialEq)]
pub struct AtOnce {
    pub agent: String,
    pub route: &'static str,
    pub timeout_ms: Option<i64>,
}

/// What an ingest batch became: each entry's outcome, in the batch's order, and the rows it
/// claimed at once (wp_id, agent_id, route, attempts, dispatch_id, fields, source_id, as a
/// dispatch round's claim returns them), to be published once the batch is committed.
pub struct Ingested {
    pub outcomes: Vec<IngestOutcome>,
    pub dispatched: Vec<sqlx::postgres::PgRow>,
}

/// The batch in one INSERT of work packages and one of edges, under the shared DAG lock, when
/// no cycle can close; None (nothing written) when one might.
///
/// Why no cycle can close then: edges are only ever added with the work package they leave
/// from, so a cycle through a new work package needs an edge into it. After taking the lock
/// (every exclusive batch before this one has committed, none after it can start until this
/// commits) there is none stored, the batch has none among its own work packages, and every
/// dependency is stored or in the batch: so no edge into this batch's work packages can come
/// from a concurrent shared batch either, whose dependencies must be stored or its own.
async fn ingest_acyclic(pool: &PgPool, specs: &[WorkPackageSpec], routes: &Routes<'_>) -> Result<Option<Ingested>, sqlx::Error> {
    let mut seen = HashSet::with_capacity(specs.len());
    // A batch that names one wp_id twice keeps strict stream order, so the first of the two wins.
    if !specs.iter().all(|s| seen.insert(s.wp_id.as_str())) || batch_has_cycle(specs) {
        return Ok(None);
    }
    let mut tx = pool.begin().await?;
    let deps: Vec<&str> = specs.iter().flat_map(|s| s.depends_on.iter().map(String::as_str)).collect();
    // Taken by every batch, with dependencies or not: a batch that stores a prerequisite while
    // another counts it as not stored yet (and so as unmet) must commit before that count is
    // taken, or after the dependent's edge is committed, so that the completion of the
    // prerequisite sees the edge. A batch that finds a dependency not stored takes this lock
    // exclusively (`ingest_in_order`), so it waits for every batch storing one.
    sqlx::query("SELECT pg_advisory_xact_lock_shared($1)").bind(DAG_LOCK).execute(&mut *tx).await?;
    if !deps.is_empty() {
        let ids: Vec<&str> = specs.iter().map(|s| s.wp_id.as_str()).collect();
        let risky: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM unnest($1::text[]) AS k(id)
                            CROSS JOIN LATERAL (SELECT 1 FROM work_package_deps d WHERE d.depends_on = k.id OFFSET 0) d)
                 OR EXISTS (SELECT 1 FROM unnest($2::text[]) AS d(id)
                            WHERE NOT d.id = ANY($1) AND NOT EXISTS (SELECT 1 FROM work_packages p WHERE p.wp_id = d.id))",
        )
        .bind(&ids)
        .bind(&deps)
        .fetch_one(&mut *tx)
        .await?;
        if risky {
            tx.rollback().await?;
            return Ok(None);
        }
    }
    let all: Vec<usize> = (0..specs.len()).collect();
    let out = insert_many(&mut tx, specs, &all, routes).await?;
    if !deps.is_empty() {
        cancel::cancel_late_dependents(&mut tx, specs, &out.outcomes).await?;
    }
    tx.commit().await?;
    Ok(Some(out))
}

/// Whether the batch's own edges (between its work packages) form a cycle.
fn batch_has_cycle(specs: &[WorkPackageSpec]) -> bool {
    let index: HashMap<&str, usize> = specs.iter().enumerate().map(|(i, s)| (s.wp_id.as_str(), i)).collect();
    let edges: Vec<Vec<usize>> =
        specs.iter().map(|s| s.depends_on.iter().filter_map(|d| index.get(d.as_str()).copied()).collect()).collect();
    // 0 unvisited, 1 on the current path, 2 done.
    let mut state = vec![0u8; specs.len()];
    for start in 0..specs.len() {
        if state[start] != 0 {
            continue;
        }
        let mut stack = vec![(start, 0usize)];
        state[start] = 1;
        while let Some((node, next)) = stack.pop() {
            match edges[node].get(next) {
                Some(&to) => {
                    stack.push((node, next + 1));
                    match state[to] {
                        0 => {
                            state[to] = 1;
                            stack.push((to, 0));
                        }
                        1 => return true,
                        _ => {}
                    }
                }
                None => state[node] = 2,
            }
        }
    }
    false
}

/// Under the exclusive DAG lock: work without dependencies in one statement, then each work
/// package with dependencies checked against the whole graph and inserted, in stream order.
async fn ingest_in_order(pool: &PgPool, specs: &[WorkPackageSpec], routes: &Routes<'_>) -> Result<Ingested, sqlx::Error> {
    let mut tx = pool.begin().await?;
    if specs.iter().any(|s| !s.depends_on.is_empty()) {
        sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(DAG_LOCK).execute(&mut *tx).await?;
    } else {
        sqlx::query("SELECT pg_advisory_xact_lock_shared($1)").bind(DAG_LOCK).execute(&mut *tx).await?;
    }
    let mut seen = HashSet::with_capacity(specs.len());
    let repeats = !specs.iter().all(|s| seen.insert(s.wp_id.as_str()));
    let mut out: Vec<Option<IngestOutcome>> = vec![None; specs.len()];
    let mut dispatched = Vec::new();
    if !repeats {
        let plain: Vec<usize> = (0..specs.len()).filter(|i| specs[*i].depends_on.is_empty()).collect();
        let ingested = insert_many(&mut tx, specs, &plain, routes).await?;
        for (i, outcome) in plain.iter().zip(ingested.outcomes) {
            out[*i] = Some(outcome);
        }
        dispatched = ingested.dispatched;
    }
    for (i, spec) in specs.iter().enumerate() {
        if out[i].is_none() {
            out[i] = Some(ingest_one(&mut tx, spec, &routes.targets[i], routes.version).await?);
        }
    }
    let out: Vec<IngestOutcome> = out.into_iter().flatten().collect();
    cancel::cancel_late_dependents(&mut tx, specs, &out).await?;
    tx.commit().await?;
    Ok(Ingested { outcomes: out, dispatched })
}

/// One INSERT for the specs at `idx` (with the outbox rows of those claimed at once) and one
/// for their edges, then one SELECT for those that were there already, to tell a producer's
/// retry from a conflicting resubmission. The caller has made sure none of them can close a
/// cycle.
async fn insert_many(
    tx: &mut Transaction<'_, Postgres>,
    specs: &[WorkPackageSpec],
    idx: &[usize],
    routes: &Routes<'_>,
) -> Result<Ingested, sqlx::Error> {
    if idx.is_empty() {
        return Ok(Ingested { outcomes: Vec::new(), dispatched: Vec::new() });
    }
    let at_once = |i: &usize| routes.at_once.get(*i).and_then(Option::as_ref);
    let col = |f: fn(&WorkPackageSpec) -> Option<String>| idx.iter().map(|i| f(&specs[*i])).collect::<Vec<_>>();
    let fields: Vec<serde_json::Value> = idx.iter().map(|i| fields_json(&specs[*i].fields)).collect();
    let deps: Vec<&str> = idx.iter().flat_map(|i| specs[*i].depends_on.iter().map(String::as_str)).collect();
    let completed = lock_prerequisites(tx, &deps).await?;
    let unmet: Vec<i32> = idx.iter().map(|i| unmet(&specs[*i], &completed)).collect();
    let rows: Vec<sqlx::postgres::PgRow> = sqlx::query(concat!(
        "WITH ins AS (
         INSERT INTO work_packages (wp_id, status, requested_agent, work_type, trigger_subject, lane, fields,
                                    source_id, source_ms, source_seq, ready_at, priority, plan, fairness_key, not_before,
                                    target, routed_by, next_attempt_at, wait_reason, unmet_deps,
                                    agent_id, route, attempts, dispatch_id, dispatched_at, timeout_ms, deadline_at,
                                    wait_for, wait_key, wait_timeout_ms, on_timeout, wait_due_at)
         SELECT t.wp_id, s.status, t.agent, t.work_type, t.trig, t.lane, t.fields, t.source_id, t.ms, t.seq,
                CASE WHEN s.status IN ('ready', 'dispatched') THEN now() END, t.priority, t.plan, t.fkey, s.nb, nullif(t.target, ''), $16,
                CASE WHEN s.status = 'retry_wait' THEN s.nb END,
                CASE WHEN s.status = 'retry_wait' THEN ",
        delayed_reason!("s.nb"),
        " WHEN s.status = 'waiting' THEN ",
        waiting_reason!("t.wait_for", "t.wait_key"),
        " END, t.unmet,
                CASE WHEN s.status = 'dispatched' THEN t.to_agent END, CASE WHEN s.status = 'dispatched' THEN t.to_route END,
                CASE WHEN s.status = 'dispatched' THEN 1 ELSE 0 END, CASE WHEN s.status = 'dispatched' THEN t.wp_id || ':1' END,
                CASE WHEN s.status = 'dispatched' THEN now() END, CASE WHEN s.status = 'dispatched' THEN t.to_timeout END,
                CASE WHEN s.status = 'dispatched' THEN now() + make_interval(secs => t.to_timeout / 1000.0) END,
                t.wait_for, t.wait_key, t.wait_ms, t.on_timeout,
                CASE WHEN s.status = 'waiting' THEN now() + make_interval(secs => t.wait_ms / 1000.0) END
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::jsonb[], $7::text[], $8::int8[], $9::int8[],
                     $10::bool[], $11::int2[], $12::text[], $13::text[], $14::int8[], $15::text[], $17::int4[],
                     $18::text[], $19::text[], $20::int8[], $21::text[], $22::text[], $23::int8[], $24::text[])
              AS t(wp_id, agent, work_type, trig, lane, fields, source_id, ms, seq, has_deps, priority, plan, fkey, nb_ms, target, unmet,
                   to_agent, to_route, to_timeout, wait_for, wait_key, wait_ms, on_timeout)
         CROSS JOIN LATERAL (SELECT to_timestamp(t.nb_ms / 1000.0) AS nb) n
         CROSS JOIN LATERAL (SELECT n.nb, CASE WHEN t.lane IS NOT NULL OR t.has_deps THEN 'blocked'
                                               WHEN n.nb > now() THEN 'retry_wait'
                                               WHEN t.wait_for IS NOT NULL THEN 'waiting'
                                               WHEN t.to_agent IS NOT NULL AND NOT EXISTS (
                                                    SELECT 1 FROM dispatch_pauses p
                                                    WHERE (p.scope = 'agent' AND p.name = t.to_agent) OR (p.scope = 'plan' AND p.name = t.plan))
                                                    AND NOT EXISTS (SELECT 1 FROM plan_budgets b WHERE b.plan = t.plan AND b.limit_usd IS NOT NULL)
                                                    THEN 'dispatched'
                                               ELSE 'ready' END AS status) s
         ON CONFLICT (wp_id) DO NOTHING
         RETURNING wp_id, status, agent_id, route, attempts, dispatch_id, fields, source_id, dispatched_at),
         outbox AS (INSERT INTO dispatch_outbox (dispatch_id, wp_id) SELECT dispatch_id, wp_id FROM ins WHERE status = 'dispatched')
         SELECT * FROM ins"
    ))
    .bind(col(|s| Some(s.wp_id.clone())))
    .bind(col(|s| s.agent_id.clone()))
    .bind(col(|s| s.work_type.clone()))
    .bind(col(|s| s.trigger.clone()))
    .bind(col(|s| s.lane.clone()))
    .bind(&fields)
    .bind(col(|s| Some(s.source_id.clone())))
    .bind(idx.iter().map(|i| specs[*i].source_ms).collect::<Vec<_>>())
    .bind(idx.iter().map(|i| specs[*i].source_seq).collect::<Vec<_>>())
    .bind(idx.iter().map(|i| !specs[*i].depends_on.is_empty()).collect::<Vec<_>>())
    .bind(idx.iter().map(|i| specs[*i].priority).collect::<Vec<_>>())
    .bind(col(|s| s.plan.clone()))
    .bind(col(|s| Some(s.fairness_key.clone())))
    .bind(idx.iter().map(|i| specs[*i].not_before_ms).collect::<Vec<_>>())
    .bind(idx.iter().map(|i| routes.targets[*i].as_str()).collect::<Vec<_>>())
    .bind(routes.version)
    .bind(&unmet)
    .bind(idx.iter().map(|i| at_once(i).map(|c| c.agent.as_str())).collect::<Vec<_>>())
    .bind(idx.iter().map(|i| at_once(i).map(|c| c.route)).collect::<Vec<_>>())
    .bind(idx.iter().map(|i| at_once(i).and_then(|c| c.timeout_ms)).collect::<Vec<_>>())
    .bind(col(|s| s.wait.as_ref().map(|w| w.wait_for.as_str().to_string())))
    .bind(col(|s| s.wait.as_ref().and_then(|w| w.key.clone())))
    .bind(idx.iter().map(|i| specs[*i].wait.as_ref().and_then(|w| w.timeout_ms)).collect::<Vec<_>>())
    .bind(col(|s| s.wait.as_ref().map(|w| w.on_timeout.as_str().to_string())))
    .fetch_all(&mut **tx)
    .await?;
    let inserted: HashSet<String> = rows.iter().map(|r| r.try_get("wp_id")).collect::<Result<_, _>>()?;
    let mut dispatched = Vec::new();
    for r in rows {
        if r.try_get::<String, _>("status")? == "dispatched" {
            dispatched.push(r);
        }
    }
    let (edge_from, edge_to): (Vec<&str>, Vec<&str>) = idx
        .iter()
        .map(|i| &specs[*i])
        .filter(|s| inserted.contains(&s.wp_id))
        .flat_map(|s| s.depends_on.iter().map(move |d| (s.wp_id.as_str(), d.as_str())))
        .unzip();
    if !edge_from.is_empty() {
        sqlx::query(
            "INSERT INTO work_package_deps (wp_id, depends_on) SELECT * FROM unnest($1::text[], $2::text[]) ON CONFLICT DO NOTHING",
        )
        .bind(&edge_from)
        .bind(&edge_to)
        .execute(&mut **tx)
        .await?;
    }
    let existing_ids: Vec<&str> = idx.iter().map(|i| specs[*i].wp_id.as_str()).filter(|w| !inserted.contains(*w)).collect();
    let existing: std::collections::HashMap<String, serde_json::Value> = if existing_ids.is_empty() {
        Default::default()
    } else {
        sqlx::query_as("SELECT wp_id, fields FROM work_packages WHERE wp_id = ANY($1)")
            .bind(&existing_ids)
            .fetch_all(&mut **tx)
            .await?
            .into_iter()
            .collect()
    };
    let outcomes = idx
        .iter()
        .zip(fields)
        .map(|(i, f)| {
            let spec = &specs[*i];
            if inserted.contains(&spec.wp_id) {
                return IngestOutcome::Inserted;
            }
            match existing.get(&spec.wp_id) {
                Some(old) => resubmission(spec, old, &f),
                // Deleted in between (operators do not delete; kept for completeness).
                None => IngestOutcome::Rejected(Rejection::new(
                    "conflict",
                    format!("wp_id {} vanished while being inserted; resubmit it", spec.wp_id),
                )),
            }
        })
        .collect();
    Ok(Ingested { outcomes, dispatched })
}

/// Locks the rows of the prerequisites `deps` that exist (FOR SHARE, in key order) and returns
/// those completed. The lock is what keeps the count of unmet prerequisites exact: a
/// completion of one of them that runs meanwhile either committed before the lock was granted
/// (and is counted as done here) or waits for this transaction, and then the statement after
/// it, which decrements the dependents, sees the new edges.
async fn lock_prerequisites(tx: &mut Transaction<'_, Postgres>, deps: &[&str]) -> Result<HashSet<String>, sqlx::Error> {
    if deps.is_empty() {
        return Ok(HashSet::new());
    }
    let rows: Vec<(String, bool)> = sqlx::query_as(
        "SELECT p.wp_id, p.done FROM (SELECT DISTINCT id FROM unnest($1::text[]) AS k(id) ORDER BY id) k
         CROSS JOIN LATERAL (SELECT x.wp_id, x.status COLLATE \"C\" = 'completed' AS done FROM work_packages x
                             WHERE x.wp_id = k.id FOR SHARE) p",
    )
    .bind(deps)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows.into_iter().filter(|(_, done)| *done).map(|(w, _)| w).collect())
}

/// How many of a spec's distinct prerequisites are not completed.
fn unmet(spec: &WorkPackageSpec, completed: &HashSet<String>) -> i32 {
    let distinct: HashSet<&str> = spec.depends_on.iter().map(String::as_str).collect();
    distinct.iter().filter(|d| !completed.contains(**d)).count() as i32
}

/// A wp_id seen before: the same fields are a producer's retry, others a conflict.
fn resubmission(spec: &WorkPackageSpec, existing: &serde_json::Value, fields: &serde_json::Value) -> IngestOutcome {
    if existing == fields || differing_keys(existing, fields).is_empty() {
        return IngestOutcome::Duplicate;
    }
    IngestOutcome::Rejected(Rejection::new(
        "conflict",
        format!(
            "wp_id {} was already submitted with different fields (differs in: {}); resubmit with a new wp_id or the original fields",
            spec.wp_id,
            differing_keys(existing, fields).join(", ")
        ),
    ))
}

async fn ingest_one(
    tx: &mut Transaction<'_, Postgres>,
    spec: &WorkPackageSpec,
    target: &str,
    routed_by: &str,
) -> Result<IngestOutcome, sqlx::Error> {
    let fields = fields_json(&spec.fields);
    if !spec.depends_on.is_empty() {
        // Does any dependency (transitively) depend on this work package already?
        let closer: Option<String> = sqlx::query_scalar(
            "WITH RECURSIVE reach(start, id) AS (
                 SELECT d, d FROM unnest($1::text[]) AS d
                 UNION
                 SELECT r.start, e.depends_on FROM work_package_deps e JOIN reach r ON e.wp_id = r.id)
             SELECT start FROM reach WHERE id = $2 LIMIT 1",
        )
        .bind(&spec.depends_on)
        .bind(&spec.wp_id)
        .fetch_optional(&mut **tx)
        .await?;
        if let Some(dep) = closer {
            return Ok(IngestOutcome::Rejected(Rejection::new(
                "cycle",
                format!(
                    "{} depends on {dep}, which already depends (directly or transitively) on {}; remove one of the edges and resubmit",
                    spec.wp_id, spec.wp_id
                ),
            )));
        }
    }
    let blocked = !spec.depends_on.is_empty() || spec.lane.is_some();
    let deps: Vec<&str> = spec.depends_on.iter().map(String::as_str).collect();
    let completed = lock_prerequisites(tx, &deps).await?;
    let inserted = sqlx::query(concat!(
        "INSERT INTO work_packages (wp_id, status, requested_agent, work_type, trigger_subject, lane, fields,
                                    source_id, source_ms, source_seq, ready_at, priority, plan, fairness_key, not_before,
                                    target, routed_by, next_attempt_at, wait_reason, unmet_deps,
                                    wait_for, wait_key, wait_timeout_ms, on_timeout, wait_due_at)
         SELECT $1, s.status, $2, $3, $4, $5, $6, $7, $8, $9, CASE WHEN s.status = 'ready' THEN now() END, $10, $11, $12, s.nb,
                nullif($15, ''), $16,
                CASE WHEN s.status = 'retry_wait' THEN s.nb END, CASE WHEN s.status = 'retry_wait' THEN ",
        delayed_reason!("s.nb"),
        " WHEN s.status = 'waiting' THEN ",
        waiting_reason!("$18::text", "$19::text"),
        " END, $17,
                $18, $19, $20, $21,
                CASE WHEN s.status = 'waiting' THEN now() + make_interval(secs => $20::int8 / 1000.0) END
         FROM (SELECT to_timestamp($13::int8 / 1000.0) AS nb) n
         CROSS JOIN LATERAL (SELECT n.nb, CASE WHEN $14 THEN 'blocked' WHEN n.nb > now() THEN 'retry_wait'
                                               WHEN $18::text IS NOT NULL THEN 'waiting' ELSE 'ready' END AS status) s
         ON CONFLICT (wp_id) DO NOTHING"
    ))
    .bind(&spec.wp_id)
    .bind(&spec.agent_id)
    .bind(&spec.work_type)
    .bind(&spec.trigger)
    .bind(&spec.lane)
    .bind(&fields)
    .bind(&spec.source_id)
    .bind(spec.source_ms)
    .bind(spec.source_seq)
    .bind(spec.priority)
    .bind(&spec.plan)
    .bind(&spec.fairness_key)
    .bind(spec.not_before_ms)
    .bind(blocked)
    .bind(target)
    .bind(routed_by)
    .bind(unmet(spec, &completed))
    .bind(spec.wait.as_ref().map(|w| w.wait_for.as_str()))
    .bind(spec.wait.as_ref().and_then(|w| w.key.as_deref()))
    .bind(spec.wait.as_ref().and_then(|w| w.timeout_ms))
    .bind(spec.wait.as_ref().map(|w| w.on_timeout.as_str()))
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if inserted == 0 {
        let existing: serde_json::Value =
            sqlx::query_scalar("SELECT fields FROM work_packages WHERE wp_id = $1").bind(&spec.wp_id).fetch_one(&mut **tx).await?;
        return Ok(resubmission(spec, &existing, &fields));
    }
    if !spec.depends_on.is_empty() {
        sqlx::query("INSERT INTO work_package_deps (wp_id, depends_on) SELECT $1, unnest($2::text[]) ON CONFLICT DO NOTHING")
            .bind(&spec.wp_id)
            .bind(&spec.depends_on)
            .execute(&mut **tx)
            .await?;
    }
    Ok(IngestOutcome::Inserted)
}

/// What became of a completion or failure report.
#[derive(Debug, Clone, PartialEq)]
pub enum ReportOutcome {
    /// By `agent`, which it went to by a route of this kind (`RouteKind::as_str`).
    Completed {
        agent: String,
        route: String,
    },
    RetryWait {
        delay_ms: u64,
    },
    Failed,
    /// The work package exists but the report is for an older attempt or was already applied.
    Stale(String),
    UnknownWp,
}

/// Completes every report of a batch that names the current dispatch of a dispatched work
/// package, in one statement; the others are told apart (stale or unknown) in one more. The
/// outcomes are in the order of `reports`. When one batch reports the same work package twice,
/// the first report that matches wins and the rest are stale.
pub(crate) async fn complete_many(
    tx: &mut Transaction<'_, Postgres>,
    reports: &[(&str, Option<&str>, Option<String>)],
) -> Result<Vec<ReportOutcome>, sqlx::Error> {
    if reports.is_empty() {
        return Ok(Vec::new());
    }
    let wp_ids: Vec<&str> = reports.iter().map(|r| r.0).collect();
    let dispatch_ids: Vec<Option<&str>> = reports.iter().map(|r| r.1).collect();
    let results: Vec<Option<&str>> = reports.iter().map(|r| r.2.as_deref()).collect();
    // The first matching report per work package, so the UPDATE sees one row for each.
    let done: Vec<(String, i64, String, String)> = sqlx::query_as(
        "WITH first AS MATERIALIZED (
             SELECT DISTINCT ON (r.wp_id) r.* FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS r(wp_id, dispatch_id, result, i)
             CROSS JOIN LATERAL (SELECT x.status, x.dispatch_id FROM work_packages x WHERE x.wp_id = r.wp_id OFFSET 0) w
             WHERE w.status COLLATE \"C\" = 'dispatched' AND (r.dispatch_id IS NULL OR w.dispatch_id = r.dispatch_id)
             ORDER BY r.wp_id, r.i)
         UPDATE work_packages w SET status = 'completed', completed_at = now(), updated_at = now(), result = first.result,
                wait_reason = NULL
         FROM first
         WHERE w.wp_id = first.wp_id AND w.status COLLATE \"C\" = 'dispatched' AND (first.dispatch_id IS NULL OR w.dispatch_id = first.dispatch_id)
         RETURNING w.wp_id, first.i, coalesce(w.agent_id, ''), coalesce(w.route, '')",
    )
    .bind(&wp_ids)
    .bind(&dispatch_ids)
    .bind(&results)
    .fetch_all(&mut **tx)
    .await?;
    let applied: HashMap<i64, (String, String)> = done.into_iter().map(|(_, i, agent, route)| (i, (agent, route))).collect();
    let rest: Vec<&str> = reports.iter().enumerate().filter(|(i, _)| !applied.contains_key(&(*i as i64 + 1))).map(|(_, r)| r.0).collect();
    let current: HashMap<String, (String, Option<String>)> = if rest.is_empty() {
        HashMap::new()
    } else {
        sqlx::query_as::<_, (String, String, Option<String>)>("SELECT wp_id, status, dispatch_id FROM work_packages WHERE wp_id = ANY($1)")
            .bind(&rest)
            .fetch_all(&mut **tx)
            .await?
            .into_iter()
            .map(|(w, s, d)| (w, (s, d)))
            .collect()
    };
    Ok(reports
        .iter()
        .enumerate()
        .map(|(i, (wp_id, dispatch_id, _))| {
            if let Some((agent, route)) = applied.get(&(i as i64 + 1)) {
                return ReportOutcome::Completed { agent: agent.clone(), route: route.clone() };
            }
            match current.get(*wp_id) {
                None => ReportOutcome::UnknownWp,
                Some((status, current)) => stale(dispatch_id.unwrap_or(wp_id), status, current.as_deref()),
            }
        })
        .collect())
}

/// A report that names no current dispatch: kept in the log, changes nothing.
fn stale(report: &str, status: &str, current: Option<&str>) -> ReportOutcome {
    ReportOutcome::Stale(format!("report for {report} ignored: work package is {status}, current dispatch {}", current.unwrap_or("none")))
}

async fn stale_or_unknown(
    tx: &mut Transaction<'_, Postgres>,
    wp_id: &str,
    dispatch_id: Option<&str>,
) -> Result<ReportOutcome, sqlx::Error> {
    let row = sqlx::query("SELECT status, dispatch_id FROM work_packages WHERE wp_id = $1").bind(wp_id).fetch_optional(&mut **tx).await?;
    Ok(match row {
        None => ReportOutcome::UnknownWp,
        Some(r) => {
            let status: String = r.try_get("status")?;
            let current: Option<String> = r.try_get("dispatch_id")?;
            stale(dispatch_id.unwrap_or(wp_id), &status, current.as_deref())
        }
    })
}

/// Records a failure: back to `retry_wait` while attempts remain and the agent says it is
/// retryable, else `failed`, where it holds its dependents and lane until an operator acts.
pub async fn fail(
    tx: &mut Transaction<'_, Postgres>,
    wp_id: &str,
    dispatch_id: Option<&str>,
    error: &str,
    retryable: bool,
    policy: &RetryPolicy,
) -> Result<ReportOutcome, sqlx::Error> {
    let row = sqlx::query(
        "SELECT attempts - retry_base AS used FROM work_packages
         WHERE wp_id = $1 AND status COLLATE \"C\" = 'dispatched' AND ($2::text IS NULL OR dispatch_id = $2) FOR UPDATE",
    )
    .bind(wp_id)
    .bind(dispatch_id)
    .fetch_optional(&mut **tx)
    .await?;
    let Some(row) = row else { return stale_or_unknown(tx, wp_id, dispatch_id).await };
    let used: i32 = row.try_get("used")?;
    let used = used.max(0) as u32;
    if retryable && used < policy.max_attempts {
        let delay = policy.delay_after(used);
        let delay_ms = delay.as_millis() as u64;
        sqlx::query(
            "UPDATE work_packages SET status = 'retry_wait', last_error = $2, updated_at = now(),
                    next_attempt_at = now() + make_interval(secs => $3::float8 / 1000.0),
                    wait_reason = 'retry after failure of attempt ' || attempts
             WHERE wp_id = $1",
        )
        .bind(wp_id)
        .bind(error)
        .bind(delay_ms as f64)
        .execute(&mut **tx)
        .await?;
        Ok(ReportOutcome::RetryWait { delay_ms })
    } else {
        sqlx::query(
            "UPDATE work_packages SET status = 'failed', last_error = $2, failed_at = now(), updated_at = now(),
                    wait_reason = NULL
             WHERE wp_id = $1",
        )
        .bind(wp_id)
        .bind(error)
        .execute(&mut **tx)
        .await?;
        Ok(ReportOutcome::Failed)
    }
}

/// A dispatch past its deadline: who had it and how long it was allowed.
#[derive(Debug, Clone)]
pub(crate) struct Overdue {
    pub wp_id: String,
    pub dispatch_id: String,
    pub agent_id: String,
    pub route: String,
    pub timeout_ms: i64,
}

/// Dispatches past their deadline, the longest overdue first.
pub(crate) async fn overdue(pool: &PgPool, limit: i64) -> Result<Vec<Overdue>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT wp_id, dispatch_id, coalesce(agent_id, '') AS agent_id, coalesce(route, '') AS route, timeout_ms FROM work_packages
         WHERE status = 'dispatched' AND deadline_at <= now() ORDER BY deadline_at LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(Overdue {
                wp_id: r.try_get("wp_id")?,
                dispatch_id: r.try_get("dispatch_id")?,
                agent_id: r.try_get("agent_id")?,
                route: r.try_get("route")?,
                timeout_ms: r.try_get::<Option<i64>, _>("timeout_ms")?.unwrap_or(0),
            })
        })
        .collect()
}

/// Counts an overdue dispatch as a retryable failure, if it is still that dispatch and still
/// overdue when its row is locked (a report or a heartbeat may have come meanwhile).
pub(crate) async fn expire(
    tx: &mut Transaction<'_, Postgres>,
    wp_id: &str,
    dispatch_id: &str,
    error: &str,
    policy: &RetryPolicy,
) -> Result<ReportOutcome, sqlx::Error> {
    let still = sqlx::query(
        "SELECT 1 FROM work_packages WHERE wp_id = $1 AND dispatch_id = $2 AND status COLLATE \"C\" = 'dispatched' AND deadline_at <= now()
         FOR UPDATE",
    )
    .bind(wp_id)
    .bind(dispatch_id)
    .fetch_optional(&mut **tx)
    .await?;
    if still.is_none() {
        return Ok(ReportOutcome::Stale(format!("dispatch {dispatch_id} was reported on or extended before its deadline passed")));
    }
    fail(tx, wp_id, Some(dispatch_id), error, true, policy).await
}

/// Moves the deadline of each running dispatch named by a heartbeat to now plus its timeout.
/// A heartbeat for an older attempt, or for a dispatch without a timeout, changes nothing.
pub(crate) async fn extend_deadlines(pool: &PgPool, wp_ids: &[String], dispatch_ids: &[String]) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "UPDATE work_packages w SET deadline_at = now() + make_interval(secs => w.timeout_ms / 1000.0)
         FROM unnest($1::text[], $2::text[]) AS h(wp_id, dispatch_id)
         WHERE w.wp_id = h.wp_id AND w.dispatch_id = h.dispatch_id AND w.status COLLATE \"C\" = 'dispatched' AND w.timeout_ms IS NOT NULL",
    )
    .bind(wp_ids)
    .bind(dispatch_ids)
    .execute(pool)
    .await?
    .rows_affected())
}

/// Operator retry of a `failed` or `cancelled` work package: it gets a fresh attempt budget
/// and waits to be dispatched again. Returns false when it was in no such state.
pub async fn retry(pool: &PgPool, wp_id: &str) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let ids = [wp_id.to_string()];
    lock_prerequisites_of(&mut tx, &ids).await?;
    let n = sqlx::query(concat!(
        "UPDATE work_packages w SET status = 'blocked', retry_base = attempts, next_attempt_at = NULL,
                failed_at = NULL, cancelled_at = NULL, wait_reason = 'retried by an operator', updated_at = now(),
                unmet_deps = ",
        unmet_count!(),
        "
         WHERE wp_id = $1 AND status IN ('failed', 'cancelled')"
    ))
    .bind(wp_id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok(n == 1)
}

/// Locks the prerequisites of work packages about to open again, before their unmet
/// prerequisites are counted in a later statement (`unmet_count!`): for the reason
/// `lock_prerequisites` gives. The DAG lock first, exclusively, so that a prerequisite an
/// ingest is storing right now is committed (and locked here) before the count: operators'
/// retries and reruns are rare enough to wait for the batches in flight.
pub(crate) async fn lock_prerequisites_of(tx: &mut Transaction<'_, Postgres>, wp_ids: &[String]) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(DAG_LOCK).execute(&mut **tx).await?;
    sqlx::query(
        "SELECT 1 FROM (SELECT DISTINCT d.depends_on FROM unnest($1::text[]) AS k(id)
                        CROSS JOIN LATERAL (SELECT d.depends_on FROM work_package_deps d WHERE d.wp_id = k.id OFFSET 0) d
                        ORDER BY d.depends_on) d
         CROSS JOIN LATERAL (SELECT 1 FROM work_packages x WHERE x.wp_id = d.depends_on FOR SHARE) p",
    )
    .bind(wp_ids)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Cancels a work package and, transitively, every work package that depends on it and has
/// not completed. Returns the ids cancelled (empty when the wp does not exist or is done).
/// See `cancel_many` for running work and plans.
pub async fn cancel(pool: &PgPool, wp_id: &str) -> Result<Vec<String>, sqlx::Error> {
    Ok(cancel_many(pool, Roots::One(wp_id)).await?.0.into_iter().map(|c| c.wp_id).collect())
}

/// Operator skip: the work package counts as completed without running (its result says so),
/// so its dependents and its lane go on. Any status but `completed` may be skipped; a report
/// that arrives later for a skipped dispatch is stale and ignored. Returns the work packages
/// that the skip may unblock, or None when there was nothing to skip.
pub async fn skip(pool: &PgPool, wp_id: &str) -> Result<Option<Vec<String>>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let n = sqlx::query(
        "UPDATE work_packages SET status = 'completed', completed_at = now(), updated_at = now(),
                result = 'skipped by an operator', wait_reason = 'skipped by an operator', next_attempt_at = NULL
         WHERE wp_id = $1 AND status <> 'completed'",
    )
    .bind(wp_id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if n == 0 {
        return Ok(None);
    }
    let ids = [wp_id.to_string()];
    let unblocked = ids_of(&unblocked_by(&mut tx, &ids).await?);
    tx.commit().await?;
    Ok(Some(unblocked))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(wp_id: &str, deps: &[&str]) -> WorkPackageSpec {
        WorkPackageSpec { wp_id: wp_id.into(), depends_on: deps.iter().map(|d| d.to_string()).collect(), ..WorkPackageSpec::default() }
    }

    #[test]
    fn a_retry_with_another_trace_context_is_the_same_work() {
        let old = serde_json::json!({"agent_id": "ada", "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"});
        let retry = serde_json::json!({"agent_id": "ada", "traceparent": "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01", "tracestate": "k=v"});
        assert_eq!(resubmission(&spec("a", &[]), &old, &retry), IngestOutcome::Duplicate);
        let other = serde_json::json!({"agent_id": "turing", "traceparent": "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01"});
        match resubmission(&spec("a", &[]), &old, &other) {
            IngestOutcome::Rejected(r) => assert!(r.detail.contains("differs in: agent_id)"), "{}", r.detail),
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn finds_cycles_among_the_batch_s_own_edges_only() {
        assert!(!batch_has_cycle(&[spec("a", &[]), spec("b", &["a"]), spec("c", &["b", "a"])]));
        assert!(!batch_has_cycle(&[spec("a", &["outside"]), spec("outside-2", &["a"])]));
        assert!(batch_has_cycle(&[spec("a", &["a"])]));
        assert!(batch_has_cycle(&[spec("a", &["c"]), spec("b", &["a"]), spec("c", &["b"])]));
    }
}
