//! One `fshost_sdk::Plugin` linked into a binary and served without the daemon or the
//! plugin ABI, through the same adapter and session code as fshostd: what
//! `tests/src/bin/memfs-standalone.rs` runs, the benchmark's measure of what hosting costs.

use std::path::Path;
use std::sync::Arc;

use crate::mount::{self, Direct, MountStats, SessionOptions};

/// Mounts a `P` made from the `-o` option `groups` on `mountpoint` (as the calling user),
/// calls `ready`, and serves until the mount is unmounted. The error says what failed.
pub fn serve<P: fshost_sdk::Plugin>(
    name: &str,
    mountpoint: &Path,
    groups: &[String],
    ready: impl FnOnce(),
) -> Result<(), String> {
    let options = fshost_protocol::parse_options(groups);
    // Absolute, as /proc/self/mountinfo has it (the readahead setting looks the mount up
    // there). Resolved before mounting: afterwards it would ask the not yet served mount.
    let mountpoint = mountpoint
        .canonicalize()
        .map_err(|e| format!("{}: {e}", mountpoint.display()))?;
    let session_options = SessionOptions::parse(&options).map_err(|e| e.to_string())?;
    let plugin_options = mount::plugin_options(&options)
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    let fs = P::create(&fshost_sdk::Options(plugin_options))
        .map_err(|e| format!("{name} refused the options: {e:?}"))?;
    let target = mount::MountTarget::resolve(&mountpoint)
        .map_err(|e| format!("{}: {e}", mountpoint.display()))?;
    let owner = (
        nix::unistd::getuid().as_raw(),
        nix::unistd::getgid().as_raw(),
    );
    let (session, id) = mount::start_session(
        Direct::new(name, fs),
        Arc::new(MountStats::default()),
        Arc::default(),
        &target,
        false,
        owner,
        &session_options,
    )
    .map_err(|e| format!("mounting {} failed: {e}", mountpoint.display()))?;
    let running = session
        .start()
        .map_err(|e| format!("cannot serve {}: {e}", mountpoint.display()))?;
    ready();
    mount::finish_session(running, &target, id);
    Ok(())
}
