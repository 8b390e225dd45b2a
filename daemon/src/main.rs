//! fshostd: hosts filesystem plugins and serves them through FUSE.
#![deny(unsafe_code)]
mod registry;
fn main() {}
