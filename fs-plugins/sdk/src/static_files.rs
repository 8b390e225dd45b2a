//! A read-only root directory of files whose contents are fixed when the plugin is built:
//! what a small plugin would otherwise write out by hand (attributes, lookup, reads,
//! listing). hellofs is built on it.

use std::ffi::OsStr;

use crate::{mode, read_slice, Attr, DirFiller, Errno, Result};

/// The root directory's inode number.
pub const ROOT: u64 = 1;

/// Files `(name, contents)` in a read-only root directory. The root is inode [`ROOT`], file
/// `i` of the list inode `i + 2`.
#[derive(Debug, Clone, Copy)]
pub struct StaticFiles(pub &'static [(&'static str, &'static [u8])]);

impl StaticFiles {
    fn file(&self, ino: u64) -> Option<&'static [u8]> {
        let index = usize::try_from(ino.checked_sub(2)?).ok()?;
        self.0.get(index).map(|(_, contents)| *contents)
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr> {
        let (mode, nlink, size) = match (ino, self.file(ino)) {
            (ROOT, _) => (mode::S_IFDIR | 0o555, 2, 0),
            (_, Some(contents)) => (mode::S_IFREG | 0o444, 1, contents.len() as u64),
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

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Attr> {
        let index = self.0.iter().position(|(n, _)| OsStr::new(n) == name);
        match (parent, index) {
            (ROOT, Some(index)) => self.getattr(index as u64 + 2),
            _ => Err(Errno::ENOENT),
        }
    }

    pub fn read(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let contents = self.file(ino).ok_or(Errno::EISDIR)?;
        Ok(read_slice(contents, offset, buf))
    }

    pub fn readdir(&self, ino: u64, offset: u64, out: &mut DirFiller) -> Result<()> {
        if ino != ROOT {
            return Err(Errno::ENOTDIR);
        }
        let dots = [(ROOT, mode::S_IFDIR, "."), (ROOT, mode::S_IFDIR, "..")];
        let files = self.0.iter().enumerate();
        let entries: Vec<(u64, u32, &str)> = dots
            .into_iter()
            .chain(files.map(|(i, (name, _))| (i as u64 + 2, mode::S_IFREG, *name)))
            .collect();
        out.add_entries(offset, &entries);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILES: StaticFiles = StaticFiles(&[("a", b"alpha"), ("b", b"")]);

    #[test]
    fn answers_like_a_read_only_directory() {
        assert_eq!(FILES.lookup(ROOT, OsStr::new("a")).unwrap().size, 5);
        assert_eq!(FILES.lookup(ROOT, OsStr::new("b")).unwrap().ino, 3);
        assert_eq!(FILES.lookup(ROOT, OsStr::new("c")), Err(Errno::ENOENT));
        assert_eq!(FILES.lookup(2, OsStr::new("a")), Err(Errno::ENOENT));
        assert_eq!(FILES.getattr(ROOT).unwrap().mode, mode::S_IFDIR | 0o555);
        assert_eq!(FILES.getattr(4), Err(Errno::ENOENT));
        let mut buf = [0u8; 8];
        assert_eq!(FILES.read(2, 2, &mut buf), Ok(3));
        assert_eq!(&buf[..3], b"pha");
        assert_eq!(FILES.read(ROOT, 0, &mut buf), Err(Errno::EISDIR));
    }
}
