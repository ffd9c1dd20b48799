//! `traces` (v1.6): route's shape three times in one run, on fresh replicas each time: entries
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
    let mut runs = Vec::new();
    for v in &variants {
        runs.push(super::route(args, stack, client, false, Some(v)).await?);
    }
    let base = runs[0].wp_per_s.max(1e-6);
    println!(
        "  traces: on {:.2}× of untraced, off with a context {:.2}×; the sink took {} requests, {:.1} MB",
        runs[1].wp_per_s / base,
        runs[2].wp_per_s / base,
        sink.requests.load(Ordering::Relaxed),
        sink.bytes.load(Ordering::Relaxed) as f64 / 1e6
    );
    Ok(runs)
}
