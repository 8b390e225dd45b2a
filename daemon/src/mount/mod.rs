//! Kernel mounts: each mount gets its own thread that makes the plugin instance, mounts
//! through fuser, serves the session until it ends, and then reports the end. The only
//! module that touches `fuser`.

mod adapter;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

use fuser::{Config, Session};
use nix::mount::{umount2, MntFlags, MsFlags};

use crate::plugin::Plugin;
use adapter::Adapter;

/// Mount options the daemon handles itself instead of passing them to the plugin.
pub const DAEMON_OPTIONS: [&str; 1] = ["allow_other"];

/// What to mount where.
pub struct MountSpec {
    pub plugin: Arc<Plugin>,
    pub mountpoint: PathBuf,
    pub options: BTreeMap<String, String>,
    pub read_only: bool,
}

/// Why a mount failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("option {key:?} contains a NUL byte")]
    BadOption { key: String },
    #[error("plugin \"{plugin}\" refused to create a filesystem for these options: {}", describe_errno(.errno.0))]
    Create {
        plugin: String,
        errno: fshost_sdk::Errno,
    },
    #[error("mounting {} failed: {source}", .path.display())]
    Mount { path: PathBuf, source: io::Error },
    #[error("cannot start the mount thread: {0}")]
    Thread(io::Error),
    #[error("the mount thread ended without reporting")]
    ThreadLost,
}

/// Why an unmount failed.
#[derive(Debug, thiserror::Error)]
pub enum UnmountError {
    #[error("{} is busy (a file is open or a process has its working directory there); close them or use --lazy", .0.display())]
    Busy(PathBuf),
    #[error("unmounting {} failed: {source}", .path.display())]
    Failed { path: PathBuf, source: nix::Error },
}

/// `strerror`-like text for an errno, for messages people read.
pub fn describe_errno(e: i32) -> String {
    format!("{} (errno {e})", io::Error::from_raw_os_error(e))
}

/// Makes the kernel mount and returns the `/dev/fuse` connection that serves it.
///
/// We mount ourselves (as root, with mount(2)) instead of letting fuser do it, so that we
/// alone decide when the mount goes: fuser's own unmount-on-drop can hit a different mount
/// that was made on the same directory after ours ended.
fn kernel_mount(
    name: &str,
    mountpoint: &Path,
    read_only: bool,
    allow_other: bool,
) -> io::Result<OwnedFd> {
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| io::Error::new(e.kind(), format!("cannot open /dev/fuse: {e}")))?;
    let root_mode = std::fs::metadata(mountpoint)?.mode();
    // fstype `fuse.fshost-<plugin>`, source `fshost:<plugin>` in /proc/self/mountinfo.
    let mut data = format!(
        "fd={},rootmode={root_mode:o},user_id={},group_id={},default_permissions,subtype=fshost-{name}",
        dev.as_raw_fd(),
        nix::unistd::getuid(),
        nix::unistd::getgid(),
    );
    if allow_other {
        data.push_str(",allow_other");
    }
    let mut flags = MsFlags::MS_NODEV | MsFlags::MS_NOSUID;
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    let source = format!("fshost:{name}");
    nix::mount::mount(
        Some(source.as_str()),
        mountpoint,
        Some("fuse"),
        flags,
        Some(data.as_str()),
    )
    .map_err(|e| match e {
        nix::Error::EPERM => io::Error::new(
            io::ErrorKind::PermissionDenied,
            "mount(2) needs root (CAP_SYS_ADMIN); run fshostd as root",
        ),
        e => io::Error::from(e),
    })?;
    Ok(OwnedFd::from(dev))
}

/// Mounts `spec` on a new thread and returns once the kernel mount exists (or failed).
/// The thread then serves the mount; when the session has fully ended (unmounted from here
/// or from outside, every session thread joined, the plugin instance destroyed) it calls
/// `on_end`. `on_end` is not called when this returns an error.
pub fn spawn(spec: MountSpec, on_end: impl FnOnce() + Send + 'static) -> Result<(), MountError> {
    let mut options = Vec::new();
    for (key, value) in &spec.options {
        if DAEMON_OPTIONS.contains(&key.as_str()) {
            continue;
        }
        match (CString::new(key.as_str()), CString::new(value.as_str())) {
            (Ok(k), Ok(v)) => options.push((k, v)),
            _ => return Err(MountError::BadOption { key: key.clone() }),
        }
    }
    let allow_other = spec.options.contains_key("allow_other");
    let acl = if allow_other {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::Owner
    };
    let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(), MountError>>(1);
    let thread_name = format!("mount:{}", spec.plugin.name);
    std::thread::Builder::new()
        .name(thread_name)
        .spawn(move || {
            let plugin = spec.plugin;
            let name = plugin.name.clone();
            let pairs: Vec<_> = options.iter().map(|(k, v)| (k.as_c_str(), v.as_c_str())).collect();
            let instance = match plugin.library.create(&pairs) {
                Ok(instance) => instance,
                Err(errno) => {
                    // Release our reference before reporting, so that once the caller has
                    // dropped the count nothing of ours holds the library.
                    drop(plugin);
                    let _ = ready_tx.send(Err(MountError::Create { plugin: name, errno }));
                    return;
                }
            };
            let adapter = Adapter::new(Arc::clone(&plugin), instance);
            // The adapter owns our only other reference to the plugin from here on.
            drop(plugin);
            let session = kernel_mount(&name, &spec.mountpoint, spec.read_only, allow_other).and_then(|fd| {
                let mut config = Config::default();
                config.n_threads = Some(1);
                // The handshake (kernel INIT) happens here; a failure leaves a dead mount.
                Session::from_fd(adapter, fd, acl, config).inspect_err(|_| {
                    let _ = umount2(&spec.mountpoint, MntFlags::MNT_DETACH);
                })
            });
            let session = match session {
                Ok(session) => session,
                Err(source) => {
                    let path = spec.mountpoint;
                    let _ = ready_tx.send(Err(MountError::Mount { path, source }));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            if let Err(e) = session.run() {
                // The kernel did not end the session, so the mount is still there but no
                // longer served: detach it rather than leave a dead mount behind.
                tracing::warn!(mountpoint = %spec.mountpoint.display(), error = %e, "FUSE session failed; detaching the mount");
                let _ = umount2(&spec.mountpoint, MntFlags::MNT_DETACH);
            }
            on_end();
        })
        .map_err(MountError::Thread)?;
    ready_rx.recv().unwrap_or(Err(MountError::ThreadLost))
}

/// Unmounts `path`; `lazy` detaches it even while files are open (MNT_DETACH).
pub fn unmount(path: &Path, lazy: bool) -> Result<(), UnmountError> {
    let flags = if lazy {
        MntFlags::MNT_DETACH
    } else {
        MntFlags::empty()
    };
    match umount2(path, flags) {
        Ok(()) => Ok(()),
        Err(nix::Error::EBUSY) => Err(UnmountError::Busy(path.to_path_buf())),
        Err(source) => Err(UnmountError::Failed {
            path: path.to_path_buf(),
            source,
        }),
    }
}
