//! Where memfs keeps file contents: a private tmpfs, mounted nowhere (`fsopen` +
//! `fsmount` give a mount that only our descriptor reaches), one file per regular node,
//! named by its inode number. The kernel then reads and writes those files itself through
//! FUSE passthrough (the host registers each as the backing file of the node's opens), and
//! so they behave as tmpfs does because they are tmpfs: sparse pages, fallocate,
//! SEEK_DATA/SEEK_HOLE, a short write and then ENOSPC at the `size=` limit, mmap.
//!
//! The store is also what crosses an upgrade: one descriptor (see `MemFs::export_state`).
//! The files' sizes, blocks and times are the backing file's; memfs keeps the rest.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};

use fshost_sdk::{inode_flags, Errno, Result, Timespec};
use rustix::fs::{AtFlags, IFlags, Mode, OFlags, Statx, StatxFlags, Timestamps};
use rustix::mount::{FsMountFlags, FsOpenFlags, FsPickFlags, MountAttrFlags};

/// tmpfs's page, the unit of `size=` and statfs.
pub const PAGE: u64 = 4096;

pub struct Store {
    root: OwnedFd,
}

/// What a call on the store answered, as the kernel wants it.
pub fn errno(e: rustix::io::Errno) -> Errno {
    Errno(e.raw_os_error())
}

/// A time for `set_times`: as given, now, or left alone.
#[derive(Clone, Copy)]
pub enum Time {
    At(Timespec),
    Now,
    Keep,
}

impl Time {
    fn raw(self) -> rustix::fs::Timespec {
        let (tv_sec, tv_nsec) = match self {
            Time::At(t) => (t.sec, i64::from(t.nsec)),
            Time::Now => (0, rustix::fs::UTIME_NOW),
            Time::Keep => (0, rustix::fs::UTIME_OMIT),
        };
        rustix::fs::Timespec { tv_sec, tv_nsec }
    }
}

/// The node's file in the store: its inode number in decimal.
fn name(ino: u64) -> String {
    ino.to_string()
}

fn timespec(t: rustix::fs::StatxTimestamp) -> Timespec {
    Timespec {
        sec: t.tv_sec,
        nsec: t.tv_nsec,
        reserved: 0,
    }
}

impl Store {
    /// A new, empty store that holds at most `limit_pages` pages (tmpfs's `size=`; a limit
    /// of 0 still makes a one-page store: memfs then refuses every write itself).
    /// Mounting needs CAP_SYS_ADMIN, which fshostd has.
    pub fn new(limit_pages: u64) -> Result<Store> {
        let fs = rustix::mount::fsopen("tmpfs", FsOpenFlags::FSOPEN_CLOEXEC).map_err(errno)?;
        let size = (limit_pages.max(1) * PAGE).to_string();
        // Inodes are memfs's to count (`nr_inodes=`); 0 is "no limit" to tmpfs.
        for (key, value) in [
            ("size", size.as_str()),
            ("nr_inodes", "0"),
            ("mode", "0700"),
        ] {
            rustix::mount::fsconfig_set_string(&fs, key, value).map_err(errno)?;
        }
        rustix::mount::fsconfig_create(&fs).map_err(errno)?;
        let flags = MountAttrFlags::MOUNT_ATTR_NOSUID
            | MountAttrFlags::MOUNT_ATTR_NODEV
            | MountAttrFlags::MOUNT_ATTR_NOEXEC;
        let root =
            rustix::mount::fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, flags).map_err(errno)?;
        Ok(Store { root })
    }

    /// Sets how many pages the store may hold (at least one; see `new`).
    pub fn resize(&self, pages: u64) -> Result<()> {
        let flags = FsPickFlags::FSPICK_EMPTY_PATH | FsPickFlags::FSPICK_CLOEXEC;
        let fs = rustix::mount::fspick(&self.root, "", flags).map_err(errno)?;
        let size = (pages.max(1) * PAGE).to_string();
        rustix::mount::fsconfig_set_string(&fs, "size", size).map_err(errno)?;
        rustix::mount::fsconfig_reconfigure(&fs).map_err(errno)
    }

    /// The store a previous generation handed over.
    pub fn from_fd(root: OwnedFd) -> Store {
        Store { root }
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.root
    }

    /// Makes node `ino`'s file, empty, and opens it.
    pub fn create(&self, ino: u64) -> Result<File> {
        let flags = OFlags::CREATE | OFlags::EXCL | OFlags::RDWR | OFlags::CLOEXEC;
        rustix::fs::openat(&self.root, name(ino), flags, Mode::RUSR | Mode::WUSR)
            .map(File::from)
            .map_err(errno)
    }

    /// Opens node `ino`'s file for reading and writing (appending only, if the node is
    /// append-only: the store's file carries the node's flags).
    pub fn open(&self, ino: u64, flags: u32) -> Result<File> {
        let mut open = OFlags::RDWR | OFlags::CLOEXEC;
        if flags & inode_flags::APPEND != 0 {
            open |= OFlags::APPEND;
        }
        if flags & inode_flags::IMMUTABLE != 0 {
            open = OFlags::RDONLY | OFlags::CLOEXEC;
        }
        rustix::fs::openat(&self.root, name(ino), open, Mode::empty())
            .map(File::from)
            .map_err(errno)
    }

    /// Removes node `ino`'s file (its pages go once no descriptor holds it either).
    pub fn remove(&self, ino: u64, flags: u32) {
        if flags & (inode_flags::APPEND | inode_flags::IMMUTABLE) != 0 {
            let _ = self.set_flags(ino, 0);
        }
        let _ = rustix::fs::unlinkat(&self.root, name(ino), AtFlags::empty());
    }

    /// Node `ino`'s file's size, blocks and times (birth time included).
    pub fn stat(&self, ino: u64) -> Result<Statx> {
        let mask = StatxFlags::SIZE
            | StatxFlags::BLOCKS
            | StatxFlags::ATIME
            | StatxFlags::MTIME
            | StatxFlags::CTIME
            | StatxFlags::BTIME;
        rustix::fs::statx(&self.root, name(ino), AtFlags::SYMLINK_NOFOLLOW, mask).map_err(errno)
    }

    /// Sets the times of node `ino`'s file (its ctime becomes now).
    pub fn set_times(&self, ino: u64, atime: Time, mtime: Time) -> Result<()> {
        let times = Timestamps {
            last_access: atime.raw(),
            last_modification: mtime.raw(),
        };
        rustix::fs::utimensat(&self.root, name(ino), &times, AtFlags::empty()).map_err(errno)
    }

    /// Marks node `ino`'s metadata changed now: its file's ctime moves (a chmod to the
    /// mode the store's files always have), which is what memfs reports.
    pub fn touch(&self, ino: u64) -> Result<()> {
        let mode = Mode::RUSR | Mode::WUSR;
        rustix::fs::chmodat(&self.root, name(ino), mode, AtFlags::empty()).map_err(errno)
    }

    /// Gives node `ino`'s file the node's inode flags: the kernel then keeps append-only,
    /// immutable and noatime for reads and writes that pass memfs by (passthrough).
    pub fn set_flags(&self, ino: u64, flags: u32) -> Result<()> {
        let file = rustix::fs::openat(
            &self.root,
            name(ino),
            OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NONBLOCK,
            Mode::empty(),
        )
        .map_err(errno)?;
        rustix::fs::ioctl_setflags(&file, IFlags::from_bits_retain(flags)).map_err(errno)
    }

    /// Pages the store's files hold.
    pub fn used_pages(&self) -> u64 {
        rustix::fs::fstatfs(self.root.as_fd())
            .map_or(0, |s| (s.f_blocks - s.f_bfree) * s.f_bsize as u64 / PAGE)
    }
}

/// When a store file was made (statx's birth time).
pub fn birth(st: &Statx) -> Timespec {
    timespec(st.stx_btime)
}

/// The times of a store file, as (atime, mtime, ctime).
pub fn times(st: &Statx) -> (Timespec, Timespec, Timespec) {
    (
        timespec(st.stx_atime),
        timespec(st.stx_mtime),
        timespec(st.stx_ctime),
    )
}
