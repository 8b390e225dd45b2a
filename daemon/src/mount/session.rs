//! The kernel mount and its FUSE session: mount(2) with `fd=/dev/fuse` onto the resolved
//! mount point, fuser's INIT handshake, serving until the kernel ends the session.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use fuser::{Config, Session};
use nix::mount::MsFlags;

use super::link::Link;
use super::{tuning, Adapter, Backend, MountStats, MountTarget, SessionOptions};

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
    let (dir_path, below) = target.dir_path_and_mount_id()?;
    nix::mount::mount(
        Some(source.as_str()),
        &dir_path,
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
    target.mounted();
    Ok((OwnedFd::from(dev), id))
}

/// Mounts `fs` on `mountpoint` and makes the FUSE session that serves it (the kernel's INIT
/// handshake included); `Session::run` on the result serves it until it is unmounted.
/// Returns the session and the mount's kernel id.
pub fn start_session<B: Backend>(
    fs: B,
    stats: Arc<MountStats>,
    link: Arc<Link>,
    target: &MountTarget,
    read_only: bool,
    owner: (u32, u32),
    options: &SessionOptions,
) -> io::Result<(Session<Adapter<B>>, u64)> {
    let name = fs.name().to_string();
    let (fd, id) = kernel_mount(&name, target, read_only, options.allow_other, owner)?;
    // A duplicate stays with the link: a daemon upgrade hands it to the next process.
    link.keep_fd(fd.try_clone()?);
    let mut cache = options.cache.clone();
    if cache.uring {
        if let Err(why) = super::ring::available() {
            // Never agree to a ring this process cannot make (see ring.rs).
            cache.uring = false;
            link.set_transport(super::ring::Transport::Fallback(why));
        }
    }
    let adapter = Adapter::new(fs, stats, &cache, link);
    // Who may use the mount is the kernel's decision (user_id=, allow_other); fuser's own
    // filter would only let the daemon's uid in, which is wrong for a user's mount.
    let session = Session::from_fd(adapter, fd, fuser::SessionACL::All, config(options))
        .inspect_err(|_| {
            // A failed handshake leaves a dead mount behind.
            let _ = target.detach(id, true);
        })?;
    tuning::tune(target, options);
    Ok((session, id))
}

/// fuser's settings for a mount's session.
fn config(options: &SessionOptions) -> Config {
    let mut config = Config::default();
    config.n_threads = Some(options.threads);
    config
}

/// The session of a connection another fshostd initialised and handed over (a daemon
/// upgrade): no INIT handshake, the adapter keeps what that INIT agreed. Nothing is read
/// from the connection before `Session::run`.
pub fn resume_session<B: Backend>(
    fs: B,
    stats: Arc<MountStats>,
    link: Arc<Link>,
    fuse: std::os::fd::OwnedFd,
    options: &SessionOptions,
) -> Session<Adapter<B>> {
    let (major, minor) = link.agreed().map_or((7, 31), |a| a.version);
    let adapter = Adapter::new(fs, stats, &options.cache, link);
    // Who may use the mount is the kernel's decision (see `start_session`).
    Session::from_initialized_fd(
        adapter,
        fuse,
        fuser::SessionACL::All,
        config(options),
        fuser::Version(major, minor),
    )
}

/// Waits until the session `running` ends (the mount is gone).
pub fn finish_session<B: Backend>(
    running: fuser::Running<Adapter<B>>,
    target: &MountTarget,
    id: u64,
) {
    if let Err(e) = running.join() {
        // The kernel did not end the session, so the mount is still there but no longer
        // served: detach it rather than leave a dead mount behind.
        tracing::warn!(mountpoint = %target.path.display(), error = %e, "FUSE session failed; detaching the mount");
        let _ = target.detach(id, true);
    }
}
