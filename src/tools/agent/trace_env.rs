//! The trigger's W3C trace context for the command (v1.6): `TRACEPARENT` and `TRACESTATE`, the
//! variables OpenTelemetry's SDKs and instrumented tools read, so that what the command does
//! continues the orchestrator's `dispatch` span. They are set only when the trigger carries a
//! `traceparent`; its `GE_TRACEPARENT` is there as for any field.

use std::collections::BTreeMap;

/// The variables, from the trigger's fields; none when it has no `traceparent`.
pub(crate) fn vars(fields: &BTreeMap<String, String>) -> Vec<(String, String)> {
    let Some(tp) = fields.get("traceparent").filter(|v| !v.is_empty() && !v.contains('\0')) else { return Vec::new() };
    let mut out = vec![("TRACEPARENT".to_string(), tp.clone())];
    if let Some(ts) = fields.get("tracestate").filter(|v| !v.is_empty() && !v.contains('\0') && v.len() <= 4096) {
        out.push(("TRACESTATE".to_string(), ts.clone()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_with_a_traceparent() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let f = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>();
        assert!(vars(&f(&[("tracestate", "k=v")])).is_empty());
        assert_eq!(vars(&f(&[("traceparent", tp)])), vec![("TRACEPARENT".into(), tp.into())]);
        assert_eq!(
            vars(&f(&[("traceparent", tp), ("tracestate", "k=v")])),
            vec![("TRACEPARENT".into(), tp.into()), ("TRACESTATE".into(), "k=v".into())]
        );
    }
}
