//! A TCP proxy that can be switched to another backend: the stand-in, on one machine, for the
//! endpoint that moves to a promoted PostgreSQL standby (a Kubernetes Service of CloudNativePG,
//! HAProxy in front of Patroni, a managed service's DNS name).

use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Listens on a free port of 127.0.0.1 and forwards every connection to the backend port of
/// the moment. A switch cuts the connections to the old backend, as a Service does whose
/// endpoint was removed: clients see their connection fail and reconnect.
pub struct TcpProxy {
    port: u16,
    backend: watch::Sender<u16>,
    stop: CancellationToken,
}

impl TcpProxy {
    pub async fn start(backend: u16) -> anyhow::Result<TcpProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await.context("binding the proxy's port")?;
        let port = listener.local_addr()?.port();
        let (tx, rx) = watch::channel(backend);
        let stop = CancellationToken::new();
        tokio::spawn(accept(listener, rx, stop.clone()));
        Ok(TcpProxy { port, backend: tx, stop })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn backend(&self) -> u16 {
        *self.backend.borrow()
    }

    /// New connections go to `backend`; those open to the old one are closed.
    pub fn switch(&self, backend: u16) {
        self.backend.send_replace(backend);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn accept(listener: TcpListener, backend: watch::Receiver<u16>, stop: CancellationToken) {
    loop {
        let client = tokio::select! {
            c = listener.accept() => c,
            _ = stop.cancelled() => return,
        };
        match client {
            Ok((client, _)) => {
                tokio::spawn(forward(client, backend.clone(), stop.clone()));
            }
            // Out of file descriptors and the like: wait rather than spin.
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn forward(mut client: TcpStream, mut backend: watch::Receiver<u16>, stop: CancellationToken) {
    let port = *backend.borrow_and_update();
    // A backend that is down refuses at once; the client sees its connection closed.
    let Ok(mut server) = TcpStream::connect(("127.0.0.1", port)).await else { return };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = backend.changed() => {}
        _ = stop.cancelled() => {}
    }
}
