//! The daemon's parts, as a library: `fshostd` (main.rs) is built on it, and so is the
//! standalone benchmark binary that serves a plugin through the same FUSE adapter without
//! the daemon and its plugin ABI (`tests/src/bin/memfs-standalone.rs`).
//!
//! Only `plugin::ffi` (it alone talks to loaded plugins) and `sys` (the OS calls no crate
//! wraps) may use `unsafe`.
#![deny(unsafe_code)]

pub mod config;
pub mod control;
pub mod host;
pub mod mount;
pub(crate) mod plugin;
pub(crate) mod registry;
#[allow(unsafe_code)]
pub(crate) mod sys;

pub use plugin::fix_malloc_mmap_threshold;

use sd_notify::NotifyState;

/// Tells systemd (if it started us) about a state change.
pub fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// Sends the counts to systemd; skipped (not even computed) when not run by systemd,
/// since it follows every request that changes something.
pub fn notify_status(host: &host::Host) {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        notify(&[NotifyState::Status(&host.status_line())]);
    }
}
