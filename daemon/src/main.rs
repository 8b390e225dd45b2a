//! fshostd: hosts filesystem plugins and serves them through FUSE (the daemon lives in the
//! library, `daemon.rs`).
#![deny(unsafe_code)]

fn main() -> anyhow::Result<()> {
    fshostd::main()
}
