//! The few OS calls that no dependency wraps. Every `unsafe` block says why it is sound.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// `SO_PEERGROUPS` (Linux 4.13+; 59 on every architecture fshost builds for): the
/// supplementary groups of the peer, as the kernel recorded them when it connected.
const SO_PEERGROUPS: libc::c_int = 59;

/// The supplementary groups the peer of a Unix socket had when it connected. Taken from
/// the kernel, not from `/proc/<pid>`, which may by now describe another process.
pub fn peer_groups(socket: impl AsFd) -> io::Result<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: `groups` is a live, writable buffer of `len` bytes; the kernel writes at
        // most `len` bytes and stores the size it needs (or wrote) in `len`.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_fd().as_raw_fd(),
                libc::SOL_SOCKET,
                SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let count = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(count);
            return Ok(groups);
        }
        let err = io::Error::last_os_error();
        // ERANGE: the buffer was too small, and `len` now says how big it must be.
        if err.raw_os_error() != Some(libc::ERANGE) || count <= groups.len() {
            return Err(err);
        }
        groups.resize(count, 0);
    }
}

/// Adopts a backing id (FUSE passthrough) that the previous server of `session`'s
/// connection registered; dropping the result closes it. The caller passes each id that
/// process handed over exactly once, after that process is gone.
pub fn adopt_backing_id<FS: fuser::Filesystem>(
    session: &fuser::Session<FS>,
    raw: u32,
) -> fuser::BackingId {
    // SAFETY: `raw` was registered on this very connection (the handed-over descriptor
    // `session` serves) and nothing else owns it any more: the process that registered it
    // has exited, and each handed id is adopted once. The worst a wrong id can do is make
    // the kernel refuse the later close (EINVAL, logged by fuser).
    unsafe { session.wrap_backing(raw) }
}

/// Takes ownership of descriptor `fd`, inherited from the process that started us (the
/// daemon upgrade's handover socket), after checking that it is an open socket; it is
/// made close-on-exec again.
pub fn inherited_socket(fd: i32) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: fstat only reads the descriptor table; `stat` is a plain out-parameter.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above; an invalid `fd` makes fstat fail with EBADF, nothing else.
    if fd < 3 || unsafe { libc::fstat(fd, &mut stat) } != 0 {
        return Err(io::Error::other(format!(
            "descriptor {fd} handed over is not open"
        )));
    }
    if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(io::Error::other(format!(
            "descriptor {fd} handed over is not a socket"
        )));
    }
    // SAFETY: `fd` is open (checked above), was left to us by the process that started us
    // for exactly this use, and nothing else in this process owns it: it is read from the
    // environment once, at start, before any other descriptor is made.
    let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC)?;
    Ok(owned)
}

/// Ends the process at once, without atexit handlers or library destructors: after a
/// daemon upgrade the old process must not unmount, unload or tear down anything (its
/// successor serves the same connections), and its workers are still parked.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: `_exit` ends the process without touching any state of ours; it cannot fail
    // and does not return.
    unsafe { libc::_exit(code) }
}

/// The descriptors systemd passed (`LISTEN_FDS`, named by `LISTEN_FDNAMES`): a socket
/// activation's listener, and the FUSE connections kept in its store before a crash. The
/// variables are cleared, so that nothing this process starts takes them for its own.
/// Call before any other thread exists.
pub fn systemd_fds() -> io::Result<Vec<(std::os::fd::OwnedFd, String)>> {
    use std::os::fd::FromRawFd;
    // SAFETY: called from main before the async runtime or any other thread exists, which
    // is what clearing the environment needs.
    let fds = unsafe { sd_notify::listen_fds_with_names_and_unset_env() }?;
    Ok(fds
        .map(|(fd, name)| {
            // SAFETY: systemd passed these descriptors to this process (LISTEN_PID is ours,
            // checked by sd_notify) for it to own; nothing else here has taken them.
            (unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }, name)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_pair_reports_our_own_groups() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut theirs = peer_groups(&a).unwrap();
        let mut ours: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        theirs.sort();
        ours.sort();
        ours.dedup();
        theirs.dedup();
        assert_eq!(theirs, ours);
    }
}
