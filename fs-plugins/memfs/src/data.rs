//! File contents as sparse pages: holes read as zeros and take no memory, so a write at
//! 5 GiB costs one page, and `st_blocks` counts what is really stored (as tmpfs does).
//! Pages `fallocate` adds hold zeros, count as stored, and stay holes for `SEEK_DATA`
//! until written, as tmpfs's unwritten pages do.

use std::collections::{BTreeMap, BTreeSet};

use fshost_sdk::state::serde_bytes::{ByteBuf, Bytes};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub const PAGE: u64 = 4096;

#[derive(Default)]
pub struct FileData {
    pages: BTreeMap<u64, Box<[u8]>>,
    size: u64,
    /// Pages allocated by `fallocate` and not written since (all zeros).
    unwritten: BTreeSet<u64>,
}

/// As (size, [(page index, bytes)], unwritten pages): each page one block of bytes in the
/// saved state.
impl Serialize for FileData {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let pages: Vec<(u64, &Bytes)> = self
            .pages
            .iter()
            .map(|(index, page)| (*index, Bytes::new(page)))
            .collect();
        (self.size, pages, &self.unwritten).serialize(s)
    }
}

impl<'de> Deserialize<'de> for FileData {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        type Saved = (u64, Vec<(u64, ByteBuf)>, BTreeSet<u64>);
        let (size, pages, unwritten): Saved = Deserialize::deserialize(d)?;
        let mut data = FileData {
            pages: BTreeMap::new(),
            size,
            unwritten,
        };
        for (index, page) in pages {
            if page.len() as u64 != PAGE {
                return Err(serde::de::Error::custom("a page of the wrong size"));
            }
            data.pages.insert(index, page.into_vec().into_boxed_slice());
        }
        if data.unwritten.iter().any(|i| !data.pages.contains_key(i)) {
            return Err(serde::de::Error::custom(
                "an unwritten page that is not stored",
            ));
        }
        Ok(data)
    }
}

impl FileData {
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Pages stored; a page is 8 blocks of 512 bytes.
    pub fn pages(&self) -> u64 {
        self.pages.len() as u64
    }

    /// How many new pages a write of `len` bytes at `offset` would add.
    pub fn new_pages(&self, offset: u64, len: u64) -> u64 {
        if len == 0 {
            return 0;
        }
        (offset / PAGE..=(offset + len - 1) / PAGE)
            .filter(|index| !self.pages.contains_key(index))
            .count() as u64
    }

    pub fn read(&self, offset: u64, buf: &mut [u8]) -> usize {
        let end = self.size.min(offset.saturating_add(buf.len() as u64));
        if offset >= end {
            return 0;
        }
        let wanted = (end - offset) as usize;
        buf[..wanted].fill(0);
        for (index, page) in self.pages.range(offset / PAGE..=(end - 1) / PAGE) {
            let page_start = index * PAGE;
            let from = offset.max(page_start);
            let to = end.min(page_start + PAGE);
            buf[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&page[(from - page_start) as usize..(to - page_start) as usize]);
        }
        wanted
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let mut done = 0usize;
        while done < data.len() {
            let at = offset + done as u64;
            let index = at / PAGE;
            let within = (at % PAGE) as usize;
            let n = (PAGE as usize - within).min(data.len() - done);
            let page = self
                .pages
                .entry(index)
                .or_insert_with(|| vec![0u8; PAGE as usize].into_boxed_slice());
            page[within..within + n].copy_from_slice(&data[done..done + n]);
            if !self.unwritten.is_empty() {
                self.unwritten.remove(&index);
            }
            done += n;
        }
        self.size = self.size.max(offset + data.len() as u64);
    }

    /// `fallocate` without a hole: stores zero pages where `[offset, offset + len)` has
    /// none (they stay holes for `SEEK_DATA` until written); the size does not change. As on
    /// tmpfs, a page an earlier `fallocate` left unwritten becomes data now (tmpfs zeroes
    /// and marks it up to date when it meets it again).
    pub fn allocate(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        for index in offset / PAGE..=(offset + len - 1) / PAGE {
            match self.pages.entry(index) {
                std::collections::btree_map::Entry::Vacant(slot) => {
                    slot.insert(vec![0u8; PAGE as usize].into_boxed_slice());
                    self.unwritten.insert(index);
                }
                std::collections::btree_map::Entry::Occupied(_) => {
                    self.unwritten.remove(&index);
                }
            }
        }
    }

    /// Punches a hole in `[offset, offset + len)`: whole pages go, the rest is zeroed; the
    /// size does not change. Returns how many pages went.
    pub fn punch(&mut self, offset: u64, len: u64) -> u64 {
        let end = offset.saturating_add(len);
        if len == 0 {
            return 0;
        }
        // Pages wholly inside the range (none when it lies within one page).
        let (first, past) = (offset.div_ceil(PAGE), end / PAGE);
        let whole: Vec<u64> = if first < past {
            self.pages
                .range(first..past)
                .map(|(index, _)| *index)
                .collect()
        } else {
            Vec::new()
        };
        for index in &whole {
            self.pages.remove(index);
            self.unwritten.remove(index);
        }
        for index in [offset / PAGE, (end - 1) / PAGE] {
            let start = index * PAGE;
            if let Some(page) = self.pages.get_mut(&index) {
                let from = offset.max(start) - start;
                let to = end.min(start + PAGE) - start;
                page[from as usize..to as usize].fill(0);
            }
        }
        whole.len() as u64
    }

    /// Whether page `index` holds data (stored and written).
    fn is_data(&self, index: u64) -> bool {
        self.pages.contains_key(&index) && !self.unwritten.contains(&index)
    }

    /// `SEEK_DATA`: the first data at or after `offset`, None (ENXIO) if there is none
    /// before the end of the file.
    pub fn seek_data(&self, offset: u64) -> Option<u64> {
        if offset >= self.size {
            return None;
        }
        let found = self
            .pages
            .range(offset / PAGE..)
            .map(|(index, _)| *index)
            .find(|index| !self.unwritten.contains(index))?;
        let at = offset.max(found * PAGE);
        (at < self.size).then_some(at)
    }

    /// `SEEK_HOLE`: the first hole at or after `offset` (the end of the file is one), None
    /// (ENXIO) at or past the end.
    pub fn seek_hole(&self, offset: u64) -> Option<u64> {
        if offset >= self.size {
            return None;
        }
        let mut index = offset / PAGE;
        while self.is_data(index) && index * PAGE < self.size {
            index += 1;
        }
        Some(offset.max(index * PAGE).min(self.size))
    }

    /// Sets the size; shrinking drops whole pages past the end and zeroes the tail of the
    /// last one, so growing again reads zeros.
    pub fn truncate(&mut self, size: u64) {
        if size < self.size {
            let keep = size.div_ceil(PAGE);
            self.pages.retain(|index, _| *index < keep);
            self.unwritten.retain(|index| *index < keep);
            if !size.is_multiple_of(PAGE) {
                if let Some(page) = self.pages.get_mut(&(size / PAGE)) {
                    page[(size % PAGE) as usize..].fill(0);
                }
            }
        }
        self.size = size;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_read_as_zeros_and_cost_nothing() {
        let mut f = FileData::default();
        f.write(5 << 30, b"far");
        assert_eq!(f.size(), (5 << 30) + 3);
        assert_eq!(f.pages(), 1);
        let mut buf = [9u8; 6];
        assert_eq!(f.read((5 << 30) - 3, &mut buf), 6);
        assert_eq!(&buf, b"\0\0\0far");
    }

    #[test]
    fn truncate_down_then_up_reads_zeros() {
        let mut f = FileData::default();
        f.write(0, &[7u8; 10_000]);
        assert_eq!(f.pages(), 3);
        f.truncate(5000);
        assert_eq!(f.pages(), 2);
        f.truncate(9000);
        let mut buf = vec![1u8; 9000];
        assert_eq!(f.read(0, &mut buf), 9000);
        assert!(buf[..5000].iter().all(|b| *b == 7));
        assert!(buf[5000..].iter().all(|b| *b == 0));
        assert_eq!(f.new_pages(4095, 2), 0);
        assert_eq!(f.new_pages(8192, 1), 1);
    }
}
