//! FUSE over io_uring for one mount (`-o uring`, Linux 6.14+ with the `fuse` module's
//! `enable_uring` on): a thread per possible CPU, each kept on its CPU, serves that CPU's
//! queue of the connection's ring. The kernel puts a request on the queue of the CPU its
//! task runs on, so the thread that answers runs where the task waits: no wake-up of
//! another CPU (measured in BENCHMARKS.md "FUSE over io_uring": that is where it pays).
//!
//! Everything else stays as for any mount: the plugin's pool still reads the `/dev/fuse`
//! connection (forgets and interrupts never come through a ring), the
//! mount ends when its connection does, and plugin code still runs only on threads that
//! end before that end is reported (the pool joins a mount's queue threads first).
//!
//! The kernel uses the ring only once every possible CPU's queue has an entry, and holds
//! every request until then. So a process that cannot make a ring at all does not ask for
//! it at INIT ([`available`]), and if a queue cannot be had after INIT (no thread, the
//! kernel refuses it) the kernel is made to give the ring up ([`Ring::start`]): then
//! `/dev/fuse` serves. Each mount says which transport serves it ([`Transport`]).

use std::io::{self, IoSlice};
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use fuser::{Received, ReplySink, RequestBuf};

use super::budget;
use crate::sys::fuse_ring::{self, Next, Queue};

/// Whether this process can make the rings (asked before INIT): why not, for people.
pub fn available() -> Result<(), String> {
    fuse_ring::available().map_err(|e| refusal(&e))
}

/// Ring entries per queue: a queue's thread serves one request at a time; a second entry
/// lets the kernel hand it the next while it answers.
const DEPTH: usize = 2;
/// The largest request a ring mount is sent (its `max_write`; the kernel sends at most
/// `max_pages` of 4 KiB, 256 by default, per request anyway). Each entry's payload buffer
/// is this large.
pub const MAX_WRITE: u32 = 1 << 20;

/// Which transport carries a mount's requests.
#[derive(Debug, Clone, Default)]
pub enum Transport {
    /// `/dev/fuse`, as asked.
    #[default]
    Dev,
    /// io_uring: this many queues (threads), and the requests they served.
    Uring(usize, Arc<AtomicU64>),
    /// `/dev/fuse`: io_uring was asked for and could not be had, for this reason.
    Fallback(String),
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Transport::Dev => write!(f, "/dev/fuse"),
            Transport::Uring(queues, served) => write!(
                f,
                "io_uring ({queues} queues, {} requests served)",
                served.load(Ordering::Relaxed)
            ),
            Transport::Fallback(why) => write!(f, "/dev/fuse (io_uring asked for: {why})"),
        }
    }
}

/// What a ring serves: the mount's session.
pub trait Serve: Send + Sync + 'static {
    /// The mount's `/dev/fuse` connection.
    fn connection(&self) -> BorrowedFd<'_>;
    /// Serves the request in `buf`, its answer going to `sink`.
    fn dispatch_to(&self, buf: &RequestBuf, sink: Arc<dyn ReplySink>) -> io::Result<Received>;
    /// A queue failed while the connection lives: its requests would wait forever.
    fn failed(&self, error: &io::Error);
}

/// A mount's queue threads; [`Ring::join`] waits for them (they end with the connection).
pub struct Ring {
    threads: Vec<JoinHandle<()>>,
    /// Counted in the thread budget while the ring lives.
    _budget: budget::Threads,
}

impl Ring {
    /// Registers every queue of `mount`'s connection and serves it. Otherwise (`Fallback`)
    /// the kernel is made to give the ring up and `/dev/fuse` serves; a ring whose first
    /// queues were registered before a later one failed is still returned, its threads
    /// waiting for the end. `Err`: the kernel could not be told, and holds the mount's
    /// requests for good (the caller detaches it). `anyway`: the threads are taken even
    /// past the thread budget (a mount that exists already).
    pub fn start(
        mount: Arc<dyn Serve>,
        name: &str,
        anyway: bool,
    ) -> io::Result<(Option<Ring>, Transport)> {
        let queues = possible_cpus();
        let budget = if anyway {
            Ok(budget::Threads::take_anyway(queues))
        } else {
            budget::Threads::take(queues)
        };
        let budget = match budget {
            Ok(budget) => budget,
            Err((used, cap)) => {
                fuse_ring::give_up(mount.connection())?;
                let why = format!(
                    "no room for {queues} queue threads (mounts use {used} of {cap} threads)"
                );
                return Ok((None, Transport::Fallback(why)));
            }
        };
        let served = Arc::new(AtomicU64::new(0));
        let mut ring = Ring {
            threads: Vec::with_capacity(queues),
            _budget: budget,
        };
        // One queue after another: the first refusal (the same for every queue: io_uring
        // not allowed, FUSE over io_uring off) leaves no queue registered.
        for qid in 0..queues {
            let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<()>>(1);
            let (serve, served) = (Arc::clone(&mount), Arc::clone(&served));
            let spawned = std::thread::Builder::new()
                .name(format!("uring:{name}"))
                .spawn(move || serve_queue(serve, qid, served, tx));
            let registered = match spawned {
                Ok(handle) => {
                    ring.threads.push(handle);
                    rx.recv()
                        .unwrap_or_else(|_| Err(io::Error::other("queue thread lost")))
                }
                Err(e) => Err(e),
            };
            if let Err(e) = registered {
                fuse_ring::give_up(mount.connection())?;
                let why = refusal(&e);
                if qid == 0 {
                    ring.join();
                    return Ok((None, Transport::Fallback(why)));
                }
                tracing::warn!(queue = qid, error = %e, "an io_uring queue was refused after others were registered");
                return Ok((Some(ring), Transport::Fallback(why)));
            }
        }
        Ok((Some(ring), Transport::Uring(queues, served)))
    }

    /// After a crash: requests that came while no process served the ring wait on their
    /// CPU's queue, and the kernel hands a waiting request to an entry only when another
    /// is answered there. One request from each CPU (`ask` runs on a thread kept on it)
    /// starts every queue moving. Only a request the kernel sends to the mount helps: for
    /// a mount whose owner is not root, root's `statfs` is answered without asking it.
    /// The threads run no plugin code and nobody waits for them.
    pub fn nudge(queues: usize, ask: impl Fn() -> io::Result<()> + Send + Sync + 'static) {
        let ask = Arc::new(ask);
        for cpu in 0..queues {
            let ask = Arc::clone(&ask);
            let nudged = std::thread::Builder::new()
                .name("uring-nudge".into())
                .spawn(move || {
                    crate::sys::pin_to_cpu(cpu);
                    if let Err(e) = ask() {
                        tracing::warn!(cpu, error = %e, "cannot start an io_uring queue's waiting requests");
                    }
                });
            if let Err(e) = nudged {
                tracing::warn!(cpu, error = %e, "cannot start an io_uring queue's waiting requests");
            }
        }
    }

    /// Waits until every queue thread has ended (after the connection ended).
    pub fn join(self) {
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

/// Why the kernel refused a queue, for people.
fn refusal(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) => {
            "the kernel has it switched off (echo 1 > /sys/module/fuse/parameters/enable_uring)"
                .into()
        }
        Some(libc::EPERM) => {
            "io_uring is not permitted here (sysctl kernel.io_uring_disabled)".into()
        }
        Some(libc::ENOSYS) => "the kernel has no io_uring".into(),
        Some(libc::EINVAL) => format!("the kernel refused the ring ({e})"),
        _ => format!("{e}"),
    }
}

/// Queues the kernel makes: one per possible CPU (ids 0 to the highest possible).
fn possible_cpus() -> usize {
    std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| {
            s.trim()
                .rsplit([',', '-'])
                .next()
                .and_then(|last| last.parse::<usize>().ok())
        })
        .map_or(1, |last| last + 1)
}

/// One queue's thread: registers the queue (says how it went on `registered`), then serves
/// its requests until the connection ends.
fn serve_queue(
    mount: Arc<dyn Serve>,
    qid: usize,
    served: Arc<AtomicU64>,
    registered: std::sync::mpsc::SyncSender<io::Result<()>>,
) {
    crate::sys::pin_to_cpu(qid);
    let queue = Queue::register(
        mount.connection(),
        qid as u16,
        DEPTH,
        MAX_WRITE as usize + 4096,
    );
    let mut queue = match queue {
        Ok(queue) => {
            let _ = registered.send(Ok(()));
            queue
        }
        Err(e) => {
            let _ = registered.send(Err(e));
            return;
        }
    };
    let mut buf = RequestBuf::new();
    let answer = Arc::new(Answer::default());
    let result = loop {
        let i = match queue.next() {
            Ok(Next::Request(i)) => i,
            Ok(Next::Ended) => break Ok(()),
            Err(e) => break Err(e),
        };
        let (header, op, payload) = queue.request(i);
        let sink = Arc::clone(&answer) as Arc<dyn ReplySink>;
        let dispatched = buf
            .fill(&[header, op, payload])
            .and_then(|()| mount.dispatch_to(&buf, sink));
        // A request fuser cannot take is answered by nobody: EIO from here.
        let reply = match dispatched {
            Ok(_) => answer.take(),
            Err(_) => error_reply(header, libc::EIO),
        };
        served.fetch_add(1, Ordering::Relaxed);
        let committed = queue.commit(i, &reply);
        answer.give_back(reply);
        if let Err(e) = committed {
            break Err(e);
        }
    };
    if let Err(e) = result {
        mount.failed(&e);
    }
}

/// An answer `errno` to the request whose in header is `header`.
fn error_reply(header: &[u8], errno: i32) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    out.extend_from_slice(&16u32.to_ne_bytes());
    out.extend_from_slice(&(-errno).to_ne_bytes());
    out.extend_from_slice(header.get(8..16).unwrap_or(&[0; 8]));
    out
}

/// Where one request's answer lands: fuser answers through it (from the queue's thread,
/// or later from another), and the queue's thread waits for it before committing.
#[derive(Default)]
struct Answer {
    state: Mutex<(bool, Vec<u8>)>,
    sent: Condvar,
}

impl Answer {
    /// Waits for the answer and takes it.
    fn take(&self) -> Vec<u8> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while !state.0 {
            state = self.sent.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.0 = false;
        std::mem::take(&mut state.1)
    }

    /// Returns the buffer of an answer committed, to be filled by the next.
    fn give_back(&self, mut buf: Vec<u8>) {
        buf.clear();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.1.capacity() < buf.capacity() {
            state.1 = buf;
        }
    }
}

impl ReplySink for Answer {
    fn send(&self, reply: &[IoSlice<'_>]) -> io::Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.1.clear();
        for part in reply {
            state.1.extend_from_slice(part);
        }
        state.0 = true;
        self.sent.notify_one();
        Ok(())
    }
}
