//! OpenTelemetry spans of the work that carries a W3C trace context (v1.6): `ingest` of an
//! entry, `wait` from when its work package could run to its claim, and `dispatch` from the
//! claim to the trigger in Redis, whose `traceparent` becomes the dispatch span's, so that the
//! agent's work continues the producer's trace.
//!
//! All three are children of the entry's own `traceparent` (the producer's span): ingest and
//! dispatch may happen on different replicas, and the entry's fields, stored with the work
//! package, are the one context both have. The wait span is recorded after the fact, from the
//! times PostgreSQL holds. Entries without a valid `traceparent` get no spans and start no
//! trace: the producer decides what is traced.
//!
//! Off (no OTLP endpoint in the environment, or `OTEL_SDK_DISABLED=true`), there is no
//! exporter and no span object: each entry point tests one `Option` and returns, and the
//! incoming `traceparent` reaches the trigger unchanged.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{Span as _, SpanBuilder, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider, Span};

use crate::core::entry::StreamEntry;
use crate::engine::streams::DeadLetter;

/// The service name when neither `OTEL_SERVICE_NAME` nor `OTEL_RESOURCE_ATTRIBUTES` gives one.
const SERVICE: &str = "ge-orchestrator";

/// The replica's tracer, or nothing.
#[derive(Default)]
pub struct Traces {
    on: Option<On>,
}

struct On {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
}

/// Whether the standard variables ask for traces to be exported: an OTLP endpoint is set, and
/// neither `OTEL_SDK_DISABLED=true` nor `OTEL_TRACES_EXPORTER=none` says otherwise.
pub fn wanted(var: impl Fn(&str) -> Option<String>) -> bool {
    let set = |name: &str| var(name).is_some_and(|v| !v.trim().is_empty());
    let disabled = var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    let none = var("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim().eq_ignore_ascii_case("none"));
    (set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") || set("OTEL_EXPORTER_OTLP_ENDPOINT")) && !disabled && !none
}

impl Traces {
    /// No tracing at all.
    pub fn off() -> Self {
        Traces { on: None }
    }

    /// From the environment, as the OpenTelemetry crates read it: the endpoint
    /// (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else `OTEL_EXPORTER_OTLP_ENDPOINT` + `/v1/traces`),
    /// `OTEL_EXPORTER_OTLP_[TRACES_]HEADERS`, `_TIMEOUT`, `OTEL_SERVICE_NAME`,
    /// `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`, `OTEL_BSP_*`. OTLP over HTTP with
    /// protobuf, plain `http://` only. The batch processor exports from a thread of its own.
    pub fn from_env() -> anyhow::Result<Self> {
        if !wanted(|k| std::env::var(k).ok()) {
            return Ok(Self::off());
        }
        for var in ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"] {
            if std::env::var(var).is_ok_and(|v| v.trim().to_ascii_lowercase().starts_with("https:")) {
                anyhow::bail!("{var} is an https:// endpoint; this build exports OTLP over plain http:// only (a local collector)");
            }
        }
        use opentelemetry_otlp::{Protocol, WithExportConfig};
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .build()
            .context("setting up the OTLP exporter from OTEL_EXPORTER_OTLP_*")?;
        let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.is_empty())
            || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name"));
        let resource = opentelemetry_sdk::Resource::builder();
        let resource = if named { resource } else { resource.with_service_name(SERVICE) };
        let provider = SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource.build()).build();
        let tracer = provider.tracer("ge-orchestrator");
        Ok(Traces { on: Some(On { provider, tracer, propagator: TraceContextPropagator::new() }) })
    }

    pub fn is_on(&self) -> bool {
        self.on.is_some()
    }

    /// Exports what is left. Blocks up to the exporter's timeout: call it off the runtime's
    /// worker threads (`spawn_blocking`) or at the very end.
    pub fn shutdown(&self) {
        if let Some(on) = &self.on
            && let Err(e) = on.provider.shutdown()
        {
            tracing::warn!(error = %e, "exporting the last spans failed");
        }
    }

    /// The `ingest` spans of a batch read from `stream`, one per entry that carries a valid
    /// trace context, started now. Nothing (no allocation) when off.
    pub(crate) fn ingest(&self, stream: &str, entries: &[StreamEntry]) -> Ingest {
        let Some(on) = &self.on else { return Ingest(Vec::new()) };
        let now = SystemTime::now();
        let spans = entries
            .iter()
            .filter_map(|e| {
                let parent = on.parent(|k| e.field(k))?;
                let mut attrs = vec![
                    KeyValue::new("messaging.system", "redis"),
                    KeyValue::new("messaging.destination.name", stream.to_string()),
                    KeyValue::new("messaging.message.id", e.id.clone()),
                ];
                if let Some(wp) = e.field("wp_id") {
                    attrs.push(KeyValue::new("ge.wp_id", wp));
                }
                let b = SpanBuilder::from_name("ingest").with_kind(SpanKind::Consumer).with_start_time(now).with_attributes(attrs);
                Some((e.id.clone(), on.tracer.build_with_context(b, &parent)))
            })
            .collect();
        Ingest(spans)
    }

    /// The `dispatch` span of a trigger about to be published, when its fields carry a valid
    /// trace context: started at `claimed_at` (the claim's time in PostgreSQL), or now for a
    /// republication; the trigger's `traceparent` becomes the span's (its `tracestate` is kept).
    pub(crate) fn dispatch(
        &self,
        fields: &mut [(String, String)],
        claimed_at: Option<SystemTime>,
        attrs: [(&'static str, &str); 3],
    ) -> Option<Dispatch> {
        let on = self.on.as_ref()?;
        let get = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let parent = on.parent(get)?;
        let attrs = attrs.into_iter().map(|(k, v)| KeyValue::new(k, v.to_string())).collect::<Vec<_>>();
        let start = claimed_at.unwrap_or_else(SystemTime::now);
        let b = SpanBuilder::from_name("dispatch")
            .with_kind(SpanKind::Producer)
            .with_start_time(start)
            .with_attributes(attrs.clone())
            .with_attributes_extend(claimed_at.is_none().then(|| KeyValue::new("ge.republished", true)));
        let span = on.tracer.build_with_context(b, &parent);
        let mut carrier = HashMap::new();
        on.propagator.inject_context(&Context::new().with_remote_span_context(span.span_context().clone()), &mut carrier);
        if let (Some(tp), Some(slot)) = (carrier.remove("traceparent"), fields.iter_mut().find(|(n, _)| n == "traceparent")) {
            slot.1 = tp;
        }
        Some(Dispatch { span, parent, start, attrs })
    }
}

impl On {
    /// The entry's context when it has a valid `traceparent` (and its `tracestate`).
    fn parent(&self, get: impl Fn(&str) -> Option<String>) -> Option<Context> {
        let mut carrier = HashMap::with_capacity(2);
        carrier.insert("traceparent".to_string(), get("traceparent")?);
        if let Some(ts) = get("tracestate") {
            carrier.insert("tracestate".to_string(), ts);
        }
        let cx = self.propagator.extract(&carrier);
        cx.span().span_context().is_valid().then_some(cx)
    }
}

/// `SpanBuilder::with_attributes` replaces; this adds.
trait Extend {
    fn with_attributes_extend(self, more: Option<KeyValue>) -> Self;
}

impl Extend for SpanBuilder {
    fn with_attributes_extend(mut self, more: Option<KeyValue>) -> Self {
        if let Some(kv) = more {
            self.attributes.get_or_insert_with(Vec::new).push(kv);
        }
        self
    }
}

/// The ingest spans of one batch, by entry id.
pub(crate) struct Ingest(Vec<(String, Span)>);

impl Ingest {
    /// Ends them: the batch is stored (or refused); a dead-lettered entry's span says why.
    pub(crate) fn end(self, deadletters: &[DeadLetter]) {
        if self.0.is_empty() {
            return;
        }
        let refused: HashMap<&str, &DeadLetter> = deadletters.iter().map(|d| (d.source_id.as_str(), d)).collect();
        for (id, mut span) in self.0 {
            if let Some(d) = refused.get(id.as_str()) {
                span.set_attribute(KeyValue::new("ge.deadletter.reason", d.reason.clone()));
                span.set_status(Status::error(d.detail.clone()));
            }
            span.end();
        }
    }
}

/// A dispatch span in flight, with what its `wait` sibling needs.
pub(crate) struct Dispatch {
    span: Span,
    parent: Context,
    start: SystemTime,
    attrs: Vec<KeyValue>,
}

impl Dispatch {
    /// Records the `wait` span: from `since` (Unix seconds in PostgreSQL's clock: when the work
    /// package could first run) to the claim.
    pub(crate) fn waited(&self, tracer: &Traces, since: f64) {
        let Some(on) = &tracer.on else { return };
        let Some(from) = Duration::try_from_secs_f64(since).ok().map(|d| UNIX_EPOCH + d) else { return };
        let b = SpanBuilder::from_name("wait")
            .with_kind(SpanKind::Internal)
            .with_start_time(from.min(self.start))
            .with_attributes(self.attrs.clone());
        on.tracer.build_with_context(b, &self.parent).end_with_timestamp(self.start);
    }

    /// Ends the span once Redis holds the trigger, or with the error it refused it with.
    pub(crate) fn end(mut self, refused: Option<&str>) {
        if let Some(e) = refused {
            self.span.set_status(Status::error(e.to_string()));
        }
        // The start came from PostgreSQL's clock; never end before it.
        self.span.end_with_timestamp(SystemTime::now().max(self.start));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wanted_only_with_an_endpoint_and_not_disabled() {
        let env =
            |pairs: &'static [(&'static str, &'static str)]| move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string());
        assert!(!wanted(env(&[])));
        assert!(!wanted(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")])));
        assert!(wanted(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")])));
        assert!(wanted(env(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:4318/v1/traces")])));
        assert!(!wanted(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"), ("OTEL_SDK_DISABLED", "TRUE")])));
        assert!(!wanted(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"), ("OTEL_TRACES_EXPORTER", "none")])));
    }

    #[test]
    fn off_touches_nothing() {
        let t = Traces::off();
        let mut fields = vec![("traceparent".to_string(), "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_string())];
        assert!(t.dispatch(&mut fields, None, [("a", ""), ("b", ""), ("c", "")]).is_none());
        assert_eq!(fields[0].1, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        assert!(t.ingest("s", &[]).0.is_empty());
    }
}
