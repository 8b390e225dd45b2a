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

/// Keeps the calling thread on CPU `cpu` (best effort: a CPU outside the process's allowed
/// set is refused, and the thread then runs anywhere).
pub fn pin_to_cpu(cpu: usize) {
    if cpu >= libc::CPU_SETSIZE as usize {
        return;
    }
    // SAFETY: `cpu_set_t` is plain data and all zeroes is the empty set; CPU_SET writes
    // inside it (cpu < CPU_SETSIZE, checked above); sched_setaffinity reads `size_of` bytes.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let _ = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// FUSE over io_uring (Linux 6.14+): one queue of a connection's ring, with its entries'
/// buffers. The kernel queues a request on the queue of the CPU its task runs on and
/// writes it into the buffers of an entry registered there; we answer in the same buffers
/// and commit, which also fetches the next request for the entry.
pub mod fuse_ring {
    use std::collections::VecDeque;
    use std::io;
    use std::os::fd::{AsRawFd, BorrowedFd};

    use io_uring::{cqueue, opcode, squeue, types, IoUring};

    const CMD_REGISTER: u32 = 1;
    const CMD_COMMIT_AND_FETCH: u32 = 2;
    /// `struct fuse_uring_req_header`: in/out header (128 bytes), the operation's header
    /// (128), then `fuse_uring_ent_in_out` (flags, commit id, payload size).
    const HEADER: usize = 288;
    /// Where the operation's header starts in an entry's header buffer.
    const OP_IN: usize = 128;
    const COMMIT_ID: usize = 264;
    const PAYLOAD_SIZE: usize = 272;

    /// One entry's buffers; boxed, so that they stay where the kernel was told they are.
    struct Entry {
        header: Box<[u8; HEADER]>,
        payload: Box<[u8]>,
        iov: Box<[libc::iovec; 2]>,
    }

    // SAFETY: the iovec's raw pointers point into the entry's own boxes, which move with it.
    unsafe impl Send for Entry {}

    /// A queue: its ring (on which `/dev/fuse` is registered as fixed file 0) and entries.
    /// Dropping it closes the ring, which the kernel takes as the end of its entries.
    pub struct Queue {
        // Declared first: closed before the buffers it names are freed.
        ring: Ring,
        entries: Vec<Entry>,
        qid: u16,
        /// Completions seen but not yet handed out.
        ready: VecDeque<(usize, i32)>,
    }

    /// What [`Queue::next`] gave.
    pub enum Next {
        /// Entry `i` holds a request.
        Request(usize),
        /// The connection ended (unmounted or aborted): no request will come.
        Ended,
    }

    impl Queue {
        /// Registers `depth` entries of `payload` bytes for queue `qid` of the connection
        /// `dev`. Fails if the kernel refuses (io_uring not allowed, FUSE over io_uring not
        /// agreed or switched off, a payload smaller than the connection's largest request).
        pub fn register(
            dev: BorrowedFd<'_>,
            qid: u16,
            depth: usize,
            payload: usize,
        ) -> io::Result<Queue> {
            let ring = ring_on(dev, depth as u32)?;
            let entries: Vec<Entry> = (0..depth)
                .map(|_| {
                    let mut header = Box::new([0u8; HEADER]);
                    let mut payload = vec![0u8; payload].into_boxed_slice();
                    let iov = Box::new([
                        libc::iovec {
                            iov_base: header.as_mut_ptr().cast(),
                            iov_len: HEADER,
                        },
                        libc::iovec {
                            iov_base: payload.as_mut_ptr().cast(),
                            iov_len: payload.len(),
                        },
                    ]);
                    Entry {
                        header,
                        payload,
                        iov,
                    }
                })
                .collect();
            let mut queue = Queue {
                ring,
                entries,
                qid,
                ready: VecDeque::new(),
            };
            for i in 0..depth {
                let sqe = command(CMD_REGISTER, qid, 0, Some(&queue.entries[i].iov));
                queue.push(sqe.user_data(i as u64))?;
            }
            queue.ring.submit()?;
            // The kernel refuses a registration at once; an accepted one completes only
            // when a request comes.
            let done: Vec<(usize, i32)> = queue
                .ring
                .completion()
                .map(|c| (c.user_data() as usize, c.result()))
                .collect();
            if let Some(&(_, e)) = done.iter().find(|(_, r)| *r < 0) {
                return Err(io::Error::from_raw_os_error(-e));
            }
            queue.ready.extend(done);
            Ok(queue)
        }

        fn push(&mut self, sqe: squeue::Entry128) -> io::Result<()> {
            // SAFETY: the buffers the SQE names (an entry's header, payload and iovecs) are
            // boxed in `self.entries`, which the ring never outlives (dropped after it).
            unsafe { self.ring.submission().push(&sqe) }
                .map_err(|_| io::Error::other("io_uring submission queue full"))
        }

        /// Waits for the next entry with a request (submitting the commits pushed before).
        pub fn next(&mut self) -> io::Result<Next> {
            loop {
                if let Some((i, result)) = self.ready.pop_front() {
                    return match result {
                        0.. if i < self.entries.len() => Ok(Next::Request(i)),
                        0.. => Err(io::Error::other("completion of an unknown ring entry")),
                        e if [
                            libc::ENOTCONN,
                            libc::ENODEV,
                            libc::ECONNABORTED,
                            libc::ECANCELED,
                        ]
                        .contains(&-e) =>
                        {
                            Ok(Next::Ended)
                        }
                        e => Err(io::Error::from_raw_os_error(-e)),
                    };
                }
                match self.ring.submit_and_wait(1) {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                    Err(e) => return Err(e),
                }
                let done = self
                    .ring
                    .completion()
                    .map(|c| (c.user_data() as usize, c.result()));
                self.ready.extend(done);
            }
        }

        /// The request in entry `i`: the in header and the operation's header (`in_len`
        /// bytes together), and the payload.
        pub fn request(&self, i: usize) -> (&[u8], &[u8], &[u8]) {
            let e = &self.entries[i];
            let h = &e.header[..];
            let total = u32::from_ne_bytes(h[0..4].try_into().unwrap_or_default()) as usize;
            let payload = u32::from_ne_bytes(
                h[PAYLOAD_SIZE..PAYLOAD_SIZE + 4]
                    .try_into()
                    .unwrap_or_default(),
            ) as usize;
            let payload = payload.min(e.payload.len());
            // fuse_in_header is 40 bytes; the operation's header is the rest of the length.
            let op = total.saturating_sub(40 + payload).min(OP_IN);
            (&h[..40], &h[OP_IN..OP_IN + op], &e.payload[..payload])
        }

        /// Answers the request in entry `i` with `reply` (out header and data, as it would
        /// be written to `/dev/fuse`) and asks for the entry's next request.
        pub fn commit(&mut self, i: usize, reply: &[u8]) -> io::Result<()> {
            let e = &mut self.entries[i];
            let (out, data) = reply.split_at(reply.len().min(16));
            if data.len() > e.payload.len() {
                return Err(io::Error::other("answer larger than the ring entry"));
            }
            e.header[..out.len()].copy_from_slice(out);
            e.payload[..data.len()].copy_from_slice(data);
            e.header[PAYLOAD_SIZE..PAYLOAD_SIZE + 4]
                .copy_from_slice(&(data.len() as u32).to_ne_bytes());
            let commit_id = u64::from_ne_bytes(
                e.header[COMMIT_ID..COMMIT_ID + 8]
                    .try_into()
                    .unwrap_or_default(),
            );
            let sqe = command(CMD_COMMIT_AND_FETCH, self.qid, commit_id, None);
            self.push(sqe.user_data(i as u64))
        }
    }

    type Ring = IoUring<squeue::Entry128, cqueue::Entry>;

    /// A ring of `depth` 128-byte SQEs (and twice the completions) with `dev` as its fixed
    /// file 0.
    fn ring_on(dev: BorrowedFd<'_>, depth: u32) -> io::Result<Ring> {
        let ring = Ring::builder().setup_cqsize(depth * 2).build(depth)?;
        ring.submitter().register_files(&[dev.as_raw_fd()])?;
        Ok(ring)
    }

    /// Whether this process may make a ring with 128-byte SQEs at all (io_uring may be
    /// missing, or forbidden: `kernel.io_uring_disabled`, seccomp). Asked before INIT: once
    /// the kernel agreed to FUSE over io_uring, it holds every request until the ring is
    /// complete or a registration fails, so a process that cannot make a ring must not ask.
    pub fn available() -> io::Result<()> {
        Ring::builder().build(1).map(drop)
    }

    /// Makes the kernel give up the ring of connection `dev` and serve it through
    /// `/dev/fuse` (as long as the ring is not complete): a registration the kernel must
    /// refuse (a queue id past the last CPU), after which it turns FUSE over io_uring off
    /// for the connection and lets the requests it held go.
    pub fn give_up(dev: BorrowedFd<'_>) -> io::Result<()> {
        let mut ring = ring_on(dev, 1)?;
        let sqe = command(CMD_REGISTER, u16::MAX, 0, None);
        // SAFETY: the SQE names no buffer (the kernel refuses the queue id before it
        // would read the entry's iovecs).
        unsafe { ring.submission().push(&sqe) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        ring.submit_and_wait(1)?;
        let result = ring.completion().next().map(|c| c.result());
        match result {
            Some(r) if r < 0 => Ok(()),
            _ => Err(io::Error::other(
                "the kernel accepted a queue it should refuse",
            )),
        }
    }

    /// A 128-byte URING_CMD SQE for `/dev/fuse` (fixed file 0) carrying `fuse_uring_cmd_req`
    /// (flags, commit id, queue id); `iov`: the entry's buffers, for a registration.
    fn command(
        op: u32,
        qid: u16,
        commit_id: u64,
        iov: Option<&[libc::iovec; 2]>,
    ) -> squeue::Entry128 {
        let mut cmd = [0u8; 80];
        cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
        cmd[16..18].copy_from_slice(&qid.to_ne_bytes());
        let mut uring_cmd = opcode::UringCmd80::new(types::Fixed(0), op).cmd(cmd);
        if let Some(iov) = iov {
            uring_cmd = uring_cmd.addr(Some(iov.as_ptr() as u64));
        }
        let sqe = uring_cmd.build();
        if iov.is_none() {
            return sqe;
        }
        // io-uring 0.7 sets no `len`; the kernel wants the iovec count there (2).
        // SAFETY: `Entry128` is `repr(C)`, 128 bytes: the kernel's `io_uring_sqe` (whose
        // `len` is the u32 at byte 24) followed by its 64 command bytes; every bit pattern
        // is a valid value of it.
        let mut raw: [u8; 128] = unsafe { std::mem::transmute(sqe) };
        raw[24..28].copy_from_slice(&2u32.to_ne_bytes());
        // SAFETY: as above, back from the same bytes.
        unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(raw) }
    }
}
