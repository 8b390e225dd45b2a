//! systemd's part, played by the tests (PID 1 on these machines is not systemd): a
//! `NOTIFY_SOCKET` that takes sd_notify messages and keeps the descriptors sent with
//! `FDSTORE=1` under their `FDNAME=` (dropping them on `FDSTOREREMOVE=1`), and a way to
//! start fshostd with the kept ones as systemd does after a crash (`LISTEN_FDS`,
//! `LISTEN_FDNAMES`, `LISTEN_PID`, descriptors from 3 on).

use std::io::IoSliceMut;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};

/// What the fake systemd has received.
#[derive(Default)]
struct Received {
    /// Every message, in order.
    messages: Vec<String>,
    /// The file descriptor store: name → descriptors.
    store: Vec<(String, OwnedFd)>,
}

/// The notify socket and the descriptor store (see the module docs).
pub struct FakeSystemd {
    _dir: tempfile::TempDir,
    path: PathBuf,
    received: Arc<Mutex<Received>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeSystemd {
    pub fn new() -> FakeSystemd {
        let dir = tempfile::Builder::new()
            .prefix("fshost-systemd-")
            .tempdir()
            .expect("temporary directory");
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let received = Arc::new(Mutex::new(Received::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (received, stop) = (Arc::clone(&received), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    if let Some((text, fds)) = receive(&socket) {
                        take(&mut received.lock().unwrap(), text, fds);
                    }
                }
            })
        };
        FakeSystemd {
            _dir: dir,
            path,
            received,
            stop,
            thread: Some(thread),
        }
    }

    /// The value of `NOTIFY_SOCKET` for the daemon.
    pub fn socket(&self) -> &Path {
        &self.path
    }

    /// Every message so far.
    pub fn messages(&self) -> Vec<String> {
        self.received.lock().unwrap().messages.clone()
    }

    /// The names in the descriptor store, sorted.
    pub fn stored(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .received
            .lock()
            .unwrap()
            .store
            .iter()
            .map(|(name, _)| name.clone())
            .collect();
        names.sort();
        names
    }

    /// A command that starts `program` as systemd restarts a service: the stored
    /// descriptors at 3, 4, … with `LISTEN_FDS`, `LISTEN_FDNAMES` and `LISTEN_PID`.
    pub fn restart_command(&self, program: &Path) -> Command {
        let received = self.received.lock().unwrap();
        let (names, fds): (Vec<String>, Vec<i32>) = received
            .store
            .iter()
            .map(|(name, fd)| {
                // The child's own duplicate; ours stay in the store.
                let copy = fd.try_clone().expect("dup a stored descriptor");
                (name.clone(), std::os::fd::IntoRawFd::into_raw_fd(copy))
            })
            .unzip();
        // LISTEN_PID must be the service's own pid: a shell sets it to its own and then
        // becomes fshostd.
        let mut command = Command::new("/bin/sh");
        command
            .arg("-c")
            .arg("LISTEN_PID=$$ exec \"$0\" \"$@\"")
            .arg(program)
            .env("LISTEN_FDS", fds.len().to_string())
            .env("LISTEN_FDNAMES", names.join(":"))
            .env("NOTIFY_SOCKET", &self.path);
        let placed = fds.clone();
        // Allocated here: after fork, in a process with other threads, malloc may deadlock.
        let mut high: Vec<i32> = Vec::with_capacity(placed.len());
        // SAFETY: between fork and exec only async-signal-safe calls (fcntl, dup2, close)
        // on descriptors this process owns, and no allocation (`high` has its capacity):
        // each is first moved above the target range, then placed at 3, 4, … without
        // close-on-exec, as systemd places them.
        unsafe {
            command.pre_exec(move || {
                high.clear();
                for &fd in &placed {
                    let moved = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 1000);
                    if moved < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    high.push(moved);
                }
                for (i, &fd) in high.iter().enumerate() {
                    if libc::dup2(fd, 3 + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::close(fd);
                }
                Ok(())
            });
        }
        // The parent's duplicates close once the child has started (see `spawned`).
        RESTART_FDS.lock().unwrap().extend(fds);
        command
    }

    /// Closes the parent's duplicates made by `restart_command` (call after spawning).
    pub fn spawned(&self) {
        for fd in RESTART_FDS.lock().unwrap().drain(..) {
            // SAFETY: made by `restart_command` for this child and owned by nothing else.
            drop(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
        }
    }
}

/// Duplicates handed to a child being started, closed by [`FakeSystemd::spawned`].
static RESTART_FDS: Mutex<Vec<i32>> = Mutex::new(Vec::new());

impl Default for FakeSystemd {
    fn default() -> Self {
        FakeSystemd::new()
    }
}

impl Drop for FakeSystemd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One datagram and the descriptors that came with it, if one arrived in time.
fn receive(socket: &UnixDatagram) -> Option<(String, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; 4096];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(16))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        socket,
        &mut [IoSliceMut::new(&mut buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .ok()?;
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = message {
            fds.extend(rights);
        }
    }
    Some((String::from_utf8_lossy(&buf[..got.bytes]).into_owned(), fds))
}

/// Applies one message to the store, as systemd does.
fn take(received: &mut Received, text: String, fds: Vec<OwnedFd>) {
    let field = |key: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(key).map(str::to_owned))
    };
    let name = field("FDNAME=").unwrap_or_else(|| "stored".into());
    if field("FDSTORE=").as_deref() == Some("1") {
        received
            .store
            .extend(fds.into_iter().map(|fd| (name.clone(), fd)));
    } else if field("FDSTOREREMOVE=").as_deref() == Some("1") {
        received.store.retain(|(stored, _)| stored != &name);
    }
    received.messages.push(text);
}
