//! What the FUSE adapter calls for one mount: a loaded plugin's instance through the C ABI
//! (`Hosted`: what fshostd serves), or a `fshost_sdk::Plugin` called directly (`Direct`:
//! the standalone benchmark binary, which measures what hosting costs).

use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use fshost_sdk::{Attr, Context, DirFiller, Errno, Setattr, Statfs};

use crate::plugin::{Answer, Instance, Plugin};

type Result<T> = std::result::Result<T, Errno>;

/// A plugin instance served by hosting it: calls go through the plugin's C descriptor.
/// Dropping it destroys the instance.
pub struct Hosted {
    plugin: Arc<Plugin>,
    instance: Instance,
}

impl Hosted {
    pub fn new(plugin: Arc<Plugin>, instance: Instance) -> Self {
        Hosted { plugin, instance }
    }
}

impl Drop for Hosted {
    fn drop(&mut self) {
        self.plugin.library.destroy(self.instance);
    }
}

/// A `Plugin` linked into the binary and called directly: no daemon, no C ABI.
pub struct Direct<P> {
    name: String,
    plugin: P,
}

impl<P: fshost_sdk::Plugin> Direct<P> {
    pub fn new(name: &str, plugin: P) -> Self {
        Direct {
            name: name.to_string(),
            plugin,
        }
    }
}

/// A variable-length answer as the C ABI gives it: the size when `cap` is 0, else the data
/// if it fits.
fn sized(data: Vec<u8>, cap: usize) -> Result<Answer> {
    match cap {
        0 => Ok(Answer::Size(data.len())),
        cap if data.len() > cap => Err(Errno::ERANGE),
        _ => Ok(Answer::Data(data)),
    }
}

/// Declares `Backend` with the operations whose signature is the same in the C ABI wrapper
/// (`Library`, after the instance) and in `fshost_sdk::Plugin`, forwards them for `Hosted`
/// and `Direct`, and adds the operations written out by hand for each.
macro_rules! backend {
    (
        forwarded { $(fn $name:ident($($arg:ident: $ty:ty),*) -> $out:ty;)* }
        own { $($own:tt)* }
        hosted { $($hosted:tt)* }
        direct { $($direct:tt)* }
    ) => {
        /// The operations the FUSE adapter needs from a filesystem.
        pub trait Backend: Send + Sync + 'static {
            $(fn $name(&self, ctx: &Context $(, $arg: $ty)*) -> Result<$out>;)*
            $($own)*
        }

        impl Backend for Hosted {
            $(fn $name(&self, ctx: &Context $(, $arg: $ty)*) -> Result<$out> {
                self.plugin.library.$name(self.instance, ctx $(, $arg)*)
            })*
            $($hosted)*
        }

        impl<P: fshost_sdk::Plugin> Backend for Direct<P> {
            $(fn $name(&self, ctx: &Context $(, $arg: $ty)*) -> Result<$out> {
                self.plugin.$name(ctx $(, $arg)*)
            })*
            $($direct)*
        }
    };
}

backend! {
    forwarded {
        fn lookup(parent: u64, name: &OsStr) -> Attr;
        fn getattr(ino: u64) -> Attr;
        fn setattr(ino: u64, set: &Setattr) -> Attr;
        fn readlink(ino: u64) -> Vec<u8>;
        fn mknod(parent: u64, name: &OsStr, mode: u32, rdev: u32) -> Attr;
        fn mkdir(parent: u64, name: &OsStr, mode: u32) -> Attr;
        fn unlink(parent: u64, name: &OsStr) -> ();
        fn rmdir(parent: u64, name: &OsStr) -> ();
        fn symlink(parent: u64, name: &OsStr, target: &OsStr) -> Attr;
        fn rename(parent: u64, name: &OsStr, newparent: u64, newname: &OsStr, flags: u32) -> ();
        fn link(ino: u64, newparent: u64, newname: &OsStr) -> Attr;
        fn open_backing(ino: u64, flags: i32) -> (u64, Option<OwnedFd>);
        fn read(ino: u64, fh: u64, offset: u64, buf: &mut [u8]) -> usize;
        fn write(ino: u64, fh: u64, offset: u64, data: &[u8], flags: i32) -> usize;
        fn flush(ino: u64, fh: u64) -> ();
        fn release(ino: u64, fh: u64, flags: i32) -> ();
        fn fsync(ino: u64, fh: u64, datasync: bool) -> ();
        fn opendir(ino: u64, flags: i32) -> u64;
        fn releasedir(ino: u64, fh: u64) -> ();
        fn statfs(ino: u64) -> Statfs;
        fn setxattr(ino: u64, name: &OsStr, value: &[u8], flags: i32) -> ();
        fn removexattr(ino: u64, name: &OsStr) -> ();
        fn create_backing(parent: u64, name: &OsStr, mode: u32, flags: i32) -> (Attr, u64, Option<OwnedFd>);
    }
    own {
        /// The plugin's name, for log lines.
        fn name(&self) -> &str;
        /// Whether opens go through `open_backing`/`create_backing` (FUSE passthrough).
        fn offers_passthrough(&self) -> bool;
        fn forget(&self, ino: u64, nlookup: u64);
        /// Lists from `offset`; `add(ino, next_offset, mode, name)` returns true when full.
        fn readdir(
            &self,
            ctx: &Context,
            ino: u64,
            fh: u64,
            offset: u64,
            add: &mut dyn FnMut(u64, u64, u32, &OsStr) -> bool,
        ) -> Result<()>;
        /// With `cap == 0` only the size.
        fn getxattr(&self, ctx: &Context, ino: u64, name: &OsStr, cap: usize) -> Result<Answer>;
        fn listxattr(&self, ctx: &Context, ino: u64, cap: usize) -> Result<Answer>;
    }
    hosted {
        fn name(&self) -> &str {
            &self.plugin.name
        }
        fn offers_passthrough(&self) -> bool {
            self.plugin.library.offers_passthrough()
        }
        fn forget(&self, ino: u64, nlookup: u64) {
            self.plugin.library.forget(self.instance, ino, nlookup);
        }
        fn readdir(
            &self,
            ctx: &Context,
            ino: u64,
            fh: u64,
            offset: u64,
            add: &mut dyn FnMut(u64, u64, u32, &OsStr) -> bool,
        ) -> Result<()> {
            self.plugin.library.readdir(self.instance, ctx, ino, fh, offset, add)
        }
        fn getxattr(&self, ctx: &Context, ino: u64, name: &OsStr, cap: usize) -> Result<Answer> {
            self.plugin.library.getxattr(self.instance, ctx, ino, name, cap)
        }
        fn listxattr(&self, ctx: &Context, ino: u64, cap: usize) -> Result<Answer> {
            self.plugin.library.listxattr(self.instance, ctx, ino, cap)
        }
    }
    direct {
        fn name(&self) -> &str {
            &self.name
        }
        fn offers_passthrough(&self) -> bool {
            P::PASSTHROUGH
        }
        fn forget(&self, ino: u64, nlookup: u64) {
            self.plugin.forget(ino, nlookup);
        }
        fn readdir(
            &self,
            ctx: &Context,
            ino: u64,
            fh: u64,
            offset: u64,
            add: &mut dyn FnMut(u64, u64, u32, &OsStr) -> bool,
        ) -> Result<()> {
            DirFiller::over(add, |filler| self.plugin.readdir(ctx, ino, fh, offset, filler))
        }
        fn getxattr(&self, ctx: &Context, ino: u64, name: &OsStr, cap: usize) -> Result<Answer> {
            sized(self.plugin.getxattr(ctx, ino, name)?, cap)
        }
        fn listxattr(&self, ctx: &Context, ino: u64, cap: usize) -> Result<Answer> {
            sized(self.plugin.listxattr(ctx, ino)?, cap)
        }
    }
}
