//! Work packages that wait for a person or an outside event instead of an agent (v1.6): the
//! incoming fields that ask for it, validated, and the bounds on what an approval, an event or
//! an agent's progress may carry. Pure code, no I/O.

use std::collections::BTreeMap;
use std::time::Duration;

/// What a work package waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitFor {
    /// An operator's approve or reject.
    Approval,
    /// An event with its key (`ge:work:events` or `POST /api/events/{key}`).
    Event,
}

impl WaitFor {
    pub fn as_str(&self) -> &'static str {
        match self {
            WaitFor::Approval => "approval",
            WaitFor::Event => "event",
        }
    }
}

/// What a timeout does to a waiting work package.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnTimeout {
    /// It fails (not retryable), like a rejection.
    Fail,
    /// It completes, with the result `{"timeout": true, ...}`.
    Complete,
}

impl OnTimeout {
    pub fn as_str(&self) -> &'static str {
        match self {
            OnTimeout::Fail => "fail",
            OnTimeout::Complete => "complete",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct WaitSpec {
    pub wait_for: WaitFor,
    /// The event's key (events only).
    pub key: Option<String>,
    /// How long it may wait once it is waiting; None: for ever.
    pub timeout_ms: Option<i64>,
    pub on_timeout: OnTimeout,
}

impl WaitSpec {
    /// How `status` and the API say what it waits for.
    pub fn reason(&self) -> String {
        reason(self.wait_for.as_str(), self.key.as_deref())
    }
}

/// The wait reason of a waiting work package.
pub fn reason(wait_for: &str, key: Option<&str>) -> String {
    match key {
        Some(k) if wait_for == "event" => format!("waiting for event {k}"),
        _ => format!("waiting for {wait_for}"),
    }
}

/// The longest key of an event, and of `wait_key`, in characters.
pub const MAX_KEY_CHARS: usize = 256;
/// The longest wait: a year, like `not_before`.
pub const MAX_WAIT_MS: u128 = 366 * 86_400_000;
/// The longest comment of an approval or rejection, and of who gave it.
pub const MAX_COMMENT_CHARS: usize = 4000;
pub const MAX_WHO_CHARS: usize = 128;
/// The longest progress text an agent may report, and the least time between two writes of a
/// work package's progress.
pub const MAX_PROGRESS_BYTES: usize = 200;
pub const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// A printable, bounded rendering of untrusted text for messages (as `entry::excerpt`).
fn excerpt(s: &str) -> String {
    let head: String = s.chars().take(64).collect();
    if head.len() == s.len() { format!("{s:?}") } else { format!("{head:?}… ({} bytes)", s.len()) }
}

/// A key an event may carry: 1 to 256 characters, none of them a control character.
pub fn valid_key(key: &str) -> bool {
    !key.is_empty() && key.chars().count() <= MAX_KEY_CHARS && !key.chars().any(char::is_control)
}

/// The wait an incoming entry asks for (`wait_for`, `wait_key`, `wait_timeout`, `on_timeout`),
/// or none. Any of the last three without `wait_for`, an unknown value, an event without a
/// key or a timeout that is not a duration of at most a year is refused with a sentence saying
/// what to send instead (dead-lettered as `invalid`).
pub fn parse(fields: &BTreeMap<String, String>) -> Result<Option<WaitSpec>, String> {
    let get = |k: &str| fields.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    let bad = |detail: String| Err(detail);
    let Some(kind) = get("wait_for") else {
        if let Some(k) = ["wait_key", "wait_timeout", "on_timeout"].into_iter().find(|k| get(k).is_some()) {
            return bad(format!("{k} is given without wait_for; add wait_for: approval or wait_for: event, or leave {k} out"));
        }
        return Ok(None);
    };
    let wait_for = match kind {
        "approval" => WaitFor::Approval,
        "event" => WaitFor::Event,
        other => return bad(format!("wait_for {} is neither approval nor event", excerpt(other))),
    };
    let key = match (wait_for, get("wait_key")) {
        (WaitFor::Event, None) => return bad("wait_for: event needs a wait_key, the key of the event it waits for".into()),
        (WaitFor::Approval, Some(_)) => return bad("wait_key is for wait_for: event; an approval is given by wp_id".into()),
        (_, Some(k)) if !valid_key(k) => {
            return bad(format!("wait_key {} must be 1 to {MAX_KEY_CHARS} characters of printable text", excerpt(k)));
        }
        (_, k) => k.map(str::to_string),
    };
    let timeout_ms = match get("wait_timeout") {
        None => None,
        Some(t) => match humantime::parse_duration(t) {
            Ok(d) if !d.is_zero() && d.as_millis() <= MAX_WAIT_MS => Some(d.as_millis() as i64),
            _ => return bad(format!("wait_timeout {} is not a duration of at most a year (30m, 2h, 7days)", excerpt(t))),
        },
    };
    let on_timeout = match get("on_timeout") {
        None | Some("fail") => OnTimeout::Fail,
        Some("complete" | "approve") => OnTimeout::Complete,
        Some(other) => return bad(format!("on_timeout {} is neither fail nor complete", excerpt(other))),
    };
    if get("on_timeout").is_some() && timeout_ms.is_none() {
        return bad("on_timeout is given without wait_timeout; say how long it may wait (wait_timeout: 2h)".into());
    }
    Ok(Some(WaitSpec { wait_for, key, timeout_ms, on_timeout }))
}

/// A progress report as an agent sends it on a heartbeat: text cut to `MAX_PROGRESS_BYTES` (at
/// a character boundary, control characters dropped) and a fraction in 0..=1. A fraction that
/// is not a number in that range is left out rather than refusing the heartbeat, which also
/// keeps the dispatch alive.
pub fn progress(text: Option<&str>, fraction: Option<&str>) -> (Option<String>, Option<f32>) {
    let text = text.map(|t| {
        let clean: String = t.chars().filter(|c| !c.is_control()).collect();
        let mut end = clean.len().min(MAX_PROGRESS_BYTES);
        while !clean.is_char_boundary(end) {
            end -= 1;
        }
        clean[..end].trim().to_string()
    });
    let fraction = fraction.and_then(|f| f.trim().parse::<f32>().ok()).filter(|f| (0.0..=1.0).contains(f));
    (text.filter(|t| !t.is_empty()), fraction)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn reads_approvals_and_events_with_their_timeouts() {
        assert_eq!(parse(&fields(&[("agent_id", "x")])).unwrap(), None);
        let a = parse(&fields(&[("wait_for", "approval")])).unwrap().unwrap();
        assert_eq!((a.wait_for, a.key, a.timeout_ms, a.on_timeout), (WaitFor::Approval, None, None, OnTimeout::Fail));
        let e = parse(&fields(&[("wait_for", "event"), ("wait_key", "ci:42"), ("wait_timeout", "2h"), ("on_timeout", "complete")]))
            .unwrap()
            .unwrap();
        assert_eq!((e.key.as_deref(), e.timeout_ms, e.on_timeout), (Some("ci:42"), Some(7_200_000), OnTimeout::Complete));
        assert_eq!(e.reason(), "waiting for event ci:42");
    }

    #[test]
    fn refuses_what_cannot_be_waited_for_with_a_sentence() {
        for (pairs, says) in [
            (&[("wait_for", "person")][..], "neither approval nor event"),
            (&[("wait_for", "event")][..], "needs a wait_key"),
            (&[("wait_for", "approval"), ("wait_key", "k")][..], "is for wait_for: event"),
            (&[("wait_key", "k")][..], "without wait_for"),
            (&[("wait_for", "approval"), ("wait_timeout", "soon")][..], "not a duration"),
            (&[("wait_for", "approval"), ("wait_timeout", "400days")][..], "at most a year"),
            (&[("wait_for", "approval"), ("on_timeout", "explode"), ("wait_timeout", "1h")][..], "neither fail nor complete"),
            (&[("wait_for", "approval"), ("on_timeout", "fail")][..], "without wait_timeout"),
            (&[("wait_for", "event"), ("wait_key", "a\u{7}b")][..], "printable"),
        ] {
            let detail = parse(&fields(pairs)).unwrap_err();
            assert!(detail.contains(says), "{pairs:?}: {detail}");
        }
    }

    #[test]
    fn progress_is_bounded_and_a_bad_fraction_is_dropped() {
        let long = "é".repeat(300);
        let (t, f) = progress(Some(&long), Some("0.5"));
        assert!(t.as_ref().unwrap().len() <= MAX_PROGRESS_BYTES, "{}", t.unwrap().len());
        assert_eq!(f, Some(0.5));
        assert_eq!(progress(Some("a\nb\u{1b}[31m"), Some("1.5")), (Some("ab[31m".into()), None));
        assert_eq!(progress(Some("   "), Some("NaN")), (None, None));
    }
}
