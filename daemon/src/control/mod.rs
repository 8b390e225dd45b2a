//! The control socket: accepts clients, reads one JSON request per line, answers one JSON
//! response per line. Each connection is its own task and each request runs on a blocking
//! thread, so a slow mount never holds up `list` on another connection.

use std::sync::Arc;

use fshost_protocol::{to_line, ErrorCode, Reply, Request, Response, MAX_REQUEST_BYTES};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};

use crate::host::{Host, HostError};

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
    while let Some(item) = lines.next().await {
        let (response, close) = match item {
            Ok(line) if line.trim().is_empty() => continue,
            Ok(line) => match serde_json::from_str::<Request>(&line) {
                Ok(request) => (dispatch(Arc::clone(&host), request).await, false),
                Err(e) => (
                    Response::failure(
                        ErrorCode::BadRequest,
                        format!("malformed request: {e} (expected one JSON object per line, see protocol/)"),
                    ),
                    false,
                ),
            },
            Err(LinesCodecError::MaxLineLengthExceeded) => (
                Response::failure(
                    ErrorCode::BadRequest,
                    format!("request longer than {MAX_REQUEST_BYTES} bytes; closing the connection"),
                ),
                true,
            ),
            Err(LinesCodecError::Io(_)) => return,
        };
        if write
            .write_all(to_line(&response).as_bytes())
            .await
            .is_err()
            || close
        {
            return;
        }
    }
}

/// Runs one request on a blocking thread and turns its outcome into a response.
async fn dispatch(host: Arc<Host>, request: Request) -> Response {
    match tokio::task::spawn_blocking(move || handle(&host, request)).await {
        Ok(Ok(reply)) => Response::success(reply),
        Ok(Err(e)) => Response::failure(e.code(), e.to_string()),
        Err(e) => Response::failure(ErrorCode::Internal, format!("request handler failed: {e}")),
    }
}

fn handle(host: &Host, request: Request) -> Result<Reply, HostError> {
    tracing::debug!(?request, "request");
    Ok(match request {
        Request::Load { path, name } => Reply::Loaded {
            plugin: host.load(&path, name.as_deref())?,
        },
        Request::Unload { name } => {
            let still_mapped = host.unload(&name)?;
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
