//! Mount points as descriptors, never as paths looked up twice.
//!
//! A caller names a directory once. [`MountTarget::resolve`] walks that path without
//! following any symlink into an `O_PATH` descriptor of the directory (and one of its
//! parent); ownership is checked on that descriptor (`fstat`), the kernel mount is made
//! onto it (`/proc/self/fd/N`), and the mount's kernel identity (its mount id) is kept.
//! Unmounting goes through the pinned parent and the final name with `UMOUNT_NOFOLLOW`, after
//! checking that the mount found there is still the one this daemon made. A user who
//! swaps directories for symlinks, or renames a parent of their mount, can therefore never
//! steer a mount or an unmount onto another path.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Weak};

use rustix::fs::{Mode, OFlags, ResolveFlags, CWD};
use rustix::mount::UnmountFlags;

/// A resolved mount point: the directory and its parent, pinned by descriptors.
#[derive(Debug)]
pub struct MountTarget {
    /// The path as the caller gave it (absolute, normalized): for messages and records.
    pub path: PathBuf,
    /// Shared by every target in the same directory (see [`shared_parent`]).
    parent: Arc<OwnedFd>,
    name: OsString,
    /// The directory mounted on, as it was resolved (before the mount covers it); closed
    /// once the mount is made ([`MountTarget::mounted`]), which needs it no more.
    dir: Mutex<Option<OwnedFd>>,
    /// Owner and mode of the directory, read from `dir`.
    pub uid: u32,
    pub mode: u32,
}

/// Why a path could not be used as a mount point.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("must be an absolute path without `.`, `..` or empty components (it names the directory to mount on)")]
    NotNormal,
    #[error("contains a symbolic link; fshostd never follows links in mount points: give the real path (see `realpath`)")]
    Symlink,
    #[error("does not exist; create the directory first")]
    Missing,
    #[error("is not a directory")]
    NotADirectory,
    #[error(
        "is a dead FUSE mount (transport endpoint is not connected); clear it with `umount -l`"
    )]
    DeadMount,
    #[error("cannot be opened: {0}")]
    Other(io::Error),
}

impl TargetError {
    fn from_errno(e: rustix::io::Errno) -> TargetError {
        match e {
            rustix::io::Errno::LOOP | rustix::io::Errno::XDEV => TargetError::Symlink,
            rustix::io::Errno::NOENT => TargetError::Missing,
            rustix::io::Errno::NOTDIR => TargetError::NotADirectory,
            rustix::io::Errno::NOTCONN => TargetError::DeadMount,
            rustix::io::Errno::MFILE => TargetError::Other(super::with_nofile_hint(e.into())),
            e => TargetError::Other(e.into()),
        }
    }
}

/// Why an unmount through a target did not happen.
#[derive(Debug, thiserror::Error)]
pub enum DetachError {
    /// The mount at the target is not (any more) the one we made: it was unmounted from
    /// outside, or something else now covers it. Nothing was unmounted.
    #[error("the mount there is no longer the one fshostd made")]
    NotOurs,
    #[error("busy")]
    Busy,
    #[error("{0}")]
    Failed(io::Error),
}

const RESOLVE: ResolveFlags = ResolveFlags::NO_SYMLINKS.union(ResolveFlags::NO_MAGICLINKS);
// No O_NOFOLLOW: it would open a final symlink itself (then fail as "not a directory");
// RESOLVE_NO_SYMLINKS refuses it with ELOOP instead, as every other component.
const PATH_DIR: OFlags = OFlags::PATH.union(OFlags::DIRECTORY).union(OFlags::CLOEXEC);

/// A mount target as it crosses to the next fshostd process (daemon upgrade); its two
/// descriptors go beside it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TargetParts {
    pub path: PathBuf,
    pub name: OsString,
    pub uid: u32,
    pub mode: u32,
}

impl MountTarget {
    /// What to hand over: the parts, and duplicates of the parent's and the directory's
    /// descriptors (the parent's again once the directory's is closed: a mounted target
    /// never uses it, and the wire keeps two).
    pub fn hand_over(&self) -> io::Result<(TargetParts, OwnedFd, OwnedFd)> {
        let parts = TargetParts {
            path: self.path.clone(),
            name: self.name.clone(),
            uid: self.uid,
            mode: self.mode,
        };
        let dir = match &*self.dir() {
            Some(dir) => dir.try_clone()?,
            None => self.parent.try_clone()?,
        };
        Ok((parts, self.parent.try_clone()?, dir))
    }

    fn dir(&self) -> MutexGuard<'_, Option<OwnedFd>> {
        self.dir.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The mount is made: the directory below it is needed no more.
    pub fn mounted(&self) {
        self.dir().take();
    }

    /// The target of a mount made by a process that died (crash recovery), from the path
    /// it was recorded at: the parent and the final name are resolved again (no symlinks),
    /// owner and mode come from the record (the directory below is covered by the mount).
    /// Nothing is asked of the mount itself, and nothing of it is held: a descriptor of
    /// its root would keep it busy. (`dir` is only used to make a mount, which a
    /// reattached target never does: it holds the parent again.)
    pub fn reattach(path: &Path, uid: u32, mode: u32) -> Result<MountTarget, TargetError> {
        let (parent, name, root) = open_beneath_no_symlinks(path)?;
        drop(root);
        Ok(MountTarget {
            path: path.to_path_buf(),
            parent: shared_parent(parent),
            name,
            dir: Mutex::new(None),
            uid,
            mode,
        })
    }

    /// The target the previous process resolved, from what it handed over.
    /// Its mount exists, so the directory's descriptor is closed at once.
    pub fn taken_over(parts: TargetParts, parent: OwnedFd, dir: OwnedFd) -> MountTarget {
        drop(dir);
        MountTarget {
            path: parts.path,
            parent: shared_parent(parent),
            name: parts.name,
            dir: Mutex::new(None),
            uid: parts.uid,
            mode: parts.mode,
        }
    }

    /// Resolves `path` (absolute, normalized) without following any symlink.
    pub fn resolve(path: &Path) -> Result<MountTarget, TargetError> {
        let (parent, name, dir) = open_beneath_no_symlinks(path)?;
        let stat = rustix::fs::fstat(&dir).map_err(TargetError::from_errno)?;
        Ok(MountTarget {
            path: path.to_path_buf(),
            parent: shared_parent(parent),
            name,
            dir: Mutex::new(Some(dir)),
            uid: stat.st_uid,
            mode: stat.st_mode,
        })
    }

    /// The directory as a path the kernel resolves to exactly the pinned directory, and
    /// the kernel id of the mount it lives on, for making the mount; an error once made.
    pub fn dir_path_and_mount_id(&self) -> io::Result<(PathBuf, u64)> {
        let dir = self.dir();
        let dir = dir.as_ref().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the mount point is mounted already",
            )
        })?;
        let path = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
        Ok((path, mount_id(dir)?))
    }

    /// Kernel id of the mount that covers the directory now (after mounting: ours), or of
    /// the directory's own mount if nothing covers it. Asks no filesystem: the id comes
    /// from `/proc/self/fdinfo`, so it works on dead or unreachable FUSE mounts too.
    pub fn current_mount_id(&self) -> io::Result<u64> {
        top_mount_id(&self.parent, &self.name)
    }

    /// `major:minor` of the mount that covers the directory now (its backing device info
    /// in sysfs), from what the kernel has cached: a FUSE mount is not asked, so this works
    /// before its session is served. O(1), unlike finding the mount in mountinfo.
    pub fn current_device(&self) -> io::Result<String> {
        let fd = rustix::fs::openat2(&self.parent, &self.name, PATH_DIR, Mode::empty(), RESOLVE)?;
        let flags = rustix::fs::AtFlags::EMPTY_PATH | rustix::fs::AtFlags::STATX_DONT_SYNC;
        let sx = rustix::fs::statx(&fd, "", flags, rustix::fs::StatxFlags::TYPE)?;
        Ok(format!("{}:{}", sx.stx_dev_major, sx.stx_dev_minor))
    }

    /// Asks the file system mounted here for its statistics (`fstatfs`: always a request
    /// to it, unlike `stat`), from the calling thread.
    pub fn ask_statfs(&self) -> io::Result<()> {
        let fd = rustix::fs::openat2(&self.parent, &self.name, PATH_DIR, Mode::empty(), RESOLVE)?;
        rustix::fs::fstatfs(&fd)?;
        Ok(())
    }

    /// Unmounts the mount with kernel id `id` at this target, and only that one.
    pub fn detach(&self, id: u64, lazy: bool) -> Result<(), DetachError> {
        detach_at(&self.parent, &self.name, id, lazy)
    }
}

/// The one descriptor of directory `fd` that targets share: many mount points in one
/// directory would otherwise hold one each (10,000 mounts, 10,000 descriptors). Two
/// `O_PATH` descriptors of a directory on the same mount (the same mount id and inode)
/// lead to the same place, so which one a target holds makes no difference; `fd`
/// itself is kept if none is alive yet, or if it cannot be told apart.
fn shared_parent(fd: OwnedFd) -> Arc<OwnedFd> {
    // (mount id, inode): the mount id names the file system too.
    type Parents = Mutex<HashMap<(u64, u64), Weak<OwnedFd>>>;
    static PARENTS: LazyLock<Parents> = LazyLock::new(Mutex::default);
    let flags = rustix::fs::AtFlags::EMPTY_PATH | rustix::fs::AtFlags::STATX_DONT_SYNC;
    let mask = rustix::fs::StatxFlags::INO | rustix::fs::StatxFlags::MNT_ID;
    let Ok(sx) = rustix::fs::statx(&fd, "", flags, mask) else {
        return Arc::new(fd);
    };
    if sx.stx_mask & rustix::fs::StatxFlags::MNT_ID.bits() == 0 {
        return Arc::new(fd);
    }
    let key = (sx.stx_mnt_id, sx.stx_ino);
    let mut parents = PARENTS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(shared) = parents.get(&key).and_then(Weak::upgrade) {
        return shared;
    }
    if parents.len() >= 64 && parents.len().is_power_of_two() {
        parents.retain(|_, parent| parent.strong_count() > 0);
    }
    let shared = Arc::new(fd);
    parents.insert(key, Arc::downgrade(&shared));
    shared
}

/// Kernel id of the top mount at `name` in the directory `parent`.
fn top_mount_id(parent: &OwnedFd, name: &OsStr) -> io::Result<u64> {
    mount_id(rustix::fs::openat2(
        parent,
        name,
        PATH_DIR,
        Mode::empty(),
        RESOLVE,
    )?)
}

/// Unmounts the mount with kernel id `id` at `name` in the directory `parent`, and only
/// that one: with `UMOUNT_NOFOLLOW`, through the pinned parent, after checking the id.
fn detach_at(parent: &OwnedFd, name: &OsStr, id: u64, lazy: bool) -> Result<(), DetachError> {
    match top_mount_id(parent, name) {
        Ok(now) if now == id => {}
        Ok(_) => return Err(DetachError::NotOurs),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Err(DetachError::NotOurs),
        Err(e) => return Err(DetachError::Failed(e)),
    }
    // A covered directory cannot be renamed or removed, so between the check and the call
    // the name still leads to that mount (only root could stack another on top).
    let mut flags = UnmountFlags::NOFOLLOW;
    if lazy {
        flags |= UnmountFlags::DETACH;
    }
    let entry = Path::new(&format!("/proc/self/fd/{}", parent.as_raw_fd())).join(name);
    match rustix::mount::unmount(entry, flags) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::BUSY) => Err(DetachError::Busy),
        Err(e) => Err(DetachError::Failed(e.into())),
    }
}

/// Unmounts the mount with kernel id `id` at `path`, resolved without following symlinks
/// (a path from mountinfo, whose parents a user may have swapped since).
pub fn detach_mount_at(path: &Path, id: u64, lazy: bool) -> Result<(), DetachError> {
    match open_beneath_no_symlinks(path) {
        Ok((parent, name, _)) => detach_at(&parent, &name, id, lazy),
        Err(TargetError::Other(e)) => Err(DetachError::Failed(e)),
        Err(_) => Err(DetachError::NotOurs),
    }
}

/// True if the mount with kernel id `id` at `path` (resolved without following symlinks)
/// answers ENOTCONN: a FUSE mount whose daemon is gone. `fstatfs` always asks the FUSE
/// daemon (a `stat` may be answered from the kernel's attribute cache for a while after the
/// daemon died).
pub fn answers_enotconn(path: &Path, id: u64) -> bool {
    let Ok((_, _, dir)) = open_beneath_no_symlinks(path) else {
        return false;
    };
    mount_id(&dir).is_ok_and(|now| now == id)
        && rustix::fs::fstatfs(&dir).err() == Some(rustix::io::Errno::NOTCONN)
}

/// Opens `path`'s parent and `path` itself as `O_PATH` descriptors, following no symlink.
fn open_beneath_no_symlinks(path: &Path) -> Result<(OwnedFd, OsString, OwnedFd), TargetError> {
    // `components()` quietly drops `.` and doubled slashes: compare the text too.
    let rebuilt: PathBuf = path.components().collect();
    let normal = path.is_absolute()
        && rebuilt.as_os_str() == path.as_os_str()
        && path
            .components()
            .skip(1)
            .all(|c| matches!(c, Component::Normal(_)));
    let (Some(parent_path), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(TargetError::NotNormal);
    };
    if !normal {
        return Err(TargetError::NotNormal);
    }
    let parent = rustix::fs::openat2(CWD, parent_path, PATH_DIR, Mode::empty(), RESOLVE)
        .map_err(TargetError::from_errno)?;
    let dir = rustix::fs::openat2(&parent, name, PATH_DIR, Mode::empty(), RESOLVE)
        .map_err(TargetError::from_errno)?;
    Ok((parent, name.to_os_string(), dir))
}

/// The kernel id of the mount at `path` (the top one), resolved as [`MountTarget::resolve`]
/// does but without asking the filesystem anything: root may not `stat` a user's FUSE
/// mount (the kernel refuses everyone but its owner without `allow_other`).
pub fn mount_id_at(path: &Path) -> Result<u64, TargetError> {
    let (_, _, dir) = open_beneath_no_symlinks(path)?;
    mount_id(&dir).map_err(TargetError::Other)
}

/// The `mnt_id` of an open descriptor, from `/proc/self/fdinfo`.
pub fn mount_id(fd: impl AsFd) -> io::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd()))?;
    text.lines()
        .find_map(|line| line.strip_prefix("mnt_id:"))
        .and_then(|id| id.trim().parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no mnt_id in fdinfo"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_absolute_directories_resolve() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, dir.path().join("link")).unwrap();
        std::fs::write(dir.path().join("file"), b"").unwrap();
        let target = MountTarget::resolve(&real).unwrap();
        assert_eq!(target.path, real);
        assert_eq!(target.uid, nix::unistd::geteuid().as_raw());
        assert!(matches!(
            MountTarget::resolve(&dir.path().join("link")),
            Err(TargetError::Symlink)
        ));
        assert!(matches!(
            MountTarget::resolve(&dir.path().join("link/x")),
            Err(TargetError::Symlink | TargetError::Missing)
        ));
        assert!(matches!(
            MountTarget::resolve(&dir.path().join("file")),
            Err(TargetError::NotADirectory)
        ));
        assert!(matches!(
            MountTarget::resolve(&dir.path().join("nope")),
            Err(TargetError::Missing)
        ));
        for bad in ["relative", "/", "/a/../b", "/a/./b", "/a//b"] {
            let bad = Path::new(bad);
            assert!(
                matches!(MountTarget::resolve(bad), Err(TargetError::NotNormal)),
                "{}",
                bad.display()
            );
        }
        // Not mounted: the top mount is the directory's own.
        assert_eq!(
            target.current_mount_id().unwrap(),
            target.dir_path_and_mount_id().unwrap().1
        );
        assert!(matches!(target.detach(1, false), Err(DetachError::NotOurs)));
    }
}
