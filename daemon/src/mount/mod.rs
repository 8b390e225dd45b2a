//! Kernel mounts: each mount gets its own thread that makes the plugin instance, mounts
//! through fuser, serves the session until it ends, and then reports the end. The only
//! module that touches `fuser`.

mod adapter;
mod backend;
pub mod budget;
mod handover;
mod link;
mod metrics;
mod mountinfo;
mod options;
pub mod pool;
mod ring;
mod session;
mod stale;
mod target;
mod tuning;
mod upgrade;

pub use adapter::{Adapter, CachePolicy, MountStats};
pub use backend::{Backend, Direct, Hosted, Swappable};
pub use handover::{export_mount, resume_mount, revive_mount, HandedMount, ResumedMount};
pub use link::{Agreed, Link};
pub use mountinfo::{abort_connection, fuse_waiting, kernel_mounts, KernelMount};
pub use options::{plugin_options, SessionOptions};
pub use session::{finish_session, start_session};
pub use stale::{answers_enotconn_as, detach_stale_mounts};
pub use target::{
    answers_enotconn, detach_mount_at, mount_id_at, DetachError, MountTarget, TargetError,
    TargetParts,
};
pub use upgrade::{move_mounts, pause_all, MoveError, Moved, Moving};

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::{mpsc, Arc};

use crate::plugin::Plugin;

/// What to mount where: a plugin and a resolved mount point (the real ones here, fakes in
/// the host's interleaving checker), with the options already checked and split.
pub struct MountSpec<P = Plugin, T = MountTarget> {
    pub plugin: Arc<P>,
    pub target: Arc<T>,
    /// The daemon's own options, parsed from `options`.
    pub session: SessionOptions,
    /// All of the mount's options (checked by `SessionOptions::parse`); the plugin's
    /// `create` gets those that are not the daemon's.
    pub options: BTreeMap<String, String>,
    pub read_only: bool,
    /// Uid and gid of the mount's owner: the kernel lets only them in, unless allow_other.
    pub owner: (u32, u32),
    pub stats: Arc<MountStats>,
}

/// Why a mount failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("option {key}={value:?} is invalid: it must be {expected}")]
    BadOption {
        key: String,
        value: String,
        expected: String,
    },
    #[error("plugin \"{plugin}\" refused to create a filesystem for these options: {}", describe_errno(.errno.0))]
    Create {
        plugin: String,
        errno: fshost_sdk::Errno,
    },
    #[error("mounting {} failed: {source}", .path.display())]
    Mount { path: PathBuf, source: io::Error },
    #[error("cannot start the mount thread: {0}")]
    Thread(io::Error),
    #[error("fshostd's mounts already use {used} of the {cap} threads it may have (bounded by {bound}) and this mount needs one: unmount something or raise the limit")]
    Threads {
        used: usize,
        cap: usize,
        bound: String,
    },
    #[error("cannot serve the mount ({0}); it was unmounted")]
    Serve(io::Error),
    #[error("the mount thread ended without reporting")]
    ThreadLost,
}

/// Why an unmount failed.
#[derive(Debug, thiserror::Error)]
pub enum UnmountError {
    #[error("{} is busy (a file is open or a process has its working directory there); close them or use --lazy", .0.display())]
    Busy(PathBuf),
    #[error("{} is no longer the mount fshostd made there (it was unmounted or covered from outside); nothing was unmounted", .0.display())]
    NotOurs(PathBuf),
    #[error("unmounting {} failed: {source}", .path.display())]
    Failed { path: PathBuf, source: io::Error },
}

/// What to do when fshostd runs out of descriptors (EMFILE), for error messages.
const NOFILE_HINT: &str = "fshostd has as many files open as it may (RLIMIT_NOFILE); unmount something or raise its limit (LimitNOFILE= in the unit)";

/// `e`, saying what to do if it is EMFILE.
fn with_nofile_hint(e: io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(libc::EMFILE) => io::Error::new(e.kind(), format!("{e}: {NOFILE_HINT}")),
        _ => e,
    }
}

/// `strerror`-like text for an errno, for messages people read.
pub fn describe_errno(e: i32) -> String {
    format!("{} (errno {e})", io::Error::from_raw_os_error(e))
}

/// Mounts `spec` on a new thread and returns once the kernel mount exists (or failed).
/// The thread then serves the mount; when the session has fully ended (unmounted from here
/// or from outside, every session thread joined, the plugin instance destroyed) it calls
/// `on_end`. `on_end` is not called when this returns an error. Returns the mount's kernel id
/// and its backend, which an upgrade can replace while the mount is served.
pub fn spawn(
    spec: MountSpec,
    on_end: impl FnOnce() + Send + 'static,
) -> Result<(u64, Arc<Swappable>), MountError> {
    let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(u64, Arc<Swappable>), MountError>>(1);
    let thread_name = format!("mount:{}", spec.plugin.name);
    // This thread, given back when it ends (once the mount is served or failed).
    let thread = budget::Threads::take(1).map_err(|(used, cap)| threads_error(used, cap))?;
    std::thread::Builder::new()
        .name(thread_name)
        .spawn(move || {
            let _thread = thread;
            let plugin = spec.plugin;
            let name = plugin.name.clone();
            // The options were checked (NUL bytes included) by `SessionOptions::parse`.
            let instance = match plugin.library.create(plugin_options(&spec.options)) {
                Ok(instance) => instance,
                Err(errno) => {
                    // Release our reference before reporting, so that once the caller has
                    // dropped the count nothing of ours holds the library.
                    drop(plugin);
                    let _ = ready_tx.send(Err(MountError::Create {
                        plugin: name,
                        errno,
                    }));
                    return;
                }
            };
            // From here on the session's adapter holds the only reference to the plugin
            // (an upgrade may replace it); dropping it (when the session ends) destroys
            // the instance.
            let link = Arc::new(Link::default());
            let fs = Swappable::new(
                Hosted::new(plugin, instance),
                Arc::clone(&spec.stats),
                spec.session.record_stats,
                Arc::clone(&link),
            );
            let slot = Arc::clone(&fs);
            let session = start_session(
                fs,
                spec.stats,
                link,
                &spec.target,
                spec.read_only,
                spec.owner,
                &spec.session,
            );
            let (session, id) = match session {
                Ok(session) => session,
                Err(source) => {
                    let path = spec.target.path.clone();
                    let source = with_nofile_hint(source);
                    let _ = ready_tx.send(Err(MountError::Mount { path, source }));
                    return;
                }
            };
            // "Mounted" means served: a worker of the plugin's pool waits for the mount's
            // requests before we say so.
            let target = Arc::clone(&spec.target);
            let (cap, owner) = (spec.session.threads, spec.owner.0);
            let on_end = Box::new(on_end);
            let served = pool::serve(
                &name, session, &slot.link, target, id, cap, owner, false, on_end,
            );
            let reply = match served {
                Ok(()) => Ok((id, slot)),
                Err(e) => {
                    let _ = spec.target.detach(id, true);
                    Err(serve_error(e))
                }
            };
            let _ = ready_tx.send(reply);
        })
        .map_err(MountError::Thread)?;
    ready_rx.recv().unwrap_or(Err(MountError::ThreadLost))
}

fn threads_error(used: usize, cap: usize) -> MountError {
    MountError::Threads {
        used,
        cap,
        bound: budget::bound(),
    }
}

fn serve_error(e: pool::ServeError) -> MountError {
    match e {
        pool::ServeError::Budget(used, cap) => threads_error(used, cap),
        pool::ServeError::Io(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
            MountError::Serve(io::Error::new(
                e.kind(),
                format!("{e}: the system refused a thread; unmount something or raise its thread limits"),
            ))
        }
        pool::ServeError::Io(e) => MountError::Serve(with_nofile_hint(e)),
    }
}

/// Unmounts the mount with kernel id `id` at `target`, and nothing else; `lazy` detaches it
/// even while files are open (MNT_DETACH).
pub fn unmount(target: &MountTarget, id: u64, lazy: bool) -> Result<(), UnmountError> {
    // A program that looks at the mount for a moment (`df`, a monitoring agent's statfs,
    // another fshostd checking for dead mounts as it starts) makes umount2 fail with EBUSY
    // just then: ask again a few times (about 0.1 s in all) before calling the mount busy.
    let mut detached = target.detach(id, lazy);
    for wait_ms in [4, 8, 16, 32, 64] {
        if !matches!(detached, Err(DetachError::Busy)) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(wait_ms));
        detached = target.detach(id, lazy);
    }
    detached.map_err(|e| match e {
        DetachError::Busy => UnmountError::Busy(target.path.clone()),
        DetachError::NotOurs => UnmountError::NotOurs(target.path.clone()),
        DetachError::Failed(source) => UnmountError::Failed {
            path: target.path.clone(),
            source,
        },
    })
}
