//! passthroughfs: mirrors a source directory (`-o source=/path`). Metadata operations go
//! through the plugin; file data goes through FUSE passthrough where the kernel has it
//! (Linux 6.9+): `open` hands the kernel the source file itself, so reads and writes never
//! reach the daemon. Elsewhere the plugin serves `read` and `write` from the same file.
//!
//! Inodes are the source's inode numbers (the source root is inode 1), and each inode is
//! reached through the last path it was seen under. The daemon runs as root, so objects
//! created here are handed to the caller (`chown`) and get exactly the requested mode.
//! Limits: one source file system (inode numbers of nested mounts could collide), no
//! extended attributes yet.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirEntryExt, FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use fshost_sdk::abi::{
    SET_ATIME, SET_ATIME_NOW, SET_GID, SET_MODE, SET_MTIME, SET_MTIME_NOW, SET_SIZE, SET_UID,
};
use fshost_sdk::state::{self, SharedFd};
use fshost_sdk::{
    export_plugin, mode, Attr, Context, DirFiller, Errno, Options, Plugin, Result, SavedState,
    Setattr, StateWriter, Statfs, Timespec,
};
use nix::fcntl::{OFlag, RenameFlags};
use nix::sys::stat::{Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid};
use serde::{Deserialize, Serialize};

const ROOT: u64 = 1;

pub struct PassthroughFs {
    source: PathBuf,
    /// The source root's own inode number, shown as inode 1.
    root_ino: u64,
    /// inode → path relative to the source (empty for the root).
    paths: RwLock<HashMap<u64, PathBuf>>,
    files: Mutex<HashMap<u64, File>>,
    /// Open directories: handle → the directory's listing, read at `opendir` and again at
    /// each read from offset 0 but the first. A listing of N entries comes in about N/100
    /// READDIRs; reading the directory again for each made listing it O(N²) (8 µs an
    /// entry at 10,000).
    dirs: Mutex<HashMap<u64, OpenDir>>,
    next_fh: AtomicU64,
    /// Set by `resume` (the instance before us died with fshostd): the kernel may name
    /// inodes we never looked up, which are found by walking the source once.
    resumed: AtomicBool,
    /// The walk has been done: an inode still unknown no longer exists.
    walked: AtomicBool,
}

/// A directory's entries: (inode, file type bits, name).
type Listing = Vec<(u64, u32, OsString)>;

/// A directory opened through the mount.
struct OpenDir {
    ino: u64,
    listing: Arc<Listing>,
    /// Not read yet: the first read from offset 0 takes the listing `opendir` made (read
    /// again, it cost as much as the rest of the listing's requests together).
    unread: bool,
}

/// How many entries the walk after a crash visits at most.
const WALK_LIMIT: usize = 1 << 20;

fn nix_errno(e: nix::Error) -> Errno {
    Errno(e as i32)
}

fn timespec(sec: i64, nsec: i64) -> Timespec {
    Timespec {
        sec,
        nsec: nsec as u32,
        reserved: 0,
    }
}

impl PassthroughFs {
    fn full(&self, relative: &Path) -> PathBuf {
        self.source.join(relative)
    }

    fn path(&self, ino: u64) -> Result<PathBuf> {
        Ok(self.full(&self.relative(ino)?))
    }

    fn relative(&self, ino: u64) -> Result<PathBuf> {
        let known = self
            .paths
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ino)
            .cloned();
        match known {
            Some(path) => Ok(path),
            None if self.resumed.load(Ordering::Relaxed) => self.find(ino),
            None => Err(Errno::ENOENT),
        }
    }

    /// After a crash: the path of an inode the kernel knows from before, found by walking
    /// the source (once; every path seen is remembered), without following symlinks or
    /// leaving its file system. ESTALE if it no longer exists.
    fn find(&self, ino: u64) -> Result<PathBuf> {
        if !self.walked.swap(true, Ordering::SeqCst) {
            let mut seen = Vec::new();
            let dev = fs::symlink_metadata(&self.source)
                .map_err(Errno::from)?
                .dev();
            let mut dirs = vec![PathBuf::new()];
            while let Some(dir) = dirs.pop() {
                let Ok(entries) = fs::read_dir(self.full(&dir)) else {
                    continue;
                };
                for entry in entries.flatten() {
                    let relative = dir.join(entry.file_name());
                    let Ok(meta) = entry.metadata() else { continue };
                    if meta.dev() != dev || seen.len() >= WALK_LIMIT {
                        continue;
                    }
                    if meta.is_dir() {
                        dirs.push(relative.clone());
                    }
                    seen.push((self.fuse_ino(meta.ino()), relative));
                }
            }
            let mut paths = self.paths.write().unwrap_or_else(|e| e.into_inner());
            for (found, relative) in seen {
                paths.entry(found).or_insert(relative);
            }
        }
        let paths = self.paths.read().unwrap_or_else(|e| e.into_inner());
        paths.get(&ino).cloned().ok_or(Errno(libc::ESTALE))
    }

    fn child(&self, parent: u64, name: &OsStr) -> Result<PathBuf> {
        if name.len() > 255 {
            return Err(Errno::ENAMETOOLONG);
        }
        // The kernel never sends these, but a name must never leave the source directory.
        if name == "." || name == ".." || name.as_encoded_bytes().contains(&b'/') {
            return Err(Errno::EINVAL);
        }
        Ok(self.relative(parent)?.join(name))
    }

    fn fuse_ino(&self, st_ino: u64) -> u64 {
        if st_ino == self.root_ino {
            ROOT
        } else {
            st_ino
        }
    }

    /// Stats `relative` (without following a final symlink) and remembers its path.
    fn stat(&self, relative: &Path) -> Result<Attr> {
        let meta = fs::symlink_metadata(self.full(relative)).map_err(Errno::from)?;
        let ino = self.fuse_ino(meta.ino());
        self.paths
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ino, relative.to_path_buf());
        Ok(Attr {
            ino,
            size: meta.size(),
            blocks: meta.blocks(),
            atime: timespec(meta.atime(), meta.atime_nsec()),
            mtime: timespec(meta.mtime(), meta.mtime_nsec()),
            ctime: timespec(meta.ctime(), meta.ctime_nsec()),
            mode: meta.mode(),
            nlink: meta.nlink() as u32,
            uid: meta.uid(),
            gid: meta.gid(),
            rdev: meta.rdev() as u32,
            blksize: meta.blksize() as u32,
        })
    }

    /// Gives a new object to the caller and its exact mode, then stats it.
    fn finish_create(&self, ctx: &Context, relative: &Path, mode: u32) -> Result<Attr> {
        let full = self.full(relative);
        if mode & mode::S_IFMT != mode::S_IFLNK {
            fs::set_permissions(&full, fs::Permissions::from_mode(mode & 0o7777))
                .map_err(Errno::from)?;
        }
        nix::unistd::fchownat(
            nix::fcntl::AT_FDCWD,
            &full,
            Some(Uid::from_raw(ctx.uid)),
            Some(Gid::from_raw(ctx.gid)),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(nix_errno)?;
        self.stat(relative)
    }

    fn open_file(&self, path: &Path, flags: i32, create_mode: Option<u32>) -> Result<File> {
        let mut oflags =
            OFlag::from_bits_truncate(flags) & !(OFlag::O_NOCTTY | OFlag::O_CREAT | OFlag::O_EXCL);
        if create_mode.is_some() {
            oflags |= OFlag::O_CREAT | OFlag::O_EXCL;
        }
        oflags |= OFlag::O_CLOEXEC;
        let mode = Mode::from_bits_truncate(create_mode.unwrap_or(0) & 0o7777);
        let fd: OwnedFd = nix::fcntl::open(path, oflags, mode).map_err(nix_errno)?;
        Ok(File::from(fd))
    }

    /// The entries of directory `ino`, `.` and `..` first.
    fn list(&self, ino: u64) -> Result<Listing> {
        let relative = self.relative(ino)?;
        let mut entries: Listing = vec![
            (ino, mode::S_IFDIR, ".".into()),
            (ino, mode::S_IFDIR, "..".into()),
        ];
        for entry in fs::read_dir(self.full(&relative)).map_err(Errno::from)? {
            let entry = entry.map_err(Errno::from)?;
            let kind = entry.file_type().map_err(Errno::from)?;
            let kind = if kind.is_dir() {
                mode::S_IFDIR
            } else if kind.is_symlink() {
                mode::S_IFLNK
            } else if kind.is_file() {
                mode::S_IFREG
            } else {
                fs::symlink_metadata(entry.path()).map_or(0, |m| m.mode() & mode::S_IFMT)
            };
            entries.push((self.fuse_ino(entry.ino()), kind, entry.file_name()));
        }
        Ok(entries)
    }

    fn open_dirs(&self) -> MutexGuard<'_, HashMap<u64, OpenDir>> {
        self.dirs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn keep(&self, file: File) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(fh, file);
        fh
    }

    fn with_file<T>(&self, fh: u64, f: impl FnOnce(&File) -> std::io::Result<T>) -> Result<T> {
        let files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        let file = files.get(&fh).ok_or(Errno::EBADF)?;
        f(file).map_err(Errno::from)
    }

    /// After a rename, every remembered path under `from` now lives under `to`.
    fn moved(&self, from: &Path, to: &Path) {
        let mut paths = self.paths.write().unwrap_or_else(|e| e.into_inner());
        for path in paths.values_mut() {
            if let Ok(rest) = path.strip_prefix(from) {
                // Not `to.join("")`, which ends in a slash: a file's path would then not
                // resolve (ENOTDIR).
                *path = if rest.as_os_str().is_empty() {
                    to.to_path_buf()
                } else {
                    to.join(rest)
                };
            }
        }
    }
}

fn utime(set: &Setattr, now_bit: u32, bit: u32, t: Timespec) -> TimeSpec {
    if set.valid & now_bit != 0 {
        TimeSpec::UTIME_NOW
    } else if set.valid & bit != 0 {
        TimeSpec::new(t.sec, i64::from(t.nsec))
    } else {
        TimeSpec::UTIME_OMIT
    }
}

/// What an upgrade hands over: the paths inodes are reached by, and the open files by
/// their handles (the kernel and the host's passthrough registrations know them by those).
#[derive(Serialize, Deserialize)]
struct Saved {
    paths: Vec<(u64, OsString)>,
    files: Vec<(u64, SharedFd)>,
    next_fh: u64,
}

const STATE_VERSION: u32 = 1;

impl Plugin for PassthroughFs {
    const PASSTHROUGH: bool = true;
    const UPGRADABLE: bool = true;
    /// Node ids are the source's inode numbers: after a crash, unknown ones are found by
    /// walking the source. Files open through passthrough never needed us; other handles
    /// of the lost process answer EBADF.
    const RESUMABLE: bool = true;

    fn resume(&self) -> Result<()> {
        self.resumed.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn export_state(&self, out: &mut StateWriter) -> Result<()> {
        let paths = self.paths.read().unwrap_or_else(|e| e.into_inner());
        let files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        let saved = Saved {
            paths: paths
                .iter()
                .map(|(ino, path)| (*ino, path.clone().into_os_string()))
                .collect(),
            files: files
                .iter()
                .map(|(fh, file)| Ok((*fh, out.share_fd(file)?)))
                .collect::<Result<_>>()?,
            next_fh: self.next_fh.load(Ordering::Relaxed),
        };
        state::save(out, STATE_VERSION, &saved)
    }

    fn fallocate(
        &self,
        _ctx: &Context,
        _ino: u64,
        fh: u64,
        offset: u64,
        length: u64,
        mode: i32,
    ) -> Result<()> {
        let mode = nix::fcntl::FallocateFlags::from_bits(mode).ok_or(Errno::EOPNOTSUPP)?;
        self.with_file(fh, |file| {
            nix::fcntl::fallocate(file, mode, offset as i64, length as i64)
                .map_err(std::io::Error::from)
        })
    }

    fn lseek(&self, _ctx: &Context, _ino: u64, fh: u64, offset: u64, whence: i32) -> Result<u64> {
        let whence = match whence {
            libc::SEEK_DATA => nix::unistd::Whence::SeekData,
            libc::SEEK_HOLE => nix::unistd::Whence::SeekHole,
            _ => return Err(Errno::EINVAL),
        };
        self.with_file(fh, |file| {
            nix::unistd::lseek(file, offset as i64, whence)
                .map(|at| at as u64)
                .map_err(std::io::Error::from)
        })
    }

    fn import_state(&self, state_in: &SavedState) -> Result<()> {
        if state::version(state_in)? != STATE_VERSION {
            return Err(Errno::EINVAL);
        }
        let saved: Saved = state::load(state_in)?;
        let mut files = HashMap::new();
        for (fh, fd) in saved.files {
            files.insert(fh, File::from(state_in.fd(fd).map_err(Errno::from)?));
        }
        *self.paths.write().unwrap_or_else(|e| e.into_inner()) = saved
            .paths
            .into_iter()
            .map(|(ino, path)| (ino, PathBuf::from(path)))
            .collect();
        *self.files.lock().unwrap_or_else(|e| e.into_inner()) = files;
        self.next_fh.store(saved.next_fh, Ordering::Relaxed);
        Ok(())
    }

    fn create(options: &Options) -> Result<Self> {
        let source = options.get("source").ok_or(Errno::EINVAL)?;
        let source = Path::new(source).canonicalize().map_err(Errno::from)?;
        let meta = fs::metadata(&source).map_err(Errno::from)?;
        if !meta.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        Ok(PassthroughFs {
            source,
            root_ino: meta.ino(),
            paths: RwLock::new(HashMap::from([(ROOT, PathBuf::new())])),
            files: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            resumed: AtomicBool::new(false),
            walked: AtomicBool::new(false),
        })
    }

    fn lookup(&self, _ctx: &Context, parent: u64, name: &OsStr) -> Result<Attr> {
        self.stat(&self.child(parent, name)?)
    }

    fn getattr(&self, _ctx: &Context, ino: u64) -> Result<Attr> {
        self.stat(&self.relative(ino)?)
    }

    fn setattr(&self, _ctx: &Context, ino: u64, set: &Setattr) -> Result<Attr> {
        let relative = self.relative(ino)?;
        let full = self.full(&relative);
        if set.valid & SET_MODE != 0 {
            fs::set_permissions(&full, fs::Permissions::from_mode(set.mode & 0o7777))
                .map_err(Errno::from)?;
        }
        if set.valid & (SET_UID | SET_GID) != 0 {
            let uid = (set.valid & SET_UID != 0).then(|| Uid::from_raw(set.uid));
            let gid = (set.valid & SET_GID != 0).then(|| Gid::from_raw(set.gid));
            nix::unistd::fchownat(
                nix::fcntl::AT_FDCWD,
                &full,
                uid,
                gid,
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(nix_errno)?;
        }
        if set.valid & SET_SIZE != 0 {
            nix::unistd::truncate(&full, set.size as i64).map_err(nix_errno)?;
        }
        if set.valid & (SET_ATIME | SET_ATIME_NOW | SET_MTIME | SET_MTIME_NOW) != 0 {
            let atime = utime(set, SET_ATIME_NOW, SET_ATIME, set.atime);
            let mtime = utime(set, SET_MTIME_NOW, SET_MTIME, set.mtime);
            nix::sys::stat::utimensat(
                nix::fcntl::AT_FDCWD,
                &full,
                &atime,
                &mtime,
                UtimensatFlags::NoFollowSymlink,
            )
            .map_err(nix_errno)?;
        }
        self.stat(&relative)
    }

    fn readlink(&self, _ctx: &Context, ino: u64) -> Result<Vec<u8>> {
        let target = fs::read_link(self.path(ino)?).map_err(Errno::from)?;
        Ok(target.into_os_string().into_encoded_bytes())
    }

    fn mknod(
        &self,
        ctx: &Context,
        parent: u64,
        name: &OsStr,
        mode: u32,
        rdev: u32,
    ) -> Result<Attr> {
        let relative = self.child(parent, name)?;
        let kind = SFlag::from_bits_truncate(mode & mode::S_IFMT);
        let perm = Mode::from_bits_truncate(mode & 0o7777);
        nix::sys::stat::mknod(&self.full(&relative), kind, perm, u64::from(rdev))
            .map_err(nix_errno)?;
        self.finish_create(ctx, &relative, mode)
    }

    fn mkdir(&self, ctx: &Context, parent: u64, name: &OsStr, mode: u32) -> Result<Attr> {
        let relative = self.child(parent, name)?;
        fs::create_dir(self.full(&relative)).map_err(Errno::from)?;
        self.finish_create(ctx, &relative, mode::S_IFDIR | mode)
    }

    fn unlink(&self, _ctx: &Context, parent: u64, name: &OsStr) -> Result<()> {
        fs::remove_file(self.full(&self.child(parent, name)?)).map_err(Errno::from)
    }

    fn rmdir(&self, _ctx: &Context, parent: u64, name: &OsStr) -> Result<()> {
        fs::remove_dir(self.full(&self.child(parent, name)?)).map_err(Errno::from)
    }

    fn symlink(&self, ctx: &Context, parent: u64, name: &OsStr, target: &OsStr) -> Result<Attr> {
        let relative = self.child(parent, name)?;
        std::os::unix::fs::symlink(target, self.full(&relative)).map_err(Errno::from)?;
        self.finish_create(ctx, &relative, mode::S_IFLNK | 0o777)
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
        let (from, to) = (self.child(parent, name)?, self.child(newparent, newname)?);
        let flags = RenameFlags::from_bits(flags).ok_or(Errno::EINVAL)?;
        nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            &self.full(&from),
            nix::fcntl::AT_FDCWD,
            &self.full(&to),
            flags,
        )
        .map_err(nix_errno)?;
        if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            let parked: PathBuf = OsString::from("\0exchange").into();
            self.moved(&from, &parked);
            self.moved(&to, &from);
            self.moved(&parked, &to);
        } else {
            self.moved(&from, &to);
        }
        Ok(())
    }

    fn link(&self, _ctx: &Context, ino: u64, newparent: u64, newname: &OsStr) -> Result<Attr> {
        let relative = self.child(newparent, newname)?;
        fs::hard_link(self.path(ino)?, self.full(&relative)).map_err(Errno::from)?;
        self.stat(&relative)
    }

    fn open(&self, ctx: &Context, ino: u64, flags: i32) -> Result<u64> {
        self.open_backing(ctx, ino, flags).map(|(fh, _)| fh)
    }

    fn open_backing(&self, _ctx: &Context, ino: u64, flags: i32) -> Result<(u64, Option<OwnedFd>)> {
        let file = self.open_file(&self.path(ino)?, flags, None)?;
        let backing = file.try_clone().map_err(Errno::from)?;
        Ok((self.keep(file), Some(OwnedFd::from(backing))))
    }

    fn read(
        &self,
        _ctx: &Context,
        _ino: u64,
        fh: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize> {
        self.with_file(fh, |file| {
            let mut done = 0;
            while done < buf.len() {
                match file.read_at(&mut buf[done..], offset + done as u64)? {
                    0 => break,
                    n => done += n,
                }
            }
            Ok(done)
        })
    }

    fn write(
        &self,
        _ctx: &Context,
        _ino: u64,
        fh: u64,
        offset: u64,
        data: &[u8],
        _flags: i32,
    ) -> Result<usize> {
        self.with_file(fh, |file| {
            file.write_all_at(data, offset).map(|()| data.len())
        })
    }

    fn release(&self, _ctx: &Context, _ino: u64, fh: u64, _flags: i32) -> Result<()> {
        self.files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&fh);
        Ok(())
    }

    fn fsync(&self, _ctx: &Context, _ino: u64, fh: u64, datasync: bool) -> Result<()> {
        self.with_file(fh, |file| {
            if datasync {
                file.sync_data()
            } else {
                file.sync_all()
            }
        })
    }

    fn opendir(&self, _ctx: &Context, ino: u64, _flags: i32) -> Result<u64> {
        let listing = Arc::new(self.list(ino)?);
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let dir = OpenDir {
            ino,
            listing,
            unread: true,
        };
        self.open_dirs().insert(fh, dir);
        Ok(fh)
    }

    fn releasedir(&self, _ctx: &Context, _ino: u64, fh: u64) -> Result<()> {
        self.open_dirs().remove(&fh);
        Ok(())
    }

    fn readdir(
        &self,
        _ctx: &Context,
        ino: u64,
        fh: u64,
        offset: u64,
        out: &mut DirFiller,
    ) -> Result<()> {
        // From the start (`rewinddir`) the directory is read again, unless nothing was read
        // since `opendir` read it; further on, the listing read then is continued. A handle
        // this instance did not give out (one of an instance before an upgrade or a crash)
        // is listed afresh every time.
        // Some(None): a handle of ours whose directory must be read again.
        let kept = {
            let mut dirs = self.open_dirs();
            dirs.get_mut(&fh).filter(|dir| dir.ino == ino).map(|dir| {
                let fresh = std::mem::replace(&mut dir.unread, false);
                (fresh || offset > 0).then(|| Arc::clone(&dir.listing))
            })
        };
        let entries = match kept {
            Some(Some(listing)) => listing,
            Some(None) => {
                let listing = Arc::new(self.list(ino)?);
                if let Some(dir) = self.open_dirs().get_mut(&fh) {
                    dir.listing = Arc::clone(&listing);
                }
                listing
            }
            None => Arc::new(self.list(ino)?),
        };
        for (i, (child, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if out.add(*child, i as u64 + 1, *kind, name) {
                break;
            }
        }
        Ok(())
    }

    fn statfs(&self, _ctx: &Context, _ino: u64) -> Result<Statfs> {
        let st = nix::sys::statvfs::statvfs(&self.source).map_err(nix_errno)?;
        Ok(Statfs {
            blocks: st.blocks(),
            bfree: st.blocks_free(),
            bavail: st.blocks_available(),
            files: st.files(),
            ffree: st.files_free(),
            bsize: st.block_size() as u32,
            namelen: st.name_max() as u32,
            frsize: st.fragment_size() as u32,
            reserved: 0,
        })
    }

    fn create_file(
        &self,
        ctx: &Context,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
    ) -> Result<(Attr, u64)> {
        self.create_backing(ctx, parent, name, mode, flags)
            .map(|(attr, fh, _)| (attr, fh))
    }

    fn create_backing(
        &self,
        ctx: &Context,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
    ) -> Result<(Attr, u64, Option<OwnedFd>)> {
        let relative = self.child(parent, name)?;
        let file = self.open_file(&self.full(&relative), flags, Some(mode))?;
        let attr = self.finish_create(ctx, &relative, mode::S_IFREG | mode)?;
        let backing = file.try_clone().map_err(Errno::from)?;
        Ok((attr, self.keep(file), Some(OwnedFd::from(backing))))
    }
}

export_plugin!(PassthroughFs, "passthroughfs");
