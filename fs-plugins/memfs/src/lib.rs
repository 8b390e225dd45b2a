//! memfs: an in-memory read-write filesystem served through fshost.
//!
//! One instance per mount; everything lives in one `Mutex<Tree>`. Permission checks are the
//! kernel's job (the daemon mounts with `default_permissions`); memfs keeps owners, modes,
//! link counts and times the way tmpfs does for the operations it implements.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::sync::{Mutex, MutexGuard};

use fshost_sdk::abi::{
    SET_ATIME, SET_ATIME_NOW, SET_GID, SET_MODE, SET_MTIME, SET_MTIME_NOW, SET_SIZE, SET_UID,
};
use fshost_sdk::{
    export_plugin, mode, Attr, Context, DirFiller, Errno, Options, Plugin, Result, Setattr, Statfs,
    Timespec,
};

const ROOT: u64 = 1;
const NAME_MAX: usize = 255;
const BLOCK: u64 = 4096;
/// Largest file memfs will hold; offsets past it give `EFBIG` instead of a huge allocation.
const MAX_FILE_SIZE: u64 = 1 << 40;

enum Content {
    File(Vec<u8>),
    Dir {
        entries: BTreeMap<OsString, u64>,
        parent: u64,
    },
    Symlink(Vec<u8>),
    /// FIFOs, sockets and device nodes: only metadata.
    Special,
}

struct Node {
    attr: Attr,
    content: Content,
    /// Open file handles; an unlinked node lives until the last one is released.
    open: u32,
}

struct Tree {
    nodes: HashMap<u64, Node>,
    next_ino: u64,
}

pub struct MemFs {
    tree: Mutex<Tree>,
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

impl Tree {
    fn node(&self, ino: u64) -> Result<&Node> {
        self.nodes.get(&ino).ok_or(Errno::ENOENT)
    }

    fn node_mut(&mut self, ino: u64) -> Result<&mut Node> {
        self.nodes.get_mut(&ino).ok_or(Errno::ENOENT)
    }

    fn entries(&self, dir: u64) -> Result<&BTreeMap<OsString, u64>> {
        match &self.node(dir)?.content {
            Content::Dir { entries, .. } => Ok(entries),
            _ => Err(Errno::ENOTDIR),
        }
    }

    fn entries_mut(&mut self, dir: u64) -> Result<&mut BTreeMap<OsString, u64>> {
        match &mut self.node_mut(dir)?.content {
            Content::Dir { entries, .. } => Ok(entries),
            _ => Err(Errno::ENOTDIR),
        }
    }

    fn child(&self, dir: u64, name: &OsStr) -> Result<u64> {
        check_name(name)?;
        self.entries(dir)?.get(name).copied().ok_or(Errno::ENOENT)
    }

    /// Marks a directory's contents as changed now.
    fn touch_dir(&mut self, dir: u64) {
        if let Some(node) = self.nodes.get_mut(&dir) {
            let now = Timespec::now();
            node.attr.mtime = now;
            node.attr.ctime = now;
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
        let parent_attr = self.node(parent)?.attr;
        if self.entries(parent)?.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let now = Timespec::now();
        let dir = matches!(content, Content::Dir { .. });
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
            blksize: BLOCK as u32,
        };
        self.nodes.insert(
            ino,
            Node {
                attr,
                content,
                open: 0,
            },
        );
        self.entries_mut(parent)?.insert(name.to_owned(), ino);
        if dir {
            self.node_mut(parent)?.attr.nlink += 1;
        }
        self.touch_dir(parent);
        Ok(attr)
    }

    /// Drops one link to `ino`; frees it when no link and no open handle is left.
    fn drop_link(&mut self, ino: u64) {
        let Some(node) = self.nodes.get_mut(&ino) else {
            return;
        };
        node.attr.nlink = node.attr.nlink.saturating_sub(1);
        node.attr.ctime = Timespec::now();
        if is_dir(&node.attr) {
            node.attr.nlink = 0; // a removed directory has no "." link either
        }
        self.collect(ino);
    }

    fn collect(&mut self, ino: u64) {
        if let Some(node) = self.nodes.get(&ino) {
            if node.attr.nlink == 0 && node.open == 0 {
                self.nodes.remove(&ino);
            }
        }
    }

    /// True if `ancestor` is `ino` or one of its parent directories.
    fn is_ancestor(&self, ancestor: u64, mut ino: u64) -> bool {
        loop {
            if ino == ancestor {
                return true;
            }
            match self.nodes.get(&ino).map(|n| &n.content) {
                Some(Content::Dir { parent, .. }) if *parent != ino => ino = *parent,
                _ => return false,
            }
        }
    }

    fn set_parent(&mut self, ino: u64, new_parent: u64) {
        if let Some(Node {
            content: Content::Dir { parent, .. },
            ..
        }) = self.nodes.get_mut(&ino)
        {
            *parent = new_parent;
        }
    }

    fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> Result<()> {
        check_name(newname)?;
        let ino = self.child(parent, name)?;
        self.entries(newparent)?;
        let target = self.entries(newparent)?.get(newname).copied();
        let moving_dir = is_dir(&self.node(ino)?.attr);
        if moving_dir && newparent != parent && self.is_ancestor(ino, newparent) {
            return Err(Errno::EINVAL);
        }
        if flags & libc::RENAME_EXCHANGE != 0 {
            let other = target.ok_or(Errno::ENOENT)?;
            if is_dir(&self.node(other)?.attr) && self.is_ancestor(other, parent) {
                return Err(Errno::EINVAL);
            }
            self.entries_mut(parent)?.insert(name.to_owned(), other);
            self.entries_mut(newparent)?.insert(newname.to_owned(), ino);
            let other_is_dir = is_dir(&self.node(other)?.attr);
            if parent != newparent && moving_dir != other_is_dir {
                let (from, to) = if moving_dir {
                    (parent, newparent)
                } else {
                    (newparent, parent)
                };
                self.node_mut(from)?.attr.nlink -= 1;
                self.node_mut(to)?.attr.nlink += 1;
            }
            self.set_parent(ino, newparent);
            self.set_parent(other, parent);
            for changed in [ino, other] {
                self.node_mut(changed)?.attr.ctime = Timespec::now();
            }
            self.touch_dir(parent);
            self.touch_dir(newparent);
            return Ok(());
        }
        if let Some(target) = target {
            if flags & libc::RENAME_NOREPLACE != 0 {
                return Err(Errno::EEXIST);
            }
            if target == ino {
                return Ok(()); // both names are links to the same file: nothing to do
            }
            let target_attr = self.node(target)?.attr;
            match (moving_dir, is_dir(&target_attr)) {
                (true, false) => return Err(Errno::ENOTDIR),
                (false, true) => return Err(Errno::EISDIR),
                (true, true) if !self.entries(target)?.is_empty() => return Err(Errno::ENOTEMPTY),
                _ => {}
            }
            if is_dir(&target_attr) {
                self.node_mut(newparent)?.attr.nlink -= 1;
            }
            self.drop_link(target);
        }
        self.entries_mut(parent)?.remove(name);
        self.entries_mut(newparent)?.insert(newname.to_owned(), ino);
        if moving_dir && parent != newparent {
            self.node_mut(parent)?.attr.nlink -= 1;
            self.node_mut(newparent)?.attr.nlink += 1;
            self.set_parent(ino, newparent);
        }
        self.node_mut(ino)?.attr.ctime = Timespec::now();
        self.touch_dir(parent);
        self.touch_dir(newparent);
        Ok(())
    }
}

impl MemFs {
    fn tree(&self) -> MutexGuard<'_, Tree> {
        // A panic while holding the lock is already reported as a taint; keep serving.
        self.tree.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn set_size(data: &mut Vec<u8>, attr: &mut Attr, size: u64) -> Result<()> {
    if size > MAX_FILE_SIZE {
        return Err(Errno::EFBIG);
    }
    data.resize(size as usize, 0);
    attr.size = size;
    attr.blocks = size.div_ceil(512);
    Ok(())
}

impl Plugin for MemFs {
    fn create(options: &Options) -> Result<Self> {
        if !options.0.is_empty() {
            // memfs takes no options yet: refuse rather than silently ignore a typo.
            return Err(Errno::EINVAL);
        }
        let now = Timespec::now();
        let root = Node {
            attr: Attr {
                ino: ROOT,
                mode: mode::S_IFDIR | 0o1777,
                nlink: 2,
                atime: now,
                mtime: now,
                ctime: now,
                blksize: BLOCK as u32,
                ..Attr::default()
            },
            content: Content::Dir {
                entries: BTreeMap::new(),
                parent: ROOT,
            },
            open: 0,
        };
        Ok(MemFs {
            tree: Mutex::new(Tree {
                nodes: HashMap::from([(ROOT, root)]),
                next_ino: ROOT + 1,
            }),
        })
    }

    fn lookup(&self, _ctx: &Context, parent: u64, name: &OsStr) -> Result<Attr> {
        let tree = self.tree();
        let ino = tree.child(parent, name)?;
        Ok(tree.node(ino)?.attr)
    }

    fn getattr(&self, _ctx: &Context, ino: u64) -> Result<Attr> {
        Ok(self.tree().node(ino)?.attr)
    }

    fn setattr(&self, _ctx: &Context, ino: u64, set: &Setattr) -> Result<Attr> {
        let mut tree = self.tree();
        let node = tree.node_mut(ino)?;
        let now = Timespec::now();
        if set.valid & SET_SIZE != 0 {
            match &mut node.content {
                Content::File(data) => set_size(data, &mut node.attr, set.size)?,
                Content::Dir { .. } => return Err(Errno::EISDIR),
                _ => return Err(Errno::EINVAL),
            }
            node.attr.mtime = now;
        }
        if set.valid & SET_MODE != 0 {
            node.attr.mode = (node.attr.mode & mode::S_IFMT) | (set.mode & 0o7777);
        }
        if set.valid & SET_UID != 0 {
            node.attr.uid = set.uid;
        }
        if set.valid & SET_GID != 0 {
            node.attr.gid = set.gid;
        }
        if set.valid & SET_ATIME_NOW != 0 {
            node.attr.atime = now;
        } else if set.valid & SET_ATIME != 0 {
            node.attr.atime = set.atime;
        }
        if set.valid & SET_MTIME_NOW != 0 {
            node.attr.mtime = now;
        } else if set.valid & SET_MTIME != 0 {
            node.attr.mtime = set.mtime;
        }
        node.attr.ctime = now;
        Ok(node.attr)
    }

    fn readlink(&self, _ctx: &Context, ino: u64) -> Result<Vec<u8>> {
        match &self.tree().node(ino)?.content {
            Content::Symlink(target) => Ok(target.clone()),
            _ => Err(Errno::EINVAL),
        }
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
            mode::S_IFREG => Content::File(Vec::new()),
            mode::S_IFIFO | mode::S_IFSOCK | mode::S_IFCHR | mode::S_IFBLK => Content::Special,
            _ => return Err(Errno::EINVAL),
        };
        self.tree().insert(ctx, parent, name, mode, rdev, content)
    }

    fn mkdir(&self, ctx: &Context, parent: u64, name: &OsStr, mode: u32) -> Result<Attr> {
        let content = Content::Dir {
            entries: BTreeMap::new(),
            parent,
        };
        let mode = mode::S_IFDIR | (mode & 0o7777);
        self.tree().insert(ctx, parent, name, mode, 0, content)
    }

    fn unlink(&self, _ctx: &Context, parent: u64, name: &OsStr) -> Result<()> {
        let mut tree = self.tree();
        let ino = tree.child(parent, name)?;
        if is_dir(&tree.node(ino)?.attr) {
            return Err(Errno::EISDIR);
        }
        tree.entries_mut(parent)?.remove(name);
        tree.touch_dir(parent);
        tree.drop_link(ino);
        Ok(())
    }

    fn rmdir(&self, _ctx: &Context, parent: u64, name: &OsStr) -> Result<()> {
        let mut tree = self.tree();
        let ino = tree.child(parent, name)?;
        if !tree.entries(ino)?.is_empty() {
            return Err(Errno::ENOTEMPTY);
        }
        tree.entries_mut(parent)?.remove(name);
        tree.node_mut(parent)?.attr.nlink -= 1;
        tree.touch_dir(parent);
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
        _ctx: &Context,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> Result<()> {
        self.tree().rename(parent, name, newparent, newname, flags)
    }

    fn link(&self, _ctx: &Context, ino: u64, newparent: u64, newname: &OsStr) -> Result<Attr> {
        let mut tree = self.tree();
        check_name(newname)?;
        if is_dir(&tree.node(ino)?.attr) {
            return Err(Errno::EPERM);
        }
        if tree.entries(newparent)?.contains_key(newname) {
            return Err(Errno::EEXIST);
        }
        tree.entries_mut(newparent)?.insert(newname.to_owned(), ino);
        tree.touch_dir(newparent);
        let node = tree.node_mut(ino)?;
        node.attr.nlink += 1;
        node.attr.ctime = Timespec::now();
        Ok(node.attr)
    }

    fn open(&self, _ctx: &Context, ino: u64, _flags: i32) -> Result<u64> {
        self.tree().node_mut(ino)?.open += 1;
        Ok(0)
    }

    fn read(
        &self,
        _ctx: &Context,
        ino: u64,
        _fh: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize> {
        let tree = self.tree();
        let Content::File(data) = &tree.node(ino)?.content else {
            return Err(Errno::EISDIR);
        };
        let start = data
            .len()
            .min(usize::try_from(offset).unwrap_or(usize::MAX));
        let n = buf.len().min(data.len() - start);
        buf[..n].copy_from_slice(&data[start..start + n]);
        Ok(n)
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
        let mut tree = self.tree();
        let node = tree.node_mut(ino)?;
        let Content::File(bytes) = &mut node.content else {
            return Err(Errno::EISDIR);
        };
        let offset = if flags & libc::O_APPEND != 0 {
            bytes.len() as u64
        } else {
            offset
        };
        let end = offset.checked_add(data.len() as u64).ok_or(Errno::EFBIG)?;
        if end > bytes.len() as u64 {
            set_size(bytes, &mut node.attr, end)?;
        }
        bytes[offset as usize..end as usize].copy_from_slice(data);
        let now = Timespec::now();
        node.attr.mtime = now;
        node.attr.ctime = now;
        // Writing by a non-owner clears setuid/setgid, as the kernel expects of a filesystem.
        node.attr.mode &= !(libc::S_ISUID | libc::S_ISGID);
        Ok(data.len())
    }

    fn release(&self, _ctx: &Context, ino: u64, _fh: u64, _flags: i32) -> Result<()> {
        let mut tree = self.tree();
        let node = tree.node_mut(ino)?;
        node.open = node.open.saturating_sub(1);
        tree.collect(ino);
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
        let tree = self.tree();
        let node = tree.node(ino)?;
        let Content::Dir { entries, parent } = &node.content else {
            return Err(Errno::ENOTDIR);
        };
        let dots = [(ino, OsStr::new(".")), (*parent, OsStr::new(".."))];
        let all = dots
            .into_iter()
            .chain(entries.iter().map(|(name, ino)| (*ino, name.as_os_str())));
        for (index, (child, name)) in all.enumerate().skip(offset as usize) {
            let kind = tree
                .nodes
                .get(&child)
                .map_or(mode::S_IFDIR, |n| n.attr.mode & mode::S_IFMT);
            if out.add(child, index as u64 + 1, kind, name) {
                break;
            }
        }
        Ok(())
    }

    fn statfs(&self, _ctx: &Context, _ino: u64) -> Result<Statfs> {
        let tree = self.tree();
        let used: u64 = tree
            .nodes
            .values()
            .map(|n| n.attr.size.div_ceil(BLOCK))
            .sum();
        let total = (MAX_FILE_SIZE / BLOCK).max(used);
        Ok(Statfs {
            blocks: total,
            bfree: total - used,
            bavail: total - used,
            files: u32::MAX as u64,
            ffree: u32::MAX as u64 - tree.nodes.len() as u64,
            bsize: BLOCK as u32,
            namelen: NAME_MAX as u32,
            frsize: BLOCK as u32,
            reserved: 0,
        })
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
        let attr = tree.insert(ctx, parent, name, mode, 0, Content::File(Vec::new()))?;
        tree.node_mut(attr.ino)?.open += 1;
        Ok((attr, 0))
    }
}

export_plugin!(MemFs, "memfs");
