//! Checks that `include/fshost_plugin.h` describes exactly the Rust ABI in `abi.rs`: a C program
//! compiled against the header prints every size, offset and constant, and Rust compares.
//! The descriptor's operations come from the operation table (`src/ops.rs`): one missing
//! from the header does not compile, one the table lacks changes the descriptor's size.

use std::collections::BTreeMap;
use std::mem::{offset_of, size_of};
use std::path::Path;
use std::process::Command;

use fshost_sdk::abi::*;

/// For each listed struct: its size and the offset of each field, from Rust and as C code.
macro_rules! layout {
    ($($rust:ident = $c:literal { $($field:ident),* $(,)? })*) => {{
        let mut rust = BTreeMap::new();
        let mut c = String::new();
        $(
            rust.insert(format!("{}.size", $c), size_of::<$rust>());
            c.push_str(&format!("printf(\"{0}.size %zu\\n\", sizeof(struct {0}));\n", $c));
            $(
                rust.insert(format!("{}.{}", $c, stringify!($field)), offset_of!($rust, $field));
                c.push_str(&format!(
                    "printf(\"{0}.{1} %zu\\n\", offsetof(struct {0}, {1}));\n",
                    $c, stringify!($field)
                ));
            )*
        )*
        (rust, c)
    }};
}

/// (name, offset in the descriptor) of every operation of the table.
macro_rules! op_offsets {
    ($(
        $(#[$attr:meta])* $([when $cond:ident])?
        fn $name:ident(&$recv:ident $(, $arg:ident : $ty:ty => [$($p:ident : $pt:ty),*])*)
            -> $out:ty => [$($o:ident : $ot:ty),*] $body:tt
    )*) => {
        [$((stringify!($name), offset_of!(PluginDescriptor, $name))),*]
    };
}

#[test]
fn c_header_matches_rust_layout() {
    let (mut rust, mut body) = layout! {
        Context = "fshost_context" { uid, gid, pid, umask }
        Timespec = "fshost_timespec" { sec, nsec, reserved }
        Attr = "fshost_attr" { ino, size, blocks, atime, mtime, ctime, mode, nlink, uid, gid, rdev, blksize }
        Setattr = "fshost_setattr" { valid, mode, uid, gid, size, atime, mtime, ctime, fh }
        Statfs = "fshost_statfs" { blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, reserved }
        MountOption = "fshost_mount_option" { key, value }
        PluginDescriptor = "fshost_plugin" {
            magic, abi_version, struct_size, name, version, on_load, on_unload, last_panic,
            create, destroy,
        }
    };
    // Every operation of the table, by the same name, at the same offset.
    for (op, offset) in fshost_sdk::operations!(op_offsets) {
        rust.insert(format!("fshost_plugin.{op}"), offset);
        body.push_str(&format!(
            "printf(\"fshost_plugin.{op} %zu\\n\", offsetof(struct fshost_plugin, {op}));\n"
        ));
    }
    let constants: [(&str, u64); 25] = [
        ("FSHOST_MIN_STRUCT_SIZE", MIN_STRUCT_SIZE.into()),
        (
            "FSHOST_PASSTHROUGH_STRUCT_SIZE",
            PASSTHROUGH_STRUCT_SIZE.into(),
        ),
        ("FSHOST_UPGRADE_STRUCT_SIZE", UPGRADE_STRUCT_SIZE.into()),
        ("FSHOST_SPACE_STRUCT_SIZE", SPACE_STRUCT_SIZE.into()),
        ("FSHOST_RESUME_STRUCT_SIZE", RESUME_STRUCT_SIZE.into()),
        ("FSHOST_TMPFILE_STRUCT_SIZE", TMPFILE_STRUCT_SIZE.into()),
        ("FSHOST_WANTS_STRUCT_SIZE", WANTS_STRUCT_SIZE.into()),
        ("FSHOST_BIRTH_STRUCT_SIZE", BIRTH_STRUCT_SIZE.into()),
        ("FSHOST_FLAGS_STRUCT_SIZE", FLAGS_STRUCT_SIZE.into()),
        (
            "FSHOST_TMPFILE_BACKING_STRUCT_SIZE",
            TMPFILE_BACKING_STRUCT_SIZE.into(),
        ),
        ("FSHOST_WANT_POSIX_ACL", WANT_POSIX_ACL),
        ("FSHOST_WANT_KILL_PRIV", WANT_KILL_PRIV),
        ("FSHOST_PLUGIN_MAGIC", MAGIC),
        ("FSHOST_ABI_VERSION", ABI_VERSION.into()),
        ("FSHOST_PANICKED", PANICKED as i64 as u64),
        ("FSHOST_SET_MODE", SET_MODE.into()),
        ("FSHOST_SET_UID", SET_UID.into()),
        ("FSHOST_SET_GID", SET_GID.into()),
        ("FSHOST_SET_SIZE", SET_SIZE.into()),
        ("FSHOST_SET_ATIME", SET_ATIME.into()),
        ("FSHOST_SET_MTIME", SET_MTIME.into()),
        ("FSHOST_SET_ATIME_NOW", SET_ATIME_NOW.into()),
        ("FSHOST_SET_MTIME_NOW", SET_MTIME_NOW.into()),
        ("FSHOST_SET_CTIME", SET_CTIME.into()),
        ("FSHOST_SET_FH", SET_FH.into()),
    ];
    let mut rust_constants = BTreeMap::new();
    for (name, value) in constants {
        body.push_str(&format!(
            "printf(\"{name} %llu\\n\", (unsigned long long)({name}));\n"
        ));
        rust_constants.insert(name.to_string(), value);
    }

    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("layout.c");
    let binary = dir.path().join("layout");
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("include");
    std::fs::write(
        &source,
        format!(
            "#include <stdio.h>\n#include <stddef.h>\n#include \"fshost_plugin.h\"\n\
             int main(void) {{\n{body}return 0;\n}}\n"
        ),
    )
    .unwrap();
    let status = Command::new("cc")
        .args(["-std=c11", "-Wall", "-Werror", "-o"])
        .arg(&binary)
        .arg(&source)
        .arg("-I")
        .arg(&include)
        .status()
        .expect("run the C compiler `cc` (install build-essential)");
    assert!(status.success(), "the C header does not compile");
    let output = Command::new(&binary).output().unwrap();
    let text = String::from_utf8(output.stdout).unwrap();

    let mut c_layout = BTreeMap::new();
    let mut c_constants = BTreeMap::new();
    for line in text.lines() {
        let (key, value) = line.split_once(' ').unwrap();
        if key.starts_with("FSHOST_") {
            c_constants.insert(key.to_string(), value.parse::<u64>().unwrap());
        } else {
            c_layout.insert(key.to_string(), value.parse::<usize>().unwrap());
        }
    }
    assert_eq!(c_layout.len(), rust.len(), "every field was printed");
    for (key, c_value) in &c_layout {
        assert_eq!(rust.remove(key), Some(*c_value), "layout of {key} differs");
    }
    assert_eq!(c_constants, rust_constants);
}
