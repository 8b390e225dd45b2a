//! What the transport of FUSE requests costs, `/dev/fuse` against io_uring (issue 16 item
//! 3): one tiny in-memory file system (directories and empty files: create, lookup,
//! getattr, readdir, unlink, mkdir, rmdir), served either by threads reading and writing
//! `/dev/fuse` or by one io_uring queue per CPU (FUSE-over-io_uring, Linux 6.14+, the `fuse`
//! module's `enable_uring`). The file system code is the same for both, so the difference is
//! the transport alone. A measuring tool, not part of fshost: `tests/bench/uring` runs the
//! benchmark's metadata pass on it both ways.
//!
//! Usage: `fuse-transport MOUNTPOINT dev|uring|uring-pinned [TTL_SECS]` (as root;
//! `uring-pinned` keeps each queue's thread on its CPU, as libfuse does; entries and attributes
//! cached for TTL_SECS, default 60; 0 makes every stat a round trip); serves until
//! unmounted.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{IoSlice, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

const FUSE_LOOKUP: u32 = 1;
const FUSE_FORGET: u32 = 2;
const FUSE_GETATTR: u32 = 3;
const FUSE_SETATTR: u32 = 4;
const FUSE_MKDIR: u32 = 9;
const FUSE_UNLINK: u32 = 10;
const FUSE_RMDIR: u32 = 11;
const FUSE_OPEN: u32 = 14;
const FUSE_STATFS: u32 = 17;
const FUSE_RELEASE: u32 = 18;
const FUSE_FLUSH: u32 = 25;
const FUSE_INIT: u32 = 26;
const FUSE_OPENDIR: u32 = 27;
const FUSE_READDIR: u32 = 28;
const FUSE_RELEASEDIR: u32 = 29;
const FUSE_INTERRUPT: u32 = 36;
const FUSE_DESTROY: u32 = 38;
const FUSE_BATCH_FORGET: u32 = 42;
const FUSE_CREATE: u32 = 35;

const FUSE_ASYNC_READ: u32 = 1 << 0;
const FUSE_BIG_WRITES: u32 = 1 << 5;
const FUSE_PARALLEL_DIROPS: u32 = 1 << 18;
const FUSE_MAX_PAGES: u32 = 1 << 22;
const FUSE_INIT_EXT: u32 = 1 << 30;
/// `FUSE_OVER_IO_URING` is bit 41 of the 64 flags: bit 9 of `flags2`.
const FUSE_OVER_IO_URING_FLAGS2: u32 = 1 << 9;

const FUSE_IO_URING_CMD_REGISTER: u32 = 1;
const FUSE_IO_URING_CMD_COMMIT_AND_FETCH: u32 = 2;
/// `struct fuse_uring_req_header`: in/out header (128), op header (128), ring entry (32).
const RING_HEADER: usize = 288;
const MAX_WRITE: usize = 128 << 10;
const PAYLOAD: usize = MAX_WRITE + 4096;
const QUEUE_DEPTH: usize = 8;
const IN_HEADER: usize = 40;

/// How long the kernel may cache entries and attributes (seconds).
static TTL_SECS: AtomicU64 = AtomicU64::new(60);

fn ttl() -> u64 {
    TTL_SECS.load(Ordering::Relaxed)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(b[at..at + 8].try_into().unwrap())
}

/// The name that ends a request's arguments (NUL-terminated).
fn name_at(b: &[u8], at: usize) -> String {
    let rest = &b[at.min(b.len())..];
    let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end]).into_owned()
}

struct Node {
    dir: bool,
    children: BTreeMap<String, u64>,
}

/// The file system: directories and empty files, in memory.
struct Fs {
    nodes: HashMap<u64, Node>,
    next: u64,
}

/// An answer: an errno, or the bytes after the out header.
type Answer = Result<Vec<u8>, i32>;

impl Fs {
    fn new() -> Fs {
        let root = Node {
            dir: true,
            children: BTreeMap::new(),
        };
        Fs {
            nodes: HashMap::from([(1, root)]),
            next: 2,
        }
    }

    fn attr(&self, ino: u64) -> Option<Vec<u8>> {
        let node = self.nodes.get(&ino)?;
        let mut a = Vec::with_capacity(88);
        let mode: u32 = if node.dir { 0o40755 } else { 0o100644 };
        for v in [ino, 0, 0, 0, 0, 0] {
            a.extend_from_slice(&v.to_ne_bytes());
        }
        let nlink: u32 = if node.dir { 2 } else { 1 };
        for v in [0u32, 0, 0, mode, nlink, 0, 0, 0, 4096, 0] {
            a.extend_from_slice(&v.to_ne_bytes());
        }
        Some(a)
    }

    fn entry(&self, ino: u64) -> Vec<u8> {
        let mut e = Vec::with_capacity(128);
        for v in [ino, 0, ttl(), ttl()] {
            e.extend_from_slice(&v.to_ne_bytes());
        }
        e.extend_from_slice(&[0u8; 8]);
        e.extend_from_slice(&self.attr(ino).unwrap());
        e
    }

    fn make(&mut self, parent: u64, name: String, dir: bool) -> Result<u64, i32> {
        let ino = self.next;
        let p = self.nodes.get_mut(&parent).ok_or(libc::ENOENT)?;
        if p.children.contains_key(&name) {
            return Err(libc::EEXIST);
        }
        p.children.insert(name, ino);
        self.next += 1;
        self.nodes.insert(
            ino,
            Node {
                dir,
                children: BTreeMap::new(),
            },
        );
        Ok(ino)
    }

    fn remove(&mut self, parent: u64, name: &str) -> Answer {
        let p = self.nodes.get_mut(&parent).ok_or(libc::ENOENT)?;
        let ino = p.children.remove(name).ok_or(libc::ENOENT)?;
        self.nodes.remove(&ino);
        Ok(Vec::new())
    }

    /// Answers one request (`req`: in header and arguments); None: no answer (forget).
    fn answer(&mut self, req: &[u8]) -> Option<Answer> {
        let opcode = u32_at(req, 4);
        let ino = u64_at(req, 16);
        let args = &req[IN_HEADER..];
        let open_out = || Ok(vec![0u8; 16]);
        Some(match opcode {
            FUSE_FORGET | FUSE_BATCH_FORGET | FUSE_INTERRUPT => return None,
            FUSE_LOOKUP => {
                let name = name_at(args, 0);
                match self.nodes.get(&ino).and_then(|n| n.children.get(&name)) {
                    Some(&child) => Ok(self.entry(child)),
                    None => Err(libc::ENOENT),
                }
            }
            FUSE_GETATTR | FUSE_SETATTR => match self.attr(ino) {
                Some(attr) => {
                    let mut out = Vec::with_capacity(104);
                    out.extend_from_slice(&ttl().to_ne_bytes());
                    out.extend_from_slice(&[0u8; 8]);
                    out.extend_from_slice(&attr);
                    Ok(out)
                }
                None => Err(libc::ENOENT),
            },
            FUSE_CREATE => {
                // fuse_create_in (16 bytes), then the name.
                match self.make(ino, name_at(args, 16), false) {
                    Ok(child) => {
                        let mut out = self.entry(child);
                        out.extend_from_slice(&[0u8; 16]);
                        Ok(out)
                    }
                    Err(e) => Err(e),
                }
            }
            FUSE_MKDIR => match self.make(ino, name_at(args, 8), true) {
                Ok(child) => Ok(self.entry(child)),
                Err(e) => Err(e),
            },
            FUSE_UNLINK | FUSE_RMDIR => self.remove(ino, &name_at(args, 0)),
            FUSE_OPEN | FUSE_OPENDIR => open_out(),
            FUSE_RELEASE | FUSE_RELEASEDIR | FUSE_FLUSH => Ok(Vec::new()),
            FUSE_STATFS => Ok(vec![0u8; 80]),
            FUSE_READDIR => {
                let offset = u64_at(args, 8) as usize;
                let size = u32_at(args, 16) as usize;
                let Some(node) = self.nodes.get(&ino) else {
                    return Some(Err(libc::ENOENT));
                };
                let mut out = Vec::new();
                for (i, (name, &child)) in node.children.iter().enumerate().skip(offset) {
                    let len = (24 + name.len()).div_ceil(8) * 8;
                    if out.len() + len > size {
                        break;
                    }
                    let kind: u32 = if self.nodes[&child].dir { 4 } else { 8 };
                    out.extend_from_slice(&child.to_ne_bytes());
                    out.extend_from_slice(&(i as u64 + 1).to_ne_bytes());
                    out.extend_from_slice(&(name.len() as u32).to_ne_bytes());
                    out.extend_from_slice(&kind.to_ne_bytes());
                    out.extend_from_slice(name.as_bytes());
                    out.resize(out.len().div_ceil(8) * 8, 0);
                }
                Ok(out)
            }
            _ => Err(libc::ENOSYS),
        })
    }
}

/// The out header and the answer's bytes as one reply.
fn reply_header(unique: u64, answer: &Answer) -> [u8; 16] {
    let (error, len) = match answer {
        Ok(body) => (0i32, 16 + body.len()),
        Err(e) => (-e, 16),
    };
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
    h[4..8].copy_from_slice(&error.to_ne_bytes());
    h[8..16].copy_from_slice(&unique.to_ne_bytes());
    h
}

fn write_reply(dev: &File, unique: u64, answer: &Answer) -> std::io::Result<()> {
    let header = reply_header(unique, answer);
    let body: &[u8] = answer.as_deref().unwrap_or(&[]);
    let mut dev = dev;
    dev.write_vectored(&[IoSlice::new(&header), IoSlice::new(body)])
        .map(drop)
}

/// Reads INIT and answers it, asking for io_uring if `uring`.
fn init(dev: &File, uring: bool) {
    let mut buf = vec![0u8; PAYLOAD + 4096];
    let n = (&*dev).read(&mut buf).expect("read INIT");
    let req = &buf[..n];
    assert_eq!(u32_at(req, 4), FUSE_INIT, "the first request is INIT");
    let unique = u64_at(req, 8);
    let args = &req[IN_HEADER..];
    let (major, minor, readahead) = (u32_at(args, 0), u32_at(args, 4), u32_at(args, 8));
    assert!(
        major == 7 && minor >= 42,
        "kernel protocol 7.{minor} has no io_uring"
    );
    let mut out = Vec::with_capacity(64);
    let flags = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_PARALLEL_DIROPS | FUSE_MAX_PAGES;
    for v in [7u32, 42, readahead, flags | FUSE_INIT_EXT] {
        out.extend_from_slice(&v.to_ne_bytes());
    }
    out.extend_from_slice(&16u16.to_ne_bytes()); // max_background
    out.extend_from_slice(&12u16.to_ne_bytes()); // congestion_threshold
    out.extend_from_slice(&(MAX_WRITE as u32).to_ne_bytes());
    out.extend_from_slice(&1u32.to_ne_bytes()); // time_gran
    out.extend_from_slice(&((MAX_WRITE / 4096) as u16).to_ne_bytes()); // max_pages
    out.extend_from_slice(&0u16.to_ne_bytes()); // map_alignment
    let flags2 = if uring { FUSE_OVER_IO_URING_FLAGS2 } else { 0 };
    out.extend_from_slice(&flags2.to_ne_bytes());
    out.resize(64, 0);
    write_reply(dev, unique, &Ok(out)).expect("answer INIT");
}

/// Serves requests read from `/dev/fuse` until the mount goes.
fn serve_dev(dev: Arc<File>, fs: Arc<Mutex<Fs>>) {
    let mut buf = vec![0u8; PAYLOAD + 4096];
    loop {
        let n = match (&*dev).read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => std::process::exit(0),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => panic!("read /dev/fuse: {e}"),
        };
        let req = &buf[..n];
        if u32_at(req, 4) == FUSE_DESTROY {
            std::process::exit(0);
        }
        let answer = fs.lock().unwrap().answer(req);
        if let Some(answer) = answer {
            let _ = write_reply(&dev, u64_at(req, 8), &answer);
        }
    }
}

/// One ring entry's buffers, registered with the kernel for the entry's life.
struct Entry {
    header: Box<[u8; RING_HEADER]>,
    payload: Vec<u8>,
    iov: Box<[libc::iovec; 2]>,
}

/// A SQE128 URING_CMD for `/dev/fuse` (fixed file 0) with `struct fuse_uring_cmd_req`.
fn fuse_cmd(
    cmd_op: u32,
    qid: u16,
    commit_id: u64,
    iov: Option<&[libc::iovec; 2]>,
) -> squeue::Entry128 {
    let mut cmd = [0u8; 80];
    cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
    cmd[16..18].copy_from_slice(&qid.to_ne_bytes());
    let mut op = opcode::UringCmd80::new(types::Fixed(0), cmd_op).cmd(cmd);
    if let Some(iov) = iov {
        op = op.addr(Some(iov.as_ptr() as u64));
    }
    let entry = op.build();
    if iov.is_none() {
        return entry;
    }
    // The crate sets no `len`; the kernel wants the iovec count there (2: header, payload).
    // SAFETY: `Entry128` is `repr(C)`, 128 bytes: the kernel's `io_uring_sqe` (whose `len`
    // is the u32 at byte 24) and its 64 bytes of command; any bytes are a valid value.
    let mut raw: [u8; 128] = unsafe { std::mem::transmute(entry) };
    raw[24..28].copy_from_slice(&2u32.to_ne_bytes());
    // SAFETY: as above, back from the same bytes.
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(raw) }
}

/// Keeps the calling thread on CPU `cpu`, as libfuse does with its queue threads: the
/// kernel queues a task's request on the queue of the CPU the task runs on, so the thread
/// that answers runs where the task waits.
fn pin_to(cpu: usize) {
    // SAFETY: `cpu_set_t` is plain data, zeroed is the empty set; CPU_SET writes within it
    // (cpu < CPU_SETSIZE, checked); sched_setaffinity reads `size_of` bytes of it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu < libc::CPU_SETSIZE as usize {
            libc::CPU_SET(cpu, &mut set);
            let _ = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
}

/// Serves queue `qid` (the requests of tasks on CPU `qid`) through io_uring.
fn serve_ring(dev: Arc<File>, fs: Arc<Mutex<Fs>>, qid: u16, pin: bool) {
    if pin {
        pin_to(qid as usize);
    }
    let mut ring: IoUring<squeue::Entry128, cqueue::Entry> = IoUring::builder()
        .setup_cqsize(QUEUE_DEPTH as u32 * 2)
        .build(QUEUE_DEPTH as u32)
        .expect("io_uring with 128-byte SQEs");
    ring.submitter()
        .register_files(&[dev.as_raw_fd()])
        .expect("register /dev/fuse");
    let mut entries: Vec<Entry> = (0..QUEUE_DEPTH)
        .map(|_| {
            let mut header = Box::new([0u8; RING_HEADER]);
            let mut payload = vec![0u8; PAYLOAD];
            let iov = Box::new([
                libc::iovec {
                    iov_base: header.as_mut_ptr().cast(),
                    iov_len: RING_HEADER,
                },
                libc::iovec {
                    iov_base: payload.as_mut_ptr().cast(),
                    iov_len: PAYLOAD,
                },
            ]);
            Entry {
                header,
                payload,
                iov,
            }
        })
        .collect();
    for (i, entry) in entries.iter().enumerate() {
        let sqe =
            fuse_cmd(FUSE_IO_URING_CMD_REGISTER, qid, 0, Some(&entry.iov)).user_data(i as u64);
        // SAFETY: the entry's buffers and iovecs live in `entries`, which outlives the ring's
        // use of them (this function serves until the process exits).
        unsafe { ring.submission().push(&sqe).expect("room for every entry") };
    }
    let mut request = vec![0u8; RING_HEADER + PAYLOAD];
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => panic!("io_uring_enter: {e}"),
        }
        let done: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (i, result) in done {
            if result < 0 {
                // The mount went (ENOTCONN), or the kernel refused the queue.
                if result == -libc::ENOTCONN || result == -libc::ENODEV {
                    std::process::exit(0);
                }
                panic!("ring entry {i}: errno {}", -result);
            }
            let entry = &mut entries[i as usize];
            let h = &entry.header;
            let total = u32_at(&h[..], 0) as usize;
            let unique = u64_at(&h[..], 8);
            let commit_id = u64_at(&h[..], 264);
            let payload_sz = u32_at(&h[..], 272) as usize;
            let op_len = total - IN_HEADER - payload_sz;
            // The request as /dev/fuse would give it: header, op header, payload.
            request.clear();
            request.extend_from_slice(&h[..IN_HEADER]);
            request.extend_from_slice(&h[128..128 + op_len]);
            request.extend_from_slice(&entry.payload[..payload_sz]);
            let answer = fs
                .lock()
                .unwrap()
                .answer(&request)
                .unwrap_or(Err(libc::ENOSYS));
            let header = reply_header(unique, &answer);
            let body: &[u8] = answer.as_deref().unwrap_or(&[]);
            entry.header[..16].copy_from_slice(&header);
            entry.payload[..body.len()].copy_from_slice(body);
            entry.header[272..276].copy_from_slice(&(body.len() as u32).to_ne_bytes());
            let sqe =
                fuse_cmd(FUSE_IO_URING_CMD_COMMIT_AND_FETCH, qid, commit_id, None).user_data(i);
            // SAFETY: as at registration; the kernel reads the answer from the same buffers.
            unsafe { ring.submission().push(&sqe).expect("an entry's slot") };
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(mountpoint), Some(mode)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: fuse-transport MOUNTPOINT dev|uring|uring-pinned [TTL_SECS]");
        std::process::exit(2);
    };
    if let Some(ttl) = args.get(3).and_then(|t| t.parse().ok()) {
        TTL_SECS.store(ttl, Ordering::Relaxed);
    }
    // "uring-pinned": each queue's thread kept on its CPU.
    let uring = mode.starts_with("uring");
    let pin = mode == "uring-pinned";
    let dev = File::options()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .expect("open /dev/fuse");
    let data = format!(
        "fd={},rootmode=40755,user_id=0,group_id=0,default_permissions",
        dev.as_raw_fd()
    );
    nix::mount::mount(
        Some("fuse-transport"),
        mountpoint.as_str(),
        Some("fuse"),
        nix::mount::MsFlags::MS_NODEV | nix::mount::MsFlags::MS_NOSUID,
        Some(data.as_str()),
    )
    .expect("mount");
    init(&dev, uring);
    let dev = Arc::new(dev);
    let fs = Arc::new(Mutex::new(Fs::new()));
    // The kernel makes a queue for every possible CPU and uses the ring only once each
    // has an entry registered.
    let cpus = std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| s.trim().rsplit(['-', ',']).next()?.parse::<usize>().ok())
        .map_or(1, |last| last + 1);
    if uring {
        for qid in 0..cpus {
            let (dev, fs) = (Arc::clone(&dev), Arc::clone(&fs));
            std::thread::spawn(move || serve_ring(dev, fs, qid as u16, pin));
        }
        // Forgets and interrupts still come through /dev/fuse, as does everything until
        // every queue is registered.
        serve_dev(dev, fs);
    } else {
        for _ in 1..cpus {
            let (dev, fs) = (Arc::clone(&dev), Arc::clone(&fs));
            std::thread::spawn(move || serve_dev(dev, fs));
        }
        serve_dev(dev, fs);
    }
}
