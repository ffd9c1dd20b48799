//! (v1.6) Live progress from the command: the agent gives it a file (`GE_PROGRESS_FILE`) and
//! forwards the last line written there on a heartbeat, soon after it changes and at most once
//! a second (and again every 5 s while it stays the same). A line is `TEXT`, `FRACTION TEXT` or `PERCENT% TEXT` (`0.4 compiling`,
//! `40% compiling`); the orchestrator keeps 200 bytes of the text.

use std::convert::Infallible;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::engine::streams::{self, MasterConnection};

/// How often the file is looked at, and the least time between two progress heartbeats.
const LOOK_EVERY: Duration = Duration::from_millis(250);
const SEND_EVERY: Duration = Duration::from_secs(1);
/// The last line is sent again this often while it stays the same: the orchestrator writes a
/// work package's progress at most once a second and drops what comes sooner, so a change that
/// came just under a second after the one before is written by the next send.
const RESEND_EVERY: Duration = Duration::from_secs(5);
/// Only the end of the file is read: its last line is what counts.
const TAIL_BYTES: u64 = 4096;

/// The progress file of one command run, removed when dropped.
pub(super) struct ProgressFile {
    pub path: PathBuf,
}

impl ProgressFile {
    pub fn new() -> std::io::Result<ProgressFile> {
        let path = std::env::temp_dir().join(format!("ge-progress-{}-{:016x}", std::process::id(), rand::random::<u64>()));
        std::fs::OpenOptions::new().write(true).create_new(true).open(&path)?;
        Ok(ProgressFile { path })
    }
}

impl Drop for ProgressFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The last non-empty line of the file's end, if any.
fn last_line(path: &Path) -> Option<String> {
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES))).ok()?;
    let mut buf = Vec::new();
    f.take(TAIL_BYTES).read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    text.lines().map(str::trim).rfind(|l| !l.is_empty()).map(str::to_string)
}

/// A line as (fraction, text): a leading `0.4` or `40%` is the fraction.
pub(super) fn parse(line: &str) -> (Option<String>, Option<String>) {
    let (head, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
    let fraction = match head.strip_suffix('%') {
        Some(p) => p.parse::<f64>().ok().map(|p| p / 100.0),
        None => head.parse::<f64>().ok(),
    }
    .filter(|f| (0.0..=1.0).contains(f));
    match fraction {
        Some(f) => (Some(format!("{f}")), Some(rest.trim().to_string()).filter(|t| !t.is_empty())),
        None => (None, Some(line.to_string())),
    }
}

/// Forwards each new last line of `path` as a heartbeat (`beat` plus `progress` and
/// `progress_fraction`), for as long as it is polled. Never ends: it is dropped with the
/// command.
pub(super) async fn forward(mut con: MasterConnection, stream: &str, beat: &[(&str, &str)], path: &Path) -> Infallible {
    let mut sent: Option<String> = None;
    let mut last = tokio::time::Instant::now() - SEND_EVERY;
    loop {
        tokio::time::sleep(LOOK_EVERY).await;
        let Some(line) = last_line(path) else { continue };
        let same = sent.as_deref() == Some(line.as_str());
        if last.elapsed() < if same { RESEND_EVERY } else { SEND_EVERY } {
            continue;
        }
        let (fraction, text) = parse(&line);
        let mut fields: Vec<(&str, String)> = beat.iter().map(|(k, v)| (*k, v.to_string())).collect();
        fields.extend(text.map(|t| ("progress", t)));
        fields.extend(fraction.map(|f| ("progress_fraction", f)));
        match streams::xadd(&mut con, stream, None, &fields).await {
            Ok(_) => {
                sent = Some(line);
                last = tokio::time::Instant::now();
            }
            Err(e) => tracing::warn!(error = %e, "cannot send progress"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_fraction_or_a_percentage_before_the_text() {
        assert_eq!(parse("0.4 compiling"), (Some("0.4".into()), Some("compiling".into())));
        assert_eq!(parse("40% compiling crate x"), (Some("0.4".into()), Some("compiling crate x".into())));
        assert_eq!(parse("1"), (Some("1".into()), None));
        assert_eq!(parse("3 files left"), (None, Some("3 files left".into())));
        assert_eq!(parse("compiling"), (None, Some("compiling".into())));
    }

    #[test]
    fn the_last_non_empty_line_of_the_file_counts() {
        let f = ProgressFile::new().unwrap();
        assert_eq!(last_line(&f.path), None);
        std::fs::write(&f.path, format!("{}\n0.2 first\n0.5 second\n\n", "x".repeat(10_000))).unwrap();
        assert_eq!(last_line(&f.path).as_deref(), Some("0.5 second"));
        let path = f.path.clone();
        drop(f);
        assert!(!path.exists());
    }
}
