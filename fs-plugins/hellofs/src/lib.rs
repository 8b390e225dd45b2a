//! hellofs: the smallest useful fshost plugin, a read-only root with one file, `hello`.
//! Copy this file to start a new plugin.

use std::ffi::OsStr;

use fshost_sdk::{export_plugin, mode, Attr, Context, DirFiller, Errno, Options, Plugin, Result};

const ROOT: u64 = 1;
const HELLO: u64 = 2;
const CONTENT: &[u8] = b"Hello from fshost\n";

pub struct HelloFs;

fn attr(ino: u64) -> Result<Attr> {
    let (mode, nlink, size) = match ino {
        ROOT => (mode::S_IFDIR | 0o555, 2, 0),
        HELLO => (mode::S_IFREG | 0o444, 1, CONTENT.len() as u64),
        _ => return Err(Errno::ENOENT),
    };
    Ok(Attr {
        ino,
        mode,
        nlink,
        size,
        blocks: size.div_ceil(512),
        blksize: 4096,
        ..Attr::default()
    })
}

impl Plugin for HelloFs {
    fn create(_options: &Options) -> Result<Self> {
        Ok(HelloFs)
    }

    fn lookup(&self, _ctx: &Context, parent: u64, name: &OsStr) -> Result<Attr> {
        match (parent, name.as_encoded_bytes()) {
            (ROOT, b"hello") => attr(HELLO),
            _ => Err(Errno::ENOENT),
        }
    }

    fn getattr(&self, _ctx: &Context, ino: u64) -> Result<Attr> {
        attr(ino)
    }

    fn read(
        &self,
        _ctx: &Context,
        ino: u64,
        _fh: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize> {
        if ino != HELLO {
            return Err(Errno::EISDIR);
        }
        Ok(fshost_sdk::read_slice(CONTENT, offset, buf))
    }

    fn readdir(
        &self,
        _ctx: &Context,
        ino: u64,
        _fh: u64,
        offset: u64,
        out: &mut DirFiller,
    ) -> Result<()> {
        if ino != ROOT {
            return Err(Errno::ENOTDIR);
        }
        out.add_entries(
            offset,
            &[
                (ROOT, mode::S_IFDIR, "."),
                (ROOT, mode::S_IFDIR, ".."),
                (HELLO, mode::S_IFREG, "hello"),
            ],
        );
        Ok(())
    }
}

export_plugin!(HelloFs, "hellofs");
