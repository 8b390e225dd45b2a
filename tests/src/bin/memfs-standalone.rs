//! memfs served by a tiny standalone FUSE binary: memfs linked in and called directly (no
//! daemon, no control socket, no plugin ABI), through the same adapter and session code
//! as fshostd. The benchmark runs it next to a hosted memfs to measure what hosting costs.
//!
//! Usage: memfs-standalone MOUNTPOINT [-o KEY[=VALUE][,...]]...   (as root)
//! Prints "ready" once mounted and serves until the mount is unmounted.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use fshost_sdk::Plugin;
use fshostd::mount::{self, Direct, MountStats, SessionOptions};

fn main() {
    let mut args = std::env::args().skip(1);
    let mut mountpoint = None;
    let mut groups = Vec::new();
    while let Some(arg) = args.next() {
        if arg == "-o" {
            groups.extend(args.next());
        } else {
            mountpoint = Some(PathBuf::from(arg));
        }
    }
    let options = fshost_protocol::parse_options(&groups);
    let Some(mountpoint) = mountpoint else {
        eprintln!("usage: memfs-standalone MOUNTPOINT [-o KEY[=VALUE][,...]]...");
        std::process::exit(2);
    };
    let fail = |what: String| -> ! {
        eprintln!("memfs-standalone: {what}");
        std::process::exit(1);
    };
    // Absolute, as /proc/self/mountinfo has it (the readahead setting looks the mount up
    // there). Resolved before mounting: afterwards it would ask the not yet served mount.
    let mountpoint = mountpoint
        .canonicalize()
        .unwrap_or_else(|e| fail(format!("{}: {e}", mountpoint.display())));
    let session_options = SessionOptions::parse(&options).unwrap_or_else(|e| fail(e.to_string()));
    let plugin_options = mount::plugin_options(&options)
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    let fs = memfs::MemFs::create(&fshost_sdk::Options(plugin_options))
        .unwrap_or_else(|e| fail(format!("memfs refused the options: {e:?}")));
    let target = mount::MountTarget::resolve(&mountpoint)
        .unwrap_or_else(|e| fail(format!("{}: {e}", mountpoint.display())));
    let (session, id) = mount::start_session(
        Direct::new("memfs", fs),
        Arc::new(MountStats::default()),
        &target,
        false,
        (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        ),
        &session_options,
    )
    .unwrap_or_else(|e| fail(format!("mounting {} failed: {e}", mountpoint.display())));
    println!("ready");
    let _ = std::io::stdout().flush();
    mount::run_session(session, &target, id);
}
