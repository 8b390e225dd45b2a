//! passthroughfs: a mirror of a source directory whose file data goes through FUSE
//! passthrough; and the ABI extension it needs not breaking older plugins.

use std::collections::BTreeMap;
use std::fs;
use std::io::ErrorKind;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use fshost_tests::{fuse_available, Env};

use crate::{path_str, MINIMAL_C};

/// Everything `ls -ln` and `readlink` and `cat` would show about a tree, by relative path.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(relative) = stack.pop() {
        let full = root.join(&relative);
        let meta = fs::symlink_metadata(&full).unwrap();
        let kind = meta.file_type();
        let detail = if kind.is_symlink() {
            format!("-> {}", fs::read_link(&full).unwrap().display())
        } else if kind.is_file() {
            format!(
                "{:x?}",
                fs::read(&full).unwrap().iter().take(64).collect::<Vec<_>>()
            )
        } else {
            String::new()
        };
        let dir_size = if kind.is_dir() { 0 } else { meta.size() };
        out.insert(
            relative.clone(),
            format!(
                "mode {:o} uid {} gid {} nlink {} size {} mtime {}.{} {detail}",
                meta.mode(),
                meta.uid(),
                meta.gid(),
                meta.nlink(),
                dir_size,
                meta.mtime(),
                meta.mtime_nsec()
            ),
        );
        if kind.is_dir() {
            for entry in fs::read_dir(&full).unwrap() {
                stack.push(relative.join(entry.unwrap().file_name()));
            }
        }
    }
    out
}

/// passthroughfs (loaded if it is not) mirroring `src` at the mount point `name`, with
/// `extra` options after `source=`.
fn mirror(env: &Env, src: &Path, name: &str, extra: &str) -> PathBuf {
    if !env.plugins().iter().any(|p| p.0 == "passthroughfs") {
        env.ctl(&["load", "passthroughfs"]).ok();
    }
    let mnt = env.mountpoint(name);
    let option = format!("source={}{extra}", src.display());
    env.ctl(&["mount", "passthroughfs", path_str(&mnt), "-o", &option])
        .ok();
    mnt
}

fn errno<T>(result: std::io::Result<T>) -> Option<i32> {
    result.err().and_then(|e| e.raw_os_error())
}

#[test]
fn passthroughfs_mirrors_its_source_and_reads_bypass_the_daemon() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    let src = env.path("src");
    fs::create_dir_all(src.join("dir/sub")).unwrap();
    fs::write(src.join("small"), b"hello passthrough\n").unwrap();
    let big: Vec<u8> = (0..4 * 1024 * 1024u32)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    fs::write(src.join("dir/big"), &big).unwrap();
    fs::set_permissions(src.join("small"), fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::symlink("../small", src.join("dir/link")).unwrap();
    fs::hard_link(src.join("small"), src.join("dir/hard")).unwrap();
    nix::unistd::mkfifo(
        &src.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    nix::unistd::chown(&src.join("dir/sub"), Some(65534.into()), Some(65534.into())).unwrap();

    let mnt = mirror(&env, &src, "mirror", "");

    // Contents and metadata match the source exactly (the root's own inode aside).
    assert_eq!(snapshot(&mnt), snapshot(&src));
    assert_eq!(fs::read(mnt.join("dir/big")).unwrap(), big);

    // Errors match too.
    assert_eq!(errno(fs::read(mnt.join("missing"))), Some(libc::ENOENT));
    assert_eq!(
        errno(fs::remove_dir(mnt.join("dir"))),
        Some(libc::ENOTEMPTY)
    );
    assert_eq!(errno(fs::create_dir(mnt.join("dir"))), Some(libc::EEXIST));
    assert_eq!(
        errno(fs::remove_file(mnt.join("dir"))),
        errno(fs::remove_file(src.join("dir")))
    );
    assert_eq!(
        errno(fs::rename(mnt.join("dir"), mnt.join("dir/sub/x"))),
        Some(libc::EINVAL)
    );

    // Writes through the mount land in the source, and the other way round.
    fs::write(mnt.join("dir/new"), b"written through fshost").unwrap();
    assert_eq!(
        fs::read(src.join("dir/new")).unwrap(),
        b"written through fshost"
    );
    fs::write(src.join("from-source"), b"written beside fshost").unwrap();
    assert_eq!(
        fs::read(mnt.join("from-source")).unwrap(),
        b"written beside fshost"
    );
    fs::rename(mnt.join("dir/new"), mnt.join("renamed")).unwrap();
    assert!(src.join("renamed").exists() && !src.join("dir/new").exists());
    fs::remove_file(mnt.join("renamed")).unwrap();
    assert_eq!(
        src.join("renamed").symlink_metadata().unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(snapshot(&mnt), snapshot(&src));

    // The data went through passthrough: the plugin served no read and no write.
    let mounts = env.ctl(&["--json", "mounts"]).ok().json();
    let stats = &mounts["mounts"][0];
    assert!(stats["passthrough_opens"].as_u64().unwrap() >= 3, "{stats}");
    assert_eq!(stats["plugin_reads"], 0, "{stats}");
    assert_eq!(stats["plugin_writes"], 0, "{stats}");
    env.ctl(&["unmount", path_str(&mnt)]).ok();
}

#[test]
fn passthroughfs_needs_a_source_directory() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    env.ctl(&["load", "passthroughfs"]).ok();
    let mnt = env.mountpoint("m");
    let out = env.ctl(&["mount", "passthroughfs", path_str(&mnt)]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("refused to create a filesystem"),
        "{out:?}"
    );
    let out = env.ctl(&[
        "mount",
        "passthroughfs",
        path_str(&mnt),
        "-o",
        "attr_timeout=soon",
    ]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("attr_timeout"), "{out:?}");
}

#[test]
fn a_plugin_built_before_the_passthrough_extension_still_loads() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    let old = env.compile_c_plugin(
        "olddesc",
        MINIMAL_C,
        &[
            "PLUGIN_NAME=\"olddesc\"",
            "STRUCT_SIZE=FSHOST_MIN_STRUCT_SIZE",
        ],
    );
    env.ctl(&["load", path_str(&old)]).ok();
    let mnt = env.mountpoint("old");
    env.ctl(&["mount", "olddesc", path_str(&mnt)]).ok();
    assert_eq!(fs::metadata(&mnt).unwrap().mode(), libc::S_IFDIR | 0o555);
    env.ctl(&["unmount", path_str(&mnt)]).ok();
}

/// Files and directories renamed through the mount are reached by their new names, with
/// their attributes cached by the kernel or not (a renamed file's path once gained a
/// trailing slash, so opening it failed with ENOTDIR: `git clone` into the mount failed).
#[test]
fn renamed_files_and_directories_open_by_their_new_names() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    for options in ["", ",attr_timeout=0"] {
        let mnt = mirror(&env, &src, "renames", options);
        fs::write(mnt.join("config.lock"), b"one").unwrap();
        fs::rename(mnt.join("config.lock"), mnt.join("config")).unwrap();
        fs::write(mnt.join("config.lock"), b"two").unwrap();
        assert_eq!(fs::read(mnt.join("config")).unwrap(), b"one");
        fs::create_dir_all(mnt.join("d/e")).unwrap();
        fs::write(mnt.join("d/e/f"), b"deep").unwrap();
        fs::rename(mnt.join("d"), mnt.join("moved")).unwrap();
        assert_eq!(fs::read(mnt.join("moved/e/f")).unwrap(), b"deep");
        fs::write(mnt.join("moved/e/g"), b"new").unwrap();
        assert_eq!(fs::read(src.join("moved/e/g")).unwrap(), b"new");
        env.ctl(&["unmount", path_str(&mnt)]).ok();
        fs::remove_dir_all(&src).unwrap();
        fs::create_dir_all(&src).unwrap();
    }
}

/// memfs's file data goes through passthrough into its private tmpfs by default, so the
/// daemon sees no read or write; `-o nopassthrough` and `-o writeback` keep memfs serving
/// them. Either way the same bytes come back, the size limit answers a short write then
/// ENOSPC as tmpfs does, and an O_TMPFILE file named by linkat opens again (the kernel
/// refuses to mix passthrough and served opens of one file).
#[test]
fn memfs_data_passes_through_unless_the_mount_says_otherwise() {
    use std::io::{Read, Seek, Write};
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::process::CommandExt;
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    // Another user writes below (allow_other; memfs's root is 1777).
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    env.ctl(&["load", "memfs"]).ok();
    for (options, passes_through) in [
        ("size=1M,allow_other", true),
        ("size=1M,allow_other,nopassthrough", false),
        ("size=1M,allow_other,writeback", false),
    ] {
        let mnt = env.mountpoint(&format!("data-{options}"));
        env.ctl(&["mount", "memfs", path_str(&mnt), "-o", options])
            .ok();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        fs::write(mnt.join("f"), &data).unwrap();
        assert_eq!(fs::read(mnt.join("f")).unwrap(), data, "{options}");
        // Past the megabyte: what fits, then ENOSPC (under the writeback cache the kernel
        // takes it all and fsync reports what the write-back met).
        let mut big = fs::File::create(mnt.join("big")).unwrap();
        let written = big.write(&vec![1u8; 1 << 20]).unwrap();
        if options.contains("writeback") {
            assert_eq!(errno(big.sync_all()), Some(libc::ENOSPC), "{options}");
        } else {
            assert!(written > 0 && written < 1 << 20, "{options}: {written}");
            assert_eq!(
                errno(big.write(&[1u8; 4096])),
                Some(libc::ENOSPC),
                "{options}"
            );
        }
        drop(big);
        fs::remove_file(mnt.join("big")).unwrap();
        // O_TMPFILE, named, written through the name, read back through the first open.
        let mut tmp = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_TMPFILE)
            .mode(0o600)
            .open(&mnt)
            .unwrap();
        tmp.write_all(b"unnamed ").unwrap();
        let proc_path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&tmp));
        let named = mnt.join("named");
        rustix::fs::linkat(
            rustix::fs::CWD,
            proc_path.as_str(),
            rustix::fs::CWD,
            &named,
            rustix::fs::AtFlags::SYMLINK_FOLLOW,
        )
        .unwrap();
        let mut again = fs::OpenOptions::new().append(true).open(&named).unwrap();
        again.write_all(b"then named").unwrap();
        let mut text = String::new();
        tmp.rewind().unwrap();
        tmp.read_to_string(&mut text).unwrap();
        assert_eq!(text, "unnamed then named", "{options}");
        drop((tmp, again));

        // A write by another user clears the setuid bit, also when the kernel writes the
        // store file itself (it asks memfs to, through setattr, before it writes).
        let setuid = mnt.join("setuid");
        fs::write(&setuid, b"#!/bin/sh\n").unwrap();
        fs::set_permissions(&setuid, fs::Permissions::from_mode(0o4777)).unwrap();
        let status = std::process::Command::new("sh")
            .args(["-c", "echo appended >> \"$0\"", path_str(&setuid)])
            .uid(65534)
            .gid(65534)
            .status()
            .unwrap();
        assert!(status.success(), "{options}");
        let mode = fs::metadata(&setuid).unwrap().mode();
        assert_eq!(mode & 0o7777, 0o777, "{options}: mode {mode:o}");
        assert_eq!(
            fs::read(&setuid).unwrap(),
            b"#!/bin/sh\nappended\n",
            "{options}"
        );

        let mounts = env.ctl(&["--json", "mounts"]).ok().json();
        let stats = mounts["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mountpoint"] == path_str(&mnt))
            .unwrap()
            .clone();
        let served =
            stats["plugin_reads"].as_u64().unwrap() + stats["plugin_writes"].as_u64().unwrap();
        if passes_through {
            assert!(
                stats["passthrough_opens"].as_u64().unwrap() >= 5,
                "{options}: {stats}"
            );
            assert_eq!(served, 0, "{options}: {stats}");
        } else {
            assert_eq!(stats["passthrough_opens"], 0, "{options}: {stats}");
            assert!(served > 0, "{options}: {stats}");
        }
        env.ctl(&["unmount", path_str(&mnt)]).ok();
    }
}

#[test]
fn a_large_directory_lists_whole_and_a_new_or_rewound_listing_sees_new_names() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    // Many READDIRs per listing: each continues the listing its open directory read.
    for i in 0..3000 {
        fs::write(src.join(format!("file-with-a-longish-name-{i}")), b"").unwrap();
    }
    let mnt = mirror(&env, &src, "mirror", "");
    let names = |dir: &Path| -> std::collections::BTreeSet<std::ffi::OsString> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect()
    };
    // Equal, or the names in one of them only (not 3,000 names in a failure).
    let same = |a: &std::collections::BTreeSet<_>, b: &std::collections::BTreeSet<_>| {
        let differ: Vec<_> = a.symmetric_difference(b).collect();
        assert!(differ.is_empty(), "the listings differ in {differ:?}");
    };
    same(&names(&mnt), &names(&src));
    assert_eq!(names(&mnt).len(), 3000);
    // A directory read to the end, changed, and read again from the start through the same
    // handle (rewinddir: nix's iterator rewinds when dropped) sees the change; so does a
    // new listing.
    let mut open = nix::dir::Dir::open(
        &mnt,
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY,
        nix::sys::stat::Mode::empty(),
    )
    .unwrap();
    let listed = |dir: &mut nix::dir::Dir| -> std::collections::BTreeSet<std::ffi::OsString> {
        dir.iter()
            .map(|e| std::ffi::OsStr::from_bytes(e.unwrap().file_name().to_bytes()).to_owned())
            .filter(|name| name != "." && name != "..")
            .collect()
    };
    same(&listed(&mut open), &names(&src));
    fs::write(src.join("made-in-the-source"), b"").unwrap();
    fs::remove_file(src.join("file-with-a-longish-name-7")).unwrap();
    same(&listed(&mut open), &names(&src));
    drop(open);
    same(&names(&mnt), &names(&src));
    env.ctl(&["unmount", path_str(&mnt)]).ok();
}
