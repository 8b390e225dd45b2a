//! The one list of filesystem operations. Everything else that lists them is made from it
//! by a macro that [`operations!`](crate::operations) calls back with the whole table:
//! the C descriptor ([`crate::abi::PluginDescriptor`]), the [`crate::Plugin`] trait, the
//! SDK's `extern "C"` wrappers, the daemon's calls through a descriptor and its `Backend`
//! trait. The C header is this table written in C; `tests/c_header.rs` checks the two
//! against each other, field by field.
//!
//! One entry reads like the `Plugin` method it becomes, with each argument's and the
//! result's C form after `=>`:
//!
//! ```text
//! /// docs
//! [when PLUGIN_CONST]
//! fn name(&self, arg: RustType => [c_param: CType, ...], ...)
//!     -> ResultType => [c_out_param: *mut CType, ...] default-body-or-;
//! ```
//!
//! How each Rust type crosses the ABI is written once, in `ffi.rs` (`Incoming` on the
//! plugin's side, `Outgoing` on the host's, `Output` for results both ways). `;` instead of
//! a default body makes the operation required (the host refuses a plugin without it);
//! `[when PASSTHROUGH]` puts the entry in the descriptor only when the plugin's
//! `Plugin::PASSTHROUGH` is true (likewise `UPGRADABLE`, `RESUMABLE`). The order is the ABI's: append only.
//!
//! Adding an operation: an entry here, its line in `include/fshost_plugin.h`, the adapter's
//! kernel-facing method (`daemon/src/mount/adapter.rs`), and the plugins that implement it.

/// The names the table uses, for the modules that expand it.
#[doc(hidden)]
pub mod vocabulary {
    pub use crate::abi::{
        Attr, Context, FillDir, Setattr, ShareFd, Statfs, TakeFd, Timespec, WriteState,
    };
    pub use crate::{DirFiller, Errno, SavedState, StateWriter};
    pub use std::ffi::{c_char, c_int, c_void, OsStr};
    pub use std::os::fd::OwnedFd;
}

/// Calls `$callback! { entries }` with the table (see the module docs). The names in it
/// resolve where the callback expands: import [`vocabulary`] there.
#[doc(hidden)]
#[macro_export]
macro_rules! operations {
    ($callback:ident) => {
        $callback! {
            /// Looks `name` up in directory `parent`; every successful lookup counts one
            /// reference that `forget` later gives back.
            fn lookup(&self, ctx: &Context => [ctx: *const Context], parent: u64 => [parent: u64],
                name: &OsStr => [name: *const c_char])
                -> Attr => [out: *mut Attr];

            /// The kernel drops `nlookup` references to `ino`.
            fn forget(&self, ino: u64 => [ino: u64], nlookup: u64 => [nlookup: u64])
                -> () => [] { Ok(()) }

            fn getattr(&self, ctx: &Context => [ctx: *const Context], ino: u64 => [ino: u64])
                -> Attr => [out: *mut Attr];

            fn setattr(&self, ctx: &Context => [ctx: *const Context], ino: u64 => [ino: u64],
                set: &Setattr => [set: *const Setattr])
                -> Attr => [out: *mut Attr] { Err(Errno::ENOSYS) }

            /// The link's target. (In C: with `cap == 0` only `*len`, the size, is set; a
            /// too-small `cap` gives `ERANGE`.)
            fn readlink(&self, ctx: &Context => [ctx: *const Context], ino: u64 => [ino: u64])
                -> Vec<u8> => [buf: *mut u8, cap: usize, len: *mut usize] { Err(Errno::ENOSYS) }

            fn mknod(&self, ctx: &Context => [ctx: *const Context], parent: u64 => [parent: u64],
                name: &OsStr => [name: *const c_char], mode: u32 => [mode: u32],
                rdev: u32 => [rdev: u32])
                -> Attr => [out: *mut Attr] { Err(Errno::ENOSYS) }

            fn mkdir(&self, ctx: &Context => [ctx: *const Context], parent: u64 => [parent: u64],
                name: &OsStr => [name: *const c_char], mode: u32 => [mode: u32])
                -> Attr => [out: *mut Attr] { Err(Errno::ENOSYS) }

            fn unlink(&self, ctx: &Context => [ctx: *const Context], parent: u64 => [parent: u64],
                name: &OsStr => [name: *const c_char])
                -> () => [] { Err(Errno::ENOSYS) }

            fn rmdir(&self, ctx: &Context => [ctx: *const Context], parent: u64 => [parent: u64],
                name: &OsStr => [name: *const c_char])
                -> () => [] { Err(Errno::ENOSYS) }

            fn symlink(&self, ctx: &Context => [ctx: *const Context], parent: u64 => [parent: u64],
                name: &OsStr => [name: *const c_char], target: &OsStr => [target: *const c_char])
                -> Attr => [out: *mut Attr] { Err(Errno::ENOSYS) }

            fn rename(&self, ctx: &Context => [ctx: *const Context], parent: u64 => [parent: u64],
                name: &OsStr => [name: *const c_char], newparent: u64 => [newparent: u64],
                newname: &OsStr => [newname: *const c_char], flags: u32 => [flags: u32])
                -> () => [] { Err(Errno::ENOSYS) }

            fn link(&self, ctx: &Context => [ctx: *const Context], ino: u64 => [ino: u64],
                newparent: u64 => [newparent: u64], newname: &OsStr => [newname: *const c_char])
                -> Attr => [out: *mut Attr] { Err(Errno::ENOSYS) }

            /// Returns the file handle that later calls receive as `fh`.
            fn open(&self, ctx: &Context => [ctx: *const Context], ino: u64 => [ino: u64],
                flags: i32 => [flags: i32])
                -> u64 => [fh: *mut u64] { Ok(0) }

            /// Fills `buf` from `offset`; returns the number of bytes read (short at end of
            /// file).
            fn read(&self, ctx: &Context => [ctx: *const Context], ino: u64 => [ino: u64],
                fh: u64 => [fh: u64], offset: u64 => [offset: u64],
                buf: &mut [u8] => [buf: *mut u8, size: usize])
                -> usize => [len: *mut usize] { Err(Errno::ENOSYS) }

            /// Writes `data` at `offset`; returns how many bytes were written.
            fn write(&self, ctx: &Context => [ctx: *const Context], ino: u64 => [ino: u64],
                fh: u64 => [fh: u64], offset: u64 => [offset: u64],
                data: &[u8] => [data: *const u8, size: usize], flags: i32 => [flags: i32])
                -> usize => [written: *mut usize] { Err(Errno::ENOSYS) }

            /// Called on every close. Left out (ENOSYS), the kernel stops calling it for the
            /// mount, which saves a round trip per close.
            fn flush(&self, ctx: &Context => [ctx: *const Context], ino: u64 => [ino: u64],
                fh: u64 => [fh: u64])
                -> () => [] { Err(Errno::ENOSYS) }

            fn release(&self, ctx: &Context => [ctx: *const Context], ino: u64 => [ino: u64],
                fh: u64 => [fh: u64], flags: i32 => [flags: i32])
                -> () => [] { Ok(()) }

            /// Left out (ENOSYS), the kernel treats fsync as done (right for memory-backed
            /// files).
            fn fsync(&self, ctx: &Context => [ctx: *const Context], ino: u64 => [ino: u64],
                fh: u64 => [fh: u64], datasync: bool => [datasync: c_int])
                -> () => [] { Err(Errno::ENOSYS) }

            fn opendir(&self, ctx: &Context => [ctx: *const Context], ino: u64 => [ino: u64],
                flags: i32 => [flags: i32])
                -> u64 => [fh: *mut u64] { Ok(0) }

            /// Adds entries from `offset` on until `out.add` says the reply is full. Each
            /// entry carries the offset at which the next call should resume.
            fn readdir(&self, ctx: &Context => [ctx: *const Context], ino: u64 => [ino: u64],
                fh: u64 => [fh: u64], offset: u64 => [offset: u64],
                out: &mut DirFiller => [fill: FillDir, fill_buf: *mut c_void])
                -> () => [] { Err(Errno::ENOSYS) }

            fn releasedir(&self, ctx: &Context => [ctx: *const Context], ino: u64 => [ino: u64],
                fh: u64 => [fh: u64])
                -> () => [] { Ok(()) }

            fn statfs(&self, ctx: &Context => [ctx: *const Context], ino: u64 => [ino: u64])
                -> Statfs => [out: *mut Statfs]
            {
                Ok(Statfs {
                    bsize: 4096,
                    frsize: 4096,
                    namelen: 255,
                    ..Statfs::default()
                })
            }

            fn setxattr(&self, ctx: &Context => [ctx: *const Context], ino: u64 => [ino: u64],
                name: &OsStr => [name: *const c_char], value: &[u8] => [value: *const u8, size: usize],
                flags: i32 => [flags: i32])
                -> () => [] { Err(Errno::EOPNOTSUPP) }

            /// The attribute's value (in C: sized as for `readlink`).
            fn getxattr(&self, ctx: &Context => [ctx: *const Context], ino: u64 => [ino: u64],
                name: &OsStr => [name: *const c_char])
                -> Vec<u8> => [buf: *mut u8, cap: usize, len: *mut usize] { Err(Errno::EOPNOTSUPP) }

            /// The attribute names, each followed by a NUL byte (in C: sized as for
            /// `readlink`).
            fn listxattr(&self, ctx: &Context => [ctx: *const Context], ino: u64 => [ino: u64])
                -> Vec<u8> => [buf: *mut u8, cap: usize, len: *mut usize] { Ok(Vec::new()) }

            fn removexattr(&self, ctx: &Context => [ctx: *const Context], ino: u64 => [ino: u64],
                name: &OsStr => [name: *const c_char])
                -> () => [] { Err(Errno::EOPNOTSUPP) }

            /// Creates and opens a regular file; returns its attributes and file handle.
            fn create_file(&self, ctx: &Context => [ctx: *const Context], parent: u64 => [parent: u64],
                name: &OsStr => [name: *const c_char], mode: u32 => [mode: u32],
                flags: i32 => [flags: i32])
                -> (Attr, u64) => [out: *mut Attr, fh: *mut u64] { Err(Errno::ENOSYS) }

            // ---- Appended after the first release: present when `struct_size` covers them.

            /// Opens a file and may hand over a file descriptor of its backing file, which
            /// the kernel then reads and writes directly (FUSE passthrough, Linux 6.9+);
            /// `read` and `write` remain the fallback where the kernel cannot do it. Called
            /// instead of `open` when `PASSTHROUGH` is true. (In C: the fd, or -1, goes to
            /// `*backing_fd`, and the host owns it from then on.)
            [when PASSTHROUGH]
            fn open_backing(&self, ctx: &Context => [ctx: *const Context], ino: u64 => [ino: u64],
                flags: i32 => [flags: i32])
                -> (u64, Option<OwnedFd>) => [fh: *mut u64, backing_fd: *mut c_int]
            {
                Ok((self.open(ctx, ino, flags)?, None))
            }

            /// `create_file` with passthrough, as `open_backing` is to `open`.
            [when PASSTHROUGH]
            fn create_backing(&self, ctx: &Context => [ctx: *const Context],
                parent: u64 => [parent: u64], name: &OsStr => [name: *const c_char],
                mode: u32 => [mode: u32], flags: i32 => [flags: i32])
                -> (Attr, u64, Option<OwnedFd>) => [out: *mut Attr, fh: *mut u64, backing_fd: *mut c_int]
            {
                let (attr, fh) = self.create_file(ctx, parent, name, mode, flags)?;
                Ok((attr, fh, None))
            }

            /// Writes what this instance holds, for the next generation of the plugin to
            /// take over (`fshostctl upgrade`); the mount is paused meanwhile, so nothing
            /// changes under it. The default writes nothing: right for a stateless plugin.
            /// [`crate::state::save`] writes a serde value with a version.
            [when UPGRADABLE]
            fn export_state(&self, out: &mut StateWriter => [write: WriteState, share_fd: ShareFd, write_buf: *mut c_void])
                -> () => [] { Ok(()) }

            /// Takes over what the previous generation's `export_state` wrote, into this
            /// instance fresh from `create` with the mount's options. Kernel-visible
            /// identities must survive: inode numbers, open file handles, directory
            /// offsets. The default takes over nothing (and refuses anything else).
            [when UPGRADABLE]
            fn import_state(&self, state: &SavedState => [state: *const u8, size: usize, take_fd: TakeFd, fds: *mut c_void])
                -> () => [] { if state.is_empty() { Ok(()) } else { Err(Errno::EINVAL) } }

            /// fallocate(2) on `[offset, offset + length)` of an open regular file:
            /// `mode` 0 allocates (and may grow the file), `FALLOC_FL_KEEP_SIZE` allocates
            /// without growing it, `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE` deallocates;
            /// refuse other modes with EOPNOTSUPP. Left out (ENOSYS), the kernel answers
            /// EOPNOTSUPP for the mount from then on.
            fn fallocate(&self, ctx: &Context => [ctx: *const Context], ino: u64 => [ino: u64],
                fh: u64 => [fh: u64], offset: u64 => [offset: u64], length: u64 => [length: u64],
                mode: i32 => [mode: i32])
                -> () => [] { Err(Errno::ENOSYS) }

            /// `SEEK_DATA` or `SEEK_HOLE` (`whence`) from `offset`: where the next data or
            /// hole starts (the end of the file is a hole); ENXIO at or past the end. Left
            /// out (ENOSYS), the kernel treats the whole file as data.
            fn lseek(&self, ctx: &Context => [ctx: *const Context], ino: u64 => [ino: u64],
                fh: u64 => [fh: u64], offset: u64 => [offset: u64], whence: i32 => [whence: i32])
                -> u64 => [out: *mut u64] { Err(Errno::ENOSYS) }

            /// Called on an instance fresh from `create` that serves a mount whose previous
            /// instance died with its fshostd (a crash; systemd kept the FUSE connection):
            /// the kernel will ask about node ids and file handles this instance never
            /// handed out. Its presence says the plugin can serve on without the lost
            /// process's memory (the host detaches the mounts of one that cannot); node
            /// ids must be answerable (fixed ones, or reconstructible), and a handle it
            /// does not know may be answered EBADF. Return an error to give the mount up.
            [when RESUMABLE]
            fn resume(&self) -> () => [] { Ok(()) }

            /// Creates and opens an unnamed regular file in directory `parent`
            /// (`O_TMPFILE`): its link count is 0 and it lives while the kernel holds it,
            /// unless `link` names it (`linkat` through `/proc/self/fd`). Returns its
            /// attributes and file handle, as `create_file`. Left out (ENOSYS), the kernel
            /// answers EOPNOTSUPP for the mount from then on.
            fn tmpfile(&self, ctx: &Context => [ctx: *const Context], parent: u64 => [parent: u64],
                mode: u32 => [mode: u32], flags: i32 => [flags: i32])
                -> (Attr, u64) => [out: *mut Attr, fh: *mut u64] { Err(Errno::ENOSYS) }

            /// What this instance asks of the kernel when its mount starts: `WANT_*` bits
            /// ([`crate::abi::WANT_POSIX_ACL`], [`crate::abi::WANT_KILL_PRIV`]). Asked once
            /// per mount, before any other request.
            fn wants(&self) -> u64 => [out: *mut u64] { Ok(0) }

            /// When `ino` was created (statx's birth time). Left out (ENOSYS), the kernel
            /// reports none for the mount.
            fn birth_time(&self, ctx: &Context => [ctx: *const Context], ino: u64 => [ino: u64])
                -> Timespec => [out: *mut Timespec] { Err(Errno::ENOSYS) }

            /// The inode flags chattr(1) shows (`FS_IOC_GETFLAGS`: `FS_APPEND_FL`,
            /// `FS_IMMUTABLE_FL`, `FS_NODUMP_FL`, `FS_NOATIME_FL`, ...). Left out (ENOSYS),
            /// the ioctl answers ENOTTY.
            fn get_flags(&self, ctx: &Context => [ctx: *const Context], ino: u64 => [ino: u64])
                -> u32 => [out: *mut u32] { Err(Errno::ENOSYS) }

            /// Sets them (`FS_IOC_SETFLAGS`, `FS_IOC_FSSETXATTR`), after the kernel checked
            /// that the caller may (the owner; `CAP_LINUX_IMMUTABLE` for append-only and
            /// immutable); refuse flags the plugin does not keep with EOPNOTSUPP. On FUSE
            /// the kernel does not enforce append-only and immutable: the host refuses the
            /// opens they forbid, the plugin every other change (setattr, unlink, rename,
            /// link, new entries, xattrs, fallocate), as the VFS does for tmpfs.
            fn set_flags(&self, ctx: &Context => [ctx: *const Context], ino: u64 => [ino: u64],
                flags: u32 => [flags: u32])
                -> () => [] { Err(Errno::ENOSYS) }

            /// `tmpfile` with passthrough, as `open_backing` is to `open`. The kernel wants
            /// every open of a file served the same way, so a plugin that hands over
            /// backing files for `open` must do it here too.
            [when PASSTHROUGH]
            fn tmpfile_backing(&self, ctx: &Context => [ctx: *const Context],
                parent: u64 => [parent: u64], mode: u32 => [mode: u32], flags: i32 => [flags: i32])
                -> (Attr, u64, Option<OwnedFd>) => [out: *mut Attr, fh: *mut u64, backing_fd: *mut c_int]
            {
                let (attr, fh) = self.tmpfile(ctx, parent, mode, flags)?;
                Ok((attr, fh, None))
            }
        }
    };
}
