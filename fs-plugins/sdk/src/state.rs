//! The state a plugin instance hands to its next generation (`export_state` /
//! `import_state`), as one versioned serde value: [`save`] writes it, [`version`] and
//! [`load`] read it back. The encoding is postcard's (compact, no schema in the data), so
//! a new generation reads an old one's state by keeping the old types for the old version
//! numbers. Mark byte buffers `#[serde(with = "serde_bytes")]`: they then go as one block
//! instead of byte by byte.

use std::io::Write;

use serde::de::DeserializeOwned;
use serde::Serialize;

pub use serde_bytes;

pub use crate::ffi::SharedFd;

use crate::{Errno, Result, StateWriter};

/// What every saved state starts with, then the version (u32, little-endian).
const MAGIC: &[u8; 8] = b"FSHSTATE";
const HEADER: usize = MAGIC.len() + 4;

/// Writes `value` as state `version` of this plugin.
pub fn save<T: Serialize>(out: &mut StateWriter<'_>, version: u32, value: &T) -> Result<()> {
    // Through a buffer: postcard writes field by field, and each write crosses to the host.
    let mut sink = Sink { out, failed: None };
    let mut buffered = std::io::BufWriter::with_capacity(1 << 16, &mut sink);
    let mut write = || -> std::result::Result<(), ()> {
        buffered.write_all(MAGIC).map_err(drop)?;
        buffered.write_all(&version.to_le_bytes()).map_err(drop)?;
        postcard::to_io(value, &mut buffered).map_err(drop)?;
        buffered.flush().map_err(drop)
    };
    let written = write().map_err(|()| Errno::EIO);
    drop(buffered);
    // The host's errno (ENOSPC, say) rather than the encoder's summary of it.
    match (written, sink.failed) {
        (Err(_), Some(errno)) => Err(errno),
        (result, _) => result,
    }
}

/// The writer under the buffer: remembers why the host refused a write.
struct Sink<'o, 'w> {
    out: &'o mut StateWriter<'w>,
    failed: Option<Errno>,
}

impl Write for Sink<'_, '_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.out.write(data).inspect_err(|e| {
            self.failed
                .get_or_insert(Errno(e.raw_os_error().unwrap_or(libc::EIO)));
        })
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The version a saved state was written as; `EINVAL` if it is not a saved state.
pub fn version(state: &[u8]) -> Result<u32> {
    match state.split_first_chunk::<HEADER>() {
        Some((header, _)) if header.starts_with(MAGIC) => {
            let mut version = [0u8; 4];
            version.copy_from_slice(&header[MAGIC.len()..]);
            Ok(u32::from_le_bytes(version))
        }
        _ => Err(Errno::EINVAL),
    }
}

/// Reads a saved state as a `T` (check [`version`] first); `EINVAL` if it does not decode.
pub fn load<T: DeserializeOwned>(state: &[u8]) -> Result<T> {
    version(state)?;
    postcard::from_bytes(&state[HEADER..]).map_err(|_| Errno::EINVAL)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SavedState;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Saved {
        name: String,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    }

    #[test]
    fn a_saved_state_reads_back_with_its_version() {
        let value = Saved {
            name: "x".into(),
            data: vec![7; 100_000],
        };
        let mut bytes = Vec::new();
        StateWriter::over(
            &mut |chunk| {
                bytes.extend_from_slice(chunk);
                true
            },
            &mut Vec::new(),
            |out| save(out, 3, &value),
        )
        .unwrap();
        assert!(bytes.len() < 100_100, "{} bytes", bytes.len());
        assert_eq!(version(&bytes), Ok(3));
        assert_eq!(load::<Saved>(&bytes), Ok(value));
        assert_eq!(version(b"nonsense"), Err(Errno::EINVAL));
        assert_eq!(load::<Saved>(&bytes[..50]), Err(Errno::EINVAL));
        // A host that cannot take more fails the export with its errno.
        let full = StateWriter::over(&mut |_| false, &mut Vec::new(), |out| save(out, 1, &1u32));
        assert_eq!(full, Err(Errno::ENOSPC));
    }

    #[test]
    fn a_shared_descriptor_crosses_as_an_index_and_comes_back_as_a_duplicate() {
        use std::io::{Read, Seek, Write};
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"shared").unwrap();
        let mut fds = Vec::new();
        let mut bytes = Vec::new();
        let shared = StateWriter::over(
            &mut |chunk| {
                bytes.extend_from_slice(chunk);
                true
            },
            &mut fds,
            |out| {
                let shared = out.share_fd(&file)?;
                save(out, 1, &shared)?;
                Ok::<_, Errno>(shared)
            },
        )
        .unwrap();
        assert_eq!(fds.len(), 1);
        drop(file); // the exporter's own descriptor may go: the host kept a duplicate
        let back: SharedFd = load(&bytes).unwrap();
        assert_eq!(back, shared);
        let mut text = String::new();
        SavedState::over(&bytes, &fds, |saved| {
            let mut taken = std::fs::File::from(saved.fd(back).unwrap());
            taken.rewind().unwrap();
            taken.read_to_string(&mut text).unwrap();
            // An index the state never shared is refused.
            let bogus: SharedFd = postcard::from_bytes(&[9]).unwrap();
            assert_eq!(
                saved.fd(bogus).unwrap_err().raw_os_error(),
                Some(libc::EBADF)
            );
        });
        assert_eq!(text, "shared");
    }
}
