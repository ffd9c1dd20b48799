//! Usage (contract v1.6): the command says what it used in a file the agent names in
//! `GE_USAGE_FILE`, and the agent puts it on the report as `usage_*` fields. The file is JSON
//! (`{"input_tokens": 1200, "output_tokens": 300, "cost": "0.0125", "model": "m"}`) or lines of
//! `key=value`; keys may carry the `usage_` prefix. The orchestrator validates the values: a
//! malformed one is dead-lettered there as `invalid_usage` and the report still applies.

use std::io::Read as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

/// The variable that names the file.
pub(crate) const VAR: &str = "GE_USAGE_FILE";

/// The most of the file that is read: usage is four short values.
const MAX_BYTES: u64 = 16 << 10;
/// The longest value passed on; the orchestrator refuses longer ones anyway.
const MAX_VALUE: usize = 256;

const KEYS: [(&str, &str); 4] =
    [("input_tokens", "usage_input_tokens"), ("output_tokens", "usage_output_tokens"), ("cost", "usage_cost"), ("model", "usage_model")];

/// A file for one run of the command, created empty and only for this user; removed on drop.
pub(crate) struct UsageFile {
    path: PathBuf,
}

impl UsageFile {
    /// A new empty file in the temporary directory; None when none can be made (the command
    /// then runs without `GE_USAGE_FILE`).
    pub(crate) fn create() -> Option<UsageFile> {
        static N: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!("ge-usage-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        match opts.open(&path) {
            Ok(_) => Some(UsageFile { path }),
            Err(e) => {
                tracing::warn!(error = %e, path = %path.display(), "cannot create the usage file; the command runs without {VAR}");
                None
            }
        }
    }

    pub(crate) fn env(&self) -> (String, String) {
        (VAR.to_string(), self.path.to_string_lossy().into_owned())
    }

    /// The report's usage fields from what the command wrote (nothing when it wrote nothing).
    pub(crate) fn fields(&self) -> Vec<(&'static str, String)> {
        let mut text = String::new();
        let read = std::fs::File::open(&self.path).and_then(|f| f.take(MAX_BYTES).read_to_string(&mut text));
        if read.is_err() {
            return Vec::new();
        }
        parse(&text)
    }
}

impl Drop for UsageFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `usage_*` fields from JSON or `key=value` lines; unknown keys are ignored.
fn parse(text: &str) -> Vec<(&'static str, String)> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(text) {
        for (k, v) in map {
            let v = match v {
                serde_json::Value::String(s) => s,
                serde_json::Value::Null => continue,
                other => other.to_string(),
            };
            pairs.push((k, v));
        }
    } else {
        for line in text.lines() {
            if let Some((k, v)) = line.split_once('=') {
                pairs.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
    }
    let mut out = Vec::new();
    for (key, field) in KEYS {
        let found = pairs.iter().rev().find(|(k, _)| k == key || k == field);
        if let Some((_, v)) = found.filter(|(_, v)| !v.is_empty()) {
            let end = v.floor_char_boundary(MAX_VALUE.min(v.len()));
            out.push((field, v[..end].to_string()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_key_value_files_give_the_same_fields() {
        let json = parse(r#"{"input_tokens": 1200, "output_tokens": 300, "cost": "0.0125", "model": "m-1", "other": 1}"#);
        let kv = parse("usage_input_tokens=1200\noutput_tokens = 300\ncost=0.0125\nmodel=m-1\n# a comment\n");
        let want = vec![
            ("usage_input_tokens", "1200".to_string()),
            ("usage_output_tokens", "300".to_string()),
            ("usage_cost", "0.0125".to_string()),
            ("usage_model", "m-1".to_string()),
        ];
        assert_eq!(json, want);
        assert_eq!(kv, want);
        assert!(parse("").is_empty());
        assert!(parse("nonsense").is_empty());
    }

    #[test]
    fn the_file_is_read_and_removed() {
        let f = UsageFile::create().unwrap();
        let (var, path) = f.env();
        assert_eq!(var, VAR);
        std::fs::write(&path, "cost=0.5\n").unwrap();
        assert_eq!(f.fields(), vec![("usage_cost", "0.5".to_string())]);
        drop(f);
        assert!(!std::path::Path::new(&path).exists());
    }
}
