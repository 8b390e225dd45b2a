//! Dead mounts left by a killed fshostd: found at start (asked as someone the kernel lets
//! in) and detached; live mounts, also other daemons', are never touched.

use std::io;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{answers_enotconn, detach_mount_at, kernel_mounts, KernelMount};

/// [`answers_enotconn`] as user `uid:gid` (no supplementary groups), for `--probe-dead`:
/// the process drops root for good first. Call it only from a single-threaded process.
pub fn answers_enotconn_as(path: &Path, id: u64, owner: &str) -> io::Result<bool> {
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
    Ok(answers_enotconn(path, id))
}

/// Whether a FUSE mount is dead, asked by a child process (`fshostd --probe-dead PATH
/// --mount-id ID`), so that a mount that hangs cannot hang the daemon: one that does not
/// answer within a second is left alone (slow is not dead). The kernel answers no one but
/// the owner of a mount without `allow_other` (root gets zeroes, not ENOTCONN), so for such
/// a mount the child becomes its owner first (`--as UID:GID`).
fn is_dead(mount: &KernelMount) -> bool {
    let Ok(exe) = std::env::current_exe() else {
        return false;
    };
    let mut command = Command::new(exe);
    command
        .arg("--probe-dead")
        .arg(&mount.mountpoint)
        .arg("--mount-id")
        .arg(mount.id.to_string());
    let me = nix::unistd::geteuid().as_raw();
    if let (Some(uid), Some(gid), false) = mount.fuse_access() {
        if uid != me {
            command.arg("--as").arg(format!("{uid}:{gid}"));
        }
    }
    command
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let Ok(mut child) = command.spawn() else {
        return false;
    };
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.code() == Some(0),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// Detaches every dead `fuse.fshost*` mount (left by an fshostd that was killed) and
/// returns them. Live mounts, including those of other fshostd instances, are untouched;
/// each is detached by its kernel id, through a path that follows no symlink.
pub fn detach_stale_mounts() -> Vec<KernelMount> {
    kernel_mounts()
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m.fstype.starts_with("fuse.fshost") && is_dead(m))
        .filter(|m| match detach_mount_at(&m.mountpoint, m.id, true) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(mountpoint = %m.mountpoint.display(), error = %e, "cannot detach stale mount");
                false
            }
        })
        .collect()
}
