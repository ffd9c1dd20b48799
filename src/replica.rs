//! One replica: connects, applies migrations, joins the group, and wires the loops together.
//! This is the only place that knows which loops exist.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::core::routing_file;
use crate::engine::backoff::Backoff;
use crate::engine::consume;
use crate::engine::context::{Ctx, SharedRouting, Stats};
use crate::engine::input::Input;
use crate::engine::settings::RunSettings;
use crate::{
    core::redact, engine::config_watch, engine::health, engine::postgres_probe, engine::recover, engine::retention, engine::scheduler,
    engine::store, engine::streams, engine::takeover, ops::http, ops::reads,
};

/// Connects to PostgreSQL and Redis, retrying until they answer or shutdown is asked.
async fn connect(
    settings: &RunSettings,
    token: &CancellationToken,
) -> anyhow::Result<Option<(sqlx::PgPool, streams::Endpoint, streams::MasterConnection)>> {
    let endpoint = streams::Endpoint::parse(&settings.conn.redis_url)?.confirming(settings.redis_confirm());
    let mut backoff = Backoff::default();
    let pool = loop {
        match store::connect_with(&settings.conn.database_url, settings.db_pool, Some(settings.statement_timeout)).await {
            Ok(p) => break p,
            Err(e) => tracing::warn!(error = format!("{e:#}"), "PostgreSQL not ready; retrying"),
        }
        backoff.wait(token).await;
        if token.is_cancelled() {
            return Ok(None);
        }
    };
    backoff.reset();
    let manager = loop {
        match streams::MasterConnection::connect(&endpoint).await {
            Ok(m) => break m,
            Err(e) => tracing::warn!(error = %e, url = %redact::url(&settings.conn.redis_url), "Redis not ready; retrying"),
        }
        backoff.wait(token).await;
        if token.is_cancelled() {
            return Ok(None);
        }
    };
    Ok(Some((pool, endpoint, manager)))
}

/// Runs until `token` is cancelled, then drains: each loop finishes and acknowledges the batch
/// in hand, a `stopping` health entry is written, and the consumer leaves the group if it
/// holds nothing pending.
pub async fn run(settings: RunSettings, token: CancellationToken) -> anyhow::Result<()> {
    settings.validate()?;
    let routing = routing_file::load(&settings.config)?;
    let consumer = settings.consumer_name();
    let traces = crate::engine::traces::Traces::from_env()?;
    let Some((pool, endpoint, mut manager)) = connect(&settings, &token).await? else { return Ok(()) };
    let ops_pool = reads::pool(&settings.conn.database_url, settings.db_ops_pool, settings.statement_timeout)?;
    for input in Input::ALL {
        let stream = input.stream_in(&settings.names);
        streams::ensure_group(&mut manager, stream, &settings.names.group).await.context("creating the consumer group")?;
    }
    tracing::info!(consumer = %consumer, config_version = %routing.config_version, "replica started");
    let listener = match settings.http_addr.as_str() {
        "off" | "" => None,
        addr => Some(tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding the HTTP port {addr}"))?),
    };
    let ctx = Arc::new(Ctx {
        settings,
        consumer,
        pool,
        ops_pool,
        endpoint,
        redis: manager,
        routing: SharedRouting::new(routing),
        stats: Stats::default(),
        group_joined: AtomicBool::new(true),
        gate_held: Default::default(),
        sweep_from: std::sync::Mutex::new(crate::engine::dispatch::SWEEP_START),
        rerouted_for: std::sync::Mutex::new(None),
        metrics: crate::engine::metrics::Metrics::new(),
        duty: Default::default(),
        plan_budgets: Default::default(),
        traces,
    });

    // A replica that starts while Redis fails over waits for the new master instead of
    // exiting: the lease is asked for again, with the one backoff, until Redis answers.
    let mut backoff = crate::engine::backoff::Backoff::default();
    while let Err(e) = takeover::acquire(&ctx).await {
        if token.is_cancelled() {
            return Err(e).context("taking the replica's lease");
        }
        tracing::warn!(error = %e, "cannot take the replica's lease yet; retrying");
        backoff.wait(&token).await;
    }
    // The lease outlives the other loops: while they finish the batches in hand at shutdown,
    // no survivor should take this replica over.
    let lease_token = CancellationToken::new();
    let lease = tokio::spawn(takeover::refresh_lease(ctx.clone(), lease_token.clone()));
    let tracker = TaskTracker::new();
    for input in Input::ALL {
        tracker.spawn(consume::run(ctx.clone(), input, token.clone()));
    }
    tracker.spawn(postgres_probe::run(ctx.clone(), token.clone()));
    tracker.spawn(health::run(ctx.clone(), token.clone()));
    tracker.spawn(recover::run(ctx.clone(), token.clone()));
    tracker.spawn(config_watch::run(ctx.clone(), token.clone()));
    tracker.spawn(crate::engine::wake::run(ctx.clone(), token.clone()));
    tracker.spawn(scheduler::run(ctx.clone(), token.clone()));
    tracker.spawn(takeover::run(ctx.clone(), token.clone()));
    tracker.spawn(retention::run(ctx.clone(), token.clone()));
    tracker.spawn(crate::engine::schedules::run(ctx.clone(), token.clone()));
    if let Some(l) = listener {
        tracker.spawn(http::serve(l, ctx.clone(), token.clone()));
    }
    tracker.close();

    token.cancelled().await;
    tracker.wait().await;
    lease_token.cancel();
    if let Err(e) = lease.await {
        tracing::warn!(error = %e, "the lease task failed");
    }

    if let Err(e) = health::report(&ctx, "stopping").await {
        tracing::warn!(error = %e, "cannot write the stopping health entry");
    }
    match health::own_pending(&ctx).await {
        Ok(0) => {
            for e in takeover::remove_consumer(&ctx, &ctx.consumer).await {
                tracing::warn!(error = %e, "cannot leave the consumer group");
            }
            takeover::release(&ctx).await;
        }
        Ok(n) => tracing::warn!(pending = n, "stopping with entries still pending; another replica will take them over"),
        Err(e) => tracing::warn!(error = %e, "cannot count pending entries at shutdown"),
    }
    tracing::info!(consumer = %ctx.consumer, "replica stopped");
    ctx.pool.close().await;
    ctx.ops_pool.close().await;
    let ctx2 = ctx.clone();
    if let Err(e) = tokio::task::spawn_blocking(move || ctx2.traces.shutdown()).await {
        tracing::warn!(error = %e, "exporting the last spans failed");
    }
    Ok(())
}
