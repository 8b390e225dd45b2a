//! File contents as state versions 2 and 3 saved them (memfs kept pages in its own memory
//! then; now they live in the store, see `store`): read back and written into the store.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::FileExt;

use fshost_sdk::state::serde_bytes::ByteBuf;
use fshost_sdk::{Errno, Result};
use rustix::fs::FallocateFlags;
use serde::{Deserialize, Deserializer};

use crate::store::{errno, PAGE};

/// (size, [(page index, bytes)], pages `fallocate` added and nothing wrote since).
pub struct FileData {
    pages: BTreeMap<u64, ByteBuf>,
    size: u64,
    unwritten: BTreeSet<u64>,
}

impl<'de> Deserialize<'de> for FileData {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        type Saved = (u64, Vec<(u64, ByteBuf)>, BTreeSet<u64>);
        let (size, pages, unwritten): Saved = Deserialize::deserialize(d)?;
        if pages.iter().any(|(_, page)| page.len() as u64 != PAGE) {
            return Err(serde::de::Error::custom("a page of the wrong size"));
        }
        let pages: BTreeMap<u64, ByteBuf> = pages.into_iter().collect();
        if unwritten.iter().any(|i| !pages.contains_key(i)) {
            return Err(serde::de::Error::custom(
                "an unwritten page that is not stored",
            ));
        }
        Ok(FileData {
            pages,
            size,
            unwritten,
        })
    }
}

impl FileData {
    /// Writes these contents into `file` (new and empty): written pages as data, unwritten
    /// ones allocated without data (as `fallocate` left them), holes left holes.
    pub fn write_into(&self, file: &File) -> Result<()> {
        let written = self
            .pages
            .iter()
            .filter(|(i, _)| !self.unwritten.contains(i));
        for (index, page) in written {
            let at = index * PAGE;
            // Nothing past the size: the file must not grow beyond it.
            let len = self.size.saturating_sub(at).min(PAGE) as usize;
            file.write_all_at(&page[..len], at).map_err(Errno::from)?;
        }
        file.set_len(self.size).map_err(Errno::from)?;
        // After the size is set: a truncation would drop those past the end.
        for index in &self.unwritten {
            rustix::fs::fallocate(file, FallocateFlags::KEEP_SIZE, index * PAGE, PAGE)
                .map_err(errno)?;
        }
        Ok(())
    }
}
