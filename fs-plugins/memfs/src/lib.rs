//! memfs: an in-memory read-write filesystem served through fshost, with tmpfs's semantics.
//!
//! One instance per mount. The tree sits behind one `RwLock`: lookups, stats, reads, writes
//! and directory listings run in parallel; changes to the tree take the lock alone. File
//! contents live in a private tmpfs (`store`), which the kernel reads and writes directly
//! through FUSE passthrough; memfs serves them itself where passthrough is off
//! (`-o nopassthrough`, `-o writeback`, a kernel without it). Permission checks are
//! the kernel's job (the daemon mounts with `default_permissions`); memfs clears
//! setuid/setgid itself where tmpfs would (`WANT_KILL_PRIV`, see `setattr`), so that the
//! kernel need not ask for `security.capability` before every write; it keeps owners, modes,
//! link counts, times, sparse contents and extended attributes the way tmpfs does.
//!
//! Options, as tmpfs's: `size=N[K|M|G]` limits the stored data (`ENOSPC` past it; default
//! half of the machine's memory), `nr_inodes=N[K|M|G]` the nodes (default as many as that
//! half has pages); unlike tmpfs, 0 means none rather than no limit (a user's allowance
//! must stay a limit). `noxattr` turns extended attributes and ACLs off (see
//! `MemFs::no_xattr`).

mod data;
mod store;

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use fshost_sdk::abi::{
    SET_ATIME, SET_ATIME_NOW, SET_CTIME, SET_FH, SET_GID, SET_MODE, SET_MTIME, SET_MTIME_NOW,
    SET_SIZE, SET_UID,
};
use fshost_sdk::acl::{self, Acl};
use fshost_sdk::state::SharedFd;
use fshost_sdk::{
    export_plugin, inode_flags, mode, state, Attr, Context, DirFiller, Errno, Options, Plugin,
    Result, SavedState, Setattr, StateWriter, Statfs, Timespec,
};
use serde::{Deserialize, Serialize};
use store::{errno, Store, Time, PAGE};

const ROOT: u64 = 1;
const NAME_MAX: usize = 255;
/// Largest file size, as on tmpfs (MAX_LFS_FILESIZE).
const MAX_FILE_SIZE: u64 = i64::MAX as u64;
/// Capacity (and inode count) when the machine's memory cannot be read.
const FALLBACK_CAPACITY: u64 = 1 << 40;
/// The inode flags memfs keeps, those tmpfs does.
const KEPT_FLAGS: u32 =
    inode_flags::IMMUTABLE | inode_flags::APPEND | inode_flags::NODUMP | inode_flags::NOATIME;
const XATTR_CREATE: i32 = 1;
const XATTR_REPLACE: i32 = 2;
/// readdir offsets: 0 is ".", 1 is "..", entries carry cookies from here on.
const FIRST_COOKIE: u64 = 2;

/// A directory's entries. Each entry gets a cookie that never changes and is never reused
/// in this directory, so a listing resumed at an offset survives concurrent unlinks.
#[derive(Serialize, Deserialize)]
struct Dir {
    entries: BTreeMap<OsString, (u64, u64)>,
    by_cookie: BTreeMap<u64, OsString>,
    next_cookie: u64,
    parent: u64,
}

impl Dir {
    fn new(parent: u64) -> Dir {
        Dir {
            entries: BTreeMap::new(),
            by_cookie: BTreeMap::new(),
            next_cookie: FIRST_COOKIE,
            parent,
        }
    }

    fn get(&self, name: &OsStr) -> Option<u64> {
        self.entries.get(name).map(|(ino, _)| *ino)
    }

    /// Adds or replaces `name`.
    fn insert(&mut self, name: &OsStr, ino: u64) {
        self.remove(name);
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        self.entries.insert(name.to_owned(), (ino, cookie));
        self.by_cookie.insert(cookie, name.to_owned());
    }

    fn remove(&mut self, name: &OsStr) -> Option<u64> {
        let (ino, cookie) = self.entries.remove(name)?;
        self.by_cookie.remove(&cookie);
        Some(ino)
    }

    fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A regular file. Its contents are the store's file of the same inode number; `fd` is that
/// file opened when a call that does not pass through needs it (a read or write memfs
/// serves, fallocate, lseek), kept until the node's last handle goes.
#[derive(Default, Serialize, Deserialize)]
struct FileNode {
    #[serde(skip)]
    fd: OnceLock<File>,
    /// The same, opened to append (writes of opens with `O_APPEND`).
    #[serde(skip)]
    append_fd: OnceLock<File>,
}

#[derive(Serialize, Deserialize)]
enum Content {
    File(FileNode),
    Dir(Dir),
    Symlink(Vec<u8>),
    /// FIFOs, sockets and device nodes: only metadata.
    Special,
}

#[derive(Serialize, Deserialize)]
struct Node {
    attr: Attr,
    content: Content,
    /// Open file handles.
    open: u32,
    /// The kernel's references (every reply that names the node counts one; `forget`
    /// gives them back). A node lives while it has a link, an open handle or a reference:
    /// an unlinked file or removed directory stays reachable through descriptors, `O_PATH`
    /// handles, a working directory or pages the kernel still has to write back.
    lookups: AtomicU64,
    /// Creation time (statx's birth time).
    btime: Timespec,
    /// Inode flags (chattr): `KEPT_FLAGS`.
    flags: u32,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// The tree and the store of file contents. An upgrade hands over the nodes (inode
/// numbers, open counts, directory cookies and all) and the store's descriptor (`Saved`);
/// the counts come from the new instance's options and a recount.
struct Tree {
    nodes: HashMap<u64, Node>,
    next_ino: u64,
    store: Store,
    /// Nodes that count (see `Node::counts`), the root included.
    counted_nodes: u64,
    /// The most pages (`size=`) and nodes (`nr_inodes=`, the root included).
    limit_pages: u64,
    limit_nodes: u64,
    /// Pages of files that no longer count but are still stored (removed, closed, and
    /// the kernel's references not yet given back), by node, and their sum: statfs
    /// leaves them out, and the store may hold that many pages more than the limit (up
    /// to the limit once more: `excused_pages`), so that the space of a removed file can
    /// be written again at once, as on tmpfs.
    uncounted: HashMap<u64, u64>,
    uncounted_pages: u64,
    /// The store's own size now (`limit_pages + excused_pages()` once `fit_store` is done).
    store_pages: u64,
}

/// What `export_state` writes: the store's descriptor and the nodes.
#[derive(Serialize)]
struct SavedRef<'t> {
    store: SharedFd,
    nodes: &'t HashMap<u64, Node>,
    next_ino: u64,
}

/// What `import_state` reads (see `SavedRef`).
#[derive(Deserialize)]
struct Saved {
    store: SharedFd,
    nodes: HashMap<u64, Node>,
    next_ino: u64,
}

/// The version of the state `export_state` writes (`SavedRef`); 2 since files record their
/// unwritten (fallocated) pages, 3 since nodes record the kernel's references and their
/// birth time, 4 since file contents are in the store. Versions 2 and 3 are still taken
/// over (see `legacy`): their pages are written into the store.
const STATE_VERSION: u32 = 4;

pub struct MemFs {
    tree: RwLock<Tree>,
    /// `noxattr`: answer every xattr call with ENOSYS, so that the kernel stops asking.
    /// Without it the kernel sends a GETXATTR `security.capability` before every write
    /// (to know whether the write must drop file capabilities): one round trip more per
    /// `write(2)`.
    no_xattr: bool,
}

fn is_dir(attr: &Attr) -> bool {
    attr.mode & mode::S_IFMT == mode::S_IFDIR
}

fn check_name(name: &OsStr) -> Result<()> {
    if name.len() > NAME_MAX {
        Err(Errno::ENAMETOOLONG)
    } else {
        Ok(())
    }
}

/// What a directory reports as its size, as tmpfs does: 20 bytes per entry, `.` and `..`
/// included (tmpfs's BOGO_DIRENT_SIZE).
const DIRENT_SIZE: u64 = 20;

impl Node {
    fn new(attr: Attr, content: Content) -> Node {
        Node {
            btime: attr.ctime,
            attr,
            content,
            open: 0,
            lookups: AtomicU64::new(0),
            flags: 0,
            xattrs: BTreeMap::new(),
        }
    }

    /// Refuses changing or removing an append-only or immutable node (EPERM), as the
    /// VFS does on tmpfs.
    fn changeable(&self) -> Result<()> {
        if self.flags & (inode_flags::IMMUTABLE | inode_flags::APPEND) != 0 {
            Err(Errno::EPERM)
        } else {
            Ok(())
        }
    }

    /// Refuses the setattr that append-only and immutable forbid: everything on an
    /// immutable node; on an append-only one the owner, mode, size and times given
    /// explicitly ("now" is allowed, and so is the kernel's own mtime+ctime stamp under
    /// `-o writeback`, the one setattr that carries ctime).
    fn settable(&self, set: &Setattr) -> Result<()> {
        if self.flags & inode_flags::IMMUTABLE != 0 {
            return Err(Errno::EPERM);
        }
        let forbidden = SET_MODE | SET_UID | SET_GID | SET_SIZE | SET_ATIME;
        let explicit_mtime = set.valid & SET_MTIME != 0 && set.valid & SET_CTIME == 0;
        if self.flags & inode_flags::APPEND != 0 && (set.valid & forbidden != 0 || explicit_mtime) {
            return Err(Errno::EPERM);
        }
        Ok(())
    }

    /// Refuses new entries in an immutable directory.
    fn extensible(&self) -> Result<()> {
        if self.flags & inode_flags::IMMUTABLE != 0 {
            Err(Errno::EPERM)
        } else {
            Ok(())
        }
    }

    /// Whether the node counts toward the limits and statfs: while a name or an open handle
    /// holds it. One held by the kernel's references alone (an `O_PATH` handle, a working
    /// directory, or a FORGET still on its way after the last close of an unlinked file)
    /// is not counted, so that space and inodes come back the moment `rm` returns, as on
    /// tmpfs, rather than when the FORGET arrives.
    fn counts(&self) -> bool {
        self.attr.nlink > 0 || self.open > 0
    }

    /// Whether reading the node now moves its atime, by the kernel's `relatime` rule: when
    /// it is not later than the last change, or a day old. (FUSE leaves atime to the file
    /// system; tmpfs is mounted relatime by default.)
    fn atime_due(&self, now: Timespec) -> bool {
        let a = &self.attr;
        if self.flags & inode_flags::NOATIME != 0 {
            return false;
        }
        a.atime <= a.mtime || a.atime <= a.ctime || now.sec - a.atime.sec >= 24 * 60 * 60
    }

    fn is_file(&self) -> bool {
        matches!(self.content, Content::File(_))
    }
}

impl Tree {
    /// The attributes as the kernel sees them: a directory's size counts its entries; a
    /// file's size, blocks and times are its store file's.
    fn attr(&self, node: &Node) -> Attr {
        let mut attr = node.attr;
        match &node.content {
            Content::Dir(dir) => attr.size = DIRENT_SIZE * (dir.entries.len() as u64 + 2),
            Content::File(_) => {
                if let Ok(st) = self.store.stat(attr.ino) {
                    attr.size = st.stx_size;
                    attr.blocks = st.stx_blocks;
                    (attr.atime, attr.mtime, attr.ctime) = store::times(&st);
                }
            }
            _ => {}
        }
        attr
    }

    /// The attributes for a reply that hands the kernel a reference to node `ino`.
    fn looked_up(&self, ino: u64) -> Result<Attr> {
        let node = self.node(ino)?;
        node.lookups.fetch_add(1, Ordering::Relaxed);
        Ok(self.attr(node))
    }

    /// Node `ino` and its file part: EISDIR for a directory, EINVAL for anything else.
    fn file_node(&self, ino: u64) -> Result<(&Node, &FileNode)> {
        let node = self.node(ino)?;
        match &node.content {
            Content::File(file) => Ok((node, file)),
            Content::Dir(_) => Err(Errno::EISDIR),
            _ => Err(Errno::EINVAL),
        }
    }

    /// Node `ino`'s store file, opened once for the calls that need it (see `FileNode`).
    fn file(&self, ino: u64, append: bool) -> Result<&File> {
        let (node, file) = self.file_node(ino)?;
        let (slot, flags) = if append {
            (&file.append_fd, node.flags | inode_flags::APPEND)
        } else {
            (&file.fd, node.flags)
        };
        if let Some(fd) = slot.get() {
            return Ok(fd);
        }
        let opened = self.store.open(ino, flags)?;
        Ok(slot.get_or_init(|| opened))
    }

    fn node(&self, ino: u64) -> Result<&Node> {
        self.nodes.get(&ino).ok_or(Errno::ENOENT)
    }

    fn node_mut(&mut self, ino: u64) -> Result<&mut Node> {
        self.nodes.get_mut(&ino).ok_or(Errno::ENOENT)
    }

    fn dir(&self, ino: u64) -> Result<&Dir> {
        match &self.node(ino)?.content {
            Content::Dir(dir) => Ok(dir),
            _ => Err(Errno::ENOTDIR),
        }
    }

    fn dir_mut(&mut self, ino: u64) -> Result<&mut Dir> {
        match &mut self.node_mut(ino)?.content {
            Content::Dir(dir) => Ok(dir),
            _ => Err(Errno::ENOTDIR),
        }
    }

    fn child(&self, dir: u64, name: &OsStr) -> Result<u64> {
        check_name(name)?;
        self.dir(dir)?.get(name).ok_or(Errno::ENOENT)
    }

    /// Marks a node's contents as changed now (mtime and ctime).
    fn modified(&mut self, ino: u64) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            let now = Timespec::now();
            node.attr.mtime = now;
            node.attr.ctime = now;
        }
    }

    /// Marks a node's metadata as changed now (ctime; a file's is its store file's).
    fn changed(&mut self, ino: u64) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.attr.ctime = Timespec::now();
            if node.is_file() {
                let _ = self.store.touch(ino);
            }
        }
    }

    fn adjust_nlink(&mut self, ino: u64, up: bool) {
        self.hold(ino, |node| {
            node.attr.nlink = if up {
                node.attr.nlink + 1
            } else {
                node.attr.nlink.saturating_sub(1)
            };
        });
    }

    /// Changes what holds node `ino` (links, open handles), keeps the totals of what
    /// counts (see `Node::counts`) and frees the node once nothing holds it.
    fn hold(&mut self, ino: u64, change: impl FnOnce(&mut Node)) {
        let Some(node) = self.nodes.get_mut(&ino) else {
            return;
        };
        let before = node.counts();
        change(node);
        let after = node.counts();
        let file = match &mut node.content {
            Content::File(file) => {
                if node.open == 0 {
                    // The last handle went: so do the descriptors memfs opened for it.
                    *file = FileNode::default();
                }
                true
            }
            _ => false,
        };
        match (before, after) {
            (true, false) => self.counted_nodes -= 1,
            (false, true) => {
                self.counted_nodes += 1;
                self.recount(ino);
            }
            _ => {}
        }
        self.collect(ino);
        // A file that stopped counting but lives on (the kernel still references it).
        if file && before && !after && self.nodes.contains_key(&ino) {
            self.uncount(ino);
        }
    }

    /// File `ino` stops counting while its store file stays: its pages are left out.
    fn uncount(&mut self, ino: u64) {
        let pages = self.store.stat(ino).map_or(0, |st| st.stx_blocks / 8);
        self.uncounted.insert(ino, pages);
        self.uncounted_pages += pages;
        self.fit_store();
    }

    /// File `ino` counts again, or its store file went: its pages are no longer left out.
    fn recount(&mut self, ino: u64) {
        if let Some(pages) = self.uncounted.remove(&ino) {
            self.uncounted_pages -= pages;
            self.fit_store();
        }
    }

    /// Makes a new node named `name` in `parent`.
    fn insert(
        &mut self,
        ctx: &Context,
        parent: u64,
        name: &OsStr,
        mode: u32,
        rdev: u32,
        content: Content,
    ) -> Result<Attr> {
        check_name(name)?;
        if self.dir(parent)?.get(name).is_some() {
            return Err(Errno::EEXIST);
        }
        let dir = matches!(content, Content::Dir(_));
        let ino = self.make(ctx, parent, mode, rdev, content)?;
        self.dir_mut(parent)?.insert(name, ino);
        if dir {
            self.adjust_nlink(parent, true);
        }
        self.modified(parent);
        self.looked_up(ino)
    }

    /// Makes a new node as a child of directory `parent` would be (its group and setgid
    /// bit follow the parent's), without naming it.
    fn make(
        &mut self,
        ctx: &Context,
        parent: u64,
        mode: u32,
        rdev: u32,
        content: Content,
    ) -> Result<u64> {
        if self.counted_nodes >= self.limit_nodes {
            return Err(Errno::ENOSPC);
        }
        let parent_node = self.node(parent)?;
        let parent_attr = parent_node.attr;
        self.dir(parent)?;
        parent_node.extensible()?;
        // The directory's default ACL, if any, narrows the mode in place of the umask
        // (which is 0 here unless the kernel left it to us: see `MemFs::wants`).
        let mut mode = mode;
        let mut xattrs = BTreeMap::new();
        let default = parent_node.xattrs.get(acl::DEFAULT.as_bytes());
        match default.map(|v| Acl::parse(v)).transpose()? {
            Some(default) if mode & mode::S_IFMT != mode::S_IFLNK => {
                if let Some(access) = default.inherit(&mut mode) {
                    xattrs.insert(acl::ACCESS.as_bytes().to_vec(), access.to_bytes());
                }
                if matches!(content, Content::Dir(_)) {
                    xattrs.insert(acl::DEFAULT.as_bytes().to_vec(), default.to_bytes());
                }
            }
            _ => mode &= !ctx.umask,
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let now = match content {
            // A file's times are its store file's from the start: its birth time too.
            Content::File(_) => {
                self.store.create(ino)?;
                store::birth(&self.store.stat(ino)?)
            }
            _ => Timespec::now(),
        };
        let dir = matches!(content, Content::Dir(_));
        // A setgid directory passes its group (and, to subdirectories, the setgid bit) on.
        let (gid, mode) = if parent_attr.mode & libc::S_ISGID != 0 {
            (
                parent_attr.gid,
                if dir { mode | libc::S_ISGID } else { mode },
            )
        } else {
            (ctx.gid, mode)
        };
        let size = match &content {
            Content::Symlink(target) => target.len() as u64,
            _ => 0,
        };
        let attr = Attr {
            ino,
            size,
            blocks: 0,
            atime: now,
            mtime: now,
            ctime: now,
            mode,
            nlink: if dir { 2 } else { 1 },
            uid: ctx.uid,
            gid,
            rdev,
            blksize: PAGE as u32,
        };
        let mut node = Node::new(attr, content);
        node.xattrs = xattrs;
        self.nodes.insert(ino, node);
        self.counted_nodes += 1;
        Ok(ino)
    }

    /// Drops one link to `ino`; frees it when nothing holds it any more (see `Node`).
    fn drop_link(&mut self, ino: u64) {
        self.changed(ino);
        self.hold(ino, |node| {
            node.attr.nlink = if is_dir(&node.attr) {
                0 // a removed directory loses its "." link too
            } else {
                node.attr.nlink.saturating_sub(1)
            };
        });
    }

    /// Frees `ino` if nothing holds it (no link, no handle, no reference of the kernel's);
    /// it no longer counts by then, so the totals stay.
    fn collect(&mut self, ino: u64) {
        let gone = self
            .nodes
            .get(&ino)
            .is_some_and(|n| !n.counts() && n.lookups.load(Ordering::Relaxed) == 0);
        if gone {
            let removed = self.nodes.remove(&ino);
            // The node (and any descriptor it holds of its store file) goes first, so that
            // the store can shrink back once the file is removed.
            if let Some((true, flags)) = removed.map(|node| (node.is_file(), node.flags)) {
                self.store.remove(ino, flags);
                self.recount(ino);
            }
        }
    }

    /// The pages of files that no longer count that are left out of the limit: all of
    /// them, up to the limit once more. A removed file held by an `O_PATH` descriptor is
    /// such a file too, and memfs cannot tell it from one whose FORGET is on its way: so
    /// that removing files held that way cannot grow a mount without end, it holds at
    /// most twice its `size=` (tmpfs counts such a file until its last reference goes).
    fn excused_pages(&self) -> u64 {
        self.uncounted_pages.min(self.limit_pages)
    }

    /// Gives the store room for the limit plus the pages of files that no longer count.
    /// A remount costs about 10 µs, twice for every `rm` of a file with data, so the store
    /// grows only once it is seven eighths full: below that, a write finds the room
    /// anyway unless it fills that last eighth before the kernel's FORGET (a moment). It
    /// shrinks back as soon as it may, so memfs's limit stays exact; shrinking fails while
    /// the store still holds more (pages the kernel has not let go of yet): the next
    /// change tries again.
    fn fit_store(&mut self) {
        let pages = self.limit_pages + self.excused_pages();
        if pages == self.store_pages {
            return;
        }
        if pages > self.store_pages && self.store.used_pages() < self.store_pages / 8 * 7 {
            return;
        }
        if self.store.resize(pages).is_ok() {
            self.store_pages = pages;
        }
    }

    /// Refuses removing `ino` from directory `dir` (or renaming it away) when either is
    /// append-only or immutable.
    fn removable(&self, dir: u64, ino: u64) -> Result<()> {
        self.node(dir)?.changeable()?;
        self.node(ino)?.changeable()
    }

    /// True if `ancestor` is `ino` or one of its parent directories.
    fn is_ancestor(&self, ancestor: u64, mut ino: u64) -> bool {
        loop {
            if ino == ancestor {
                return true;
            }
            match self.nodes.get(&ino).map(|n| &n.content) {
                Some(Content::Dir(dir)) if dir.parent != ino => ino = dir.parent,
                _ => return false,
            }
        }
    }

    fn set_parent(&mut self, ino: u64, new_parent: u64) {
        if let Ok(dir) = self.dir_mut(ino) {
            dir.parent = new_parent;
        }
    }

    fn rename(
        &mut self,
        ctx: &Context,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> Result<()> {
        check_name(newname)?;
        let ino = self.child(parent, name)?;
        let target = self.dir(newparent)?.get(newname);
        self.removable(parent, ino)?;
        match target {
            Some(target) => self.removable(newparent, target)?,
            None => self.node(newparent)?.extensible()?,
        }
        let moving_dir = is_dir(&self.node(ino)?.attr);
        if moving_dir && self.is_ancestor(ino, newparent) {
            return Err(Errno::EINVAL);
        }
        if flags & libc::RENAME_EXCHANGE != 0 {
            let other = target.ok_or(Errno::ENOENT)?;
            let other_is_dir = is_dir(&self.node(other)?.attr);
            if other_is_dir && self.is_ancestor(other, parent) {
                return Err(Errno::EINVAL);
            }
            self.dir_mut(parent)?.insert(name, other);
            self.dir_mut(newparent)?.insert(newname, ino);
            if parent != newparent && moving_dir != other_is_dir {
                let (from, to) = if moving_dir {
                    (parent, newparent)
                } else {
                    (newparent, parent)
                };
                self.adjust_nlink(from, false);
                self.adjust_nlink(to, true);
            }
            self.set_parent(ino, newparent);
            self.set_parent(other, parent);
            self.changed(ino);
            self.changed(other);
            self.modified(parent);
            self.modified(newparent);
            return Ok(());
        }
        if let Some(target) = target {
            if flags & libc::RENAME_NOREPLACE != 0 {
                return Err(Errno::EEXIST);
            }
            if target == ino {
                return Ok(()); // both names are links to the same file: nothing to do
            }
            let target_is_dir = is_dir(&self.node(target)?.attr);
            match (moving_dir, target_is_dir) {
                (true, false) => return Err(Errno::ENOTDIR),
                (false, true) => return Err(Errno::EISDIR),
                (true, true) if !self.dir(target)?.is_empty() => return Err(Errno::ENOTEMPTY),
                _ => {}
            }
            if target_is_dir {
                self.adjust_nlink(newparent, false);
            }
            self.drop_link(target);
        }
        self.dir_mut(parent)?.remove(name);
        self.dir_mut(newparent)?.insert(newname, ino);
        if moving_dir && parent != newparent {
            self.adjust_nlink(parent, false);
            self.adjust_nlink(newparent, true);
            self.set_parent(ino, newparent);
        }
        self.changed(ino);
        self.modified(parent);
        self.modified(newparent);
        if flags & libc::RENAME_WHITEOUT != 0 {
            // What overlayfs expects where the name was: a 0:0 character device.
            self.insert(ctx, parent, name, mode::S_IFCHR, 0, Content::Special)?;
        }
        Ok(())
    }

    /// Writes `data` at `offset` into node `ino`'s store file (at its end, `append`): as
    /// on tmpfs, a write that crosses the size limit writes what fits (a short write) and
    /// fails with ENOSPC only when not one byte fits.
    fn write(&self, ino: u64, offset: u64, data: &[u8], append: bool) -> Result<usize> {
        if self.limit_pages == 0 && !data.is_empty() {
            return Err(Errno::ENOSPC);
        }
        // With O_APPEND, Linux's pwrite writes at the end whatever the offset.
        self.file(ino, append)?
            .write_at(data, offset)
            .map_err(Errno::from)
    }

    /// fallocate(2), done by the store file (tmpfs's own): allocate (growing the file
    /// unless `KEEP_SIZE`) with ENOSPC when the pages do not fit, or punch a hole.
    fn fallocate(&self, ino: u64, offset: u64, length: u64, mode: i32) -> Result<()> {
        let node = self.node(ino)?;
        let keeps_to_size = mode & !libc::FALLOC_FL_KEEP_SIZE == 0;
        if node.flags & inode_flags::IMMUTABLE != 0
            || (node.flags & inode_flags::APPEND != 0 && !keeps_to_size)
        {
            return Err(Errno::EPERM);
        }
        if !node.is_file() {
            return Err(if is_dir(&node.attr) {
                Errno::EISDIR
            } else {
                Errno(libc::ENODEV)
            });
        }
        if self.limit_pages == 0 && mode & libc::FALLOC_FL_PUNCH_HOLE == 0 {
            return Err(Errno::ENOSPC);
        }
        let mode = rustix::fs::FallocateFlags::from_bits_retain(mode as u32);
        rustix::fs::fallocate(self.file(ino, false)?, mode, offset, length).map_err(errno)
    }

    fn truncate(&self, ino: u64, size: u64) -> Result<()> {
        if size > MAX_FILE_SIZE {
            return Err(Errno::EFBIG);
        }
        let (node, file) = self.file_node(ino)?;
        // Through the open descriptor if there is one; else one for this call only.
        match file.fd.get() {
            Some(fd) => fd.set_len(size),
            None => self.store.open(ino, node.flags)?.set_len(size),
        }
        .map_err(Errno::from)
    }
}

impl MemFs {
    // A panic while holding the lock is already reported as a taint; keep serving.
    fn read_tree(&self) -> RwLockReadGuard<'_, Tree> {
        self.tree.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks `ino` as read now if `relatime` says so (see `Node::atime_due`). Called after
    /// the read, without the lock: most reads find nothing to do under the shared lock.
    fn accessed(&self, ino: u64) {
        let now = Timespec::now();
        if !self.read_tree().node(ino).is_ok_and(|n| n.atime_due(now)) {
            return;
        }
        if let Ok(node) = self.tree().node_mut(ino) {
            if node.atime_due(now) {
                node.attr.atime = now;
            }
        }
    }

    fn tree(&self) -> RwLockWriteGuard<'_, Tree> {
        self.tree.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// The machine's memory in pages (MemTotal, what tmpfs sizes itself by).
fn memory_pages() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024 / PAGE)
}

/// Extended attributes memfs stores: the user, trusted and security namespaces and POSIX
/// ACLs, as tmpfs does (the kernel lets only privileged callers at trusted.*, and checks
/// ACLs before they reach memfs).
fn xattr_namespace_ok(name: &OsStr) -> Result<()> {
    let bytes = name.as_encoded_bytes();
    if [&b"user."[..], b"trusted.", b"security."]
        .iter()
        .any(|prefix| bytes.starts_with(prefix))
        || name == acl::ACCESS
        || name == acl::DEFAULT
    {
        Ok(())
    } else {
        Err(Errno::EOPNOTSUPP)
    }
}

impl MemFs {
    /// The entries of directory `ino` from `offset` on, until `out` is full.
    fn list(&self, ino: u64, offset: u64, out: &mut DirFiller) -> Result<()> {
        let tree = self.read_tree();
        let dir = tree.dir(ino)?;
        let dots = [(0, ino, "."), (1, dir.parent, "..")];
        for (at, child, name) in dots {
            if offset <= at && out.add(child, at + 1, mode::S_IFDIR, OsStr::new(name)) {
                return Ok(());
            }
        }
        for (cookie, name) in dir.by_cookie.range(offset.max(FIRST_COOKIE)..) {
            let Some(child) = dir.get(name) else { continue };
            let kind = tree
                .nodes
                .get(&child)
                .map_or(0, |n| n.attr.mode & mode::S_IFMT);
            if out.add(child, cookie + 1, kind, name) {
                break;
            }
        }
        Ok(())
    }

    /// Node `ino`'s store file for the kernel to read and write directly (passthrough),
    /// or none, and memfs serves the file: when the size limit is 0 (memfs refuses every
    /// write itself then) or the file cannot be opened.
    fn backing(&self, ino: u64) -> Option<OwnedFd> {
        let tree = self.read_tree();
        if tree.limit_pages == 0 {
            return None;
        }
        let node = tree.node(ino).ok()?;
        tree.store.open(ino, node.flags).ok().map(OwnedFd::from)
    }

    fn xattrs_on(&self) -> Result<()> {
        if self.no_xattr {
            Err(Errno::ENOSYS)
        } else {
            Ok(())
        }
    }
}

impl Plugin for MemFs {
    /// Upgrades hand the whole tree over (see `Tree`).
    const UPGRADABLE: bool = true;
    /// File contents are store files the kernel can read and write itself.
    const PASSTHROUGH: bool = true;

    fn export_state(&self, out: &mut StateWriter) -> Result<()> {
        let tree = self.read_tree();
        let saved = SavedRef {
            store: out.share_fd(tree.store.fd())?,
            nodes: &tree.nodes,
            next_ino: tree.next_ino,
        };
        state::save(out, STATE_VERSION, &saved)
    }

    fn import_state(&self, saved: &SavedState) -> Result<()> {
        let mut tree = self.tree();
        let (nodes, next_ino) = match state::version(saved)? {
            STATE_VERSION => {
                let loaded: Saved = state::load(saved)?;
                let store = saved.fd(loaded.store).map_err(Errno::from)?;
                tree.store = Store::from_fd(store);
                (loaded.nodes, loaded.next_ino)
            }
            // Pages from memfs's memory: into this instance's (new, empty) store.
            3 => legacy::nodes_v3(state::load(saved)?, &tree.store)?,
            2 => legacy::nodes_v2(state::load(saved)?, &tree.store)?,
            _ => return Err(Errno::EINVAL),
        };
        let root_is_dir = nodes.get(&ROOT).is_some_and(|n| is_dir(&n.attr));
        if !root_is_dir || nodes.keys().any(|ino| *ino >= next_ino) {
            return Err(Errno::EINVAL);
        }
        tree.counted_nodes = nodes.values().filter(|node| node.counts()).count() as u64;
        tree.uncounted.clear();
        tree.uncounted_pages = 0;
        for (ino, node) in &nodes {
            if node.is_file() && !node.counts() {
                tree.uncount(*ino);
            }
        }
        tree.nodes = nodes;
        tree.next_ino = next_ino;
        // The store handed over has the old instance's size, which this one's options
        // may change.
        tree.store_pages = u64::MAX;
        tree.fit_store();
        Ok(())
    }

    fn create(options: &Options) -> Result<Self> {
        // As tmpfs: half of the memory, and as many nodes as that has pages.
        let half = memory_pages().map_or(FALLBACK_CAPACITY / PAGE, |pages| pages / 2);
        let (mut limit_pages, mut limit_nodes) = (half, half);
        let mut no_xattr = false;
        for (key, value) in &options.0 {
            let size = || fshost_sdk::parse_size(value).ok_or(Errno::EINVAL);
            match key.as_str() {
                "size" => limit_pages = size()?.div_ceil(PAGE),
                "nr_inodes" => limit_nodes = size()?,
                "noxattr" if value.is_empty() => no_xattr = true,
                _ => return Err(Errno::EINVAL), // refuse rather than ignore a typo
            }
        }
        let now = Timespec::now();
        let root = Node::new(
            Attr {
                ino: ROOT,
                mode: mode::S_IFDIR | 0o1777,
                nlink: 2,
                atime: now,
                mtime: now,
                ctime: now,
                blksize: PAGE as u32,
                ..Attr::default()
            },
            Content::Dir(Dir::new(ROOT)),
        );
        Ok(MemFs {
            tree: RwLock::new(Tree {
                nodes: HashMap::from([(ROOT, root)]),
                next_ino: ROOT + 1,
                store: Store::new(limit_pages)?,
                counted_nodes: 1,
                limit_pages,
                limit_nodes,
                uncounted: HashMap::new(),
                uncounted_pages: 0,
                store_pages: limit_pages,
            }),
            no_xattr,
        })
    }

    /// POSIX ACLs, unless extended attributes are off; and clearing setuid/setgid itself
    /// (see `setattr`).
    fn wants(&self) -> Result<u64> {
        let acl = if self.no_xattr {
            0
        } else {
            fshost_sdk::abi::WANT_POSIX_ACL
        };
        Ok(acl | fshost_sdk::abi::WANT_KILL_PRIV)
    }

    fn lookup(&self, _ctx: &Context, parent: u64, name: &OsStr) -> Result<Attr> {
        let tree = self.read_tree();
        let ino = tree.child(parent, name)?;
        tree.looked_up(ino)
    }

    fn forget(&self, ino: u64, nlookup: u64) -> Result<()> {
        let mut tree = self.tree();
        let node = tree.node_mut(ino)?;
        let left = node.lookups.get_mut();
        *left = left.saturating_sub(nlookup);
        tree.collect(ino);
        Ok(())
    }

    fn getattr(&self, _ctx: &Context, ino: u64) -> Result<Attr> {
        let tree = self.read_tree();
        Ok(tree.attr(tree.node(ino)?))
    }

    fn birth_time(&self, _ctx: &Context, ino: u64) -> Result<Timespec> {
        Ok(self.read_tree().node(ino)?.btime)
    }

    fn get_flags(&self, _ctx: &Context, ino: u64) -> Result<u32> {
        Ok(self.read_tree().node(ino)?.flags)
    }

    fn set_flags(&self, _ctx: &Context, ino: u64, flags: u32) -> Result<()> {
        if flags & !KEPT_FLAGS != 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        let mut tree = self.tree();
        let node = tree.node(ino)?;
        if node.is_file() {
            // The store file keeps them too, for the reads and writes that pass memfs by
            // (this also moves its ctime).
            tree.store.set_flags(ino, flags)?;
        }
        let node = tree.node_mut(ino)?;
        node.flags = flags;
        node.attr.ctime = Timespec::now();
        Ok(())
    }

    fn setattr(&self, ctx: &Context, ino: u64, set: &Setattr) -> Result<Attr> {
        let mut tree = self.tree();
        let now = Timespec::now();
        tree.node(ino)?.settable(set)?;
        let file = tree.node(ino)?.is_file();
        if set.valid & SET_SIZE != 0 {
            tree.truncate(ino, set.size)?;
        }
        let node = tree.node_mut(ino)?;
        if set.valid & SET_MODE != 0 {
            node.attr.mode = (node.attr.mode & mode::S_IFMT) | (set.mode & 0o7777);
            // The access ACL follows the mode.
            if let Some(value) = node.xattrs.get_mut(acl::ACCESS.as_bytes()) {
                let mut access = Acl::parse(value)?;
                access.chmod(set.mode);
                *value = access.to_bytes();
            }
        }
        if set.valid & SET_UID != 0 {
            node.attr.uid = set.uid;
        }
        if set.valid & SET_GID != 0 {
            node.attr.gid = set.gid;
        }
        // Setuid and setgid go where tmpfs drops them (WANT_KILL_PRIV): on a new owner or
        // group; on a truncation or a write by someone else than root (taken as lacking
        // CAP_FSETID), a write said by a setattr that sets nothing. Setgid without group
        // execute goes only for a caller outside the file's group (its primary group: FUSE
        // does not say the others). Root's writes send such a setattr too when the file has
        // capabilities (`security.capability`, which the kernel removes itself): the bits
        // stay then.
        if !is_dir(&node.attr) {
            let bits = node.attr.mode;
            let group_x = bits & mode::S_IXGRP != 0;
            // The kernel's rule for a caller without CAP_FSETID.
            let sgid_goes = group_x || ctx.gid != node.attr.gid;
            let for_a_write = set.valid & !SET_FH == 0;
            let truncated = set.valid & SET_SIZE != 0;
            // A change of owner drops them from any node but a directory (a FIFO too, as
            // on tmpfs); writes and truncations reach regular files only.
            let (suid, sgid) = if set.valid & (SET_UID | SET_GID) != 0 {
                (true, group_x)
            } else if file && (for_a_write || truncated) && ctx.uid != 0 {
                (true, sgid_goes)
            } else {
                (false, false)
            };
            if suid {
                node.attr.mode &= !mode::S_ISUID;
            }
            if sgid {
                node.attr.mode &= !mode::S_ISGID;
            }
        }
        let atime = if set.valid & SET_ATIME_NOW != 0 {
            Time::Now
        } else if set.valid & SET_ATIME != 0 {
            Time::At(set.atime)
        } else {
            Time::Keep
        };
        let mtime = if set.valid & SET_MTIME_NOW != 0 {
            Time::Now
        } else if set.valid & SET_MTIME != 0 {
            Time::At(set.mtime)
        } else {
            Time::Keep
        };
        node.attr.ctime = now;
        if file {
            // A file's times are its store file's; every setattr moves its ctime. The
            // one explicit time an append-only file takes is the kernel's own stamp
            // (see `Node::settable`), which its store file refuses: now instead.
            let (atime, mtime) = if node.flags & inode_flags::APPEND != 0 {
                let now_if_set = |t| if let Time::At(_) = t { Time::Now } else { t };
                (now_if_set(atime), now_if_set(mtime))
            } else {
                (atime, mtime)
            };
            match (atime, mtime) {
                (Time::Keep, Time::Keep) if set.valid & SET_SIZE != 0 => {}
                (Time::Keep, Time::Keep) => tree.store.touch(ino)?,
                _ => tree.store.set_times(ino, atime, mtime)?,
            }
        } else {
            for (time, slot) in [(atime, &mut node.attr.atime), (mtime, &mut node.attr.mtime)] {
                match time {
                    Time::At(t) => *slot = t,
                    Time::Now => *slot = now,
                    Time::Keep => {}
                }
            }
        }
        Ok(tree.attr(tree.node(ino)?))
    }

    fn readlink(&self, _ctx: &Context, ino: u64) -> Result<Vec<u8>> {
        let target = match &self.read_tree().node(ino)?.content {
            Content::Symlink(target) => target.clone(),
            _ => return Err(Errno::EINVAL),
        };
        self.accessed(ino);
        Ok(target)
    }

    fn mknod(
        &self,
        ctx: &Context,
        parent: u64,
        name: &OsStr,
        mode: u32,
        rdev: u32,
    ) -> Result<Attr> {
        let content = match mode & mode::S_IFMT {
            mode::S_IFREG => Content::File(FileNode::default()),
            mode::S_IFIFO | mode::S_IFSOCK | mode::S_IFCHR | mode::S_IFBLK => Content::Special,
            _ => return Err(Errno::EINVAL),
        };
        self.tree().insert(ctx, parent, name, mode, rdev, content)
    }

    fn mkdir(&self, ctx: &Context, parent: u64, name: &OsStr, mode: u32) -> Result<Attr> {
        let mode = mode::S_IFDIR | (mode & 0o7777);
        self.tree()
            .insert(ctx, parent, name, mode, 0, Content::Dir(Dir::new(parent)))
    }

    fn unlink(&self, _ctx: &Context, parent: u64, name: &OsStr) -> Result<()> {
        let mut tree = self.tree();
        let ino = tree.child(parent, name)?;
        tree.removable(parent, ino)?;
        if is_dir(&tree.node(ino)?.attr) {
            return Err(Errno::EISDIR);
        }
        tree.dir_mut(parent)?.remove(name);
        tree.modified(parent);
        tree.drop_link(ino);
        Ok(())
    }

    fn rmdir(&self, _ctx: &Context, parent: u64, name: &OsStr) -> Result<()> {
        let mut tree = self.tree();
        let ino = tree.child(parent, name)?;
        tree.removable(parent, ino)?;
        if !tree.dir(ino)?.is_empty() {
            return Err(Errno::ENOTEMPTY);
        }
        tree.dir_mut(parent)?.remove(name);
        tree.adjust_nlink(parent, false);
        tree.modified(parent);
        tree.drop_link(ino);
        Ok(())
    }

    fn symlink(&self, ctx: &Context, parent: u64, name: &OsStr, target: &OsStr) -> Result<Attr> {
        let content = Content::Symlink(target.as_encoded_bytes().to_vec());
        self.tree()
            .insert(ctx, parent, name, mode::S_IFLNK | 0o777, 0, content)
    }

    fn rename(
        &self,
        ctx: &Context,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> Result<()> {
        self.tree()
            .rename(ctx, parent, name, newparent, newname, flags)
    }

    fn link(&self, _ctx: &Context, ino: u64, newparent: u64, newname: &OsStr) -> Result<Attr> {
        let mut tree = self.tree();
        check_name(newname)?;
        if is_dir(&tree.node(ino)?.attr) {
            return Err(Errno::EPERM);
        }
        if tree.dir(newparent)?.get(newname).is_some() {
            return Err(Errno::EEXIST);
        }
        tree.node(ino)?.changeable()?;
        tree.node(newparent)?.extensible()?;
        tree.dir_mut(newparent)?.insert(newname, ino);
        tree.modified(newparent);
        tree.adjust_nlink(ino, true);
        tree.changed(ino);
        tree.looked_up(ino)
    }

    fn open(&self, _ctx: &Context, ino: u64, _flags: i32) -> Result<u64> {
        let mut tree = self.tree();
        tree.node(ino)?;
        tree.hold(ino, |node| node.open += 1);
        Ok(0)
    }

    /// Hands the kernel the node's store file: it reads and writes it from then on.
    fn open_backing(&self, ctx: &Context, ino: u64, flags: i32) -> Result<(u64, Option<OwnedFd>)> {
        let fh = self.open(ctx, ino, flags)?;
        Ok((fh, self.backing(ino)))
    }

    fn read(
        &self,
        _ctx: &Context,
        ino: u64,
        _fh: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize> {
        let tree = self.read_tree();
        let file = tree.file(ino, false)?;
        // As many bytes as asked unless the file ends first (what FUSE expects of a read).
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(done)
    }

    fn fallocate(
        &self,
        _ctx: &Context,
        ino: u64,
        _fh: u64,
        offset: u64,
        length: u64,
        mode: i32,
    ) -> Result<()> {
        self.read_tree().fallocate(ino, offset, length, mode)
    }

    fn lseek(&self, _ctx: &Context, ino: u64, _fh: u64, offset: u64, whence: i32) -> Result<u64> {
        let tree = self.read_tree();
        if !tree.node(ino)?.is_file() {
            return Err(Errno::EINVAL);
        }
        let at = match whence {
            libc::SEEK_DATA => rustix::fs::SeekFrom::Data(offset),
            libc::SEEK_HOLE => rustix::fs::SeekFrom::Hole(offset),
            _ => return Err(Errno::EINVAL),
        };
        rustix::fs::seek(tree.file(ino, false)?, at).map_err(errno)
    }

    fn write(
        &self,
        _ctx: &Context,
        ino: u64,
        _fh: u64,
        offset: u64,
        data: &[u8],
        flags: i32,
    ) -> Result<usize> {
        self.read_tree()
            .write(ino, offset, data, flags & libc::O_APPEND != 0)
    }

    fn release(&self, _ctx: &Context, ino: u64, _fh: u64, _flags: i32) -> Result<()> {
        let mut tree = self.tree();
        tree.node(ino)?;
        tree.hold(ino, |node| node.open = node.open.saturating_sub(1));
        Ok(())
    }

    fn readdir(
        &self,
        _ctx: &Context,
        ino: u64,
        _fh: u64,
        offset: u64,
        out: &mut DirFiller,
    ) -> Result<()> {
        self.list(ino, offset, out)?;
        self.accessed(ino);
        Ok(())
    }

    fn statfs(&self, _ctx: &Context, _ino: u64) -> Result<Statfs> {
        let tree = self.read_tree();
        let used = tree.store.used_pages().saturating_sub(tree.excused_pages());
        let total = tree.limit_pages.max(used);
        let free = total - used;
        let nodes = tree.counted_nodes;
        Ok(Statfs {
            blocks: total,
            bfree: free,
            bavail: free,
            files: tree.limit_nodes.max(nodes),
            ffree: tree.limit_nodes.saturating_sub(nodes),
            bsize: PAGE as u32,
            namelen: NAME_MAX as u32,
            frsize: PAGE as u32,
            reserved: 0,
        })
    }

    fn setxattr(
        &self,
        ctx: &Context,
        ino: u64,
        name: &OsStr,
        value: &[u8],
        flags: i32,
    ) -> Result<()> {
        self.xattrs_on()?;
        xattr_namespace_ok(name)?;
        let mut tree = self.tree();
        let node = tree.node_mut(ino)?;
        node.changeable()?;
        let key = name.as_encoded_bytes().to_vec();
        let exists = node.xattrs.contains_key(&key);
        if flags & XATTR_CREATE != 0 && exists {
            return Err(Errno::EEXIST);
        }
        if flags & XATTR_REPLACE != 0 && !exists {
            return Err(Errno::ENODATA);
        }
        // An ACL is checked before anything changes.
        let access = match name {
            n if n == acl::ACCESS => Some(Acl::parse(value)?),
            n if n == acl::DEFAULT => {
                Acl::parse(value)?;
                None
            }
            _ => None,
        };
        node.attr.ctime = Timespec::now();
        if let Some(access) = access {
            // The ACL sets the mode; one the mode says all of is not kept. A caller
            // outside the file's group loses its setgid bit, as on tmpfs (root keeps it;
            // memfs sees only the caller's primary group, tmpfs all of them).
            let (mode, equivalent) = access.equiv_mode(node.attr.mode);
            node.attr.mode = mode;
            if ctx.uid != 0 && ctx.gid != node.attr.gid {
                node.attr.mode &= !libc::S_ISGID;
            }
            if equivalent {
                node.xattrs.remove(&key);
                return Ok(());
            }
        }
        node.xattrs.insert(key, value.to_vec());
        Ok(())
    }

    fn getxattr(&self, _ctx: &Context, ino: u64, name: &OsStr) -> Result<Vec<u8>> {
        self.xattrs_on()?;
        xattr_namespace_ok(name)?;
        let tree = self.read_tree();
        let node = tree.node(ino)?;
        node.xattrs
            .get(name.as_encoded_bytes())
            .cloned()
            .ok_or(Errno::ENODATA)
    }

    fn listxattr(&self, _ctx: &Context, ino: u64) -> Result<Vec<u8>> {
        self.xattrs_on()?;
        let tree = self.read_tree();
        let mut names = Vec::new();
        for name in tree.node(ino)?.xattrs.keys() {
            names.extend_from_slice(name);
            names.push(0);
        }
        Ok(names)
    }

    fn removexattr(&self, _ctx: &Context, ino: u64, name: &OsStr) -> Result<()> {
        self.xattrs_on()?;
        xattr_namespace_ok(name)?;
        let mut tree = self.tree();
        let node = tree.node_mut(ino)?;
        node.changeable()?;
        node.xattrs
            .remove(name.as_encoded_bytes())
            .ok_or(Errno::ENODATA)?;
        node.attr.ctime = Timespec::now();
        Ok(())
    }

    fn create_file(
        &self,
        ctx: &Context,
        parent: u64,
        name: &OsStr,
        mode: u32,
        _flags: i32,
    ) -> Result<(Attr, u64)> {
        let mut tree = self.tree();
        let mode = mode::S_IFREG | (mode & 0o7777);
        let content = Content::File(FileNode::default());
        let attr = tree.insert(ctx, parent, name, mode, 0, content)?;
        tree.hold(attr.ino, |node| node.open += 1);
        Ok((attr, 0))
    }

    fn create_backing(
        &self,
        ctx: &Context,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
    ) -> Result<(Attr, u64, Option<OwnedFd>)> {
        let (attr, fh) = self.create_file(ctx, parent, name, mode, flags)?;
        Ok((attr, fh, self.backing(attr.ino)))
    }

    /// A file in no directory, open and held by the kernel (see `Node`).
    fn tmpfile(&self, ctx: &Context, parent: u64, mode: u32, _flags: i32) -> Result<(Attr, u64)> {
        let mut tree = self.tree();
        let mode = mode::S_IFREG | (mode & 0o7777);
        let ino = tree.make(ctx, parent, mode, 0, Content::File(FileNode::default()))?;
        tree.hold(ino, |node| {
            node.attr.nlink = 0;
            node.open += 1;
        });
        Ok((tree.looked_up(ino)?, 0))
    }

    fn tmpfile_backing(
        &self,
        ctx: &Context,
        parent: u64,
        mode: u32,
        flags: i32,
    ) -> Result<(Attr, u64, Option<OwnedFd>)> {
        let (attr, fh) = self.tmpfile(ctx, parent, mode, flags)?;
        Ok((attr, fh, self.backing(attr.ino)))
    }
}

export_plugin!(MemFs, "memfs");

/// The state older generations of memfs wrote, taken over by this one.
mod legacy {
    use super::*;
    use crate::data::FileData;

    /// What a node held before version 4: a file's pages were in the state.
    #[derive(Deserialize)]
    enum ContentV3 {
        File(FileData),
        Dir(Dir),
        Symlink(Vec<u8>),
        Special,
    }

    #[derive(Deserialize)]
    pub(super) struct TreeV3 {
        nodes: HashMap<u64, NodeV3>,
        next_ino: u64,
    }

    #[derive(Deserialize)]
    struct NodeV3 {
        attr: Attr,
        content: ContentV3,
        open: u32,
        lookups: u64,
        btime: Timespec,
        flags: u32,
        xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    }

    /// Version 2: nodes without the kernel's references, a birth time or flags.
    #[derive(Deserialize)]
    pub(super) struct TreeV2 {
        nodes: HashMap<u64, NodeV2>,
        next_ino: u64,
    }

    #[derive(Deserialize)]
    struct NodeV2 {
        attr: Attr,
        content: ContentV3,
        open: u32,
        xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    }

    type Nodes = (HashMap<u64, Node>, u64);

    pub(super) fn nodes_v3(old: TreeV3, store: &Store) -> Result<Nodes> {
        let mut nodes = HashMap::new();
        for (ino, old) in old.nodes {
            let mut node = Node::new(old.attr, content(ino, old.content, &old.attr, store)?);
            node.open = old.open;
            node.lookups = AtomicU64::new(old.lookups);
            node.btime = old.btime;
            node.flags = old.flags;
            node.xattrs = old.xattrs;
            if node.is_file() && node.flags != 0 {
                store.set_flags(ino, node.flags)?;
            }
            nodes.insert(ino, node);
        }
        Ok((nodes, old.next_ino))
    }

    /// The references the kernel holds are unknown: counted as none, an unlinked node
    /// goes as soon as its last handle does, as version 2 did it. The birth time is the
    /// last change's.
    pub(super) fn nodes_v2(old: TreeV2, store: &Store) -> Result<Nodes> {
        let mut nodes = HashMap::new();
        for (ino, old) in old.nodes {
            let mut node = Node::new(old.attr, content(ino, old.content, &old.attr, store)?);
            node.open = old.open;
            node.xattrs = old.xattrs;
            nodes.insert(ino, node);
        }
        Ok((nodes, old.next_ino))
    }

    /// A node's content now: a file's pages go into a store file with its times.
    fn content(ino: u64, old: ContentV3, attr: &Attr, store: &Store) -> Result<Content> {
        Ok(match old {
            ContentV3::File(data) => {
                data.write_into(&store.create(ino)?)?;
                store.set_times(ino, Time::At(attr.atime), Time::At(attr.mtime))?;
                Content::File(FileNode::default())
            }
            ContentV3::Dir(dir) => Content::Dir(dir),
            ContentV3::Symlink(target) => Content::Symlink(target),
            ContentV3::Special => Content::Special,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memfs(options: &[(&str, &str)]) -> Result<MemFs> {
        MemFs::create(&Options(
            options
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ))
    }

    fn list(fs: &MemFs, offset: u64) -> Vec<(String, u64)> {
        let mut names = Vec::new();
        let mut add = |_ino: u64, next: u64, _mode: u32, name: &OsStr| {
            names.push((name.to_string_lossy().into_owned(), next));
            false
        };
        DirFiller::over(&mut add, |filler| {
            fs.readdir(&Context::default(), ROOT, 0, offset, filler)
        })
        .unwrap();
        names
    }

    #[test]
    fn options_are_checked() {
        assert_eq!(memfs(&[("sise", "1M")]).err(), Some(Errno::EINVAL));
        assert_eq!(memfs(&[("size", "lots")]).err(), Some(Errno::EINVAL));
        assert_eq!(memfs(&[("noxattr", "yes")]).err(), Some(Errno::EINVAL));
        assert!(memfs(&[("size", "64M"), ("noxattr", "")]).is_ok());
    }

    #[test]
    fn a_write_across_the_size_limit_writes_what_fits_as_tmpfs_does() {
        let ctx = Context::default();
        let fs = memfs(&[("size", "16K")]).unwrap();
        let (file, _) = fs
            .create_file(&ctx, ROOT, OsStr::new("f"), 0o644, libc::O_RDWR)
            .unwrap();
        let data = vec![7u8; 6 * 4096];
        // 16K is four pages: a 24K write at offset 100 writes up to the end of page four.
        assert_eq!(
            fs.write(&ctx, file.ino, 0, 100, &data, 0),
            Ok(4 * 4096 - 100)
        );
        assert_eq!(
            fs.write(&ctx, file.ino, 0, 4 * 4096, &data, 0),
            Err(Errno::ENOSPC)
        );
        // Pages that exist can still be rewritten.
        assert_eq!(fs.write(&ctx, file.ino, 0, 0, &data[..4096], 0), Ok(4096));
        assert_eq!(fs.getattr(&ctx, file.ino).unwrap().size, 4 * 4096);
    }

    /// A removed file the kernel has not forgotten yet keeps its store file (a reopen
    /// through /proc still reads it), but its space is free at once, for statfs and for
    /// writes, as on tmpfs; it goes for good with the FORGET. Such files get at most the
    /// limit once more.
    #[test]
    fn the_space_of_a_removed_file_is_free_before_the_kernel_forgets_it() {
        let ctx = Context::default();
        let fs = memfs(&[("size", "16K")]).unwrap();
        let full = vec![7u8; 4 * 4096];
        let (f, _) = fs
            .create_file(&ctx, ROOT, OsStr::new("f"), 0o644, 0)
            .unwrap();
        assert_eq!(fs.write(&ctx, f.ino, 0, 0, &full, 0), Ok(full.len()));
        fs.unlink(&ctx, ROOT, OsStr::new("f")).unwrap();
        fs.release(&ctx, f.ino, 0, 0).unwrap();
        assert_eq!(fs.statfs(&ctx, ROOT).unwrap().bfree, 4);
        let (g, _) = fs
            .create_file(&ctx, ROOT, OsStr::new("g"), 0o644, 0)
            .unwrap();
        assert_eq!(fs.write(&ctx, g.ino, 0, 0, &full, 0), Ok(full.len()));
        // Still the limit: not a page more.
        assert_eq!(
            fs.write(&ctx, g.ino, 0, full.len() as u64, b"x", 0),
            Err(Errno::ENOSPC)
        );
        assert_eq!(read_all(&fs, f.ino), full, "still readable until forgotten");
        // Not without end: a second removed file still referenced gets no more room.
        fs.unlink(&ctx, ROOT, OsStr::new("g")).unwrap();
        fs.release(&ctx, g.ino, 0, 0).unwrap();
        let (h, _) = fs
            .create_file(&ctx, ROOT, OsStr::new("h"), 0o644, 0)
            .unwrap();
        assert_eq!(fs.write(&ctx, h.ino, 0, 0, b"x", 0), Err(Errno::ENOSPC));
        assert_eq!(fs.statfs(&ctx, ROOT).unwrap().bfree, 0);
        fs.forget(g.ino, 1).unwrap();
        assert_eq!(fs.write(&ctx, h.ino, 0, 0, &full, 0), Ok(full.len()));
        fs.unlink(&ctx, ROOT, OsStr::new("h")).unwrap();
        fs.release(&ctx, h.ino, 0, 0).unwrap();
        fs.forget(h.ino, 1).unwrap();
        let (g, _) = fs
            .create_file(&ctx, ROOT, OsStr::new("g"), 0o644, 0)
            .unwrap();
        assert_eq!(fs.write(&ctx, g.ino, 0, 0, &full, 0), Ok(full.len()));
        fs.forget(f.ino, 1).unwrap();
        assert_eq!(fs.getattr(&ctx, f.ino), Err(Errno::ENOENT));
        let st = fs.statfs(&ctx, ROOT).unwrap();
        assert_eq!((st.blocks, st.bfree), (4, 0));
        assert_eq!(
            fs.write(&ctx, g.ino, 0, full.len() as u64, b"x", 0),
            Err(Errno::ENOSPC)
        );
    }

    #[test]
    fn noxattr_answers_enosys_so_that_the_kernel_stops_asking() {
        let ctx = Context::default();
        let name = OsStr::new("user.k");
        let with = memfs(&[]).unwrap();
        with.setxattr(&ctx, ROOT, name, b"v", 0).unwrap();
        assert_eq!(with.getxattr(&ctx, ROOT, name).unwrap(), b"v");
        let without = memfs(&[("noxattr", "")]).unwrap();
        assert_eq!(
            without.setxattr(&ctx, ROOT, name, b"v", 0).err(),
            Some(Errno::ENOSYS)
        );
        assert_eq!(
            without.getxattr(&ctx, ROOT, name).err(),
            Some(Errno::ENOSYS)
        );
        assert_eq!(without.listxattr(&ctx, ROOT).err(), Some(Errno::ENOSYS));
        assert_eq!(
            without.removexattr(&ctx, ROOT, name).err(),
            Some(Errno::ENOSYS)
        );
    }

    /// Exports `from` and imports it into a fresh instance, as an upgrade does.
    fn hand_over(from: &MemFs) -> MemFs {
        let (mut bytes, mut fds) = (Vec::new(), Vec::new());
        let mut sink = |chunk: &[u8]| {
            bytes.extend_from_slice(chunk);
            true
        };
        StateWriter::over(&mut sink, &mut fds, |out| from.export_state(out)).unwrap();
        let to = memfs(&[]).unwrap();
        SavedState::over(&bytes, &fds, |saved| to.import_state(saved)).unwrap();
        to
    }

    fn read_all(fs: &MemFs, ino: u64) -> Vec<u8> {
        let mut buf = vec![0u8; 1 << 16];
        let n = fs.read(&Context::default(), ino, 0, 0, &mut buf).unwrap();
        buf.truncate(n);
        buf
    }

    #[test]
    fn an_upgrade_hands_the_store_over_and_the_old_instance_may_go() {
        let ctx = Context::default();
        let old = memfs(&[]).unwrap();
        let (file, _) = old
            .create_file(&ctx, ROOT, OsStr::new("f"), 0o644, libc::O_RDWR)
            .unwrap();
        old.write(&ctx, file.ino, 0, 8192, b"kept", 0).unwrap();
        let new = hand_over(&old);
        drop(old);
        assert_eq!(new.getattr(&ctx, file.ino).unwrap().size, 8196);
        assert_eq!(&read_all(&new, file.ino)[8192..], b"kept");
        // The hole stays a hole: the store file itself crossed, not a copy of its bytes.
        assert_eq!(new.lseek(&ctx, file.ino, 0, 0, libc::SEEK_DATA), Ok(8192));
        new.release(&ctx, file.ino, 0, 0).unwrap();
    }

    /// State version 3 (pages in the state), written by the types memfs had then.
    #[test]
    fn a_version_3_state_is_taken_over_into_the_store() {
        use fshost_sdk::state::serde_bytes::ByteBuf;
        use std::collections::BTreeSet;
        #[derive(Serialize)]
        enum ContentV3 {
            File((u64, Vec<(u64, ByteBuf)>, BTreeSet<u64>)),
            Dir(Dir),
        }
        #[derive(Serialize)]
        struct NodeV3 {
            attr: Attr,
            content: ContentV3,
            open: u32,
            lookups: u64,
            btime: Timespec,
            flags: u32,
            xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
        }
        let when = Timespec {
            sec: 1_000_000_000,
            nsec: 5,
            reserved: 0,
        };
        let attr = |ino, mode| Attr {
            ino,
            mode,
            nlink: 1,
            atime: when,
            mtime: when,
            ctime: when,
            ..Attr::default()
        };
        let mut root = Dir::new(ROOT);
        root.insert(OsStr::new("f"), 2);
        let page = |byte| ByteBuf::from(vec![byte; PAGE as usize]);
        // Page 0 written, page 2 allocated and unwritten, 10,000 bytes long.
        let file = (
            10_000,
            vec![(0, page(7)), (2, page(0))],
            BTreeSet::from([2]),
        );
        let nodes = HashMap::from([
            (
                ROOT,
                NodeV3 {
                    attr: attr(ROOT, mode::S_IFDIR | 0o755),
                    content: ContentV3::Dir(root),
                    open: 0,
                    lookups: 1,
                    btime: when,
                    flags: 0,
                    xattrs: BTreeMap::new(),
                },
            ),
            (
                2,
                NodeV3 {
                    attr: attr(2, mode::S_IFREG | 0o600),
                    content: ContentV3::File(file),
                    open: 1,
                    lookups: 1,
                    btime: when,
                    flags: 0,
                    xattrs: BTreeMap::new(),
                },
            ),
        ]);
        let mut bytes = Vec::new();
        let mut sink = |chunk: &[u8]| {
            bytes.extend_from_slice(chunk);
            true
        };
        StateWriter::over(&mut sink, &mut Vec::new(), |out| {
            state::save(out, 3, &(nodes, 3u64))
        })
        .unwrap();
        let fs = memfs(&[]).unwrap();
        SavedState::over(&bytes, &[], |saved| fs.import_state(saved)).unwrap();
        let ctx = Context::default();
        let got = fs.getattr(&ctx, 2).unwrap();
        assert_eq!(
            (got.size, got.mtime, got.mode),
            (10_000, when, mode::S_IFREG | 0o600)
        );
        assert_eq!(got.blocks, 16, "two pages stored");
        let data = read_all(&fs, 2);
        assert_eq!(data.len(), 10_000);
        assert!(data[..4096].iter().all(|b| *b == 7) && data[4096..].iter().all(|b| *b == 0));
        assert_eq!(
            fs.lseek(&ctx, 2, 0, 4096, libc::SEEK_DATA),
            Err(Errno(libc::ENXIO))
        );
        assert_eq!(fs.lseek(&ctx, 2, 0, 0, libc::SEEK_HOLE), Ok(4096));
        // A new node does not take a number the old state used.
        let (new, _) = fs
            .create_file(&ctx, ROOT, OsStr::new("g"), 0o644, 0)
            .unwrap();
        assert_eq!(new.ino, 3);
    }

    #[test]
    fn readdir_resumes_at_each_entrys_offset() {
        let fs = memfs(&[]).unwrap();
        let ctx = Context::default();
        for name in ["a", "b", "c"] {
            fs.create_file(&ctx, ROOT, OsStr::new(name), 0o644, 0)
                .unwrap();
        }
        let all = list(&fs, 0);
        let names: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, [".", "..", "a", "b", "c"]);
        // Resuming at the offset an entry carries lists what follows it.
        let after_a = list(&fs, all[2].1);
        assert_eq!(after_a.first().map(|(n, _)| n.as_str()), Some("b"));
    }
}
