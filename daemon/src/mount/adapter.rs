//! The `fuser::Filesystem` that forwards each kernel request to one plugin instance.
//!
//! One `Adapter` serves one mount. Dropping it destroys the plugin instance; fuser drops it
//! at the end of `Session::run`, on the mount's own thread, after every session thread has
//! exited. Only then does the mount count drop (see `mount::spawn`).

use std::ffi::OsStr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fshost_sdk::abi::{
    Attr, Context, Setattr, Timespec, SET_ATIME, SET_ATIME_NOW, SET_CTIME, SET_FH, SET_GID,
    SET_MODE, SET_MTIME, SET_MTIME_NOW, SET_SIZE, SET_UID,
};
use fshost_sdk::inode_flags::{APPEND, IMMUTABLE, NOATIME, NODUMP, SYNC};
use fshost_sdk::DirFiller;
use fuser::{
    BackingId, BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyIoctl,
    ReplyLseek, ReplyOpen, ReplyStatfs, ReplyStatx, ReplyWrite, ReplyXattr, Request, TimeOrNow,
    WriteFlags,
};

use super::backend::Backend;
use super::link::{Agreed, Handles, Link};
pub use super::metrics::MountStats;

pub struct Adapter<B: Backend> {
    fs: B,
    stats: Arc<MountStats>,
    /// How long the kernel may cache attributes and entries (`-o attr_timeout`).
    ttl: Duration,
    /// Flags for file opens (`-o keep_cache`: keep the page cache between opens).
    open_flags: FopenFlags,
    /// `-o writeback`: ask the kernel for its writeback cache (false if it refused).
    writeback: bool,
    /// Set in `init` when the plugin offers passthrough, the mount did not turn it off
    /// (`CachePolicy::passthrough`) and the kernel accepted it; until then, whether to ask.
    passthrough: bool,
    /// Set in `init` when the plugin wants POSIX ACLs and the kernel accepted them: the
    /// plugin then applies the umask (`Context::umask`), not us.
    posix_acl: bool,
    /// Whether to ask for FUSE over io_uring in `init`; then whether the kernel agreed.
    uring: bool,
    /// The connection's state that outlives this process in a daemon upgrade: what INIT
    /// agreed, and the open files' handles.
    link: Arc<Link>,
}

/// What the kernel may cache for one mount (the daemon's mount options).
#[derive(Debug, Clone)]
pub struct CachePolicy {
    /// How long attributes and entries stay valid (`-o attr_timeout`).
    pub ttl: Duration,
    /// Keep file pages between opens (`-o keep_cache`).
    pub keep_cache: bool,
    /// Writes go to the page cache and reach the plugin later, in large batches
    /// (`-o writeback`). Only for plugins whose files nothing else changes.
    pub writeback: bool,
    /// Offer FUSE passthrough to plugins that have backing files (off with
    /// `-o nopassthrough` or `-o writeback`): the kernel then reads and writes them itself.
    pub passthrough: bool,
    /// Ask for FUSE over io_uring (`-o uring`): a thread per CPU serves the requests of
    /// tasks on that CPU; `/dev/fuse` serves if the kernel does not agree (mount/ring.rs).
    pub uring: bool,
}

impl<B: Backend> Adapter<B> {
    pub fn new(fs: B, stats: Arc<MountStats>, cache: &CachePolicy, link: Arc<Link>) -> Self {
        // A resumed connection keeps what its INIT agreed; a new one learns it in `init`.
        let agreed = link.agreed();
        Adapter {
            fs,
            stats,
            ttl: cache.ttl,
            open_flags: if cache.keep_cache {
                FopenFlags::FOPEN_KEEP_CACHE
            } else {
                FopenFlags::empty()
            },
            writeback: agreed.map_or(cache.writeback, |a| a.writeback),
            passthrough: agreed.map_or(cache.passthrough, |a| a.passthrough),
            posix_acl: agreed.is_some_and(|a| a.posix_acl),
            uring: agreed.map_or(cache.uring, |a| a.uring),
            link,
        }
    }

    /// Open flags as the plugin must see them. With the writeback cache the kernel writes
    /// pages back through any writable open file of the inode, reads pages of files opened
    /// write-only (to complete partly written pages), and does O_APPEND itself (every
    /// write carries its offset). So the plugin opens for reading too and never appends
    /// on its own, as libfuse documents for its writeback cache capability.
    fn plugin_open_flags(&self, flags: i32) -> i32 {
        let flags = self.plugin_write_flags(flags);
        if self.writeback && flags & libc::O_ACCMODE == libc::O_WRONLY {
            (flags & !libc::O_ACCMODE) | libc::O_RDWR
        } else {
            flags
        }
    }

    /// The flags of a WRITE: without O_APPEND under the writeback cache (see above).
    fn plugin_write_flags(&self, flags: i32) -> i32 {
        if self.writeback {
            flags & !libc::O_APPEND
        } else {
            flags
        }
    }

    /// The context and mode of a call that creates a node: with POSIX ACLs the plugin gets
    /// the umask to apply (a default ACL replaces it); else we apply it here.
    fn creating(&self, req: &Request, mode: u32, umask: u32) -> (Context, u32) {
        let mut ctx = ctx(req);
        if self.posix_acl {
            ctx.umask = umask & 0o777;
            (ctx, mode)
        } else {
            (ctx, mode & !(umask & 0o777))
        }
    }

    /// Refuses the opens that append-only and immutable forbid, as the VFS does for other
    /// file systems (it cannot for FUSE: it does not know the flags). Asks the plugin only
    /// for opens that write or truncate; a plugin without flags has none.
    fn open_allowed(&self, ctx: &Context, ino: u64, flags: i32) -> Result<(), fshost_sdk::Errno> {
        let writes = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let truncates = flags & libc::O_TRUNC != 0;
        if !writes && !truncates {
            return Ok(());
        }
        let inode_flags = match self.fs.get_flags(ctx, ino) {
            Ok(inode_flags) => inode_flags,
            Err(_) => return Ok(()),
        };
        let immutable = inode_flags & IMMUTABLE != 0;
        let append_only = inode_flags & APPEND != 0;
        if immutable || (append_only && (truncates || flags & libc::O_APPEND == 0)) {
            Err(fshost_sdk::Errno::EPERM)
        } else {
            Ok(())
        }
    }

    fn maps_handles(&self) -> bool {
        self.fs.offers_passthrough()
    }

    fn handles(&self) -> std::sync::MutexGuard<'_, Handles> {
        self.link.handles()
    }

    /// The plugin's file handle for the kernel's.
    /// A handle we never gave out (the lost process's, after a crash) becomes one the
    /// plugin never gave out either, which it answers EBADF.
    fn plugin_fh(&self, fh: FileHandle) -> u64 {
        if !self.maps_handles() {
            return fh.0;
        }
        self.handles()
            .open
            .get(&fh.0)
            .map_or(UNKNOWN_FH, |(_, plugin_fh, _)| *plugin_fh)
    }

    /// Returns the handle the kernel gets for an open and whether it goes through
    /// passthrough. A plugin without passthrough keeps its own handle; for one with it, the
    /// open is registered under a handle of ours and, if the plugin handed over a backing
    /// file, the inode's backing file is registered with the kernel (`open_backing`) or
    /// reused.
    fn register_open(
        &self,
        ino: u64,
        plugin_fh: u64,
        backing: Option<std::os::fd::OwnedFd>,
        open_backing: impl FnOnce(&std::os::fd::OwnedFd) -> std::io::Result<BackingId>,
    ) -> (u64, bool) {
        if !self.maps_handles() {
            return (plugin_fh, false);
        }
        let mut handles = self.handles();
        handles.next += 1;
        let fh = handles.next;
        let mut passthrough = false;
        if let (true, Some(fd)) = (self.passthrough, backing) {
            if let Some(entry) = handles.backing.get_mut(&ino) {
                entry.1 += 1;
                passthrough = true;
            } else {
                match open_backing(&fd) {
                    Ok(id) => {
                        handles.backing.insert(ino, (id, 1));
                        passthrough = true;
                    }
                    Err(e) => {
                        tracing::debug!(ino, error = %e, "passthrough refused; the plugin serves this file")
                    }
                }
            }
        }
        if passthrough {
            self.stats.passthrough_opens.fetch_add(1, Ordering::Relaxed);
        }
        handles.open.insert(fh, (ino, plugin_fh, passthrough));
        (fh, passthrough)
    }

    /// Answers a CREATE or TMPFILE: registers the open (through passthrough if the
    /// plugin handed over a backing file) and replies with the node and the handle.
    fn reply_created(
        &self,
        created: Result<(Attr, u64, Option<std::os::fd::OwnedFd>), fshost_sdk::Errno>,
        reply: ReplyCreate,
    ) {
        let (attr, plugin_fh, backing) = match created {
            Ok(created) => created,
            Err(e) => return reply.error(errno(e)),
        };
        let (fh, passthrough) =
            self.register_open(attr.ino, plugin_fh, backing, |fd| reply.open_backing(fd));
        let fuse_attr = file_attr(&attr);
        if passthrough {
            if let Some((id, _)) = self.handles().backing.get(&attr.ino) {
                return reply.created_passthrough(
                    &self.ttl,
                    &fuse_attr,
                    Generation(0),
                    FileHandle(fh),
                    FopenFlags::empty(),
                    id,
                );
            }
        }
        reply.created(
            &self.ttl,
            &fuse_attr,
            Generation(0),
            FileHandle(fh),
            self.open_flags,
        );
    }

    /// Forgets one of our handles; the inode's backing file goes with its last user.
    fn unregister_open(&self, fh: FileHandle) {
        let mut handles = self.handles();
        let Some((ino, _, passthrough)) = handles.open.remove(&fh.0) else {
            return;
        };
        if passthrough {
            if let Some(entry) = handles.backing.get_mut(&ino) {
                entry.1 -= 1;
                if entry.1 == 0 {
                    handles.backing.remove(&ino);
                }
            }
        }
    }
}

/// What the plugin gets for a handle the adapter never gave out.
const UNKNOWN_FH: u64 = u64::MAX;

thread_local! {
    /// The read buffer of the session thread this runs on (the daemon's own thread-local,
    /// not a plugin's: it does not keep any plugin library mapped).
    static READ_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn ctx(req: &Request) -> Context {
    Context {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
        umask: 0,
    }
}

fn errno(e: fshost_sdk::Errno) -> Errno {
    Errno::from_i32(e.0)
}

fn to_system_time(t: Timespec) -> SystemTime {
    if t.sec >= 0 {
        UNIX_EPOCH + Duration::new(t.sec as u64, t.nsec.min(999_999_999))
    } else {
        UNIX_EPOCH - Duration::from_secs(t.sec.unsigned_abs())
            + Duration::from_nanos(u64::from(t.nsec.min(999_999_999)))
    }
}

pub fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: to_system_time(a.atime),
        mtime: to_system_time(a.mtime),
        ctime: to_system_time(a.ctime),
        crtime: to_system_time(a.ctime),
        kind: file_type(a.mode),
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: if a.blksize == 0 { 4096 } else { a.blksize },
        flags: 0,
    }
}

fn entry(reply: ReplyEntry, ttl: Duration, result: Result<Attr, fshost_sdk::Errno>) {
    match result {
        Ok(attr) => reply.entry(&ttl, &file_attr(&attr), Generation(0)),
        Err(e) => reply.error(errno(e)),
    }
}

fn empty(reply: ReplyEmpty, result: Result<(), fshost_sdk::Errno>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(e)),
    }
}

/// An xattr value or name list: its size when the kernel asks with `size == 0`, else the
/// data if it fits.
fn xattr(reply: ReplyXattr, size: u32, result: Result<Vec<u8>, fshost_sdk::Errno>) {
    match result {
        Ok(data) if size == 0 => reply.size(data.len() as u32),
        Ok(data) if data.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(data) => reply.data(&data),
        Err(e) => reply.error(errno(e)),
    }
}

fn time_or_now(t: Option<TimeOrNow>, set: &mut Setattr, bit: u32, now_bit: u32) -> Timespec {
    match t {
        Some(TimeOrNow::Now) => {
            set.valid |= now_bit;
            Timespec::default()
        }
        Some(TimeOrNow::SpecificTime(t)) => {
            set.valid |= bit;
            Timespec::from(t)
        }
        None => Timespec::default(),
    }
}

impl<B: Backend> Filesystem for Adapter<B> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if self.writeback
            && config
                .add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE)
                .is_err()
        {
            self.writeback = false;
            tracing::info!(plugin = %self.fs.name(), "the kernel does not offer a writeback cache; writes go through");
        }
        if self.passthrough && self.fs.offers_passthrough() {
            let accepted = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            self.passthrough = accepted;
            if !accepted {
                tracing::info!(plugin = %self.fs.name(), "the kernel does not offer FUSE passthrough; the plugin serves reads and writes itself");
            }
        } else {
            self.passthrough = false;
        }
        // Lookups and listings in one directory may run at once (every plugin is Sync).
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        let wants = self.fs.wants().unwrap_or(0);
        // The plugin clears setuid/setgid: the kernel no longer asks for security.capability
        // before each write (a round trip a write(2), the whole gap between memfs's and
        // tmpfs's streaming writes).
        let kill_priv = wants & fshost_sdk::abi::WANT_KILL_PRIV != 0
            && config
                .add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV_V2)
                .is_ok();
        if wants & fshost_sdk::abi::WANT_POSIX_ACL != 0 {
            self.posix_acl = config
                .add_capabilities(InitFlags::FUSE_POSIX_ACL | InitFlags::FUSE_DONT_MASK)
                .is_ok();
            if !self.posix_acl {
                tracing::info!(plugin = %self.fs.name(), "the kernel does not offer POSIX ACLs; the mount has none");
            }
        }
        if self.uring {
            // Each ring entry holds the largest request: 1 MiB rather than fuser's 16.
            self.uring = config
                .add_capabilities(InitFlags::FUSE_OVER_IO_URING)
                .is_ok()
                && config.set_max_write(super::ring::MAX_WRITE).is_ok();
            if !self.uring {
                self.link.set_transport(super::ring::Transport::Fallback(
                    "the kernel does not offer it (Linux 6.14+ with /sys/module/fuse/parameters/enable_uring set to Y)".into(),
                ));
            }
        }
        let abi = config.kernel_abi();
        self.link.agree(Agreed {
            version: (abi.0, abi.1),
            writeback: self.writeback,
            passthrough: self.passthrough,
            posix_acl: self.posix_acl,
            uring: self.uring,
            kill_priv,
        });
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.fs.lookup(&ctx(req), parent.0, name) {
            // A name that does not exist is cached as long as one that does (node id 0:
            // a negative entry), so that the next lookup of it asks nobody; a create
            // through this mount replaces it at once.
            Err(e) if e == fshost_sdk::Errno::ENOENT && !self.ttl.is_zero() => {
                let absent = FileAttr {
                    ino: INodeNo(0),
                    ..file_attr(&Attr::default())
                };
                reply.entry(&self.ttl, &absent, Generation(0));
            }
            result => entry(reply, self.ttl, result),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        // Nothing to answer; a failure is the plugin's to log.
        let _ = self.fs.forget(ino.0, nlookup);
    }

    fn ioctl(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        cmd: u32,
        in_data: &[u8],
        out_size: u32,
        reply: ReplyIoctl,
    ) {
        match inode_flags_ioctl(&self.fs, &ctx(req), ino.0, cmd, in_data) {
            Ok(out) if out.len() <= out_size as usize => reply.ioctl(0, &out),
            Ok(_) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(errno(e)),
        }
    }

    /// The kernel asks only when the caller wants the birth time.
    fn statx(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: Option<FileHandle>,
        _flags: u32,
        _mask: u32,
        reply: ReplyStatx,
    ) {
        let ctx = ctx(req);
        let born = match self.fs.birth_time(&ctx, ino.0) {
            Ok(born) => born,
            Err(e) => return reply.error(errno(e)),
        };
        match self.fs.getattr(&ctx, ino.0) {
            Ok(attr) => reply.statx(
                &self.ttl,
                &FileAttr {
                    crtime: to_system_time(born),
                    ..file_attr(&attr)
                },
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fs.getattr(&ctx(req), ino.0) {
            Ok(attr) => reply.attr(&self.ttl, &file_attr(&attr)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut set = Setattr::default();
        let fields = [
            (mode, SET_MODE, &mut set.mode),
            (uid, SET_UID, &mut set.uid),
            (gid, SET_GID, &mut set.gid),
        ];
        let mut valid = 0;
        for (value, bit, slot) in fields {
            if let Some(v) = value {
                *slot = v;
                valid |= bit;
            }
        }
        set.valid = valid;
        if let Some(size) = size {
            set.size = size;
            set.valid |= SET_SIZE;
        }
        set.atime = time_or_now(atime, &mut set, SET_ATIME, SET_ATIME_NOW);
        set.mtime = time_or_now(mtime, &mut set, SET_MTIME, SET_MTIME_NOW);
        if let Some(ctime) = ctime {
            set.ctime = Timespec::from(ctime);
            set.valid |= SET_CTIME;
        }
        if let Some(fh) = fh {
            set.fh = self.plugin_fh(fh);
            set.valid |= SET_FH;
        }
        match self.fs.setattr(&ctx(req), ino.0, &set) {
            Ok(attr) => reply.attr(&self.ttl, &file_attr(&attr)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.readlink(&ctx(req), ino.0) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let (ctx, mode) = self.creating(req, mode, umask);
        let result = self.fs.mknod(&ctx, parent.0, name, mode, rdev);
        entry(reply, self.ttl, result);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let (ctx, mode) = self.creating(req, mode, umask);
        let result = self.fs.mkdir(&ctx, parent.0, name, mode);
        entry(reply, self.ttl, result);
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let result = self.fs.unlink(&ctx(req), parent.0, name);
        empty(reply, result);
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let result = self.fs.rmdir(&ctx(req), parent.0, name);
        empty(reply, result);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let result = self
            .fs
            .symlink(&ctx(req), parent.0, link_name, target.as_os_str());
        entry(reply, self.ttl, result);
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let result = self.fs.rename(
            &ctx(req),
            parent.0,
            name,
            newparent.0,
            newname,
            flags.bits(),
        );
        empty(reply, result);
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let result = self.fs.link(&ctx(req), ino.0, newparent.0, newname);
        entry(reply, self.ttl, result);
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let ctx = ctx(req);
        if let Err(e) = self.open_allowed(&ctx, ino.0, flags.0) {
            return reply.error(errno(e));
        }
        let flags = self.plugin_open_flags(flags.0);
        let opened = if self.passthrough {
            self.fs.open_backing(&ctx, ino.0, flags)
        } else {
            self.fs.open(&ctx, ino.0, flags).map(|fh| (fh, None))
        };
        let (plugin_fh, backing) = match opened {
            Ok(opened) => opened,
            Err(e) => return reply.error(errno(e)),
        };
        let (fh, passthrough) =
            self.register_open(ino.0, plugin_fh, backing, |fd| reply.open_backing(fd));
        if passthrough {
            // Our registered open keeps the inode's entry alive until its release.
            if let Some((id, _)) = self.handles().backing.get(&ino.0) {
                return reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), id);
            }
        }
        reply.opened(FileHandle(fh), self.open_flags);
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.stats.plugin_reads.fetch_add(1, Ordering::Relaxed);
        let fh = self.plugin_fh(fh);
        READ_BUFFER.with_borrow_mut(|buf| {
            // One buffer per session thread, grown once: no allocation per read.
            if buf.len() < size as usize {
                buf.resize(size as usize, 0);
            }
            let buf = &mut buf[..size as usize];
            match self.fs.read(&ctx(req), ino.0, fh, offset, buf) {
                Ok(n) => {
                    let n = n.min(buf.len());
                    self.stats.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
                    reply.data(&buf[..n])
                }
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.stats.plugin_writes.fetch_add(1, Ordering::Relaxed);
        let (ctx, fh, flags) = (
            ctx(req),
            self.plugin_fh(fh),
            self.plugin_write_flags(flags.0),
        );
        // The kernel takes a short answer to a write-back of its cache (FUSE_WRITE_CACHE)
        // as done, and the rest of the pages would be lost without an error: ask again for
        // the rest, and answer the error (ENOSPC, say) that stops it, which fsync reports.
        let whole = write_flags.contains(WriteFlags::FUSE_WRITE_CACHE);
        let mut done = 0;
        let result = loop {
            let rest = &data[done..];
            match self
                .fs
                .write(&ctx, ino.0, fh, offset + done as u64, rest, flags)
            {
                Ok(n) => {
                    done += n.min(rest.len());
                    if !whole || n == 0 || done == data.len() {
                        break Ok(done);
                    }
                }
                Err(e) => break Err(e),
            }
        };
        self.stats
            .bytes_written
            .fetch_add(done as u64, Ordering::Relaxed);
        match result {
            Ok(n) if whole && n < data.len() => reply.error(Errno::EIO),
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let result = self.fs.flush(&ctx(req), ino.0, self.plugin_fh(fh));
        // ENOSYS goes to the kernel on purpose: it then stops sending FLUSH on every
        // close of this mount (one round trip less per close), and treats it as success.
        empty(reply, result);
    }

    fn release(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if !self.maps_handles() {
            let result = self.fs.release(&ctx(req), ino.0, fh.0, flags.0);
            return empty(reply, result.or_else(ignore_enosys));
        }
        let Some(plugin_fh) = self
            .handles()
            .open
            .get(&fh.0)
            .map(|(_, plugin_fh, _)| *plugin_fh)
        else {
            // The lost process's handle (after a crash): nothing of ours to release.
            return reply.ok();
        };
        // The plugin first: its call waits while the mount is paused for a daemon upgrade,
        // so that a handle (and the backing id it may close) the state has handed over is
        // released by the next process, never by this one behind its back.
        let result = self.fs.release(&ctx(req), ino.0, plugin_fh, flags.0);
        self.unregister_open(fh);
        empty(reply, result.or_else(ignore_enosys));
    }

    fn fsync(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let result = self
            .fs
            .fsync(&ctx(req), ino.0, self.plugin_fh(fh), datasync);
        // As for flush: the kernel takes ENOSYS as "nothing to sync" and stops asking.
        empty(reply, result);
    }

    fn opendir(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.opendir(&ctx(req), ino.0, flags.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) if e == fshost_sdk::Errno::ENOSYS => {
                reply.opened(FileHandle(0), FopenFlags::empty())
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut add = |ino: u64, next: u64, mode: u32, name: &OsStr| {
            reply.add(INodeNo(ino), next, file_type(mode), name)
        };
        let result = DirFiller::over(&mut add, |out| {
            self.fs.readdir(&ctx(req), ino.0, fh.0, offset, out)
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn releasedir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let result = self.fs.releasedir(&ctx(req), ino.0, fh.0);
        empty(reply, result.or_else(ignore_enosys));
    }

    fn statfs(&self, req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        match self.fs.statfs(&ctx(req), ino.0) {
            Ok(s) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let result = self.fs.setxattr(&ctx(req), ino.0, name, value, flags);
        empty(reply, result);
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        xattr(reply, size, self.fs.getxattr(&ctx(req), ino.0, name));
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        xattr(reply, size, self.fs.listxattr(&ctx(req), ino.0));
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let result = self.fs.removexattr(&ctx(req), ino.0, name);
        empty(reply, result);
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let fh = self.plugin_fh(fh);
        empty(
            reply,
            self.fs
                .fallocate(&ctx(req), ino.0, fh, offset, length, mode),
        );
    }

    fn lseek(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let Ok(offset) = u64::try_from(offset) else {
            return reply.error(Errno::EINVAL);
        };
        match self
            .fs
            .lseek(&ctx(req), ino.0, self.plugin_fh(fh), offset, whence)
        {
            Ok(at) => reply.offset(i64::try_from(at).unwrap_or(i64::MAX)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (ctx, mode) = self.creating(req, mode, umask);
        let flags = self.plugin_open_flags(flags);
        let created = if self.passthrough {
            self.fs.create_backing(&ctx, parent.0, name, mode, flags)
        } else {
            (self.fs.create_file(&ctx, parent.0, name, mode, flags))
                .map(|(attr, fh)| (attr, fh, None))
        };
        self.reply_created(created, reply);
    }

    fn tmpfile(
        &self,
        req: &Request,
        parent: INodeNo,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (ctx, mode) = self.creating(req, mode, umask);
        let flags = self.plugin_open_flags(flags);
        // Served as the file's later opens will be (the kernel refuses mixing the two).
        let created = if self.passthrough {
            self.fs.tmpfile_backing(&ctx, parent.0, mode, flags)
        } else {
            (self.fs.tmpfile(&ctx, parent.0, mode, flags)).map(|(attr, fh)| (attr, fh, None))
        };
        self.reply_created(created, reply);
    }
}

/// `FS_IOC_GETFLAGS` and `FS_IOC_SETFLAGS` (the kernel's fileattr calls send these 64-bit
/// numbers with an int's worth of data), their 32-bit forms, and `FS_IOC_FSGETXATTR` and
/// `FS_IOC_FSSETXATTR` (struct fsxattr).
const FS_IOC_GETFLAGS: u32 = 0x8008_6601;
const FS_IOC_SETFLAGS: u32 = 0x4008_6602;
const FS_IOC32_GETFLAGS: u32 = 0x8004_6601;
const FS_IOC32_SETFLAGS: u32 = 0x4004_6602;
const FS_IOC_FSGETXATTR: u32 = 0x801c_581f;
const FS_IOC_FSSETXATTR: u32 = 0x401c_5820;
/// Size of struct fsxattr: xflags, extsize, nextents, projid, cowextsize, 8 bytes padding.
const FSXATTR_SIZE: usize = 28;
/// Inode flags and their fsxattr twins (`FS_XFLAG_*`).
const XFLAGS: [(u32, u32); 5] = [
    (SYNC, 0x20),
    (IMMUTABLE, 0x8),
    (APPEND, 0x10),
    (NODUMP, 0x80),
    (NOATIME, 0x40),
];

/// Answers the inode-flag ioctls from the plugin's `get_flags`/`set_flags`; any other
/// ioctl is not ours to pass on (ENOTTY).
fn inode_flags_ioctl<B: Backend>(
    fs: &B,
    ctx: &Context,
    ino: u64,
    cmd: u32,
    input: &[u8],
) -> Result<Vec<u8>, fshost_sdk::Errno> {
    let not_tty = |e: fshost_sdk::Errno| {
        if e == fshost_sdk::Errno::ENOSYS {
            fshost_sdk::Errno(libc::ENOTTY)
        } else {
            e
        }
    };
    let word = |at: usize| {
        input
            .get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_ne_bytes)
            .ok_or(fshost_sdk::Errno::EINVAL)
    };
    match cmd {
        FS_IOC_GETFLAGS | FS_IOC32_GETFLAGS => {
            let flags = fs.get_flags(ctx, ino).map_err(not_tty)?;
            Ok(flags.to_ne_bytes().to_vec())
        }
        FS_IOC_SETFLAGS | FS_IOC32_SETFLAGS => {
            fs.set_flags(ctx, ino, word(0)?).map_err(not_tty)?;
            Ok(Vec::new())
        }
        FS_IOC_FSGETXATTR => {
            let flags = fs.get_flags(ctx, ino).map_err(not_tty)?;
            let xflags = XFLAGS
                .iter()
                .filter(|(flag, _)| flags & flag != 0)
                .fold(0u32, |x, (_, xflag)| x | xflag);
            let mut out = vec![0u8; FSXATTR_SIZE];
            out[..4].copy_from_slice(&xflags.to_ne_bytes());
            Ok(out)
        }
        FS_IOC_FSSETXATTR => {
            let xflags = word(0)?;
            let known = XFLAGS.iter().fold(0u32, |x, (_, xflag)| x | xflag);
            // Extent sizes and project ids are not inode flags: as tmpfs, refuse them.
            if xflags & !known != 0 || (4..16).step_by(4).any(|at| word(at) != Ok(0)) {
                return Err(fshost_sdk::Errno::EOPNOTSUPP);
            }
            let old = fs.get_flags(ctx, ino).map_err(not_tty)?;
            let flags = XFLAGS.iter().fold(old, |f, (flag, xflag)| {
                if xflags & xflag != 0 {
                    f | flag
                } else {
                    f & !flag
                }
            });
            fs.set_flags(ctx, ino, flags).map_err(not_tty)?;
            Ok(Vec::new())
        }
        _ => Err(fshost_sdk::Errno(libc::ENOTTY)),
    }
}

/// Operations a plugin may leave out without failing the caller.
fn ignore_enosys(e: fshost_sdk::Errno) -> Result<(), fshost_sdk::Errno> {
    if e == fshost_sdk::Errno::ENOSYS {
        Ok(())
    } else {
        Err(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip() {
        for t in [
            Timespec {
                sec: 1_700_000_000,
                nsec: 5,
                reserved: 0,
            },
            Timespec {
                sec: -2,
                nsec: 500,
                reserved: 0,
            },
        ] {
            assert_eq!(Timespec::from(to_system_time(t)), t);
        }
    }

    #[test]
    fn file_types_from_mode() {
        assert_eq!(file_type(libc::S_IFREG | 0o644), FileType::RegularFile);
        assert_eq!(file_type(libc::S_IFDIR | 0o755), FileType::Directory);
        assert_eq!(file_type(libc::S_IFLNK), FileType::Symlink);
    }
}
