//! Traces (v1.6): a replica with an OTLP endpoint records `ingest`, `wait` and `dispatch` spans
//! of traced work and hands the agent the dispatch span's context; without one the trigger
//! carries the producer's `traceparent` unchanged. The spans are received by a real OTLP/HTTP
//! receiver started here, and decoded with the protobuf types of `opentelemetry-proto`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;

use crate::harness::{ROUTING, T, TestEnv, eventually, free_port};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PRODUCER_SPAN: &str = "00f067aa0ba902b7";

/// A span as received: name, trace id, span id, parent span id (hex), service name, attributes.
#[derive(Debug, Clone)]
struct Got {
    name: String,
    trace: String,
    span: String,
    parent: String,
    service: String,
    attrs: HashMap<String, String>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// An OTLP/HTTP receiver on a free port: every span of every `POST /v1/traces`.
async fn receiver() -> (u16, Arc<Mutex<Vec<Got>>>) {
    let got: Arc<Mutex<Vec<Got>>> = Arc::default();
    let sink = got.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf request");
                for rs in req.resource_spans {
                    let service = rs
                        .resource
                        .iter()
                        .flat_map(|r| r.attributes.iter())
                        .find(|a| a.key == "service.name")
                        .map(|a| format!("{:?}", a.value))
                        .unwrap_or_default();
                    for s in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                        let attrs = s.attributes.iter().map(|a| (a.key.clone(), format!("{:?}", a.value))).collect();
                        sink.lock().unwrap().push(Got {
                            name: s.name,
                            trace: hex(&s.trace_id),
                            span: hex(&s.span_id),
                            parent: hex(&s.parent_span_id),
                            service: service.clone(),
                            attrs,
                        });
                    }
                }
                ([("content-type", "application/x-protobuf")], Vec::<u8>::new())
            }
        }),
    );
    let port = free_port();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("bind the receiver");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (port, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trigger_continues_the_producer_s_trace_under_the_dispatch_span() {
    let env = TestEnv::start(ROUTING).await;
    let (port, got) = receiver().await;
    let endpoint = format!("http://127.0.0.1:{port}");
    let vars = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "100"), ("OTEL_SERVICE_NAME", "")];
    let (mut child, _) = env.serve_process("traced", &vars, None).await;
    let incoming = format!("00-{TRACE}-{PRODUCER_SPAN}-01");
    env.submit(&[("wp_id", "t1"), ("agent_id", "turing"), ("traceparent", &incoming), ("tracestate", "congo=t61rcWkgMzE")]).await;
    env.submit(&[("wp_id", "plain"), ("agent_id", "turing")]).await;

    let triggers = eventually(T, "both triggers", || async {
        let t = env.triggers("turing").await;
        (t.len() == 2).then_some(t)
    })
    .await;
    let traced = triggers.iter().find(|t| t["wp_id"] == "t1").expect("t1's trigger");
    let plain = triggers.iter().find(|t| t["wp_id"] == "plain").expect("plain's trigger");
    assert!(!plain.contains_key("traceparent"), "work without a trace context gets none: {plain:?}");
    let tp: Vec<&str> = traced["traceparent"].split('-').collect();
    assert_eq!((tp.len(), tp[0], tp[1], tp[3]), (4, "00", TRACE, "01"), "the producer's trace, sampled: {traced:?}");
    assert_ne!(tp[2], PRODUCER_SPAN, "a span of the orchestrator's own");
    assert_eq!(traced["tracestate"], "congo=t61rcWkgMzE", "tracestate kept");

    let spans = eventually(T, "ingest, wait and dispatch spans at the receiver", || async {
        let spans: Vec<Got> = got.lock().unwrap().clone();
        let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
        ["ingest", "wait", "dispatch"].iter().all(|n| names.contains(n)).then_some(spans)
    })
    .await;
    assert!(spans.iter().all(|s| s.trace == TRACE), "only the traced work has spans, all in its trace: {spans:#?}");
    for s in &spans {
        assert_eq!(s.parent, PRODUCER_SPAN, "{} is a child of the producer's span", s.name);
        assert!(s.service.contains("ge-orchestrator"), "the default service name: {}", s.service);
    }
    let dispatch = spans.iter().find(|s| s.name == "dispatch").expect("dispatch");
    assert_eq!(dispatch.span, tp[2], "the trigger carries the dispatch span's context");
    assert!(dispatch.attrs["ge.dispatch_id"].contains("t1:1"), "{:?}", dispatch.attrs);
    assert_eq!(spans.iter().filter(|s| s.name == "ingest").count(), 1, "one ingest span, for the traced entry only");
    child.kill().await.expect("kill the replica");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_endpoint_the_trigger_carries_the_incoming_trace_context_unchanged() {
    let env = TestEnv::start(ROUTING).await;
    let replica = env.replica("untraced");
    let incoming = format!("00-{TRACE}-{PRODUCER_SPAN}-01");
    env.submit(&[("wp_id", "t2"), ("agent_id", "turing"), ("traceparent", &incoming), ("tracestate", "k=v")]).await;
    let trigger = eventually(T, "the trigger", || async { env.triggers("turing").await.into_iter().next() }).await;
    assert_eq!(trigger["traceparent"], incoming);
    assert_eq!(trigger["tracestate"], "k=v");
    replica.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_with_a_new_span_id_is_the_same_work_package() {
    let env = TestEnv::start(ROUTING).await;
    let replica = env.replica("retries");
    let first = format!("00-{TRACE}-{PRODUCER_SPAN}-01");
    let retry = format!("00-{TRACE}-b7ad6b7169203331-01");
    env.submit(&[("wp_id", "r1"), ("agent_id", "turing"), ("traceparent", &first)]).await;
    env.submit(&[("wp_id", "r1"), ("agent_id", "turing"), ("traceparent", &retry), ("tracestate", "k=v")]).await;
    env.submit(&[("wp_id", "r1"), ("agent_id", "ada"), ("traceparent", &retry)]).await;
    let dls = eventually(T, "the conflicting entry dead-lettered", || async {
        let d = env.deadletters().await;
        (!d.is_empty()).then_some(d)
    })
    .await;
    assert_eq!(dls.len(), 1, "only the entry naming another agent conflicts: {dls:?}");
    assert_eq!(dls[0]["reason"], "conflict");
    assert!(dls[0]["detail"].contains("differs in: agent_id)"), "{}", dls[0]["detail"]);
    let trigger = eventually(T, "the trigger", || async { env.triggers("turing").await.into_iter().next() }).await;
    assert_eq!(trigger["traceparent"], first, "the first submission's context is the one kept");
    replica.stop().await;
}
