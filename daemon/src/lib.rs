//! The daemon, as a library with a narrow face: [`main`] is fshostd (main.rs only calls
//! it), [`standalone`] serves a plugin linked into a binary through the same FUSE adapter
//! without the daemon and its plugin ABI (`tests/src/bin/memfs-standalone.rs`), and
//! [`kernel_mounts`] lets the tests see what is mounted. Everything else is crate-private.
//!
//! Only `plugin::ffi` (it alone talks to loaded plugins) and `sys` (the OS calls no crate
//! wraps) may use `unsafe`.
#![deny(unsafe_code)]

pub(crate) mod config;
pub(crate) mod control;
mod daemon;
mod fdstore;
mod handover;
pub(crate) mod host;
pub(crate) mod mount;
pub(crate) mod plugin;
pub(crate) mod registry;
pub mod standalone;
#[allow(unsafe_code)]
pub(crate) mod sys;

pub use daemon::main;
pub use mount::{kernel_mounts, KernelMount};

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use sd_notify::NotifyState;

/// Checks that `dir` belongs to `owner` and that no one else may write in it (who can, can
/// replace or swap what is in it: plugin files, the control socket). The error says what
/// is wrong; the caller says what to do.
pub(crate) fn check_private_dir(dir: &Path, owner: u32) -> Result<(), String> {
    let meta =
        std::fs::metadata(dir).map_err(|e| format!("cannot inspect {}: {e}", dir.display()))?;
    if meta.uid() == owner && meta.mode() & 0o022 == 0 {
        return Ok(());
    }
    Err(format!(
        "directory {} is owned by uid {} with mode {:o}: others could replace its files",
        dir.display(),
        meta.uid(),
        meta.mode() & 0o7777,
    ))
}

/// Tells systemd (if it started us) about a state change.
pub(crate) fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// Sends the counts to systemd; skipped (not even computed) when not run by systemd,
/// since it follows every request that changes something.
pub(crate) fn notify_status(host: &host::Host) {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        notify(&[NotifyState::Status(&host.status_line())]);
    }
}
