//! SDK for fshost filesystem plugins: implement [`Plugin`], then call [`export_plugin!`].
//!
//! A plugin is a `cdylib` that exports one C symbol, `fshost_plugin_entry`, returning a static
//! [`abi::PluginDescriptor`]. The macro builds that descriptor from your [`Plugin`] impl; every
//! exported function catches panics (the caller gets `EIO`, the host marks the plugin tainted),
//! so a bug in a plugin never takes the daemon down.
//!
//! What a plugin must not do, so that its library really unmaps at unload: leave threads
//! running after `destroy`, or touch a `thread_local!` with a destructor from a thread the
//! host owns. The host only calls plugin code from threads that end before the unload
//! (mount threads, the workers of the plugin's pool, which all end before its last mount's
//! end is reported, and a short-lived thread for `on_load`/`on_unload`).
//!
//! ```text
//! struct MyFs;
//! impl fshost_sdk::Plugin for MyFs { /* create, lookup, getattr, ... */ }
//! fshost_sdk::export_plugin!(MyFs, "myfs");
//! ```

pub mod abi;
pub mod acl;
#[doc(hidden)]
pub mod ffi;
pub mod ops;
pub mod state;
mod static_files;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt;
use std::os::fd::OwnedFd;
use std::time::{SystemTime, UNIX_EPOCH};

pub use abi::{Attr, Context, Setattr, Statfs, Timespec};
pub use ffi::{DirFiller, SavedState, StateWriter};
pub use static_files::{StaticFiles, ROOT};

/// A positive errno value, as the kernel wants it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(pub i32);

impl Errno {
    pub const EPERM: Errno = Errno(libc::EPERM);
    pub const ENOENT: Errno = Errno(libc::ENOENT);
    pub const EIO: Errno = Errno(libc::EIO);
    pub const EBADF: Errno = Errno(libc::EBADF);
    pub const EACCES: Errno = Errno(libc::EACCES);
    pub const EEXIST: Errno = Errno(libc::EEXIST);
    pub const EXDEV: Errno = Errno(libc::EXDEV);
    pub const ENOTDIR: Errno = Errno(libc::ENOTDIR);
    pub const EISDIR: Errno = Errno(libc::EISDIR);
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    pub const EFBIG: Errno = Errno(libc::EFBIG);
    pub const ENOSPC: Errno = Errno(libc::ENOSPC);
    pub const EROFS: Errno = Errno(libc::EROFS);
    pub const ERANGE: Errno = Errno(libc::ERANGE);
    pub const ENAMETOOLONG: Errno = Errno(libc::ENAMETOOLONG);
    pub const ENOSYS: Errno = Errno(libc::ENOSYS);
    pub const ENOTEMPTY: Errno = Errno(libc::ENOTEMPTY);
    pub const ENODATA: Errno = Errno(libc::ENODATA);
    pub const EOPNOTSUPP: Errno = Errno(libc::EOPNOTSUPP);
}

/// An I/O error's errno (EIO for one that has none), so that a plugin's calls on the
/// standard library answer with what the system said.
impl From<std::io::Error> for Errno {
    fn from(e: std::io::Error) -> Errno {
        Errno(e.raw_os_error().unwrap_or(libc::EIO))
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Errno({})", self.0)
    }
}

/// Result of a filesystem operation.
pub type Result<T> = std::result::Result<T, Errno>;

/// The `-o key=value` options of one mount.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options(pub BTreeMap<String, String>);

impl Options {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
}

/// Inode flags (`FS_*_FL` of `<linux/fs.h>`) for `get_flags`/`set_flags`: the ones tmpfs
/// keeps, and `SYNC`.
pub mod inode_flags {
    pub const SYNC: u32 = 0x08;
    pub const IMMUTABLE: u32 = 0x10;
    pub const APPEND: u32 = 0x20;
    pub const NODUMP: u32 = 0x40;
    pub const NOATIME: u32 = 0x80;
}

/// File type bits for [`Attr::mode`].
pub mod mode {
    pub const S_IFMT: u32 = libc::S_IFMT;
    pub const S_IFREG: u32 = libc::S_IFREG;
    pub const S_IFDIR: u32 = libc::S_IFDIR;
    pub const S_IFLNK: u32 = libc::S_IFLNK;
    pub const S_IFIFO: u32 = libc::S_IFIFO;
    pub const S_IFCHR: u32 = libc::S_IFCHR;
    pub const S_IFBLK: u32 = libc::S_IFBLK;
    pub const S_IFSOCK: u32 = libc::S_IFSOCK;
    pub const S_ISUID: u32 = libc::S_ISUID;
    pub const S_ISGID: u32 = libc::S_ISGID;
    pub const S_IXGRP: u32 = libc::S_IXGRP;
}

impl Timespec {
    /// The current wall-clock time, from the clock the kernel stamps files with (the
    /// coarse one, ticking every few ms). A plugin that mixes it with the kernel's own
    /// stamps (`-o writeback`: the kernel sets mtime on write) never sees time go
    /// backwards, as it would with the fine clock.
    pub fn now() -> Timespec {
        ffi::coarse_now()
    }
}

impl From<SystemTime> for Timespec {
    fn from(t: SystemTime) -> Timespec {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Timespec {
                sec: d.as_secs() as i64,
                nsec: d.subsec_nanos(),
                reserved: 0,
            },
            Err(e) => {
                let d = e.duration();
                if d.subsec_nanos() == 0 {
                    Timespec {
                        sec: -(d.as_secs() as i64),
                        nsec: 0,
                        reserved: 0,
                    }
                } else {
                    Timespec {
                        sec: -(d.as_secs() as i64) - 1,
                        nsec: 1_000_000_000 - d.subsec_nanos(),
                        reserved: 0,
                    }
                }
            }
        }
    }
}

/// Copies what `data` holds from `offset` on into `buf`; returns how many bytes that was
/// (0 at or past the end). The whole `read` of a file whose contents sit in memory.
pub fn read_slice(data: &[u8], offset: u64, buf: &mut [u8]) -> usize {
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(data.len());
    let n = buf.len().min(data.len() - start);
    buf[..n].copy_from_slice(&data[start..start + n]);
    n
}

/// `64M`, `1G`, `4096`: a size in bytes, as the `size=` mount option gives it (suffixes K,
/// M, G in either case, powers of 1024). `size` is the one option with a meaning fixed by
/// fshost: the most memory a mount may hold. For ordinary users' mounts fshostd always
/// passes one (their allowance, `[users] max_size`); a plugin that keeps data in memory
/// must honour it, any other may ignore it.
pub fn parse_size(text: &str) -> Option<u64> {
    let (digits, factor) = match text.char_indices().last()? {
        (i, 'k' | 'K') => (&text[..i], 1 << 10),
        (i, 'm' | 'M') => (&text[..i], 1 << 20),
        (i, 'g' | 'G') => (&text[..i], 1 << 30),
        _ => (text, 1),
    };
    digits.parse::<u64>().ok()?.checked_mul(factor)
}

/// Declares [`Plugin`]: the plugin-wide items, then one method per operation of the table
/// (`ops.rs`), with the table's default body.
macro_rules! plugin_trait {
    ($(
        $(#[$attr:meta])* $([when $cond:ident])?
        fn $name:ident(&$recv:ident $(, $arg:ident : $ty:ty => [$($p:ident : $pt:ty),*])*)
            -> $out:ty => [$($o:ident : $ot:ty),*] $body:tt
    )*) => {
        /// A filesystem plugin. One value of this type serves one mount (the instance
        /// handle); everything the filesystem needs lives in it, so no global state is
        /// needed.
        ///
        /// Only `create`, `lookup` and `getattr` are required; every other operation
        /// answers `ENOSYS` (or succeeds trivially, for open/release/opendir/releasedir)
        /// unless overridden.
        #[allow(unused_variables)]
        pub trait Plugin: Sized + Send + Sync + 'static {
            /// Makes the instance for one mount from its `-o` options.
            fn create(options: &Options) -> Result<Self>;

            /// Runs once while the plugin is Registering; an error aborts the load.
            fn on_load() -> Result<()> {
                Ok(())
            }

            /// Runs once while the plugin is Deregistering, after its last mount has gone.
            fn on_unload() {}

            /// Set to true to offer FUSE passthrough: the host then calls `open_backing`
            /// and `create_backing` instead of `open` and `create_file`.
            const PASSTHROUGH: bool = false;

            /// Set to true to let `fshostctl upgrade` move this plugin's mounts to a new
            /// version of it without unmounting: the host pauses each mount, calls
            /// `export_state` on the old instance and `import_state` on a new one. The
            /// defaults hand over nothing, which is all a stateless plugin needs; one with
            /// state implements the pair. Left false, upgrades are refused.
            const UPGRADABLE: bool = false;

            /// Set to true when a new instance can serve a mount whose previous instance
            /// died with fshostd (see `resume`): fixed or reconstructible node ids, no
            /// state that only the lost process had. Under systemd such mounts survive a
            /// crash of fshostd; the mounts of other plugins are detached.
            const RESUMABLE: bool = false;

            $($(#[$attr])* fn $name(&$recv $(, $arg: $ty)*) -> Result<$out> $body)*
        }
    };
}

#[allow(unused_imports)] // the names the operation table uses
use ops::vocabulary::*;

operations!(plugin_trait);

/// Exports `fshost_plugin_entry` for a [`Plugin`] type under the given plugin name.
/// The version is the plugin crate's `CARGO_PKG_VERSION`.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty, $name:literal) => {
        /// The plugin's one exported symbol: returns its static descriptor.
        #[unsafe(no_mangle)]
        pub extern "C" fn fshost_plugin_entry() -> *const $crate::abi::PluginDescriptor {
            static DESCRIPTOR: $crate::abi::PluginDescriptor = $crate::ffi::descriptor::<$plugin>(
                concat!($name, "\0").as_ptr().cast(),
                concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast(),
            );
            &DESCRIPTOR
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_slice_stops_at_the_end() {
        let mut buf = [0u8; 4];
        assert_eq!(read_slice(b"hello", 0, &mut buf), 4);
        assert_eq!(&buf, b"hell");
        assert_eq!(read_slice(b"hello", 3, &mut buf), 2);
        assert_eq!(&buf[..2], b"lo");
        assert_eq!(read_slice(b"hello", 5, &mut buf), 0);
        assert_eq!(read_slice(b"hello", u64::MAX, &mut buf), 0);
    }
}
