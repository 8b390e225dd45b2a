//! The daemon upgrade's wire: how one fshostd process hands everything to its successor.
//!
//! The old process starts the new binary with one end of a `SOCK_SEQPACKET` socket pair
//! (its number in [`FD_ENV`]). Over it go: a header message (how many descriptors follow),
//! then the descriptors in batches (SCM_RIGHTS): first a memfd holding the [`Manifest`]
//! (postcard), then the control socket's listener, then per mount its `/dev/fuse`
//! connection, its mount target's two descriptors and a memfd with its instance's state.
//! The new process answers [`READY`] once every plugin is loaded and every mount resumed
//! (not yet served), or `FAILED` with the reason; then it waits for the old process to be
//! gone (end of file on the socket) before it reads from any connection.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut, Read, Seek, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};

use crate::mount::{HandedMount, TargetParts};

/// The environment variable that names the handover socket's descriptor in the successor.
pub const FD_ENV: &str = "FSHOST_HANDOVER_FD";
/// Bumped whenever the manifest changes incompatibly; a successor refuses another format.
/// 2: what INIT agreed names POSIX ACLs.
pub const FORMAT: u32 = 2;
/// Descriptors per message (the kernel allows 253).
const BATCH: usize = 200;

/// Everything the successor needs beside the descriptors.
#[derive(Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub from_pid: u32,
    pub from_version: String,
    pub socket: PathBuf,
    /// The control socket's listener, as an index of the descriptors handed over.
    pub listener: usize,
    /// Whether the old process made the socket file (and the successor removes it at stop).
    pub owns_socket: bool,
    /// Config preloads: entry → plugin name.
    pub preloaded: BTreeMap<String, String>,
    pub plugins: Vec<PluginOut>,
    pub mounts: Vec<MountOut>,
}

/// A plugin as handed over: the successor opens it again from `source`.
#[derive(Debug, Serialize, Deserialize)]
pub struct PluginOut {
    pub name: String,
    pub source: PathBuf,
    /// The private copy it was loaded from, as an index of the descriptors handed over.
    pub image: usize,
    pub generation: u32,
    pub loaded_at: (u64, u32),
}

/// A mount as handed over; `fds` index the descriptors sent after the manifest.
#[derive(Debug, Serialize, Deserialize)]
pub struct MountOut {
    pub plugin: String,
    pub options: BTreeMap<String, String>,
    pub read_only: bool,
    pub owner: u32,
    pub since: (u64, u32),
    pub kernel_id: u64,
    pub target: TargetParts,
    pub handed: HandedMount,
    pub fds: MountFds,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct MountFds {
    pub fuse: usize,
    pub parent: usize,
    pub dir: usize,
    pub state: usize,
}

/// The successor's answer when it is ready to serve.
const READY: &[u8] = b"READY";
const FAILED: &[u8] = b"FAILED:";

/// Descriptors to send, by index; the manifest's memfd goes first.
#[derive(Default)]
pub struct Outgoing {
    fds: Vec<OwnedFd>,
}

impl Outgoing {
    /// Adds a descriptor; returns its index.
    pub fn push(&mut self, fd: OwnedFd) -> usize {
        self.fds.push(fd);
        self.fds.len()
    }
}

/// A memfd to write a state or the manifest into.
pub fn memfd(name: &str) -> io::Result<File> {
    let fd = rustix::fs::memfd_create(name, rustix::fs::MemfdFlags::CLOEXEC)?;
    Ok(File::from(fd))
}

/// The old process's end: the successor, started and connected.
pub struct Successor {
    child: Child,
    socket: OwnedFd,
}

/// Starts `binary` (already opened: `exe`, so the file checked is the file run) with this
/// process's arguments and the handover socket.
pub fn start(binary: &Path, exe: &File) -> io::Result<Successor> {
    let (ours, theirs) = rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )?;
    // Only the successor's end crosses exec; nothing else is started meanwhile.
    rustix::io::fcntl_setfd(&theirs, rustix::io::FdFlags::empty())?;
    let child = Command::new(format!("/proc/self/fd/{}", exe.as_raw_fd()))
        .arg0(binary)
        .args(std::env::args_os().skip(1))
        .env(FD_ENV, theirs.as_raw_fd().to_string())
        // systemd's socket activation was for us; the listener is handed over instead.
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES")
        .spawn();
    drop(theirs);
    Ok(Successor {
        child: child?,
        socket: ours,
    })
}

impl Successor {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends the manifest and the descriptors.
    pub fn send(&mut self, manifest: &Manifest, outgoing: Outgoing) -> io::Result<()> {
        let mut file = memfd("fshost-manifest")?;
        let bytes = postcard::to_stdvec(manifest).map_err(io::Error::other)?;
        file.write_all(&bytes)?;
        let mut fds = Vec::with_capacity(outgoing.fds.len() + 1);
        fds.push(OwnedFd::from(file));
        fds.extend(outgoing.fds);
        let count = u32::try_from(fds.len()).map_err(io::Error::other)?;
        send(&self.socket, &count.to_le_bytes(), &[])?;
        for batch in fds.chunks(BATCH) {
            send(&self.socket, b"F", batch)?;
        }
        Ok(())
    }

    /// Waits until the successor is ready (Ok) or failed, died or took longer than `limit`
    /// (Err, with what it said). On Err the successor has been killed and reaped.
    pub fn wait_ready(&mut self, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        let answer = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err(format!(
                    "it did not report ready within {}s",
                    limit.as_secs()
                ));
            }
            match readable(&self.socket, left) {
                Ok(false) => continue,
                Ok(true) => {}
                Err(e) => break Err(format!("cannot wait for it: {e}")),
            }
            let mut buf = [0u8; 4096];
            break match receive(&self.socket, &mut buf, 0) {
                // Closed, or reset with our messages unread: it is gone.
                Ok((0, _)) => Err(self.exit_status()),
                Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => Err(self.exit_status()),
                Ok((n, _)) if &buf[..n] == READY => Ok(()),
                Ok((n, _)) if buf[..n].starts_with(FAILED) => {
                    Err(String::from_utf8_lossy(&buf[FAILED.len()..n]).into_owned())
                }
                Ok(_) => Err("it answered nonsense".into()),
                Err(e) => Err(format!("cannot read its answer: {e}")),
            };
        };
        if answer.is_err() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        answer
    }

    /// How the successor ended, for a message (it closed the socket without answering).
    fn exit_status(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return format!("it exited ({status}) before it was ready; see the log");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        "it closed the handover socket before it was ready".into()
    }
}

/// Waits up to `limit` for `fd` to be readable (or closed).
fn readable(fd: &OwnedFd, limit: Duration) -> io::Result<bool> {
    let mut fds = [rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN)];
    let limit = rustix::event::Timespec::try_from(limit.min(Duration::from_secs(1)))
        .map_err(io::Error::other)?;
    match rustix::event::poll(&mut fds, Some(&limit)) {
        Ok(n) => Ok(n > 0),
        Err(rustix::io::Errno::INTR) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn send(socket: &OwnedFd, data: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
    let borrowed: Vec<_> = fds.iter().map(|fd| fd.as_fd()).collect();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(BATCH))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !borrowed.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&borrowed)) {
        return Err(io::Error::other("too many descriptors for one message"));
    }
    rustix::net::sendmsg(
        socket,
        &[IoSlice::new(data)],
        &mut control,
        SendFlags::empty(),
    )?;
    Ok(())
}

/// Receives one message into `buf`, and the descriptors that came with it (at most
/// `max_fds`).
fn receive(socket: &OwnedFd, buf: &mut [u8], max_fds: usize) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(BATCH))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = rustix::net::recvmsg(
        socket,
        &mut [IoSliceMut::new(buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = message {
            fds.extend(rights);
        }
    }
    if fds.len() > max_fds {
        return Err(io::Error::other("more descriptors than announced"));
    }
    Ok((received.bytes, fds))
}

/// The successor's end: the handover socket from [`FD_ENV`], if this process was started
/// as a successor.
pub struct Predecessor {
    socket: OwnedFd,
}

/// What the predecessor sent.
pub struct Received {
    pub manifest: Manifest,
    fds: Vec<Option<OwnedFd>>,
}

impl Received {
    /// Takes descriptor `index` (each can be taken once).
    pub fn take(&mut self, index: usize) -> io::Result<OwnedFd> {
        self.fds
            .get_mut(index)
            .and_then(Option::take)
            .ok_or_else(|| io::Error::other(format!("descriptor {index} was not handed over")))
    }

    /// Reads a state memfd whole.
    pub fn read_state(&mut self, index: usize, bytes: u64) -> io::Result<Vec<u8>> {
        let mut file = File::from(self.take(index)?);
        file.rewind()?;
        let mut state = Vec::with_capacity(usize::try_from(bytes).map_err(io::Error::other)?);
        file.read_to_end(&mut state)?;
        if state.len() as u64 != bytes {
            return Err(io::Error::other("the state handed over is incomplete"));
        }
        Ok(state)
    }
}

impl Predecessor {
    /// The handover socket if this process is a successor (and clears the variable, so
    /// that nothing this process starts takes it for its own).
    pub fn from_env() -> io::Result<Option<Predecessor>> {
        let Some(value) = std::env::var_os(FD_ENV) else {
            return Ok(None);
        };
        std::env::remove_var(FD_ENV);
        let fd: i32 = value
            .to_str()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| io::Error::other(format!("{FD_ENV}={value:?} is not a descriptor")))?;
        let socket = crate::sys::inherited_socket(fd)?;
        Ok(Some(Predecessor { socket }))
    }

    /// Receives the manifest and every descriptor.
    pub fn receive(&self) -> io::Result<Received> {
        let mut header = [0u8; 16];
        let (n, _) = receive(&self.socket, &mut header, 0)?;
        let count = match header[..n].try_into() {
            Ok(bytes) => u32::from_le_bytes(bytes) as usize,
            Err(_) => return Err(io::Error::other("the handover header is malformed")),
        };
        let mut fds = Vec::with_capacity(count);
        while fds.len() < count {
            let mut byte = [0u8; 1];
            let (n, batch) = receive(&self.socket, &mut byte, count - fds.len())?;
            if n == 0 {
                return Err(io::Error::other(
                    "the old fshostd closed the handover early",
                ));
            }
            fds.extend(batch.into_iter().map(Some));
        }
        let manifest_fd = fds
            .first_mut()
            .and_then(Option::take)
            .ok_or_else(|| io::Error::other("no manifest was handed over"))?;
        let mut file = File::from(manifest_fd);
        file.rewind()?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let manifest: Manifest = postcard::from_bytes(&bytes)
            .map_err(|e| io::Error::other(format!("the manifest does not decode: {e}")))?;
        if manifest.format != FORMAT {
            return Err(io::Error::other(format!(
                "the old fshostd speaks handover format {}, this one {FORMAT}",
                manifest.format
            )));
        }
        Ok(Received { manifest, fds })
    }

    /// Tells the old process that everything is ready to serve.
    pub fn ready(&self) -> io::Result<()> {
        send(&self.socket, READY, &[])
    }

    /// Tells the old process why this one cannot take over.
    pub fn failed(&self, why: &str) {
        let mut message = FAILED.to_vec();
        message.extend_from_slice(why.as_bytes());
        message.truncate(4000);
        let _ = send(&self.socket, &message, &[]);
    }

    /// Waits until the old process is gone (its end of the socket closed at its exit).
    pub fn wait_gone(&self, limit: Duration) -> io::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the old fshostd did not exit",
                ));
            }
            if readable(&self.socket, left)? {
                let mut buf = [0u8; 64];
                if receive(&self.socket, &mut buf, 0)?.0 == 0 {
                    return Ok(());
                }
            }
        }
    }
}

/// The installed path of the running binary: `/proc/self/exe`, without the " (deleted)"
/// the kernel adds once a package upgrade has replaced the file.
pub fn installed_binary() -> io::Result<PathBuf> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    Ok(
        match exe.as_os_str().as_bytes().strip_suffix(b" (deleted)") {
            Some(path) => PathBuf::from(OsStr::from_bytes(path)),
            None => exe,
        },
    )
}

/// Seconds and nanoseconds since the epoch, for the manifest.
pub fn epoch(t: std::time::SystemTime) -> (u64, u32) {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or((0, 0), |d| (d.as_secs(), d.subsec_nanos()))
}

pub fn from_epoch((secs, nanos): (u64, u32)) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + Duration::new(secs, nanos)
}
