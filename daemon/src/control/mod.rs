//! The control socket: accepts clients, reads one JSON request per line, answers one JSON
//! response per line. Each connection is its own task and each request runs on a blocking
//! thread, so a slow mount never holds up `list` on another connection. Every request is
//! authorized from the connection's peer credentials before it runs.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fshost_protocol::{
    decode_request, to_line, ErrorCode, Reply, Request, Response, DEFAULT_DRAIN_SECS,
    DEFAULT_UPGRADE_SECS, MAX_DRAIN_SECS, MAX_REQUEST_BYTES,
};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};

pub mod access;
pub mod daemon_upgrade;
pub mod metrics_http;

use crate::config::Limits;
use crate::host::{Caller, Drain, Host, HostError};
use access::Policy;
use daemon_upgrade::Upgrader;

/// Accepts connections until `stop` turns true (none while a daemon upgrade runs).
pub async fn serve(
    listener: UnixListener,
    host: Arc<Host>,
    policy: Arc<Mutex<Policy>>,
    upgrader: Arc<Upgrader>,
    mut stop: watch::Receiver<bool>,
) {
    let connections = Arc::new(Connections::default());
    let mut accepting = upgrader.accepting();
    loop {
        if !*accepting.borrow_and_update() {
            tokio::select! {
                _ = accepting.changed() => continue,
                _ = stop.changed() => return,
            }
        }
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let (host, policy) = (Arc::clone(&host), Arc::clone(&policy));
                    let connections = Arc::clone(&connections);
                    let upgrader = Arc::clone(&upgrader);
                    tokio::spawn(async move {
                        admit_and_serve(stream, host, policy, upgrader, &connections).await;
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    // EMFILE and friends: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = accepting.changed() => {}
            _ = stop.changed() => return,
        }
    }
}

/// Connections being served: in all, and per uid of callers who are not admins.
#[derive(Default)]
struct Connections {
    counts: Mutex<(usize, HashMap<u32, usize>)>,
}

/// One admitted connection; gives its place back when dropped.
struct Slot<'a> {
    connections: &'a Connections,
    uid: Option<u32>,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut counts = self.connections.lock();
        counts.0 -= 1;
        if let Some(uid) = self.uid {
            if let Some(n) = counts.1.get_mut(&uid) {
                *n -= 1;
                if *n == 0 {
                    counts.1.remove(&uid);
                }
            }
        }
    }
}

impl Connections {
    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, HashMap<u32, usize>)> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits `caller` or says which limit refuses it. The last `admin_reserved_connections`
    /// places are for root and the admin group only, so users can never lock them out.
    fn admit(&self, caller: &Caller, limits: &Limits) -> Result<Slot<'_>, String> {
        let mut counts = self.lock();
        let (total, per_user) = &mut *counts;
        if *total >= limits.max_connections {
            return Err(format!(
                "too many connections: fshostd already serves {} (limits.max_connections); try again later",
                limits.max_connections
            ));
        }
        if caller.admin {
            *total += 1;
            return Ok(Slot {
                connections: self,
                uid: None,
            });
        }
        if *total >= limits.max_connections - limits.admin_reserved_connections {
            return Err(format!(
                "too many connections: the remaining {} of fshostd's connections are reserved for root and group members (limits.admin_reserved_connections); try again later",
                limits.max_connections - *total
            ));
        }
        let mine = per_user.entry(caller.uid).or_default();
        if *mine >= limits.max_connections_per_user {
            return Err(format!(
                "too many connections: user {} already has {} open (limits.max_connections_per_user); close some",
                caller.uid, *mine
            ));
        }
        *mine += 1;
        *total += 1;
        Ok(Slot {
            connections: self,
            uid: Some(caller.uid),
        })
    }
}

/// Takes the peer's credentials as the kernel recorded them at connect, admits the
/// connection within the limits (or answers why not and closes it), then serves it.
async fn admit_and_serve(
    mut stream: UnixStream,
    host: Arc<Host>,
    policy: Arc<Mutex<Policy>>,
    upgrader: Arc<Upgrader>,
    connections: &Connections,
) {
    let Ok(cred) = stream.peer_cred() else {
        return; // no credentials, no service
    };
    let groups = match crate::sys::peer_groups(&stream) {
        Ok(groups) => groups,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the peer's groups (SO_PEERGROUPS); refusing the connection");
            return;
        }
    };
    let (caller, limits) = {
        let policy = policy.lock().unwrap_or_else(|e| e.into_inner());
        (
            policy.caller(cred.uid(), cred.gid(), &groups),
            policy.limits.clone(),
        )
    };
    let slot = match connections.admit(&caller, &limits) {
        Ok(slot) => slot,
        Err(why) => {
            tracing::info!(uid = caller.uid, %why, "connection refused");
            let response = Response::failure(ErrorCode::LimitReached, why);
            let _ = stream.write_all(to_line(&response).as_bytes()).await;
            // Let the client read the answer before the close: a client that writes its
            // request first would otherwise see only "broken pipe".
            let _ = stream.shutdown().await;
            return;
        }
    };
    serve_connection(stream, host, policy, upgrader, caller, &limits).await;
    drop(slot);
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

async fn serve_connection(
    stream: UnixStream,
    host: Arc<Host>,
    policy: Arc<Mutex<Policy>>,
    upgrader: Arc<Upgrader>,
    caller: Caller,
    limits: &Limits,
) {
    // Admins are trusted to hold a connection (a benchmark, a monitor); users are not, so
    // that idle connections cannot pile up against their limit.
    let idle = (!caller.admin).then(|| Duration::from_secs(limits.idle_timeout_secs));
    let mut pending = Queue {
        max: limits.max_queued_requests,
        lines: VecDeque::new(),
    };
    let mut rate = RateLimit {
        per_second: limits.requests_per_second,
        window: Instant::now(),
        used: 0,
    };
    let (read, mut write) = stream.into_split();
    let mut lines = FramedRead::new(read, LinesCodec::new_with_max_length(MAX_REQUEST_BYTES));
    let mut peer_closed = false;
    loop {
        let line = match pending.lines.pop_front() {
            Some(line) => line,
            None if peer_closed => return,
            None => {
                let Ok(next) = maybe_timeout(idle, lines.next()).await else {
                    let response = Response::failure(
                        ErrorCode::Timeout,
                        format!(
                            "no request for {}s (limits.idle_timeout_secs); closing the connection",
                            limits.idle_timeout_secs
                        ),
                    );
                    let _ = write.write_all(to_line(&response).as_bytes()).await;
                    return;
                };
                match next {
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
            Err(malformed) => Response::failure(ErrorCode::BadRequest, malformed.to_string()),
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
                                | Request::Stats { .. }
                        );
                        let response = run_request(
                            &host,
                            &upgrader,
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
        if let Some(Reply::DaemonUpgraded { upgrade }) = &response.result {
            // Answered: the new process serves from here on.
            upgrader.finish(upgrade);
        }
    }
}

/// Awaits `future`, giving up after `limit` if there is one.
async fn maybe_timeout<F: std::future::Future>(
    limit: Option<Duration>,
    future: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    match limit {
        Some(limit) => tokio::time::timeout(limit, future).await,
        None => Ok(future.await),
    }
}

/// Request lines that arrived while an earlier request ran, answered in order afterwards.
/// Bounded: when it is full the connection is not read until it drains, so a client that
/// pipelines faster than it is served only fills its own socket buffer.
struct Queue {
    max: usize,
    lines: VecDeque<String>,
}

/// Runs a request on a blocking thread while watching the connection: a client that goes
/// away cancels a waiting request (drain-unload) instead of leaving it to time out. Lines
/// that arrive meanwhile are kept for later, up to the queue's bound.
async fn run_request(
    host: &Arc<Host>,
    upgrader: &Arc<Upgrader>,
    request: Request,
    caller: Caller,
    lines: &mut FramedRead<tokio::net::unix::OwnedReadHalf, LinesCodec>,
    pending: &mut Queue,
    peer_closed: &mut bool,
) -> Response {
    let cancelled = Arc::new(AtomicBool::new(false));
    let task = tokio::task::spawn_blocking({
        let host = Arc::clone(host);
        let upgrader = Arc::clone(upgrader);
        let cancelled = Arc::clone(&cancelled);
        move || handle(&host, &upgrader, request, &caller, &cancelled)
    });
    tokio::pin!(task);
    let outcome = loop {
        tokio::select! {
            outcome = &mut task => break outcome,
            next = lines.next(), if !*peer_closed && pending.lines.len() < pending.max => match next {
                Some(Ok(line)) => pending.lines.push_back(line),
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

/// How long an upgrade waits for the requests in flight on the mounts it pauses.
fn pause_limit(timeout_secs: Option<u64>) -> Duration {
    Duration::from_secs(
        timeout_secs
            .unwrap_or(DEFAULT_UPGRADE_SECS)
            .clamp(1, MAX_DRAIN_SECS),
    )
}

fn handle(
    host: &Host,
    upgrader: &Upgrader,
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
        Request::Upgrade {
            name,
            path,
            timeout_secs,
        } => Reply::Upgraded {
            upgrade: host.upgrade(&name, path.as_deref(), pause_limit(timeout_secs))?,
        },
        Request::DaemonUpgrade {
            binary,
            timeout_secs,
        } => Reply::DaemonUpgraded {
            upgrade: upgrader.run(host, binary.as_deref(), caller, pause_limit(timeout_secs))?,
        },
        Request::Stats { filter } => Reply::Stats {
            mounts: host.stats(filter.as_deref())?,
        },
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
