//! The one backoff every loop uses after an error.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Exponential backoff for loop errors, reset by a success.
pub(crate) struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: Duration::from_millis(100) }
    }
}

impl Backoff {
    pub(crate) fn reset(&mut self) {
        self.next = Duration::from_millis(100);
    }
    /// Sleeps for the current delay (cut short by shutdown) and doubles it, up to 5 s.
    pub async fn wait(&mut self, token: &CancellationToken) {
        let d = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(5));
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = token.cancelled() => {}
        }
    }
}
