//! `traces` (v1.6): route's shape three ways, twice each, on fresh replicas each time: entries
//! without a trace context, entries with one and replicas exporting spans over OTLP to a local
//! sink that accepts and drops them, and entries with one and no endpoint (tracing off). The
//! ratios to the first say what tracing costs when on, and whether it costs anything when off.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::report::Run;
use super::{BenchArgs, Stack};

/// One way of running route's shape.
pub(super) struct Variant {
    pub name: &'static str,
    /// Each entry carries a `traceparent` of a trace of its own.
    pub traced: bool,
    /// The replicas' extra environment.
    pub env: Vec<(String, String)>,
}

/// An OTLP/HTTP endpoint that answers 200 to every export and keeps only counts.
struct Sink {
    url: String,
    requests: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
}

impl Sink {
    async fn start() -> anyhow::Result<Sink> {
        let (requests, bytes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (r, b) = (requests.clone(), bytes.clone());
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                r.fetch_add(1, Ordering::Relaxed);
                b.fetch_add(body.len() as u64, Ordering::Relaxed);
                async { ([("content-type", "application/x-protobuf")], Vec::<u8>::new()) }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Sink { url, requests, bytes })
    }
}

/// A `traceparent` of a trace of its own for the `i`th entry: the ids need only be valid.
pub(super) fn traceparent(i: usize) -> String {
    let r: u64 = rand::random();
    format!("00-{r:016x}{i:016x}-{:016x}-01", (i as u64) | (1 << 63))
}

pub(super) async fn traces(args: &BenchArgs, stack: &Stack, client: &redis::Client) -> anyhow::Result<Vec<Run>> {
    let sink = Sink::start().await?;
    let on = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT".to_string(), sink.url.clone()),
        ("OTEL_SERVICE_NAME".to_string(), "ge-orchestrator-bench".to_string()),
    ];
    let variants = [
        Variant { name: "route-untraced", traced: false, env: Vec::new() },
        Variant { name: "route-traced", traced: true, env: on },
        Variant { name: "route-ctx-off", traced: true, env: Vec::new() },
    ];
    // A, B, C, then C, B, A: whatever drifts over the run (a warming cache, the machine's other
    // load) weighs on each variant alike.
    let order = [0, 1, 2, 2, 1, 0];
    let mut runs = Vec::new();
    let mut rate = [0.0; 3];
    for i in order {
        let run = super::route(args, stack, client, false, Some(&variants[i])).await?;
        rate[i] += run.wp_per_s / 2.0;
        runs.push(run);
    }
    let base = rate[0].max(1e-6);
    println!(
        "  traces: untraced {:.0} WP/s, on {:.0} ({:.2}×), off with a context {:.0} ({:.2}×) (means of two runs each); \
         the sink took {} requests, {:.1} MB",
        rate[0],
        rate[1],
        rate[1] / base,
        rate[2],
        rate[2] / base,
        sink.requests.load(Ordering::Relaxed),
        sink.bytes.load(Ordering::Relaxed) as f64 / 1e6
    );
    Ok(runs)
}
