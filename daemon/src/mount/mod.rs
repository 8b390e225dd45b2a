//! Kernel mounts: each mount gets its own thread that makes the plugin instance, mounts
//! through fuser, serves the session until it ends, and then reports the end. The only
//! module that touches `fuser`.

mod adapter;

pub use adapter::MountStats;

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
pub const DAEMON_OPTIONS: [&str; 4] = ["allow_other", "attr_timeout", "keep_cache", "threads"];

/// How long the kernel may cache attributes and entries unless `-o attr_timeout=SECS`
/// says otherwise. Plugins that own their tree can keep it; a mirror of a directory that
/// others change (passthroughfs) may want 0.
const DEFAULT_ATTR_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// What to mount where.
pub struct MountSpec {
    pub plugin: Arc<Plugin>,
    pub mountpoint: PathBuf,
    pub options: BTreeMap<String, String>,
    pub read_only: bool,
    /// Uid and gid of the mount's owner: the kernel lets only them in, unless allow_other.
    pub owner: (u32, u32),
    pub stats: Arc<MountStats>,
}

/// Why a mount failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("option {key:?} is invalid (a NUL byte, attr_timeout not 0 to 86400 seconds, or threads not 1 to 16)")]
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
    (uid, gid): (u32, u32),
) -> io::Result<OwnedFd> {
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| io::Error::new(e.kind(), format!("cannot open /dev/fuse: {e}")))?;
    let root_mode = std::fs::metadata(mountpoint)?.mode();
    // fstype `fuse.fshost-<plugin>`, source `fshost:<plugin>` in /proc/self/mountinfo.
    let mut data = format!(
        "fd={},rootmode={root_mode:o},user_id={uid},group_id={gid},default_permissions,subtype=fshost-{name}",
        dev.as_raw_fd(),
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
    // Session threads per mount (1 keeps 1,000 mounts cheap; more help busy mounts).
    let threads = match spec.options.get("threads") {
        None => 1,
        Some(n) => n
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=16).contains(n))
            .ok_or_else(|| MountError::BadOption {
                key: "threads".into(),
            })?,
    };
    // Keep the page cache between opens: right when nothing but this mount changes the
    // files (memfs), wrong for a mirror others write to.
    let keep_cache = spec.options.contains_key("keep_cache");
    let ttl = match spec.options.get("attr_timeout") {
        None => DEFAULT_ATTR_TIMEOUT,
        Some(secs) => secs
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && (0.0..=86_400.0).contains(s))
            .map(std::time::Duration::from_secs_f64)
            .ok_or_else(|| MountError::BadOption {
                key: "attr_timeout".into(),
            })?,
    };
    // Who may use the mount is the kernel's decision (user_id=, allow_other); fuser's own
    // filter would only let the daemon's uid in, which is wrong for a user's mount.
    let acl = fuser::SessionACL::All;
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
            let adapter = Adapter::new(Arc::clone(&plugin), instance, Arc::clone(&spec.stats), ttl, keep_cache);
            // The adapter owns our only other reference to the plugin from here on.
            drop(plugin);
            let session = kernel_mount(&name, &spec.mountpoint, spec.read_only, allow_other, spec.owner).and_then(|fd| {
                let mut config = Config::default();
                config.n_threads = Some(threads);
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

/// One line of /proc/self/mountinfo that matters here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelMount {
    pub mountpoint: PathBuf,
    pub fstype: String,
    pub source: String,
}

/// Parses /proc/self/mountinfo text; mount points are unescaped (`\040` is a space).
pub fn parse_mountinfo(text: &str) -> Vec<KernelMount> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let dash = fields.iter().position(|f| *f == "-")?;
            Some(KernelMount {
                mountpoint: PathBuf::from(unescape_mountinfo(fields.get(4)?)),
                fstype: fields.get(dash + 1)?.to_string(),
                source: unescape_mountinfo(fields.get(dash + 2)?),
            })
        })
        .collect()
}

fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// True if `path` answers ENOTCONN: a FUSE mount whose daemon is gone. `statfs` always
/// asks the FUSE daemon (a `stat` may be answered from the kernel's attribute cache for a
/// while after the daemon died). A live mount that does not answer within a second is left
/// alone (slow is not dead).
fn is_dead(path: &Path) -> bool {
    let (tx, rx) = mpsc::channel();
    let probe = path.to_path_buf();
    let spawned = std::thread::Builder::new()
        .name("stale-probe".into())
        .spawn(move || {
            let _ = tx.send(nix::sys::statfs::statfs(&probe).err());
        });
    spawned.is_ok()
        && rx.recv_timeout(std::time::Duration::from_secs(1)) == Ok(Some(nix::Error::ENOTCONN))
}

/// Detaches every dead `fuse.fshost*` mount (left by an fshostd that was killed) and
/// returns them. Live mounts, including those of other fshostd instances, are untouched.
pub fn detach_stale_mounts() -> Vec<KernelMount> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    parse_mountinfo(&text)
        .into_iter()
        .filter(|m| m.fstype.starts_with("fuse.fshost") && is_dead(&m.mountpoint))
        .filter(|m| match umount2(&m.mountpoint, MntFlags::MNT_DETACH) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(mountpoint = %m.mountpoint.display(), error = %e, "cannot detach stale mount");
                false
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_are_parsed_and_unescaped() {
        let text =
            "42 27 0:39 / /tmp/a\\040b rw,nosuid - fuse.fshost-memfs fshost:memfs rw,user_id=0\n\
                    43 27 0:40 / /srv rw shared:1 - ext4 /dev/vda rw\n";
        let mounts = parse_mountinfo(text);
        assert_eq!(
            mounts[0],
            KernelMount {
                mountpoint: PathBuf::from("/tmp/a b"),
                fstype: "fuse.fshost-memfs".into(),
                source: "fshost:memfs".into(),
            }
        );
        assert_eq!(mounts[1].fstype, "ext4");
        assert_eq!(mounts[1].mountpoint, PathBuf::from("/srv"));
    }
}
