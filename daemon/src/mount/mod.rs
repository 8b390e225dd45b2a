//! Kernel mounts: each mount gets its own thread that makes the plugin instance, mounts
//! through fuser, serves the session until it ends, and then reports the end. The only
//! module that touches `fuser`.

mod adapter;
mod backend;
mod target;

pub use adapter::{Adapter, CachePolicy, MountStats};
pub use backend::{Backend, Direct, Hosted};
pub use target::{mount_id, mount_id_at, DetachError, MountTarget, TargetError};

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};

use std::os::fd::{AsRawFd, OwnedFd};

use fuser::{Config, Session};
use nix::mount::{umount2, MntFlags, MsFlags};

use crate::plugin::Plugin;

/// Mount options the daemon handles itself instead of passing them to the plugin.
pub const DAEMON_OPTIONS: [&str; 6] = [
    "allow_other",
    "attr_timeout",
    "keep_cache",
    "read_ahead_kb",
    "threads",
    "writeback",
];

/// Session threads per mount unless `-o threads=N` says otherwise (see `SessionOptions`).
const DEFAULT_THREADS: usize = 2;

/// Kernel readahead per mount unless `-o read_ahead_kb=N` says otherwise: 1 MiB, the
/// largest request FUSE sends (max_pages 256), instead of the kernel's 128 KiB, so that a
/// sequential read costs one round trip per MiB instead of eight.
const DEFAULT_READ_AHEAD_KB: u32 = 1024;

/// How long the kernel may cache attributes and entries unless `-o attr_timeout=SECS`
/// says otherwise. Plugins that own their tree can keep it; a mirror of a directory that
/// others change (passthroughfs) may want 0.
const DEFAULT_ATTR_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// What to mount where.
pub struct MountSpec {
    pub plugin: Arc<Plugin>,
    pub target: Arc<MountTarget>,
    pub options: BTreeMap<String, String>,
    pub read_only: bool,
    /// Uid and gid of the mount's owner: the kernel lets only them in, unless allow_other.
    pub owner: (u32, u32),
    pub stats: Arc<MountStats>,
}

/// Why a mount failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("option {key:?} is invalid (a NUL byte, attr_timeout not 0 to 86400 seconds, threads not 1 to 16, or read_ahead_kb not 0 to 65536)")]
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
    #[error("{} is no longer the mount fshostd made there (it was unmounted or covered from outside); nothing was unmounted", .0.display())]
    NotOurs(PathBuf),
    #[error("unmounting {} failed: {source}", .path.display())]
    Failed { path: PathBuf, source: io::Error },
}

/// `strerror`-like text for an errno, for messages people read.
pub fn describe_errno(e: i32) -> String {
    format!("{} (errno {e})", io::Error::from_raw_os_error(e))
}

/// Makes the kernel mount on `target` and returns the `/dev/fuse` connection that serves
/// it, with the mount's kernel id.
///
/// We mount ourselves (as root, with mount(2)) instead of letting fuser do it, so that we
/// alone decide when the mount goes: fuser's own unmount-on-drop can hit a different mount
/// that was made on the same directory after ours ended. The mount goes onto the directory
/// descriptor the caller's path was resolved to once, never onto the path again.
fn kernel_mount(
    name: &str,
    target: &MountTarget,
    read_only: bool,
    allow_other: bool,
    (uid, gid): (u32, u32),
) -> io::Result<(OwnedFd, u64)> {
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| io::Error::new(e.kind(), format!("cannot open /dev/fuse: {e}")))?;
    let root_mode = target.mode;
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
    let below = target.dir_mount_id()?;
    nix::mount::mount(
        Some(source.as_str()),
        &target.dir_path(),
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
    let id = target.current_mount_id()?;
    if id == below {
        return Err(io::Error::other(
            "the new mount is not visible at its mount point",
        ));
    }
    Ok((OwnedFd::from(dev), id))
}

/// The mount options fshostd handles itself (`DAEMON_OPTIONS`), parsed.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub allow_other: bool,
    /// Session threads. Two by default: with one, a create on memfs took 290 µs instead of
    /// 100 (this VM); more than two did not help. 1,000 mounts cost 65 MiB RSS with two.
    pub threads: usize,
    pub read_ahead_kb: u32,
    pub cache: CachePolicy,
}

/// A number option within `range`, or `default` when absent.
fn number<T: std::str::FromStr + PartialOrd>(
    options: &BTreeMap<String, String>,
    key: &str,
    default: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<T, MountError> {
    match options.get(key) {
        None => Ok(default),
        Some(text) => text
            .parse::<T>()
            .ok()
            .filter(|n| range.contains(n))
            .ok_or_else(|| MountError::BadOption { key: key.into() }),
    }
}

impl SessionOptions {
    /// Parses the daemon's options out of `options` and returns the plugin's (the rest).
    pub fn parse(
        options: &BTreeMap<String, String>,
    ) -> Result<(SessionOptions, BTreeMap<String, String>), MountError> {
        let attr_timeout = number(
            options,
            "attr_timeout",
            DEFAULT_ATTR_TIMEOUT.as_secs_f64(),
            0.0..=86_400.0,
        )?;
        let parsed = SessionOptions {
            allow_other: options.contains_key("allow_other"),
            threads: number(options, "threads", DEFAULT_THREADS, 1..=16)?,
            read_ahead_kb: number(options, "read_ahead_kb", DEFAULT_READ_AHEAD_KB, 0..=65_536)?,
            cache: CachePolicy {
                ttl: std::time::Duration::from_secs_f64(attr_timeout),
                // Keep the page cache between opens: right when nothing but this mount
                // changes the files (memfs), wrong for a mirror others write to.
                keep_cache: options.contains_key("keep_cache"),
                writeback: options.contains_key("writeback"),
            },
        };
        let rest = options
            .iter()
            .filter(|(key, _)| !DAEMON_OPTIONS.contains(&key.as_str()))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        Ok((parsed, rest))
    }
}

/// Mounts `fs` on `mountpoint` and makes the FUSE session that serves it (the kernel's INIT
/// handshake included); `Session::run` on the result serves it until it is unmounted.
/// Returns the session and the mount's kernel id.
pub fn start_session<B: Backend>(
    fs: B,
    stats: Arc<MountStats>,
    target: &MountTarget,
    read_only: bool,
    owner: (u32, u32),
    options: &SessionOptions,
) -> io::Result<(Session<Adapter<B>>, u64)> {
    let name = fs.name().to_string();
    let adapter = Adapter::new(fs, stats, &options.cache);
    let (fd, id) = kernel_mount(&name, target, read_only, options.allow_other, owner)?;
    let mut config = Config::default();
    config.n_threads = Some(options.threads);
    // Who may use the mount is the kernel's decision (user_id=, allow_other); fuser's own
    // filter would only let the daemon's uid in, which is wrong for a user's mount.
    let session =
        Session::from_fd(adapter, fd, fuser::SessionACL::All, config).inspect_err(|_| {
            // A failed handshake leaves a dead mount behind.
            let _ = target.detach(id, true);
        })?;
    // After INIT, which caps FUSE readahead at 128 KiB: only sysfs can raise it.
    let mut tuning = vec![("read_ahead_kb", options.read_ahead_kb.to_string())];
    if options.cache.writeback {
        // FUSE marks every mount's dirty limit strict (1% of the dirty threshold, enforced
        // per mount), which throttles a writeback-cached stream to write-through speed:
        // 1 GiB wrote at 1.5 GB/s on memfs with it, 3.0–3.3 GB/s without. Without it the
        // mount is throttled like a disk, by the machine's dirty limits.
        tuning.push(("strict_limit", "0".to_string()));
    }
    let tuned = bdi_dir(id).and_then(|dir| {
        tuning
            .iter()
            .try_for_each(|(knob, value)| std::fs::write(dir.join(knob), value))
    });
    if let Err(e) = tuned {
        tracing::info!(mountpoint = %target.path.display(), error = %e, "cannot tune the mount in sysfs; the kernel's defaults stay");
    }
    Ok((session, id))
}

/// Serves `session` until the mount is gone.
pub fn run_session<B: Backend>(session: Session<Adapter<B>>, target: &MountTarget, id: u64) {
    if let Err(e) = session.run() {
        // The kernel did not end the session, so the mount is still there but no longer
        // served: detach it rather than leave a dead mount behind.
        tracing::warn!(mountpoint = %target.path.display(), error = %e, "FUSE session failed; detaching the mount");
        let _ = target.detach(id, true);
    }
}

/// Mounts `spec` on a new thread and returns once the kernel mount exists (or failed).
/// The thread then serves the mount; when the session has fully ended (unmounted from here
/// or from outside, every session thread joined, the plugin instance destroyed) it calls
/// `on_end`. `on_end` is not called when this returns an error. Returns the mount's kernel id.
pub fn spawn(spec: MountSpec, on_end: impl FnOnce() + Send + 'static) -> Result<u64, MountError> {
    let (session_options, plugin_options) = SessionOptions::parse(&spec.options)?;
    let mut options = Vec::new();
    for (key, value) in &plugin_options {
        match (CString::new(key.as_str()), CString::new(value.as_str())) {
            (Ok(k), Ok(v)) => options.push((k, v)),
            _ => return Err(MountError::BadOption { key: key.clone() }),
        }
    }
    let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<u64, MountError>>(1);
    let thread_name = format!("mount:{}", spec.plugin.name);
    std::thread::Builder::new()
        .name(thread_name)
        .spawn(move || {
            let plugin = spec.plugin;
            let name = plugin.name.clone();
            let pairs: Vec<_> = options
                .iter()
                .map(|(k, v)| (k.as_c_str(), v.as_c_str()))
                .collect();
            let instance = match plugin.library.create(&pairs) {
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
            // From here on the session's adapter holds the only reference to the plugin;
            // dropping it (when the session ends) destroys the instance.
            let fs = Hosted::new(plugin, instance);
            let session = start_session(
                fs,
                spec.stats,
                &spec.target,
                spec.read_only,
                spec.owner,
                &session_options,
            );
            let (session, id) = match session {
                Ok(session) => session,
                Err(source) => {
                    let path = spec.target.path.clone();
                    let _ = ready_tx.send(Err(MountError::Mount { path, source }));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(id));
            run_session(session, &spec.target, id);
            on_end();
        })
        .map_err(MountError::Thread)?;
    ready_rx.recv().unwrap_or(Err(MountError::ThreadLost))
}

/// The sysfs directory of the backing device of the mount with kernel id `id`,
/// `/sys/class/bdi/<major:minor>/`.
fn bdi_dir(id: u64) -> io::Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    parse_mountinfo(&text)
        .into_iter()
        .find(|m| m.id == id)
        .map(|m| Path::new("/sys/class/bdi").join(m.device))
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "mount not in mountinfo"))
}

/// Unmounts the mount with kernel id `id` at `target`, and nothing else; `lazy` detaches it
/// even while files are open (MNT_DETACH).
pub fn unmount(target: &MountTarget, id: u64, lazy: bool) -> Result<(), UnmountError> {
    target.detach(id, lazy).map_err(|e| match e {
        DetachError::Busy => UnmountError::Busy(target.path.clone()),
        DetachError::NotOurs => UnmountError::NotOurs(target.path.clone()),
        DetachError::Failed(source) => UnmountError::Failed {
            path: target.path.clone(),
            source,
        },
    })
}

/// One line of /proc/self/mountinfo that matters here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelMount {
    /// The kernel's mount id (stable for the mount's life, unique while it exists).
    pub id: u64,
    /// `major:minor` of the mount's device (its backing device info in sysfs).
    pub device: String,
    pub mountpoint: PathBuf,
    pub fstype: String,
    pub source: String,
    /// The filesystem's own options (`user_id=0,group_id=0,default_permissions,...`).
    pub super_options: String,
}

impl KernelMount {
    /// A FUSE mount's owner (`user_id=`, `group_id=`) and whether others may use it.
    fn fuse_access(&self) -> (Option<u32>, Option<u32>, bool) {
        let option = |key: &str| {
            self.super_options
                .split(',')
                .find_map(|o| o.strip_prefix(key)?.parse().ok())
        };
        let allow_other = self.super_options.split(',').any(|o| o == "allow_other");
        (option("user_id="), option("group_id="), allow_other)
    }
}

/// Parses /proc/self/mountinfo text; mount points are unescaped (`\040` is a space).
pub fn parse_mountinfo(text: &str) -> Vec<KernelMount> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let dash = fields.iter().position(|f| *f == "-")?;
            Some(KernelMount {
                id: fields.first()?.parse().ok()?,
                device: fields.get(2)?.to_string(),
                mountpoint: PathBuf::from(unescape_mountinfo(fields.get(4)?)),
                fstype: fields.get(dash + 1)?.to_string(),
                source: unescape_mountinfo(fields.get(dash + 2)?),
                super_options: fields.get(dash + 3).unwrap_or(&"").to_string(),
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
/// while after the daemon died).
pub fn answers_enotconn(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).err() == Some(nix::Error::ENOTCONN)
}

/// [`answers_enotconn`] as user `uid:gid` (no supplementary groups), for `--probe-dead`:
/// the process drops root for good first. Call it only from a single-threaded process.
pub fn answers_enotconn_as(path: &Path, owner: &str) -> io::Result<bool> {
    let (uid, gid) = owner
        .split_once(':')
        .and_then(|(u, g)| Some((u.parse().ok()?, g.parse().ok()?)))
        .ok_or_else(|| io::Error::other("--as wants UID:GID"))?;
    let (uid, gid) = (
        nix::unistd::Uid::from_raw(uid),
        nix::unistd::Gid::from_raw(gid),
    );
    nix::unistd::setgroups(&[])?;
    nix::unistd::setresgid(gid, gid, gid)?;
    nix::unistd::setresuid(uid, uid, uid)?;
    Ok(answers_enotconn(path))
}

/// Whether a FUSE mount is dead, asked as someone the kernel lets in: the kernel answers
/// no one but the owner of a mount without `allow_other` (root gets zeroes, not ENOTCONN),
/// so such a mount is probed by a child process (`fshostd --probe-dead PATH --as UID:GID`)
/// that becomes its owner before it looks. A mount that does not answer within a second is left alone (slow is not dead).
fn is_dead(mount: &KernelMount) -> bool {
    let me = nix::unistd::geteuid().as_raw();
    let (uid, gid, allow_other) = mount.fuse_access();
    let mut command = match (uid, gid) {
        (Some(uid), Some(gid)) if uid != me && !allow_other => {
            let Ok(exe) = std::env::current_exe() else {
                return false;
            };
            let mut command = std::process::Command::new(exe);
            command.arg("--as").arg(format!("{uid}:{gid}"));
            command
        }
        _ => {
            let (tx, rx) = mpsc::channel();
            let probe = mount.mountpoint.clone();
            let spawned = std::thread::Builder::new()
                .name("stale-probe".into())
                .spawn(move || {
                    let _ = tx.send(answers_enotconn(&probe));
                });
            return spawned.is_ok()
                && rx.recv_timeout(std::time::Duration::from_secs(1)) == Ok(true);
        }
    };
    command
        .arg("--probe-dead")
        .arg(&mount.mountpoint)
        .env_clear()
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let Ok(mut child) = command.spawn() else {
        return false;
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.code() == Some(0),
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(5))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// Detaches every dead `fuse.fshost*` mount (left by an fshostd that was killed) and
/// returns them. Live mounts, including those of other fshostd instances, are untouched.
pub fn detach_stale_mounts() -> Vec<KernelMount> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    parse_mountinfo(&text)
        .into_iter()
        .filter(|m| m.fstype.starts_with("fuse.fshost") && is_dead(m))
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
                id: 42,
                device: "0:39".into(),
                mountpoint: PathBuf::from("/tmp/a b"),
                fstype: "fuse.fshost-memfs".into(),
                source: "fshost:memfs".into(),
                super_options: "rw,user_id=0".into(),
            }
        );
        assert_eq!(mounts[1].fstype, "ext4");
        assert_eq!(mounts[1].mountpoint, PathBuf::from("/srv"));
    }
}
