//! memfs served by a tiny standalone FUSE binary: memfs linked in and called directly (no
//! daemon, no control socket, no plugin ABI), through the same adapter and session code
//! as fshostd. The benchmark runs it next to a hosted memfs to measure what hosting costs.
//!
//! Usage: memfs-standalone MOUNTPOINT [-o KEY[=VALUE][,...]]...   (as root)
//! Prints "ready" once mounted and serves until the mount is unmounted.

use std::io::Write;
use std::path::PathBuf;

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
    let Some(mountpoint) = mountpoint else {
        eprintln!("usage: memfs-standalone MOUNTPOINT [-o KEY[=VALUE][,...]]...");
        std::process::exit(2);
    };
    let ready = || {
        println!("ready");
        let _ = std::io::stdout().flush();
    };
    if let Err(why) =
        fshostd::standalone::serve::<memfs::MemFs>("memfs", &mountpoint, &groups, ready)
    {
        eprintln!("memfs-standalone: {why}");
        std::process::exit(1);
    }
}
