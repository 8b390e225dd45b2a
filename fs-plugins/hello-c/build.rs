//! Compiles hello.c with the system C compiler ($CC, else cc) into a shared object and puts
//! it beside the Rust plugins in target/<profile>/, where `fshostctl load hello_c` finds it.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let include = manifest.join("../sdk/include");
    println!("cargo:rerun-if-changed=hello.c");
    println!("cargo:rerun-if-changed=../sdk/include/fshost_plugin.h");
    println!("cargo:rerun-if-env-changed=CC");
    let built = out_dir.join("libhello_c.so");
    let compiler = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&compiler)
        .args([
            "-shared", "-fPIC", "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-o",
        ])
        .arg(&built)
        .arg(manifest.join("hello.c"))
        .arg("-I")
        .arg(&include)
        .status()
        .unwrap_or_else(|e| {
            panic!("cannot run the C compiler {compiler:?} (install build-essential): {e}")
        });
    assert!(status.success(), "compiling hello.c failed");
    // OUT_DIR is target/<profile>/build/hello-c-<hash>/out.
    let profile_dir = out_dir.ancestors().nth(3).expect("target/<profile>");
    std::fs::copy(&built, profile_dir.join("libhello_c.so")).expect("copy libhello_c.so");
}
