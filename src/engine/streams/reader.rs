//! The one way this crate reads a consumer group: the replica's input loops, the reference
//! agent and the fake agents of chaos and bench all read through a [`Reader`]. Its caller's
//! loop is: take a batch, act on it, acknowledge it, back off on error.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{RedisError, RedisResult};
use tokio_util::sync::CancellationToken;

use crate::core::entry::StreamEntry;
use crate::engine::backoff::Backoff;

/// What a reader ran into while getting the next batch, for its owner to log and count. The
/// reader has already dealt with each (reconnect, recreate the group) when it says so.
pub(crate) enum Trouble<'a> {
    /// No connection to Redis could be made.
    Connect(&'a RedisError),
    /// The group is gone (Redis restarted without persistence, or a FLUSHALL); the reader
    /// recreates it right after saying so.
    GroupMissing(&'a RedisError),
    /// How recreating the group went.
    GroupRecreated(Result<(), &'a RedisError>),
    /// Any other failed read; the connection is dropped and made again.
    Read(&'a RedisError),
}

/// Reads one stream as one consumer of a group. It first reads this consumer's own pending
/// entries (cursor `0`: a restart under the same name), then new ones (cursor `>`). Its
/// connection is made lazily, to the master its endpoint names at that moment (so a
/// reconnection follows a failover), has no response timeout (see [`super::blocking`]), and it
/// stops only between reads: a read in flight is never dropped, or the entries it delivered
/// would sit in the pending list with nobody reading them.
pub(crate) struct Reader {
    endpoint: super::Endpoint,
    stream: String,
    group: String,
    consumer: String,
    count: usize,
    block: Duration,
    cursor: &'static str,
    own_first_after_reconnect: bool,
    conn: Option<MultiplexedConnection>,
    on_trouble: Box<dyn Fn(Trouble<'_>) + Send + Sync>,
    /// The delay after an error, shared with the owner's own retries (acting, acknowledging)
    /// so that one outage slows the whole loop down; the owner resets it after a batch is done.
    pub(crate) backoff: Backoff,
}

impl Reader {
    /// `count` entries at most per read; a read of new entries waits up to `block` for some.
    pub(crate) fn new(endpoint: super::Endpoint, stream: &str, group: &str, consumer: &str, count: usize, block: Duration) -> Reader {
        Reader {
            endpoint,
            stream: stream.to_string(),
            group: group.to_string(),
            consumer: consumer.to_string(),
            count,
            block,
            cursor: "0",
            own_first_after_reconnect: false,
            conn: None,
            on_trouble: Box::new(|_| {}),
            backoff: Backoff::default(),
        }
    }

    /// Skips this consumer's own pending entries: for a consumer name that is new each run.
    pub(crate) fn new_entries_only(mut self) -> Reader {
        self.cursor = ">";
        self
    }

    /// After a failed read, reads this consumer's own pending entries again before new ones:
    /// the read may have been delivered (and its entries made pending) with the reply lost.
    pub(crate) fn own_first_after_reconnect(mut self) -> Reader {
        self.own_first_after_reconnect = true;
        self
    }

    /// Called with each [`Trouble`]; by default nothing is said.
    pub(crate) fn on_trouble(mut self, f: impl Fn(Trouble<'_>) + Send + Sync + 'static) -> Reader {
        self.on_trouble = Box::new(f);
        self
    }

    async fn connect(&self) -> RedisResult<MultiplexedConnection> {
        super::blocking(&self.endpoint.client().await?).await
    }

    /// Like [`Reader::next`], but gives up when `abandon` is cancelled, even a read in flight:
    /// its connection is dropped, so that Redis forgets the blocked read instead of delivering
    /// entries to a consumer that is handing its work over; the next read starts with this
    /// consumer's own pending entries. None at shutdown (`token`) or when abandoned.
    pub(crate) async fn next_unless(&mut self, token: &CancellationToken, abandon: &CancellationToken) -> Option<Vec<StreamEntry>> {
        let read = {
            let next = self.next(token);
            tokio::select! {
                biased;
                _ = abandon.cancelled() => None,
                entries = next => Some(entries),
            }
        };
        match read {
            Some(entries) => entries,
            None => {
                self.abandon();
                None
            }
        }
    }

    /// Drops the connection (and with it a read in flight), and starts the next read with this
    /// consumer's own pending entries: for a batch given up, which is still pending with this
    /// consumer unless another replica has taken it over meanwhile.
    pub(crate) fn abandon(&mut self) {
        self.conn = None;
        self.cursor = "0";
    }

    /// The next non-empty batch, or None once `token` is cancelled. Errors are reported to
    /// the trouble hook and waited out with the backoff.
    pub(crate) async fn next(&mut self, token: &CancellationToken) -> Option<Vec<StreamEntry>> {
        while !token.is_cancelled() {
            let con = match self.conn.as_mut() {
                Some(c) => c,
                None => match self.connect().await {
                    Ok(c) => self.conn.insert(c),
                    Err(e) => {
                        (self.on_trouble)(Trouble::Connect(&e));
                        self.backoff.wait(token).await;
                        continue;
                    }
                },
            };
            let block = (self.cursor == ">").then_some(self.block);
            let read: RedisResult<Vec<StreamEntry>> =
                super::read_group(con, &self.stream, &self.group, &self.consumer, self.count, block, self.cursor).await;
            match read {
                Ok(entries) if entries.is_empty() => self.cursor = ">",
                Ok(entries) => return Some(entries),
                Err(e) if super::is_nogroup(&e) => {
                    (self.on_trouble)(Trouble::GroupMissing(&e));
                    let made = super::ensure_group(con, &self.stream, &self.group).await;
                    (self.on_trouble)(Trouble::GroupRecreated(made.as_ref().map(|_| ())));
                    self.backoff.wait(token).await;
                }
                Err(e) => {
                    (self.on_trouble)(Trouble::Read(&e));
                    self.conn = None;
                    if self.own_first_after_reconnect {
                        self.cursor = "0";
                    }
                    self.backoff.wait(token).await;
                }
            }
        }
        None
    }
}
