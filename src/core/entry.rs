//! Validation of entries read from `ge:work:incoming`: raw field bytes in, a work package
//! spec or a dead-letter reason out. Pure code, no I/O.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use regex::Regex;

use crate::core::limits::Limits;

/// Field/value pairs exactly as Redis returned them: bytes, since producers may send anything.
pub type RawFields = Vec<(Vec<u8>, Vec<u8>)>;

/// One stream entry. `fields` is `None` when the entry was deleted from the stream while it
/// was still pending (Redis returns its id with no body).
#[derive(Debug, Clone)]
pub struct StreamEntry {
    pub id: String,
    pub fields: Option<RawFields>,
}

impl StreamEntry {
    /// The value of field `name`, as text (bytes that are not UTF-8 replaced).
    pub(crate) fn field(&self, name: &str) -> Option<String> {
        self.fields.as_ref()?.iter().find(|(k, _)| k == name.as_bytes()).map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }
}

/// Why an entry cannot become a work package: a contract reason code and a sentence a person
/// can act on.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub reason: &'static str,
    pub detail: String,
}

impl Rejection {
    pub fn new(reason: &'static str, detail: impl Into<String>) -> Self {
        Rejection { reason, detail: detail.into() }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkPackageSpec {
    pub wp_id: String,
    pub agent_id: Option<String>,
    pub work_type: Option<String>,
    pub trigger: Option<String>,
    pub lane: Option<String>,
    pub depends_on: Vec<String>,
    /// Dispatch order among work that may run now (v1.4): higher first; 0 when not given.
    pub priority: i16,
    /// The plan the work package belongs to (v1.4): the `plan` field, else the wp_id up to its
    /// last dot, else none.
    pub plan: Option<String>,
    /// The round-robin group of fair share (v1.4): `fairness_key`, else the plan, else "".
    pub fairness_key: String,
    /// Unix milliseconds before which it may not run (v1.4).
    pub not_before_ms: Option<i64>,
    /// (v1.6) It waits for an approval or an event instead of going to an agent.
    pub wait: Option<crate::core::wait::WaitSpec>,
    /// Every field as received; passed through to the trigger.
    pub fields: BTreeMap<String, String>,
    pub source_id: String,
    /// The stream id's place in the incoming order, the lane order (`order_key`).
    pub source_ms: i64,
    pub source_seq: i64,
}

static WP_ID: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^[A-Za-z0-9._:-]{1,128}$").expect("static regex"));

pub(crate) fn is_valid_wp_id(s: &str) -> bool {
    WP_ID.is_match(s)
}

/// A stream id `ms-seq` as Redis has it: two unsigned 64-bit numbers. A producer may set any
/// id above the stream's last one by hand (`XADD s 18446744073709551615-0 ...`), and Redis then
/// gives every later entry that millisecond part; so the whole range must be read.
pub(crate) fn stream_id_parts(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// The place of a stream id in the incoming order, as `work_packages (source_ms, source_seq)`
/// store it (BIGINT) and every lane comparison reads it: each part as itself up to `i64::MAX`,
/// and `i64::MAX` beyond. Ordered like the ids wherever a part stays below 2^63, which every
/// id a clock gives does, and so is every entry after a hand-set id past it: they share its
/// millisecond part and count up their sequence. Only two hand-set ids that both pass 2^63 in
/// the same part, and differ there, may be ordered by the rest of the id instead.
///
/// Why not an exact map of both u64 parts into the i64 range (each part minus 2^63): it moves
/// every id below the point `(-1, -1)` the dispatch sweep starts from, so it needs that start
/// changed with it (see `dispatch::SWEEP_START`).
pub(crate) fn order_key(ms: u64, seq: u64) -> (i64, i64) {
    (i64::try_from(ms).unwrap_or(i64::MAX), i64::try_from(seq).unwrap_or(i64::MAX))
}

/// Parses a stream id into its place in the incoming order (`order_key`), as it is compared
/// with `source_ms, source_seq`. For the id's time, use `stream_id_parts`.
pub(crate) fn parse_stream_id(id: &str) -> Option<(i64, i64)> {
    let (ms, seq) = stream_id_parts(id)?;
    Some(order_key(ms, seq))
}

/// A printable, bounded rendering of untrusted text for error messages.
pub(crate) fn excerpt(s: &str) -> String {
    const MAX: usize = 64;
    if s.chars().count() <= MAX {
        format!("{s:?}")
    } else {
        let head: String = s.chars().take(MAX).collect();
        format!("{head:?}… ({} bytes)", s.len())
    }
}

/// The longest field name an entry may have.
pub(crate) const MAX_FIELD_NAME_BYTES: usize = 256;

/// Turns raw fields into UTF-8 text, rejecting non-UTF-8, duplicates and oversize values.
pub(crate) fn decode_fields(raw: &RawFields, limits: &Limits) -> Result<BTreeMap<String, String>, Rejection> {
    if raw.len() > limits.max_fields {
        return Err(Rejection::new("invalid", format!("entry has {} fields; at most {} are accepted", raw.len(), limits.max_fields)));
    }
    let mut fields = BTreeMap::new();
    for (i, (k, v)) in raw.iter().enumerate() {
        let key = std::str::from_utf8(k).map_err(|_| {
            Rejection::new("invalid", format!("field name #{} is not valid UTF-8; field names and values must be UTF-8 text", i + 1))
        })?;
        let value = std::str::from_utf8(v).map_err(|_| {
            Rejection::new("invalid", format!("field {} is not valid UTF-8; send text (base64-encode binary payloads)", excerpt(key)))
        })?;
        let cap = if key == "payload" { limits.max_payload_bytes } else { limits.max_field_bytes };
        if value.len() > cap {
            return Err(Rejection::new("invalid", format!("field {} is {} bytes; the limit is {cap} bytes", excerpt(key), value.len())));
        }
        if key.is_empty() || key.len() > MAX_FIELD_NAME_BYTES {
            return Err(Rejection::new("invalid", format!("field name {} must be 1 to {MAX_FIELD_NAME_BYTES} bytes", excerpt(key))));
        }
        if fields.insert(key.to_string(), value.to_string()).is_some() {
            return Err(Rejection::new("invalid", format!("field {} appears twice in the entry", excerpt(key))));
        }
    }
    Ok(fields)
}

/// The text of a report's `result` or `error` as it is stored: NUL bytes, which PostgreSQL
/// cannot store, become U+FFFD. A report is never refused for its text: refusing it would leave
/// its work package `dispatched` until its deadline.
pub(crate) fn report_text(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains('\0') { std::borrow::Cow::Owned(s.replace('\0', "\u{FFFD}")) } else { std::borrow::Cow::Borrowed(s) }
}

fn non_empty(fields: &BTreeMap<String, String>, key: &str) -> Option<String> {
    fields.get(key).filter(|v| !v.is_empty()).cloned()
}

/// The range of `priority` (v1.4).
pub(crate) const PRIORITY_RANGE: std::ops::RangeInclusive<i16> = -100..=100;

/// A name field (`lane`, `plan`, `fairness_key`): at most 128 bytes.
fn bounded_name(fields: &BTreeMap<String, String>, key: &str) -> Result<Option<String>, Rejection> {
    match non_empty(fields, key) {
        Some(v) if v.len() > 128 => Err(Rejection::new("invalid", format!("{key} {} is longer than 128 bytes", excerpt(&v)))),
        v => Ok(v),
    }
}

fn parse_priority(fields: &BTreeMap<String, String>) -> Result<i16, Rejection> {
    let Some(p) = non_empty(fields, "priority") else { return Ok(0) };
    match p.trim().parse::<i16>() {
        Ok(n) if PRIORITY_RANGE.contains(&n) => Ok(n),
        _ => Err(Rejection::new(
            "invalid",
            format!(
                "priority {} must be an integer from {} to {} (higher goes first; leave it out for 0)",
                excerpt(&p),
                PRIORITY_RANGE.start(),
                PRIORITY_RANGE.end()
            ),
        )),
    }
}

/// The furthest `not_before` may lie after the entry's stream id (v1.4: "at most a year"): a
/// delay or an RFC 3339 time alike, since either holds the work package, and its lane, as long.
const MAX_HOLD_MS: u64 = 366 * 86_400_000;

/// The last millisecond of the year 9999, the last an RFC 3339 time can name.
const LAST_RFC3339_MS: u64 = 253_402_300_799_999;

/// `not_before`: an RFC 3339 time, or a delay (`30s`, `5m`) counted from the entry's stream id,
/// so that a redelivery of the entry means the same time. Either is at most a year after the
/// stream id's time.
fn parse_not_before(fields: &BTreeMap<String, String>, id_ms: u64) -> Result<Option<i64>, Rejection> {
    let Some(v) = non_empty(fields, "not_before") else { return Ok(None) };
    let added = || {
        chrono::DateTime::from_timestamp_millis(id_ms as i64)
            .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
            .unwrap_or_else(|| format!("{id_ms} ms"))
    };
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(v.trim()) {
        let at = t.timestamp_millis();
        if at > 0 && at as u64 > id_ms.saturating_add(MAX_HOLD_MS) {
            return Err(Rejection::new(
                "invalid",
                format!(
                    "not_before {} is more than a year after the entry was added ({}); work may be held back at most a year \
                     (the same bound as a delay): send a nearer time, or send the entry later",
                    excerpt(&v),
                    added()
                ),
            ));
        }
        return Ok(Some(at));
    }
    match humantime::parse_duration(v.trim()) {
        Ok(_) if id_ms > LAST_RFC3339_MS => Err(Rejection::new(
            "invalid",
            format!(
                "not_before {} is a delay counted from the entry's stream id, whose time ({id_ms} ms) is past the year \
                 9999 (the id was set by hand); send not_before as an RFC 3339 time (2026-11-29T08:00:00Z)",
                excerpt(&v)
            ),
        )),
        Ok(d) if d.as_millis() <= u128::from(MAX_HOLD_MS) => Ok(Some((id_ms + d.as_millis() as u64) as i64)),
        _ => Err(Rejection::new(
            "invalid",
            format!(
                "not_before {} is neither an RFC 3339 time (2026-11-29T08:00:00Z) nor a delay of at most a year (30s, 5m, 2h)",
                excerpt(&v)
            ),
        )),
    }
}

/// Validates one `ge:work:incoming` entry. Routing is decided elsewhere; this only checks
/// that the entry is well-formed.
pub(crate) fn parse_incoming(entry: &StreamEntry, limits: &Limits) -> Result<WorkPackageSpec, Rejection> {
    let raw =
        entry.fields.as_ref().ok_or_else(|| Rejection::new("deleted", "the entry was deleted from the stream before it was processed"))?;
    let (id_ms, id_seq) = stream_id_parts(&entry.id)
        .ok_or_else(|| Rejection::new("invalid", format!("stream id {} is not of the form ms-seq", excerpt(&entry.id))))?;
    let (source_ms, source_seq) = order_key(id_ms, id_seq);
    let fields = decode_fields(raw, limits)?;
    // Every field is stored (in JSONB), and PostgreSQL stores no NUL character in text or
    // JSON. Refusing it here gives the producer a reason it can act on.
    if let Some((k, _)) = fields.iter().find(|(k, v)| k.contains('\0') || v.contains('\0')) {
        return Err(Rejection::new(
            "invalid",
            format!("field {} contains a NUL byte, which PostgreSQL cannot store; send text (base64-encode binary data)", excerpt(k)),
        ));
    }

    let wp_id = match fields.get("wp_id") {
        Some(id) if is_valid_wp_id(id) => id.clone(),
        Some(id) => {
            return Err(Rejection::new("invalid", format!("wp_id {} must match [A-Za-z0-9._:-]{{1,128}}", excerpt(id))));
        }
        // Derived from the entry id so that a redelivery of the same entry maps to the same
        // work package rather than a second one.
        None => format!("auto-{}", entry.id),
    };

    let lane = bounded_name(&fields, "lane")?;
    let priority = parse_priority(&fields)?;
    let not_before_ms = parse_not_before(&fields, id_ms)?;
    let wait = crate::core::wait::parse(&fields).map_err(|d| Rejection::new("invalid", d))?;
    let plan = bounded_name(&fields, "plan")?.or_else(|| wp_id.rsplit_once('.').map(|(p, _)| p.to_string()).filter(|p| !p.is_empty()));
    let fairness_key = bounded_name(&fields, "fairness_key")?.or_else(|| plan.clone()).unwrap_or_default();

    let mut depends_on: Vec<String> = Vec::new();
    if let Some(deps) = fields.get("depends_on") {
        let parts: Vec<&str> = deps.split(',').map(str::trim).filter(|d| !d.is_empty()).collect();
        if parts.len() > limits.max_depends_on {
            return Err(Rejection::new(
                "invalid",
                format!("depends_on lists {} work packages; at most {} are accepted", parts.len(), limits.max_depends_on),
            ));
        }
        for d in parts {
            if !is_valid_wp_id(d) {
                return Err(Rejection::new(
                    "invalid",
                    format!("depends_on entry {} is not a valid wp_id ([A-Za-z0-9._:-]{{1,128}})", excerpt(d)),
                ));
            }
            if d == wp_id {
                return Err(Rejection::new("cycle", format!("work package {wp_id} depends on itself")));
            }
            if !depends_on.iter().any(|x| x == d) {
                depends_on.push(d.to_string());
            }
        }
    }

    Ok(WorkPackageSpec {
        wp_id,
        agent_id: non_empty(&fields, "agent_id"),
        work_type: non_empty(&fields, "work_type"),
        trigger: non_empty(&fields, "trigger"),
        lane,
        depends_on,
        priority,
        plan,
        fairness_key,
        not_before_ms,
        wait,
        fields,
        source_id: entry.id.clone(),
        source_ms,
        source_seq,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(pairs: &[(&str, &str)]) -> StreamEntry {
        StreamEntry {
            id: "1700000000000-3".into(),
            fields: Some(pairs.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec())).collect()),
        }
    }

    #[test]
    fn assigns_a_stable_wp_id_when_missing() {
        let spec = parse_incoming(&entry(&[("work_type", "implement")]), &Limits::default()).unwrap();
        assert_eq!(spec.wp_id, "auto-1700000000000-3");
        assert_eq!((spec.source_ms, spec.source_seq), (1700000000000, 3));
    }

    #[test]
    fn parses_depends_on_trimming_and_deduplicating() {
        let spec = parse_incoming(&entry(&[("wp_id", "c"), ("depends_on", " a, b,,a ")]), &Limits::default()).unwrap();
        assert_eq!(spec.depends_on, vec!["a", "b"]);
    }

    #[test]
    fn refuses_a_nul_byte_in_any_field_name_or_value() {
        for pairs in [[("wp_id", "n1"), ("payload", "a\0b")], [("wp_id", "n1"), ("no\0te", "x")]] {
            let rej = parse_incoming(&entry(&pairs), &Limits::default()).unwrap_err();
            assert_eq!(rej.reason, "invalid");
            assert!(rej.detail.contains("NUL byte"), "{}", rej.detail);
        }
    }

    /// A report's text is kept with NUL bytes replaced, so the report still applies.
    #[test]
    fn report_text_loses_only_its_nul_bytes() {
        assert_eq!(report_text("ok\0done"), "ok\u{FFFD}done");
        assert_eq!(report_text("plain"), "plain");
    }

    #[test]
    fn rejects_bad_input_with_reasons() {
        let l = Limits::default();
        let bad_id = parse_incoming(&entry(&[("wp_id", "../x")]), &l).unwrap_err();
        assert_eq!(bad_id.reason, "invalid");
        assert!(bad_id.detail.contains("wp_id"), "{}", bad_id.detail);
        let own = parse_incoming(&entry(&[("wp_id", "a"), ("depends_on", "a")]), &l).unwrap_err();
        assert_eq!(own.reason, "cycle");
        let many = (0..1001).map(|i| format!("d{i}")).collect::<Vec<_>>().join(",");
        let too_many = parse_incoming(&entry(&[("wp_id", "a"), ("depends_on", &many)]), &l).unwrap_err();
        assert!(too_many.detail.contains("1001"), "{}", too_many.detail);
        let big = "x".repeat(l.max_payload_bytes + 1);
        assert_eq!(parse_incoming(&entry(&[("payload", &big)]), &l).unwrap_err().reason, "invalid");
        let binary = StreamEntry { id: "1-0".into(), fields: Some(vec![(b"payload".to_vec(), vec![0xff, 0xfe])]) };
        let e = parse_incoming(&binary, &l).unwrap_err();
        assert!(e.detail.contains("UTF-8"), "{}", e.detail);
        let dup = StreamEntry { id: "1-0".into(), fields: Some(vec![(b"a".to_vec(), b"1".to_vec()), (b"a".to_vec(), b"2".to_vec())]) };
        assert!(parse_incoming(&dup, &l).unwrap_err().detail.contains("twice"));
        let deleted = StreamEntry { id: "1-0".into(), fields: None };
        assert_eq!(parse_incoming(&deleted, &l).unwrap_err().reason, "deleted");
    }

    #[test]
    fn controls_have_defaults_and_refuse_bad_values_with_reasons() {
        let l = Limits::default();
        let plain = parse_incoming(&entry(&[("wp_id", "run1.step.a")]), &l).unwrap();
        assert_eq!(
            (plain.priority, plain.plan.as_deref(), plain.fairness_key.as_str(), plain.not_before_ms),
            (0, Some("run1.step"), "run1.step", None)
        );
        let bare = parse_incoming(&entry(&[("wp_id", "alone")]), &l).unwrap();
        assert_eq!((bare.plan, bare.fairness_key.as_str()), (None, ""));
        let given = parse_incoming(
            &entry(&[("wp_id", "x.y"), ("priority", "-7"), ("plan", "p"), ("fairness_key", "tenant-3"), ("not_before", "90s")]),
            &l,
        )
        .unwrap();
        assert_eq!((given.priority, given.plan.as_deref(), given.fairness_key.as_str()), (-7, Some("p"), "tenant-3"));
        assert_eq!(given.not_before_ms, Some(1700000000000 + 90_000));
        let at = parse_incoming(&entry(&[("not_before", "2024-05-29T08:00:00+01:00")]), &l).unwrap();
        assert_eq!(at.not_before_ms, Some(chrono::DateTime::parse_from_rfc3339("2024-05-29T07:00:00Z").unwrap().timestamp_millis()));
        for (k, v, says) in [("priority", "101", "-100 to 100"), ("priority", "high", "integer"), ("not_before", "tomorrow", "RFC 3339")] {
            let rej = parse_incoming(&entry(&[(k, v)]), &l).unwrap_err();
            assert!(rej.reason == "invalid" && rej.detail.contains(k) && rej.detail.contains(says), "{}", rej.detail);
        }
        let long = "p".repeat(129);
        assert!(parse_incoming(&entry(&[("plan", &long)]), &l).unwrap_err().detail.contains("plan"));
    }

    /// Stream ids are two unsigned 64-bit numbers. A producer may set the largest by hand, and
    /// Redis then gives every later entry its millisecond part: each must still be taken, after
    /// every entry before it in the incoming order.
    #[test]
    fn takes_every_stream_id_redis_can_give_in_order() {
        let l = Limits::default();
        let at = |id: &str| {
            let e = StreamEntry { id: id.into(), fields: Some(vec![(b"lane".to_vec(), b"L".to_vec())]) };
            let spec = parse_incoming(&e, &l).unwrap_or_else(|r| panic!("{id}: {}", r.detail));
            (spec.source_ms, spec.source_seq)
        };
        let ids = [
            "1700000000000-3",
            "1700000000000-18446744073709551615",
            "9223372036854775806-5",
            "18446744073709551615-0",
            "18446744073709551615-1",
            "18446744073709551615-2",
        ];
        for w in ids.windows(2) {
            assert!(at(w[0]) < at(w[1]), "{} before {}", w[0], w[1]);
        }
        let no_id = StreamEntry { id: "18446744073709551615-7".into(), fields: Some(vec![]) };
        assert_eq!(parse_incoming(&no_id, &l).unwrap().wp_id, "auto-18446744073709551615-7");
        for bad in ["18446744073709551616-0", "1-18446744073709551616", "-1-0", "1"] {
            let e = StreamEntry { id: bad.into(), fields: Some(vec![]) };
            assert_eq!(parse_incoming(&e, &l).unwrap_err().reason, "invalid", "{bad}");
        }
    }

    /// `not_before` holds a work package, and its lane, until then: an RFC 3339 time is held to
    /// the bound of a delay, a year after the entry's stream id.
    #[test]
    fn not_before_is_at_most_a_year_after_the_stream_id() {
        let l = Limits::default();
        // The stream id of `entry` is 2023-11-14T22:13:20Z.
        for near in ["2024-11-13T00:00:00Z", "2020-01-01T00:00:00Z", "366days"] {
            assert!(parse_incoming(&entry(&[("not_before", near)]), &l).is_ok(), "{near}");
        }
        for far in ["9999-12-31T23:59:59Z", "2024-11-15T00:00:00Z", "367days"] {
            let rej = parse_incoming(&entry(&[("not_before", far)]), &l).unwrap_err();
            assert!(rej.reason == "invalid" && rej.detail.contains("year"), "{far}: {}", rej.detail);
        }
        // A delay counts from the stream id; past the year 9999 no time can be named.
        let late = StreamEntry { id: "18446744073709551615-0".into(), fields: Some(vec![(b"not_before".to_vec(), b"30s".to_vec())]) };
        let rej = parse_incoming(&late, &l).unwrap_err();
        assert!(rej.detail.contains("RFC 3339"), "{}", rej.detail);
    }

    #[test]
    fn excerpt_bounds_hostile_strings() {
        let long = "y".repeat(10_000);
        assert!(excerpt(&long).len() < 100);
    }
}
