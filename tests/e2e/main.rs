//! End-to-end tests: the real `fshostd` and `fshostctl` binaries, real plugins, real kernel
//! FUSE mounts. Each test has its own daemon, socket and directory (see `fshost_tests::Env`).

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use fshost_tests::{artifact, eventually, fshost_mounts_below, fuse_available, run, Env};

mod crash;
mod daemon_upgrade;
mod differential;
mod faults;
mod lifecycle;
mod limits;
mod passthrough;
mod recovery;
mod security;
mod stats;
mod storm;
mod system;
mod tidy;
mod tuning;
mod upgrade;

pub(crate) const MINIMAL_C: &str = include_str!("plugins/minimal.c");

pub(crate) fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 test path")
}

pub(crate) fn memfs() -> String {
    artifact("libmemfs.so").display().to_string()
}

/// Loads memfs and mounts it at `<dir>/<name>`; returns the mount point.
pub(crate) fn mounted_memfs(env: &Env, name: &str) -> std::path::PathBuf {
    if !env.plugins().iter().any(|p| p.0 == "memfs") {
        env.ctl(&["load", &memfs()]).ok();
    }
    let mnt = env.mountpoint(name);
    env.ctl(&["mount", "memfs", path_str(&mnt)]).ok();
    mnt
}

#[test]
fn load_mount_write_read_and_list() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    let loaded = env.ctl(&["load", &memfs()]).ok();
    assert!(loaded.stdout.contains("loaded memfs"), "{loaded:?}");
    assert_eq!(env.plugins(), vec![("memfs".into(), "live".into(), 0)]);

    let mnt = env.mountpoint("mnt");
    env.ctl(&["mount", "memfs", path_str(&mnt)]).ok();
    fs::write(mnt.join("greeting.txt"), b"hello through FUSE\n").unwrap();
    assert_eq!(
        fs::read(mnt.join("greeting.txt")).unwrap(),
        b"hello through FUSE\n"
    );
    assert_eq!(env.plugins(), vec![("memfs".into(), "live".into(), 1)]);

    let mounts = env.ctl(&["--json", "mounts"]).ok().json();
    let listed = &mounts["mounts"][0];
    assert_eq!(listed["plugin"], "memfs");
    assert_eq!(listed["mountpoint"].as_str(), Some(path_str(&mnt)));
    assert_eq!(fshost_mounts_below(env.dir.path()), vec![mnt.clone()]);
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .find(|l| l.contains(path_str(&mnt)))
        .expect("kernel has the mount");
    assert!(
        line.contains(" - fuse.fshost-memfs fshost:memfs "),
        "{line}"
    );

    let table = env.ctl(&["list"]).ok().stdout;
    let mut lines = table.lines();
    assert!(
        lines
            .next()
            .unwrap()
            .starts_with("NAME   STATE  GEN  MOUNTS  VERSION  PATH"),
        "{table}"
    );
    assert!(
        lines
            .next()
            .unwrap()
            .starts_with("memfs  live   1    1       "),
        "{table}"
    );
}

#[test]
fn hellofs_serves_its_one_file() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    // A bare name is found in the daemon's --plugin-dir.
    env.ctl(&["load", "hellofs"]).ok();
    let mnt = env.mountpoint("hello");
    env.ctl(&["mount", "hellofs", path_str(&mnt), "--read-only"])
        .ok();
    assert_eq!(
        fs::read_to_string(mnt.join("hello")).unwrap(),
        "Hello from fshost\n"
    );
    let names: Vec<_> = fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec!["hello"]);
    let err = fs::write(mnt.join("new"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
}

#[test]
fn a_plugin_written_in_c_loads_and_serves() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    let loaded = env.ctl(&["load", "hello_c"]).ok();
    assert!(loaded.stdout.contains("loaded hello-c 1.0.0"), "{loaded:?}");
    let mnt = env.mountpoint("c");
    env.ctl(&["mount", "hello-c", path_str(&mnt)]).ok();
    assert_eq!(
        fs::read_to_string(mnt.join("hello")).unwrap(),
        "Hello from C\n"
    );
    let names: Vec<_> = fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec!["hello"]);
    assert_eq!(
        fs::metadata(mnt.join("nope")).unwrap_err().raw_os_error(),
        Some(libc::ENOENT)
    );
    env.ctl(&["unmount", path_str(&mnt)]).ok();
    env.ctl(&["unload", "hello-c"]).ok();
}

#[test]
fn unload_refused_while_mounted_then_allowed_after_unmount() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    let mnt = mounted_memfs(&env, "busy");
    let refused = env.ctl(&["unload", "memfs"]);
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(
        refused
            .stderr
            .contains("plugin \"memfs\" is busy: 1 mount (")
            && refused.stderr.contains(path_str(&mnt)),
        "{refused:?}"
    );
    // The refusal changed nothing: the mount still serves.
    fs::write(mnt.join("still"), b"works").unwrap();
    assert_eq!(fs::read(mnt.join("still")).unwrap(), b"works");
    assert_eq!(env.plugins(), vec![("memfs".into(), "live".into(), 1)]);

    env.ctl(&["unmount", path_str(&mnt)]).ok();
    assert_eq!(env.plugins(), vec![("memfs".into(), "live".into(), 0)]);
    assert!(fshost_mounts_below(env.dir.path()).is_empty());
    let unloaded = env.ctl(&["unload", "memfs"]).ok();
    assert!(unloaded.stderr.is_empty(), "unmap warning: {unloaded:?}");
    assert!(env.plugins().is_empty());
    let maps = fs::read_to_string(format!("/proc/{}/maps", env.pid())).unwrap();
    assert!(
        !maps.contains("libmemfs.so"),
        "memfs is still mapped in the daemon after unload:\n{maps}"
    );
}

#[test]
fn external_umount_drops_the_count() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    let mnt = mounted_memfs(&env, "ext");
    let mut umount = Command::new("umount");
    umount.arg(&mnt);
    let out = run(umount);
    assert!(out.status.success(), "umount: {out:?}");
    assert!(
        eventually(Duration::from_secs(1), || env.plugins()[0].2 == 0),
        "count did not drop within 1 s: {:?}",
        env.plugins()
    );
    env.ctl(&["unload", "memfs"]).ok();
}

#[test]
fn mount_refused_while_registering() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    let slow = env.compile_c_plugin(
        "slowload",
        MINIMAL_C,
        &["PLUGIN_NAME=\"slowload\"", "LOAD_DELAY_MS=1500"],
    );
    let mnt = env.mountpoint("slow");
    std::thread::scope(|scope| {
        let loading = scope.spawn(|| env.ctl(&["load", path_str(&slow)]));
        assert!(
            eventually(Duration::from_secs(5), || env.plugins().contains(&(
                "slowload".into(),
                "registering".into(),
                0
            ))),
            "plugin never showed up as registering"
        );
        let refused = env.ctl(&["mount", "slowload", path_str(&mnt)]);
        assert_eq!(refused.code, 1, "{refused:?}");
        assert!(refused.stderr.contains("registering"), "{refused:?}");
        let again = env.ctl(&["load", path_str(&slow)]);
        assert_eq!(again.code, 1, "{again:?}");
        assert!(again.stderr.contains("(busy)"), "{again:?}");
        loading.join().unwrap().ok();
    });
    // Once live, the same mount works.
    env.ctl(&["mount", "slowload", path_str(&mnt)]).ok();
    assert_eq!(fs::metadata(&mnt).unwrap().mode(), libc::S_IFDIR | 0o555);
    env.ctl(&["unmount", path_str(&mnt)]).ok();
}

/// Runs `fshostctl` and checks its exit code and that stderr mentions `needle`.
#[track_caller]
fn refused(env: &Env, args: &[&str], code: i32, needle: &str) {
    let out = env.ctl(args);
    assert_eq!(out.code, code, "{args:?}: {out:?}");
    assert!(
        out.stderr.contains(needle),
        "{args:?}: expected {needle:?} in {out:?}"
    );
}

#[test]
fn bad_input_is_refused_clearly_and_the_daemon_stays_healthy() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    let missing = env.path("missing.so");
    refused(&env, &["load", path_str(&missing)], 1, "does not exist");
    refused(
        &env,
        &["load", "nosuchplugin"],
        1,
        "no plugin \"nosuchplugin\" in the plugin directories",
    );
    let text = env.path("text.so");
    fs::write(&text, "this is not ELF").unwrap();
    refused(&env, &["load", path_str(&text)], 1, "not a shared object");
    let no_entry = env.compile_c_plugin("noentry", MINIMAL_C, &["NO_ENTRY"]);
    refused(
        &env,
        &["load", path_str(&no_entry)],
        1,
        "does not export `fshost_plugin_entry`",
    );
    let bad_abi = env.compile_c_plugin("badabi", MINIMAL_C, &["ABI_VERSION=999"]);
    refused(
        &env,
        &["load", path_str(&bad_abi)],
        1,
        "built for plugin ABI version 999",
    );
    // A plugin built for ABI version 1 loads and serves; its export_state/import_state
    // have version 1's signatures, so it cannot hand state over until rebuilt.
    let v1 = env.compile_c_plugin("v1", MINIMAL_C, &["ABI_VERSION=1", "V1_UPGRADE"]);
    env.ctl(&["load", path_str(&v1)]).ok();
    let v1_mount = env.mountpoint("v1");
    env.ctl(&["mount", "minimal", path_str(&v1_mount)]).ok();
    let info = env.ctl(&["--json", "info", "minimal"]).ok().json();
    assert_eq!(info["plugin"]["abi_version"], 1, "{info}");
    refused(
        &env,
        &["upgrade", "minimal"],
        1,
        "cannot hand its mounts' state over",
    );
    env.ctl(&["unmount", path_str(&v1_mount)]).ok();
    env.ctl(&["unload", "minimal"]).ok();
    let small = env.compile_c_plugin("small", MINIMAL_C, &["STRUCT_SIZE=16"]);
    refused(
        &env,
        &["load", path_str(&small)],
        1,
        "descriptor is 16 bytes",
    );
    let bad_name = env.compile_c_plugin("badname", MINIMAL_C, &["PLUGIN_NAME=\"../evil\""]);
    refused(
        &env,
        &["load", path_str(&bad_name)],
        1,
        "not a safe identifier",
    );

    env.ctl(&["load", &memfs()]).ok();
    refused(
        &env,
        &["load", &memfs()],
        1,
        "plugin \"memfs\" is already loaded",
    );
    let mnt = env.mountpoint("m");
    refused(
        &env,
        &["mount", "nosuchfs", path_str(&mnt)],
        1,
        "plugin \"nosuchfs\" is not loaded",
    );
    refused(
        &env,
        &["mount", "memfs", path_str(&env.path("nodir"))],
        1,
        "does not exist",
    );
    refused(
        &env,
        &["mount", "memfs", path_str(&text)],
        1,
        "is not a directory",
    );
    refused(
        &env,
        &["mount", "memfs", path_str(&mnt), "-o", "bogus=1"],
        1,
        "refused to create a filesystem",
    );
    refused(
        &env,
        &["unmount", path_str(env.dir.path())],
        1,
        "is not an fshost mount point",
    );
    refused(
        &env,
        &["unload", "nosuchfs"],
        1,
        "plugin \"nosuchfs\" is not loaded",
    );
    refused(&env, &["mount", "memfs"], 2, "MOUNTPOINT");
    refused(&env, &["frobnicate"], 2, "unrecognized subcommand");

    let malformed = env.raw(b"{\"op\": \"load\", oops\n");
    assert!(
        malformed.contains("\"code\":\"bad-request\""),
        "{malformed}"
    );
    let not_utf8 = env.raw(b"{\"op\":\"list\xff\"}\n");
    assert!(not_utf8.contains("not valid UTF-8"), "{not_utf8}");
    let unknown_op = env.raw(b"{\"op\":\"format-disk\"}\n");
    assert!(
        unknown_op.contains("\"code\":\"bad-request\""),
        "{unknown_op}"
    );
    let mut huge = vec![b'x'; 70 * 1024];
    huge.push(b'\n');
    let oversized = env.raw(&huge);
    assert!(
        oversized.contains("\"code\":\"bad-request\"") && oversized.contains("longer than 65536"),
        "{oversized}"
    );

    // Still healthy, nothing half-registered, and the failed mount left nothing behind.
    assert_eq!(env.plugins(), vec![("memfs".into(), "live".into(), 0)]);
    assert!(fshost_mounts_below(env.dir.path()).is_empty());
    env.ctl(&["mount", "memfs", path_str(&mnt)]).ok();
    env.ctl(&["unmount", path_str(&mnt)]).ok();
}

#[test]
fn cli_without_a_daemon_exits_3_and_says_how_to_start_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(artifact("fshostctl"));
    command
        .arg("list")
        .env("FSHOST_SOCKET", dir.path().join("nobody.sock"));
    let out = run(command);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot reach fshostd"), "{stderr}");
    assert!(stderr.contains("start the daemon"), "{stderr}");
}

#[test]
fn sigterm_unmounts_everything_and_removes_the_socket() {
    if !fuse_available() {
        return;
    }
    let mut env = Env::start();
    let a = mounted_memfs(&env, "a");
    env.ctl(&["load", "hellofs"]).ok();
    let b = env.mountpoint("b");
    env.ctl(&["mount", "hellofs", path_str(&b)]).ok();
    fs::write(a.join("f"), b"data").unwrap();
    assert_eq!(fshost_mounts_below(env.dir.path()).len(), 2);

    let status = env.terminate();
    assert!(
        status.success(),
        "fshostd exit status {status:?}: {}",
        env.log_text()
    );
    assert!(
        fshost_mounts_below(env.dir.path()).is_empty(),
        "mounts left after SIGTERM"
    );
    assert!(!env.socket.exists(), "socket left after SIGTERM");
    assert!(env.log_text().contains("fshostd stopped"));
}

#[test]
fn memfs_behaves_like_a_filesystem() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    let mnt = mounted_memfs(&env, "posix");
    let p = |name: &str| mnt.join(name);

    // Directories and link counts.
    fs::create_dir(p("d")).unwrap();
    fs::create_dir(p("d/sub")).unwrap();
    assert_eq!(fs::metadata(p("d")).unwrap().nlink(), 3);
    assert_eq!(
        fs::create_dir(p("d")).unwrap_err().raw_os_error(),
        Some(libc::EEXIST)
    );
    assert_eq!(
        fs::remove_dir(p("d")).unwrap_err().raw_os_error(),
        Some(libc::ENOTEMPTY)
    );

    // Writes at offsets, holes read as zeros, truncate both ways.
    use std::os::unix::fs::FileExt;
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(p("f"))
        .unwrap();
    file.write_all_at(b"abc", 0).unwrap();
    file.write_all_at(b"xyz", 10).unwrap();
    let mut buf = vec![0u8; 13];
    file.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(buf, b"abc\0\0\0\0\0\0\0xyz");
    file.set_len(2).unwrap();
    assert_eq!(fs::read(p("f")).unwrap(), b"ab");
    file.set_len(4).unwrap();
    assert_eq!(fs::read(p("f")).unwrap(), b"ab\0\0");
    drop(file);

    // Modes, rename over an existing file, hard and symbolic links.
    fs::set_permissions(p("f"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(fs::metadata(p("f")).unwrap().mode() & 0o7777, 0o600);
    fs::write(p("g"), b"old").unwrap();
    fs::rename(p("f"), p("g")).unwrap();
    assert_eq!(fs::read(p("g")).unwrap(), b"ab\0\0");
    assert!(!p("f").exists());
    fs::hard_link(p("g"), p("d/h")).unwrap();
    assert_eq!(fs::metadata(p("g")).unwrap().nlink(), 2);
    std::os::unix::fs::symlink("../g", p("d/s")).unwrap();
    assert_eq!(fs::read_link(p("d/s")).unwrap(), Path::new("../g"));
    assert_eq!(fs::read(p("d/s")).unwrap(), b"ab\0\0");

    // Moving a directory into its own subtree is refused; moving it elsewhere fixes nlinks.
    assert_eq!(
        fs::rename(p("d"), p("d/sub/x")).unwrap_err().raw_os_error(),
        Some(libc::EINVAL)
    );
    fs::create_dir(p("e")).unwrap();
    fs::rename(p("d/sub"), p("e/sub")).unwrap();
    assert_eq!(fs::metadata(p("d")).unwrap().nlink(), 2);
    assert_eq!(fs::metadata(p("e")).unwrap().nlink(), 3);

    // readdir lists exactly what is there.
    let mut names: Vec<String> = fs::read_dir(p("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec!["h", "s"]);

    // An unlinked file stays readable while open.
    let open = fs::File::open(p("g")).unwrap();
    fs::remove_file(p("g")).unwrap();
    fs::remove_file(p("d/h")).unwrap();
    let mut content = String::new();
    std::io::Read::read_to_string(&mut &open, &mut content).unwrap();
    assert_eq!(content, "ab\0\0");
    drop(open);

    assert_eq!(
        fs::write(p(&"n".repeat(256)), b"")
            .unwrap_err()
            .raw_os_error(),
        Some(libc::ENAMETOOLONG)
    );
    env.ctl(&["unmount", path_str(&mnt)]).ok();
}

/// Variable-length answers (link targets, xattr values and name lists) of every size cross
/// the plugin ABI whole: small ones in one call, large ones after a size query.
#[test]
fn long_link_targets_and_large_xattrs_cross_whole() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    let mnt = mounted_memfs(&env, "sized");
    let p = |name: &str| mnt.join(name);
    for len in [1, 255, 256, 257, 4000] {
        let target = "t".repeat(len);
        let link = p(&format!("link{len}"));
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert_eq!(fs::read_link(&link).unwrap().as_os_str().len(), len);
    }
    fs::write(p("f"), b"").unwrap();
    let file = p("f");
    let mut names = Vec::new();
    for (i, len) in [0usize, 1, 256, 257, 60_000].into_iter().enumerate() {
        let value: Vec<u8> = (0..len).map(|b| (b % 251) as u8).collect();
        let name = format!("user.{}{i}", "n".repeat(60));
        rustix::fs::setxattr(
            &file,
            name.as_str(),
            &value,
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
        let mut buf = vec![0u8; 65536];
        assert_eq!(
            rustix::fs::getxattr_query(&file, name.as_str()),
            Ok(len),
            "size of {len} bytes"
        );
        let got = rustix::fs::getxattr(&file, name.as_str(), &mut buf).unwrap();
        assert_eq!(&buf[..got], &value[..], "value of {len} bytes");
        if len > 1 {
            assert_eq!(
                rustix::fs::getxattr(&file, name.as_str(), &mut buf[..len - 1]),
                Err(rustix::io::Errno::RANGE)
            );
        }
        names.push(name);
    }
    // More than 256 bytes of names.
    let mut buf = vec![0u8; 4096];
    let len = rustix::fs::listxattr(&file, &mut buf).unwrap();
    let mut listed: Vec<String> = buf[..len]
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect();
    listed.sort();
    assert_eq!(listed, names);
    assert!(len > 256);
    env.ctl(&["unmount", path_str(&mnt)]).ok();
}
