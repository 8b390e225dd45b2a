//! Conventions that would otherwise hold only by review (STYLE.md), checked on the source
//! tree: every file says what it is for, `unsafe` stays in the FFI modules, only `mount/`
//! uses fuser and only `plugin/` uses libloading, and no debugging leftovers.

use std::path::{Path, PathBuf};

/// Every `.rs` file of the workspace, relative to its root (build output excluded, and
/// the fuser we carry: upstream's code, patched as `daemon/fuser/fshost.patch` shows).
fn sources() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut found = Vec::new();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let vendored = path.ends_with("daemon/fuser");
            if path.is_dir() && !name.starts_with('.') && name != "target" && !vendored {
                dirs.push(path);
            } else if name.ends_with(".rs") {
                found.push(path.strip_prefix(&root).unwrap().to_path_buf());
            }
        }
    }
    assert!(found.len() > 40, "found only {found:?}");
    found.sort();
    found
}

fn text(path: &Path) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)).unwrap()
}

/// Files whose lines contain one of `needles`, outside `allowed` (path prefixes).
fn offenders(needles: &[&str], allowed: &[&str]) -> Vec<String> {
    sources()
        .into_iter()
        .filter(|path| {
            let shown = path.to_string_lossy();
            !allowed.iter().any(|a| shown.starts_with(a)) && !shown.ends_with("e2e/tidy.rs")
        })
        .flat_map(|path| {
            text(&path)
                .lines()
                .enumerate()
                .filter(|(_, line)| !line.trim_start().starts_with("//"))
                .filter(|(_, line)| needles.iter().any(|n| line.contains(n)))
                .map(|(i, line)| format!("{}:{}: {}", path.display(), i + 1, line.trim()))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn every_source_file_starts_by_saying_what_it_is_for() {
    let undocumented: Vec<PathBuf> = sources()
        .into_iter()
        .filter(|path| !text(path).starts_with("//!"))
        .collect();
    assert!(
        undocumented.is_empty(),
        "no leading //! line: {undocumented:?}"
    );
}

#[test]
fn unsafe_code_stays_in_the_ffi_modules() {
    let found = offenders(
        &["unsafe {", "unsafe fn", "unsafe impl", "allow(unsafe_code)"],
        &[
            "daemon/src/plugin/ffi.rs",
            "daemon/src/sys.rs",
            "fs-plugins/sdk/src/ffi.rs",
            // The descriptor is plain static data: Send/Sync for the C ABI's pointers.
            "fs-plugins/sdk/src/abi.rs",
            // A test program that must map a file of a mount (mmap is unsafe by nature).
            "tests/src/bin/workload.rs",
            // The io_uring transport measurement: the kernel reads a ring entry's buffers
            // while the SQE names them (io-uring's push is unsafe by nature).
            "tests/src/bin/fuse-transport.rs",
            // systemd's stand-in places descriptors at 3, 4, … in the child (pre_exec).
            "tests/src/systemd.rs",
            // The two lines that let those modules use it.
            "daemon/src/lib.rs",
            "daemon/src/plugin/mod.rs",
        ],
    );
    assert!(
        found.is_empty(),
        "unsafe outside the FFI modules:\n{}",
        found.join("\n")
    );
}

#[test]
fn only_mount_uses_fuser_and_only_plugin_uses_libloading() {
    let fuser = offenders(
        &["fuser::", "use fuser"],
        // sys.rs: the one unsafe fuser call (adopting a handed-over backing id).
        &["daemon/src/mount/", "daemon/src/sys.rs"],
    );
    assert!(
        fuser.is_empty(),
        "fuser outside daemon/src/mount/:\n{}",
        fuser.join("\n")
    );
    let libloading = offenders(&["libloading"], &["daemon/src/plugin/"]);
    assert!(
        libloading.is_empty(),
        "libloading outside daemon/src/plugin/:\n{}",
        libloading.join("\n")
    );
}

#[test]
fn no_debugging_leftovers() {
    let found = offenders(&["todo!(", "dbg!(", "unimplemented!("], &[]);
    assert!(found.is_empty(), "{}", found.join("\n"));
}

/// The names of the function pointers in the C header's descriptor after the line that
/// starts with `start`, in order.
fn header_operations(start: &str) -> Vec<String> {
    let text = text(Path::new("fs-plugins/sdk/include/fshost_plugin.h"));
    let from = text
        .find(start)
        .unwrap_or_else(|| panic!("{start:?} not in the header"));
    let to = from + text[from..].find("};").unwrap();
    text[from..to]
        .lines()
        .filter_map(|line| {
            let rest = &line[line.find("int (*")? + "int (*".len()..];
            Some(rest[..rest.find(')')?].to_string())
        })
        .collect()
}

/// The operations are declared once, in the SDK's table (fs-plugins/sdk/src/ops.rs); the
/// descriptor, the `Plugin` trait, both sides of the C calls and the daemon's `Backend`
/// are made from it. The C header is the one copy by hand: it must list the same
/// operations in the same order (c_header.rs checks their types' layout).
#[test]
fn the_header_lists_the_tables_operations_in_order() {
    let header = header_operations("    /* Filesystem operations");
    assert_eq!(header, fshost_sdk::abi::OPERATIONS, "C header vs ops.rs");
}
