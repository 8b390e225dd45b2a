//! The control socket: accepts clients, reads one JSON request per line, answers one JSON
//! response per line. Each connection is its own task and each request runs on a blocking
//! thread, so a slow mount never holds up `list` on another connection.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fshost_protocol::{
    to_line, ErrorCode, Reply, Request, Response, DEFAULT_DRAIN_SECS, MAX_DRAIN_SECS,
    MAX_REQUEST_BYTES,
};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};

use crate::host::{Drain, Host, HostError};

/// Accepts connections until `stop` turns true.
pub async fn serve(listener: UnixListener, host: Arc<Host>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(serve_connection(stream, Arc::clone(&host)));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    // EMFILE and friends: back off instead of spinning.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            _ = stop.changed() => return,
        }
    }
}

async fn serve_connection(stream: UnixStream, host: Arc<Host>) {
    let (read, mut write) = stream.into_split();
    let mut lines = FramedRead::new(read, LinesCodec::new_with_max_length(MAX_REQUEST_BYTES));
    // Lines that arrived while a request was running; answered in order afterwards.
    let mut pending: VecDeque<String> = VecDeque::new();
    let mut peer_closed = false;
    loop {
        let line = match pending.pop_front() {
            Some(line) => line,
            None if peer_closed => return,
            None => {
                match lines.next().await {
                    Some(Ok(line)) => line,
                    Some(Err(LinesCodecError::MaxLineLengthExceeded)) => {
                        let response = Response::failure(
                        ErrorCode::BadRequest,
                        format!("request longer than {MAX_REQUEST_BYTES} bytes; closing the connection"),
                    );
                        let _ = write.write_all(to_line(&response).as_bytes()).await;
                        return;
                    }
                    Some(Err(LinesCodecError::Io(_))) | None => return,
                }
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        let response = match serde_json::from_str::<Request>(&line) {
            Err(e) => Response::failure(
                ErrorCode::BadRequest,
                format!(
                    "malformed request: {e} (expected one JSON object per line, see protocol/)"
                ),
            ),
            Ok(request) => {
                // Run the request while watching the connection: a client that goes away
                // cancels a waiting request (drain-unload) instead of leaving it to time out.
                let cancelled = Arc::new(AtomicBool::new(false));
                let task = tokio::task::spawn_blocking({
                    let host = Arc::clone(&host);
                    let cancelled = Arc::clone(&cancelled);
                    move || handle(&host, request, &cancelled)
                });
                tokio::pin!(task);
                let outcome = loop {
                    tokio::select! {
                        outcome = &mut task => break outcome,
                        next = lines.next(), if !peer_closed => match next {
                            Some(Ok(line)) => pending.push_back(line),
                            _ => {
                                peer_closed = true;
                                cancelled.store(true, Ordering::SeqCst);
                                host.wake_waiters();
                            }
                        },
                    }
                };
                match outcome {
                    Ok(Ok(reply)) => Response::success(reply),
                    Ok(Err(e)) => Response::failure(e.code(), e.to_string()),
                    Err(e) => Response::failure(
                        ErrorCode::Internal,
                        format!("request handler failed: {e}"),
                    ),
                }
            }
        };
        if write
            .write_all(to_line(&response).as_bytes())
            .await
            .is_err()
        {
            return;
        }
    }
}

fn handle(host: &Host, request: Request, cancelled: &AtomicBool) -> Result<Reply, HostError> {
    tracing::debug!(?request, "request");
    Ok(match request {
        Request::Load { path, name } => Reply::Loaded {
            plugin: host.load(&path, name.as_deref())?,
        },
        Request::Unload {
            name,
            drain,
            timeout_secs,
        } => {
            let drain = drain.then(|| Drain {
                timeout: Duration::from_secs(
                    timeout_secs
                        .unwrap_or(DEFAULT_DRAIN_SECS)
                        .min(MAX_DRAIN_SECS),
                ),
                cancelled,
            });
            let still_mapped = host.unload(&name, drain)?;
            Reply::Unloaded { name, still_mapped }
        }
        Request::Mount {
            plugin,
            mountpoint,
            options,
            read_only,
        } => Reply::Mounted {
            mount: host.mount(&plugin, &mountpoint, options, read_only)?,
        },
        Request::Unmount { mountpoint, lazy } => {
            let (path, detached) = host.unmount(&mountpoint, lazy)?;
            Reply::Unmounted {
                mountpoint: path.display().to_string(),
                detached,
            }
        }
        Request::List {} => Reply::Plugins {
            plugins: host.list(),
        },
        Request::Mounts {} => Reply::Mounts {
            mounts: host.mounts(),
        },
        Request::Info { name } => Reply::Info {
            plugin: host.info(&name)?,
        },
    })
}
