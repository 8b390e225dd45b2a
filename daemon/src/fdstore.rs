//! Crash survival under systemd: every mount's `/dev/fuse` connection is kept in systemd's
//! file descriptor store (`FDSTORE=1`, `FDNAME=fshost-mount-<kernel id>`), beside a record
//! in the runtime directory of what serving it again needs (plugin, options, what INIT
//! agreed). A connection lives as long as any descriptor of it is open, so when fshostd
//! dies systemd's copy keeps every mount alive; the restarted fshostd receives them
//! (`LISTEN_FDS`, `LISTEN_FDNAMES`) and serves again those whose plugin can do without the
//! dead process's memory (`host/recover.rs`). A mount's end removes both
//! (`FDSTOREREMOVE=1`). Without systemd (no `NOTIFY_SOCKET`) nothing is kept.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::BorrowedFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use sd_notify::NotifyState;
use serde::{Deserialize, Serialize};

use crate::mount::Agreed;

/// The name prefix of the descriptors fshostd keeps in systemd's store.
pub const PREFIX: &str = "fshost-mount-";

/// What serving a kept connection again needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// The plugin's registered name and the library it was loaded from.
    pub plugin: String,
    pub source: PathBuf,
    pub mountpoint: PathBuf,
    pub kernel_id: u64,
    pub options: BTreeMap<String, String>,
    pub read_only: bool,
    pub owner: u32,
    /// Owner and mode of the directory mounted on.
    pub uid: u32,
    pub mode: u32,
    pub since: (u64, u32),
    pub agreed: Agreed,
}

/// Where the records go; set once at start, when running under systemd.
static RECORDS: OnceLock<PathBuf> = OnceLock::new();

/// Keeps connections from now on (if systemd started us: `NOTIFY_SOCKET` is set), with
/// their records in `dir` (made private to root if missing).
pub fn enable(dir: &Path) -> std::io::Result<bool> {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return Ok(false);
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    crate::check_private_dir(dir, nix::unistd::geteuid().as_raw())
        .map_err(std::io::Error::other)?;
    let _ = RECORDS.set(dir.to_path_buf());
    Ok(true)
}

/// The name a mount's connection has in the store.
pub fn name(kernel_id: u64) -> String {
    format!("{PREFIX}{kernel_id}")
}

/// The kernel mount id a stored descriptor's name gives, if it is one of ours.
pub fn kernel_id_of(name: &str) -> Option<u64> {
    name.strip_prefix(PREFIX)?.parse().ok()
}

fn record_path(dir: &Path, kernel_id: u64) -> PathBuf {
    dir.join(format!("{kernel_id}.json"))
}

/// Keeps a served mount's connection `fuse` and its record (nothing when not enabled). A
/// mount kept already only gets its record rewritten (after a plugin upgrade: the new
/// generation's file).
pub fn keep(record: &Record, fuse: BorrowedFd<'_>) {
    let Some(dir) = RECORDS.get() else {
        return;
    };
    let path = record_path(dir, record.kernel_id);
    let kept_already = path.exists();
    let written = (|| {
        let text = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
        let partial = path.with_extension("partial");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&partial)?;
        file.write_all(&text)?;
        file.sync_all()?;
        std::fs::rename(&partial, &path)
    })();
    if let Err(e) = written {
        tracing::warn!(mountpoint = %record.mountpoint.display(), error = %e, "cannot record the mount for a restart after a crash; it will not survive one");
        return;
    }
    if kept_already {
        return;
    }
    let name = name(record.kernel_id);
    let state = [NotifyState::FdStore, NotifyState::FdName(&name)];
    if let Err(e) = sd_notify::notify_with_fds(&state, &[fuse]) {
        tracing::warn!(mountpoint = %record.mountpoint.display(), error = %e, "systemd did not take the mount's connection (FDSTORE); it will not survive a crash");
        let _ = std::fs::remove_file(&path);
    }
}

/// Forgets a mount that ended: systemd closes its copy of the connection.
pub fn forget(kernel_id: u64) {
    let Some(dir) = RECORDS.get() else {
        return;
    };
    let path = record_path(dir, kernel_id);
    if std::fs::remove_file(&path).is_err() {
        return; // never kept (or already forgotten)
    }
    let name = name(kernel_id);
    if let Err(e) = sd_notify::notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(&name)]) {
        tracing::warn!(error = %e, %name, "cannot tell systemd to drop a kept connection");
    }
}

/// Every record kept, by kernel mount id.
pub fn records() -> BTreeMap<u64, Record> {
    let Some(dir) = RECORDS.get() else {
        return BTreeMap::new();
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return BTreeMap::new();
    };
    entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| {
            let text = std::fs::read(e.path()).ok()?;
            match serde_json::from_slice::<Record>(&text) {
                Ok(record) => Some((record.kernel_id, record)),
                Err(err) => {
                    tracing::warn!(file = %e.path().display(), error = %err, "ignoring an unreadable mount record");
                    None
                }
            }
        })
        .collect()
}
