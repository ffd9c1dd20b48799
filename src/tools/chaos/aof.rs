//! What `appendfsync everysec` does not promise to keep. A kill -9 of Redis loses nothing it
//! acknowledged: each reply goes out after its write(2) to the AOF, and the kernel keeps the
//! page cache. A crash of the machine loses what was not yet fsynced, up to about a second.
//! To see what the orchestrator does then, `--lose-unsynced` truncates the AOF after each kill
//! to the size it had a second before, the worst a machine crash with `everysec` would leave.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// How far back a crash reaches with `everysec`.
const UNSYNCED: Duration = Duration::from_secs(1);

/// Sizes of the AOF file being appended to, sampled every 50 ms over the last seconds.
#[derive(Clone, Default)]
pub(crate) struct AofSizes(Arc<Mutex<VecDeque<(Instant, PathBuf, u64)>>>);

/// The newest incremental file of a Redis 7 multi-part AOF in `dir`, and its size.
fn current(dir: &Path) -> Option<(PathBuf, u64)> {
    let files = std::fs::read_dir(dir.join("appendonlydir")).ok()?;
    files
        .filter_map(Result::ok)
        .map(|f| f.path())
        .filter(|p| p.to_string_lossy().ends_with(".incr.aof"))
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .max()
        .and_then(|(_, p)| Some((p.clone(), p.metadata().ok()?.len())))
}

impl AofSizes {
    /// Samples the AOF under `dir` until `token` is cancelled.
    pub(crate) fn watch(&self, dir: PathBuf, token: CancellationToken) {
        let sizes = self.0.clone();
        tokio::spawn(async move {
            while !token.is_cancelled() {
                if let Some((path, len)) = current(&dir) {
                    let mut s = sizes.lock().unwrap_or_else(|p| p.into_inner());
                    s.push_back((Instant::now(), path, len));
                    while s.front().is_some_and(|(t, _, _)| t.elapsed() > UNSYNCED * 3) {
                        s.pop_front();
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    }

    /// With Redis killed: cuts the file being appended to back to its size `UNSYNCED` ago.
    /// Returns the bytes dropped (0 when the file was rewritten meanwhile).
    pub(crate) fn lose_unsynced(&self, dir: &Path) -> anyhow::Result<u64> {
        let Some((path, len)) = current(dir) else { return Ok(0) };
        let then = {
            let s = self.0.lock().unwrap_or_else(|p| p.into_inner());
            s.iter().rev().find(|(t, _, _)| t.elapsed() >= UNSYNCED).map(|(_, p, l)| (p.clone(), *l))
        };
        match then {
            Some((p, l)) if p == path && l < len => {
                std::fs::OpenOptions::new().write(true).open(&path)?.set_len(l)?;
                Ok(len - l)
            }
            _ => Ok(0),
        }
    }
}
