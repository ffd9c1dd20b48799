//! A TCP proxy that can be switched to another backend: the stand-in, on one machine, for the
//! endpoint that moves to a promoted PostgreSQL standby (a Kubernetes Service of CloudNativePG,
//! HAProxy in front of Patroni, a managed service's DNS name). It also makes the link faults
//! of the chaos harness and the partition tests: a link cut (open connections reset, new ones
//! refused), a slow link, and connections reset in the middle of a reply.

use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What the link does at the moment. Every change closes the connections open under the
/// previous state, except a change of delay.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Link {
    backend: u16,
    /// Open connections are reset and the port refuses new ones.
    cut: bool,
    /// Added to every chunk, each way.
    delay: Duration,
    /// Bumped by [`TcpProxy::reset_mid_reply`]: each connection open then forwards half of the
    /// next chunk the backend sends and is reset.
    resets: u64,
}

/// Listens on a free port of 127.0.0.1 and forwards every connection to the backend port of
/// the moment. A switch cuts the connections to the old backend, as a Service does whose
/// endpoint was removed: clients see their connection fail and reconnect.
pub struct TcpProxy {
    port: u16,
    link: watch::Sender<Link>,
    stop: CancellationToken,
}

impl TcpProxy {
    pub async fn start(backend: u16) -> anyhow::Result<TcpProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await.context("binding the proxy's port")?;
        let port = listener.local_addr()?.port();
        let (tx, rx) = watch::channel(Link { backend, cut: false, delay: Duration::ZERO, resets: 0 });
        let stop = CancellationToken::new();
        tokio::spawn(accept(listener, port, rx, stop.clone()));
        Ok(TcpProxy { port, link: tx, stop })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn backend(&self) -> u16 {
        self.link.borrow().backend
    }

    /// New connections go to `backend`; those open to the old one are closed.
    pub fn switch(&self, backend: u16) {
        self.link.send_modify(|l| l.backend = backend);
    }

    /// Cuts the link: open connections are reset, and new ones refused (the port is closed)
    /// until [`TcpProxy::heal`].
    pub fn cut(&self) {
        self.link.send_modify(|l| l.cut = true);
    }

    /// Ends a cut and a delay.
    pub fn heal(&self) {
        self.link.send_modify(|l| {
            l.cut = false;
            l.delay = Duration::ZERO;
        });
    }

    /// Delays every chunk by `delay` each way (zero for none); connections stay open.
    pub fn slow(&self, delay: Duration) {
        self.link.send_modify(|l| l.delay = delay);
    }

    /// Resets each open connection in the middle of the next reply its backend sends.
    pub fn reset_mid_reply(&self) {
        self.link.send_modify(|l| l.resets += 1);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Accepts while the link is up. During a cut the listener is closed, so that connecting is
/// refused as by a host whose port is closed, and bound again to the same port at the heal.
async fn accept(listener: TcpListener, port: u16, mut link: watch::Receiver<Link>, stop: CancellationToken) {
    let mut listener = Some(listener);
    loop {
        let cut = link.borrow_and_update().cut;
        if cut {
            listener = None;
        } else if listener.is_none() {
            match TcpListener::bind(("127.0.0.1", port)).await {
                Ok(l) => listener = Some(l),
                Err(_) => {
                    // The port is still in TIME_WAIT or taken for a moment: try again.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            }
        }
        let Some(l) = listener.as_ref() else {
            tokio::select! {
                _ = link.changed() => continue,
                _ = stop.cancelled() => return,
            }
        };
        let client = tokio::select! {
            c = l.accept() => c,
            _ = link.changed() => continue,
            _ = stop.cancelled() => return,
        };
        match client {
            Ok((client, _)) => {
                tokio::spawn(forward(client, link.clone(), stop.clone()));
            }
            // Out of file descriptors and the like: wait rather than spin.
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn forward(client: TcpStream, mut link: watch::Receiver<Link>, stop: CancellationToken) {
    let start = *link.borrow_and_update();
    // A backend that is down refuses at once; the client sees its connection closed.
    let Ok(server) = TcpStream::connect(("127.0.0.1", start.backend)).await else { return };
    for s in [&client, &server] {
        let _ = s.set_nodelay(true);
        // A close is a reset, as when a link or a middlebox drops the connection.
        let _ = s.set_zero_linger();
    }
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let ended = CancellationToken::new();
    let up = pump(client_read, server_write, link.clone(), None, ended.clone());
    let down = pump(server_read, client_write, link.clone(), Some(start.resets), ended.clone());
    let closed = async {
        loop {
            if link.changed().await.is_err() {
                return;
            }
            let now = *link.borrow_and_update();
            if now.cut || now.backend != start.backend {
                return;
            }
        }
    };
    tokio::select! {
        _ = async { tokio::join!(up, down) } => {}
        _ = closed => {}
        _ = ended.cancelled() => {}
        _ = stop.cancelled() => {}
    }
    // Dropping both halves closes both sockets, with a reset (linger zero).
}

/// Copies one direction, each chunk delayed by the link's delay of the moment. With
/// `resets_seen` (the backend-to-client direction), a reset asked after the connection opened
/// forwards half of the next chunk and then resets the connection.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    link: watch::Receiver<Link>,
    resets_seen: Option<u64>,
    ended: CancellationToken,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(tokio::time::Instant, Vec<u8>, bool)>(64);
    let reading = async move {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let now = *link.borrow();
            let reset = resets_seen.is_some_and(|seen| now.resets > seen);
            let chunk = if reset { buf[..n.div_ceil(2)].to_vec() } else { buf[..n].to_vec() };
            if tx.send((tokio::time::Instant::now() + now.delay, chunk, reset)).await.is_err() || reset {
                return;
            }
        }
    };
    let writing = async {
        while let Some((at, chunk, reset)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() || reset {
                return;
            }
        }
        // The sender closed its side: pass the close on, and keep the other direction open.
        let _ = to.shutdown().await;
    };
    tokio::join!(reading, writing);
    if resets_seen.is_some() {
        // The backend closed, or the connection was reset: nothing more comes either way.
        ended.cancel();
    }
}
