//! hellofs: the smallest useful fshost plugin, a read-only root with one file, `hello`.
//! Copy this file to start a new plugin: implement `fshost_sdk::Plugin` (every operation
//! you leave out answers ENOSYS) and export it. Here the SDK's `StaticFiles` answers for a
//! fixed set of files; a real filesystem answers from its own state instead.

use std::ffi::OsStr;

use fshost_sdk::{export_plugin, Attr, Context, DirFiller, Options, Plugin, Result, StaticFiles};

const FILES: StaticFiles = StaticFiles(&[("hello", b"Hello from fshost\n")]);

pub struct HelloFs;

impl Plugin for HelloFs {
    /// Nothing to hand over: `fshostctl upgrade` may replace it under its mounts.
    const UPGRADABLE: bool = true;
    const RESUMABLE: bool = true;

    /// One instance per mount, made from its `-o` options.
    fn create(_options: &Options) -> Result<Self> {
        Ok(HelloFs)
    }

    fn lookup(&self, _ctx: &Context, parent: u64, name: &OsStr) -> Result<Attr> {
        FILES.lookup(parent, name)
    }

    fn getattr(&self, _ctx: &Context, ino: u64) -> Result<Attr> {
        FILES.getattr(ino)
    }

    fn read(&self, _ctx: &Context, ino: u64, _fh: u64, off: u64, buf: &mut [u8]) -> Result<usize> {
        FILES.read(ino, off, buf)
    }

    fn readdir(&self, _: &Context, ino: u64, _: u64, off: u64, out: &mut DirFiller) -> Result<()> {
        FILES.readdir(ino, off, out)
    }
}

export_plugin!(HelloFs, "hellofs");
