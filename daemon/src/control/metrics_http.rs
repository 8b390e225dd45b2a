//! The optional Prometheus endpoint (`metrics_listen = "127.0.0.1:PORT"` in the config):
//! `GET /metrics` answers the mounts' statistics in the text exposition format, anything
//! else 404. One GET on one path does not need an HTTP library: requests are read up to
//! the end of their head (at most 8 KiB, within 5 s), at most 8 are served at once, and
//! every answer closes its connection.
//!
//! Anyone who can reach the address sees every mount point and plugin name: keep it on
//! loopback (or a scrape network) and, under systemd, allow the address family (the unit
//! restricts them to AF_UNIX; see README).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::host::Host;

const MAX_HEAD: usize = 8 << 10;
const READ_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CLIENTS: usize = 8;

/// Binds `address` and serves `/metrics` until `stop` turns true.
pub async fn serve(
    address: SocketAddr,
    host: Arc<Host>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(address).await?;
    let address = listener.local_addr()?;
    tracing::info!(%address, "serving Prometheus metrics at /metrics");
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                // Past the limit a client waits for a free slot; the listen queue bounds
                // the rest.
                let Ok(slot) = Arc::clone(&slots).acquire_owned().await else { continue };
                let host = Arc::clone(&host);
                tokio::spawn(async move {
                    let _ = answer(stream, host).await;
                    drop(slot);
                });
            }
        }
    }
}

async fn answer(mut stream: TcpStream, host: Arc<Host>) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let read = tokio::time::timeout(READ_TIMEOUT, async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if !matches!(read, Ok(Ok(()))) {
        return Ok(());
    }
    let wanted = head.starts_with(b"GET /metrics ") || head.starts_with(b"GET /metrics?");
    let (status, body) = if wanted {
        let stats = tokio::task::spawn_blocking(move || host.stats(None))
            .await
            .map_err(std::io::Error::other)?
            .unwrap_or_default();
        ("200 OK", fshost_protocol::prometheus_text(&stats))
    } else {
        (
            "404 Not Found",
            "only /metrics is served here\n".to_string(),
        )
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
