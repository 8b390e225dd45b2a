//! The control socket: accepts clients, reads one JSON request per line, answers one JSON
//! response per line. Each connection is its own task and each request runs on a blocking
//! thread, so a slow mount never holds up `list` on another connection. Every request is
//! authorized from the connection's peer credentials before it runs.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fshost_protocol::{
    decode_request, to_line, ErrorCode, Reply, Request, Response, DEFAULT_DRAIN_SECS,
    MAX_DRAIN_SECS, MAX_REQUEST_BYTES,
};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};

use crate::access::Policy;
use crate::host::{Caller, Drain, Host, HostError};

/// Accepts connections until `stop` turns true.
pub async fn serve(
    listener: UnixListener,
    host: Arc<Host>,
    policy: Arc<Mutex<Policy>>,
    mut stop: watch::Receiver<bool>,
) {
    let max_connections = policy
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .limits
        .max_connections;
    let slots = Arc::new(Semaphore::new(max_connections));
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((mut stream, _)) => {
                    let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                        let response = Response::failure(
                            ErrorCode::Busy,
                            format!("fshostd already serves {max_connections} connections (limits.max_connections); try again later"),
                        );
                        tokio::spawn(async move {
                            let _ = stream.write_all(to_line(&response).as_bytes()).await;
                        });
                        continue;
                    };
                    let (host, policy) = (Arc::clone(&host), Arc::clone(&policy));
                    tokio::spawn(async move {
                        serve_connection(stream, host, policy).await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    // EMFILE and friends: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stop.changed() => return,
        }
    }
}

/// Slows a connection down to `per_second` requests (a fixed one-second window).
struct RateLimit {
    per_second: u32,
    window: Instant,
    used: u32,
}

impl RateLimit {
    async fn wait(&mut self) {
        if self.window.elapsed() >= Duration::from_secs(1) {
            self.window = Instant::now();
            self.used = 0;
        }
        if self.used >= self.per_second {
            tokio::time::sleep_until((self.window + Duration::from_secs(1)).into()).await;
            self.window = Instant::now();
            self.used = 0;
        }
        self.used += 1;
    }
}

async fn serve_connection(stream: UnixStream, host: Arc<Host>, policy: Arc<Mutex<Policy>>) {
    let Ok(cred) = stream.peer_cred() else {
        return; // no credentials, no service
    };
    let (caller, per_second) = {
        let policy = policy.lock().unwrap_or_else(|e| e.into_inner());
        (
            policy.caller(cred.uid(), cred.gid(), cred.pid()),
            policy.limits.requests_per_second,
        )
    };
    let mut rate = RateLimit {
        per_second,
        window: Instant::now(),
        used: 0,
    };
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
                    Some(Err(LinesCodecError::Io(e)))
                        if e.kind() == std::io::ErrorKind::InvalidData =>
                    {
                        let response = Response::failure(
                            ErrorCode::BadRequest,
                            "request is not valid UTF-8; closing the connection",
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
        rate.wait().await;
        let response = match decode_request(&line) {
            Err(message) => Response::failure(ErrorCode::BadRequest, message),
            Ok(request) => {
                let allowed = policy
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .authorize(&caller, &request);
                match allowed {
                    Err(why) => {
                        tracing::info!(uid = caller.uid, ?request, %why, "request refused");
                        Response::failure(
                            ErrorCode::PermissionDenied,
                            format!("permission denied: {why}"),
                        )
                    }
                    Ok(()) => {
                        let mutating = !matches!(
                            request,
                            Request::List {}
                                | Request::Mounts {}
                                | Request::Info { .. }
                                | Request::Status {}
                        );
                        let response = run_request(
                            &host,
                            request,
                            caller,
                            &mut lines,
                            &mut pending,
                            &mut peer_closed,
                        )
                        .await;
                        if mutating {
                            crate::notify_status(&host);
                        }
                        response
                    }
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

/// Runs a request on a blocking thread while watching the connection: a client that goes
/// away cancels a waiting request (drain-unload) instead of leaving it to time out. Lines
/// that arrive meanwhile are kept for later.
async fn run_request(
    host: &Arc<Host>,
    request: Request,
    caller: Caller,
    lines: &mut FramedRead<tokio::net::unix::OwnedReadHalf, LinesCodec>,
    pending: &mut VecDeque<String>,
    peer_closed: &mut bool,
) -> Response {
    let cancelled = Arc::new(AtomicBool::new(false));
    let task = tokio::task::spawn_blocking({
        let host = Arc::clone(host);
        let cancelled = Arc::clone(&cancelled);
        move || handle(&host, request, &caller, &cancelled)
    });
    tokio::pin!(task);
    let outcome = loop {
        tokio::select! {
            outcome = &mut task => break outcome,
            next = lines.next(), if !*peer_closed => match next {
                Some(Ok(line)) => pending.push_back(line),
                _ => {
                    *peer_closed = true;
                    cancelled.store(true, Ordering::SeqCst);
                    host.wake_waiters();
                }
            },
        }
    };
    match outcome {
        Ok(Ok(reply)) => Response::success(reply),
        Ok(Err(e)) => Response::failure(e.code(), e.to_string()),
        Err(e) => Response::failure(ErrorCode::Internal, format!("request handler failed: {e}")),
    }
}

fn handle(
    host: &Host,
    request: Request,
    caller: &Caller,
    cancelled: &AtomicBool,
) -> Result<Reply, HostError> {
    tracing::debug!(?request, uid = caller.uid, "request");
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
            mount: host.mount(&plugin, &mountpoint, options, read_only, caller)?,
        },
        Request::Unmount { mountpoint, lazy } => {
            let (path, detached) = host.unmount(&mountpoint, lazy, caller)?;
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
        Request::Status {} => Reply::Status {
            status: host.status(),
        },
    })
}
