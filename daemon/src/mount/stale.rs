//! Dead mounts left by a killed fshostd: found at start (asked as someone the kernel lets
//! in) and detached; live mounts, also other daemons', are never touched.

use std::io;
use std::path::Path;
use std::sync::mpsc;

use nix::mount::{umount2, MntFlags};

use super::{parse_mountinfo, KernelMount};

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
