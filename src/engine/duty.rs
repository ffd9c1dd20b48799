//! On duty or standing down. A replica that reaches Redis but not PostgreSQL can read entries
//! but can neither store what it read nor apply what agents report; entries it holds are kept
//! from every other replica until the link heals or the recovery sweep claims them (60 s by
//! default), while its lease tells the others it is alive. So it hands its work over as a
//! dead replica would: it gives up a read in flight and the batch in hand (which stay
//! pending), reads nothing new, lets its lease go once no loop is reading, so that a
//! survivor's takeover claims its pending entries at once, and says why in `/readyz`. It comes
//! back on duty when PostgreSQL answers again.
//!
//! This file owns the state; `postgres_probe` decides it, the loops that read ask it whether
//! to read, the lease loop whether to keep the lease.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Whether this replica does its work, and why not.
pub struct Duty {
    /// None on duty; the reason while standing down.
    state: watch::Sender<Option<String>>,
    /// Cancelled when this period on duty ends.
    period: Mutex<CancellationToken>,
    /// Loops reading or handling entries at this moment.
    busy: AtomicUsize,
}

impl Default for Duty {
    fn default() -> Self {
        Duty { state: watch::channel(None).0, period: Mutex::new(CancellationToken::new()), busy: AtomicUsize::new(0) }
    }
}

/// Held by a loop while it reads or handles entries; see [`Duty::busy`].
pub(crate) struct Busy<'a>(&'a AtomicUsize);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Duty {
    /// The reason this replica stands down, or None while it is on duty.
    pub fn standing_down(&self) -> Option<String> {
        self.state.borrow().clone()
    }

    /// Waits until the replica is on duty, and returns a token cancelled when it stands down;
    /// None once `token` (shutdown) is cancelled.
    pub(crate) async fn on_duty(&self, token: &CancellationToken) -> Option<CancellationToken> {
        let mut state = self.state.subscribe();
        loop {
            if token.is_cancelled() {
                return None;
            }
            if state.borrow_and_update().is_none() {
                return Some(self.period.lock().unwrap_or_else(|p| p.into_inner()).clone());
            }
            tokio::select! {
                _ = state.changed() => {}
                _ = token.cancelled() => return None,
            }
        }
    }

    /// Counts a loop as reading or handling entries until the guard is dropped.
    pub(crate) fn busy(&self) -> Busy<'_> {
        self.busy.fetch_add(1, Ordering::SeqCst);
        Busy(&self.busy)
    }

    /// True while standing down with no loop reading or handling entries: nothing more can
    /// come into this consumer's pending list, and its lease may go.
    pub(crate) fn idle(&self) -> bool {
        self.standing_down().is_some() && self.busy.load(Ordering::SeqCst) == 0
    }

    /// Runs `work` (a sweep that claims entries into this consumer) counted as busy, unless
    /// the replica stands down: then None, without starting it or by dropping it at once.
    pub(crate) async fn while_on_duty<F: std::future::Future>(&self, work: F) -> Option<F::Output> {
        let period = self.period.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let _busy = self.busy();
        if self.standing_down().is_some() {
            return None;
        }
        tokio::select! {
            biased;
            _ = period.cancelled() => None,
            out = work => Some(out),
        }
    }

    pub(crate) fn stand_down(&self, reason: String) {
        self.state.send_replace(Some(reason));
        self.period.lock().unwrap_or_else(|p| p.into_inner()).cancel();
    }

    pub(crate) fn resume(&self) {
        *self.period.lock().unwrap_or_else(|p| p.into_inner()) = CancellationToken::new();
        self.state.send_replace(None);
    }
}
