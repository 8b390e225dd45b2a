//! One mount crossing to the next fshostd process (daemon upgrade). The old process pauses
//! the mount (its backend lock taken alone, as a plugin upgrade does), exports the
//! instance's state and the connection's ([`export_mount`]); the new process makes an
//! instance of the same plugin, imports the state and builds a session on the handed
//! `/dev/fuse` descriptor without INIT ([`resume_mount`]). Nothing is read from the
//! connection until the old process is gone ([`ResumedMount::start`]): then the kernel is
//! asked to queue again what the old process read and never answered.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use fuser::Session;
use serde::{Deserialize, Serialize};

use super::backend::Backend;
use super::backend::{Hosted, Swappable};
use super::link::{Agreed, Link, LinkState};
use super::session::resume_session;
use super::upgrade::{export, instance_from, keeps_to, new_instance, MoveError};
use super::{Adapter, MountStats, MountTarget, SessionOptions};
use crate::plugin::Plugin;

/// What the old process says of one mount's connection and instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HandedMount {
    pub link: LinkState,
    /// Bytes of instance state (sent beside, in a file of its own).
    pub state_bytes: u64,
    /// The descriptors the state names, as indices of those handed over.
    pub state_fds: Vec<usize>,
}

/// Exports the state of a paused mount (`current`: its backend, held alone) into `out`;
/// returns it with duplicates of the descriptors the state names.
pub fn export_mount(
    path: &std::path::Path,
    slot: &Swappable,
    current: &Hosted,
    out: &mut impl Write,
) -> Result<(HandedMount, Vec<OwnedFd>), MoveError> {
    let link = slot.link.state().ok_or_else(|| MoveError::Export {
        path: path.to_path_buf(),
        errno: fshost_sdk::Errno(libc::EAGAIN),
        panic: Some("its FUSE session is not initialised yet".into()),
    })?;
    let mut state_bytes = 0u64;
    let mut failed = None;
    let exported = export(path, current, &mut |chunk| {
        state_bytes += chunk.len() as u64;
        out.write_all(chunk).map_err(|e| failed = Some(e)).is_ok()
    });
    if let Some(e) = failed {
        return Err(MoveError::Export {
            path: path.to_path_buf(),
            errno: fshost_sdk::Errno(e.raw_os_error().unwrap_or(libc::EIO)),
            panic: None,
        });
    }
    let fds = exported?;
    let handed = HandedMount {
        link,
        state_bytes,
        state_fds: Vec::new(),
    };
    Ok((handed, fds))
}

/// A mount made again in the new process, not yet served.
pub struct ResumedMount {
    session: Session<Adapter<Arc<Swappable>>>,
    link: Arc<Link>,
    state: LinkState,
    /// Its plugin's name (whose pool will serve it) and `-o threads=N`.
    plugin: String,
    cap: usize,
}

/// Makes an instance of `plugin` for a handed-over mount, gives it the old instance's
/// `state`, and builds the session on `fuse`. Dropping the result before `start` leaves
/// the connection as it was (the old process still holds it and its backing ids).
#[allow(clippy::too_many_arguments)]
pub fn resume_mount(
    path: &std::path::Path,
    plugin: Arc<Plugin>,
    options: &BTreeMap<String, String>,
    session: &SessionOptions,
    stats: Arc<MountStats>,
    fuse: OwnedFd,
    handed: &HandedMount,
    state: &[u8],
    state_fds: &[OwnedFd],
) -> Result<(ResumedMount, Arc<Swappable>), MoveError> {
    let hosted = instance_from(&plugin, path, options, state, state_fds)?;
    serve_connection(path, hosted, stats, session, fuse, handed.link.clone())
}

/// The backend and the session (not yet run) for `hosted` on an existing connection.
fn serve_connection(
    path: &std::path::Path,
    hosted: Hosted,
    stats: Arc<MountStats>,
    session: &SessionOptions,
    fuse: OwnedFd,
    state: LinkState,
) -> Result<(ResumedMount, Arc<Swappable>), MoveError> {
    keeps_to(&state.agreed, &hosted, path)?;
    let kept = fuse.try_clone().map_err(|e| MoveError::Create {
        path: path.to_path_buf(),
        errno: fshost_sdk::Errno(e.raw_os_error().unwrap_or(libc::EIO)),
        panic: None,
    })?;
    let link = Arc::new(Link::resumed(kept, &state));
    let fs = Swappable::new(
        hosted,
        Arc::clone(&stats),
        session.record_stats,
        Arc::clone(&link),
    );
    let plugin = fs.name().to_string();
    let cap = session.threads;
    let session = resume_session(Arc::clone(&fs), stats, Arc::clone(&link), fuse, session);
    Ok((
        ResumedMount {
            session,
            link,
            state,
            plugin,
            cap,
        },
        fs,
    ))
}

/// Makes a new instance of `plugin` serve a mount whose previous instance died with its
/// fshostd (crash recovery): created with the mount's options, told to `resume`, and the
/// session built on the kept connection `fuse` as INIT `agreed` then. Handles the lost
/// process gave out are unknown to the new adapter (its own start past them).
#[allow(clippy::too_many_arguments)]
pub fn revive_mount(
    path: &std::path::Path,
    plugin: Arc<Plugin>,
    options: &BTreeMap<String, String>,
    session: &SessionOptions,
    stats: Arc<MountStats>,
    fuse: OwnedFd,
    agreed: Agreed,
) -> Result<(ResumedMount, Arc<Swappable>), MoveError> {
    let hosted = new_instance(&plugin, path, options)?;
    hosted.resume().map_err(|errno| MoveError::Resume {
        path: path.to_path_buf(),
        errno,
        panic: plugin.library.taint(),
    })?;
    serve_connection(path, hosted, stats, session, fuse, LinkState::fresh(agreed))
}

impl ResumedMount {
    /// Serves the mount from now on (the old process is gone): adopts its backing ids,
    /// asks the kernel to queue again the requests it read and never answered, and runs
    /// the session on a thread of its own; `on_end` runs when the session has ended.
    pub fn start(
        self,
        target: Arc<MountTarget>,
        kernel_id: u64,
        owner: u32,
        on_end: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<()> {
        let ResumedMount {
            session,
            link,
            state,
            plugin,
            cap,
        } = self;
        // Each backing id of the handed state was registered on this connection by the
        // previous process, which is gone; each is wrapped once, here.
        link.adopt_backing(&state, |raw| crate::sys::adopt_backing_id(&session, raw));
        if let Err(e) = session.notifier().resend() {
            // Before Linux 6.9: requests the old process had read stay unanswered.
            tracing::warn!(mountpoint = %target.path.display(), error = %e, "the kernel cannot re-send requests (FUSE_NOTIFY_RESEND needs Linux 6.9)");
        }
        let (t, on_end) = (Arc::clone(&target), Box::new(on_end));
        let served = super::pool::serve(
            &plugin, session, &link, t, kernel_id, cap, owner, true, on_end,
        );
        served.map_err(|e| {
            // Nobody can serve the mount.
            tracing::error!(mountpoint = %target.path.display(), error = ?e, "cannot serve a taken-over mount; detaching it");
            let _ = target.detach(kernel_id, true);
            match e {
                super::pool::ServeError::Io(e) => e,
                // Not met: a takeover's first worker is made past the budget.
                super::pool::ServeError::Budget(used, cap) => std::io::Error::other(format!(
                    "fshostd's mounts already use {used} of the {cap} threads it may have"
                )),
            }
        })
    }
}
