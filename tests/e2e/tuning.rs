//! The speed-related mount options and the standalone benchmark binary: readahead raised
//! past the kernel's FUSE cap, the writeback cache, memfs without xattrs, and memfs served
//! without the daemon.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use fshost_tests::{
    artifact, eventually, fuse_available, DetachOnDrop, Env, KillOnDrop, Knob, ENABLE_URING,
};

use crate::{memfs, path_str};

/// A setting of the mount on `path` in its backing device's sysfs directory.
fn bdi_knob(path: &Path, knob: &str) -> u32 {
    let device = fshost_tests::kernel_mounts()
        .into_iter()
        .rev()
        .find(|m| m.mountpoint == path)
        .unwrap_or_else(|| panic!("{} is not mounted", path.display()))
        .device;
    fs::read_to_string(format!("/sys/class/bdi/{device}/{knob}"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn readahead_is_one_mib_unless_the_mount_says_otherwise() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    env.ctl(&["load", &memfs()]).ok();
    let (a, b) = (env.mountpoint("a"), env.mountpoint("b"));
    env.ctl(&["mount", "memfs", path_str(&a)]).ok();
    env.ctl(&["mount", "memfs", path_str(&b), "-o", "read_ahead_kb=256"])
        .ok();
    // The kernel's own cap for FUSE is 128 KiB: 1024 can only come from the daemon.
    assert_eq!(bdi_knob(&a, "read_ahead_kb"), 1024);
    assert_eq!(bdi_knob(&b, "read_ahead_kb"), 256);
    // FUSE's strict per-mount dirty limit stays where there is no writeback cache.
    assert_eq!(bdi_knob(&a, "strict_limit"), 1);
    let c = env.mountpoint("c");
    let out = env.ctl(&["mount", "memfs", path_str(&c), "-o", "read_ahead_kb=lots"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains(
            "option read_ahead_kb=\"lots\" is invalid: it must be a number from 0 to 65536"
        ),
        "{out:?}"
    );
    for m in [&a, &b] {
        env.ctl(&["unmount", path_str(m)]).ok();
    }
}

#[test]
fn writeback_mount_keeps_every_byte_and_the_size() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    env.ctl(&["load", &memfs()]).ok();
    let m = env.mountpoint("m");
    env.ctl(&["mount", "memfs", path_str(&m), "-o", "writeback,keep_cache"])
        .ok();
    // Throttled like a disk, not by FUSE's strict per-mount limit.
    assert_eq!(bdi_knob(&m, "strict_limit"), 0);
    let data: Vec<u8> = (0..3 * 1024 * 1024 + 123)
        .map(|i| (i % 251) as u8)
        .collect();
    fs::write(m.join("f"), &data).unwrap();
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(m.join("f"))
        .unwrap();
    f.write_all(b"tail").unwrap();
    f.sync_all().unwrap();
    drop(f);
    let mut expected = data.clone();
    expected.extend_from_slice(b"tail");
    assert_eq!(
        fs::metadata(m.join("f")).unwrap().len(),
        expected.len() as u64
    );
    // Drop the kernel's copy: what comes back now was stored by memfs.
    fs::write("/proc/sys/vm/drop_caches", "1").unwrap();
    assert!(
        fs::read(m.join("f")).unwrap() == expected,
        "content differs"
    );
    env.ctl(&["unmount", path_str(&m)]).ok();
}

#[test]
fn memfs_noxattr_refuses_xattrs() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    env.ctl(&["load", &memfs()]).ok();
    let m = env.mountpoint("m");
    env.ctl(&["mount", "memfs", path_str(&m), "-o", "noxattr"])
        .ok();
    fs::write(m.join("f"), b"x").unwrap();
    let err = rustix::fs::setxattr(
        m.join("f").as_path(),
        "user.k",
        b"v",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap_err();
    assert_eq!(err, rustix::io::Errno::OPNOTSUPP);
    env.ctl(&["unmount", path_str(&m)]).ok();
}

#[test]
fn standalone_memfs_serves_until_unmounted() {
    if !fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _detach = DetachOnDrop(dir.path());
    let m = dir.path().join("m");
    fs::create_dir(&m).unwrap();
    let mut child = Command::new(artifact("memfs-standalone"))
        .arg(&m)
        .args(["-o", "keep_cache,attr_timeout=60,size=1M"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut child = KillOnDrop(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");

    fs::create_dir(m.join("d")).unwrap();
    fs::write(m.join("d/f"), b"standalone").unwrap();
    fs::rename(m.join("d/f"), m.join("g")).unwrap();
    assert_eq!(fs::read(m.join("g")).unwrap(), b"standalone");
    let mut names: Vec<_> = fs::read_dir(&m)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["d", "g"]);
    // The plugin's own options reach it: size=1M.
    let err = fs::write(m.join("big"), vec![0u8; 2 << 20]).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));

    nix::mount::umount2(&m, nix::mount::MntFlags::empty()).unwrap();
    let exited = eventually(Duration::from_secs(10), || {
        matches!(child.0.try_wait(), Ok(Some(_)))
    });
    assert!(exited, "memfs-standalone still running after its unmount");

    let out = Command::new(artifact("memfs-standalone"))
        .arg(&m)
        .args(["-o", "threads=99"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("threads"));
}

#[test]
fn writeback_appends_and_overwrites_land_at_their_offsets() {
    if !fuse_available() {
        return;
    }
    use std::os::unix::fs::FileExt;
    let env = Env::start();
    env.ctl(&["load", "passthroughfs"]).ok();
    let src = env.mountpoint("src");
    let m = env.mountpoint("m");
    let original: Vec<u8> = b"0123456789".repeat(1000);
    fs::write(src.join("f"), &original).unwrap();
    let source = format!("source={},writeback", path_str(&src));
    env.ctl(&["mount", "passthroughfs", path_str(&m), "-o", &source])
        .ok();
    // The kernel reads pages of write-only files to complete partial pages, and writes
    // dirty pages back through any writable open file: an append-only open must reach the
    // plugin readable and without O_APPEND, or `>>` fails (EBADF) and pages written back
    // through it land at the end of the file.
    let mut appender = fs::OpenOptions::new()
        .append(true)
        .open(m.join("f"))
        .unwrap();
    appender.write_all(b"TAIL").unwrap();
    let writer = fs::OpenOptions::new()
        .write(true)
        .open(m.join("f"))
        .unwrap();
    writer.write_at(b"ABCD", 0).unwrap();
    let mut second = fs::OpenOptions::new()
        .append(true)
        .open(m.join("f"))
        .unwrap();
    second.write_all(b"END!").unwrap();
    writer.sync_all().unwrap();
    drop((appender, writer, second));
    let mut expected = original.clone();
    expected[..4].copy_from_slice(b"ABCD");
    expected.extend_from_slice(b"TAILEND!");
    let on_disk = fs::read(src.join("f")).unwrap();
    assert_eq!(on_disk.len(), expected.len());
    assert!(
        on_disk == expected,
        "the source file differs from what was written"
    );
    env.ctl(&["unmount", path_str(&m)]).ok();
}

/// The knobs are the machine's: one test at a time turns them.
static KNOBS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// FUSE over io_uring switched on for one test (the old setting back when dropped, then
/// the next test may turn it); `None` where the kernel has no such switch.
pub(crate) struct UringOn {
    // Restored before the lock is given back (fields drop in this order).
    _enabled: Knob,
    _turning: std::sync::MutexGuard<'static, ()>,
}

pub(crate) fn uring_on() -> Option<UringOn> {
    let turning = KNOBS.lock().unwrap_or_else(|e| e.into_inner());
    Some(UringOn {
        _enabled: Knob::set(ENABLE_URING, "Y")?,
        _turning: turning,
    })
}

/// The transport `mounts` reports for the mount at `path`.
pub(crate) fn transport(env: &Env, path: &Path) -> String {
    let mounts = env.ctl(&["--json", "mounts"]).ok().json();
    mounts["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountpoint"] == path_str(path))
        .and_then(|m| m["transport"].as_str())
        .unwrap_or_else(|| panic!("no transport for {}: {mounts}", path.display()))
        .to_string()
}

/// Threads of process `pid` whose name starts with `prefix`.
fn threads_named(pid: u32, prefix: &str) -> usize {
    fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with(prefix))
        .count()
}

/// Files made, written, renamed, read back and removed: what a mount must serve whatever
/// carries its requests.
fn exercise(dir: &Path) {
    let sub = dir.join("sub");
    fs::create_dir(&sub).unwrap();
    for i in 0..200 {
        fs::write(sub.join(format!("f{i}")), format!("content {i}").repeat(i)).unwrap();
    }
    fs::rename(sub.join("f7"), dir.join("moved")).unwrap();
    assert_eq!(
        fs::read_to_string(dir.join("moved")).unwrap(),
        "content 7".repeat(7)
    );
    let big = vec![0xa5u8; 3 << 20];
    fs::write(dir.join("big"), &big).unwrap();
    assert!(fs::read(dir.join("big")).unwrap() == big);
    assert_eq!(fs::read_dir(&sub).unwrap().count(), 199);
    fs::remove_dir_all(&sub).unwrap();
}

#[test]
fn fuse_over_io_uring_serves_where_the_kernel_offers_it_and_dev_fuse_where_not() {
    if !fuse_available() {
        return;
    }
    let Some(_uring) = uring_on() else {
        // A kernel before 6.14 (or without CONFIG_FUSE_IO_URING): only the fallback.
        let env = Env::start();
        env.ctl(&["load", &memfs()]).ok();
        let a = env.mountpoint("a");
        env.ctl(&["mount", "memfs", path_str(&a), "-o", "uring"])
            .ok();
        assert!(transport(&env, &a).starts_with("/dev/fuse (io_uring asked for"));
        exercise(&a);
        env.ctl(&["unmount", path_str(&a)]).ok();
        return;
    };
    let mut env = Env::start();
    env.ctl(&["load", &memfs()]).ok();
    let (ring, plain) = (env.mountpoint("ring"), env.mountpoint("plain"));
    env.ctl(&["mount", "memfs", path_str(&ring), "-o", "uring"])
        .ok();
    env.ctl(&["mount", "memfs", path_str(&plain)]).ok();
    exercise(&ring);
    exercise(&plain);
    let queues = fs::read_to_string("/sys/devices/system/cpu/possible")
        .unwrap()
        .trim()
        .rsplit(['-', ','])
        .next()
        .unwrap()
        .parse::<usize>()
        .unwrap()
        + 1;
    let via_ring = transport(&env, &ring);
    let served: u64 = via_ring
        .strip_prefix(&format!("io_uring ({queues} queues, "))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{via_ring}"));
    // 200 creates alone are 600 requests; the ring carried them, not /dev/fuse.
    assert!(served > 600, "{via_ring}");
    assert_eq!(transport(&env, &plain), "/dev/fuse");
    assert_eq!(threads_named(env.pid(), "uring:"), queues);
    // A ring's requests cannot cross to another process: the upgrade is refused, and
    // both mounts serve on.
    let out = env.daemon_upgrade(&[]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("served over io_uring") && out.stderr.contains(path_str(&ring)),
        "{out:?}"
    );
    exercise(&ring);
    // A plugin upgrade under it: the state moves, the ring's threads serve the new code.
    fs::write(ring.join("kept"), b"across the upgrade").unwrap();
    env.ctl(&["upgrade", "memfs"]).ok();
    assert_eq!(fs::read(ring.join("kept")).unwrap(), b"across the upgrade");
    exercise(&ring);

    // The kernel's switch off: /dev/fuse serves, and the mount says why.
    let off = env.mountpoint("off");
    fs::write(ENABLE_URING, "N").unwrap();
    env.ctl(&["mount", "memfs", path_str(&off), "-o", "uring"])
        .ok();
    fs::write(ENABLE_URING, "Y").unwrap();
    assert!(
        transport(&env, &off).contains("the kernel does not offer it"),
        "{}",
        transport(&env, &off)
    );
    exercise(&off);
    // io_uring forbidden to the daemon: it does not ask (the kernel would hold every
    // request for a ring that never comes).
    let forbidden = env.mountpoint("forbidden");
    {
        let _disabled = Knob::set("/proc/sys/kernel/io_uring_disabled", "2");
        env.ctl(&["mount", "memfs", path_str(&forbidden), "-o", "uring"])
            .ok();
    }
    assert!(
        transport(&env, &forbidden).contains("kernel.io_uring_disabled"),
        "{}",
        transport(&env, &forbidden)
    );
    exercise(&forbidden);
    for m in [&ring, &plain, &off, &forbidden] {
        env.ctl(&["unmount", path_str(m)]).ok();
    }
    // The queue threads end with their mount, before the plugin may go.
    assert_eq!(threads_named(env.pid(), "uring:"), 0);
    env.ctl(&["unload", "memfs"]).ok();
    // With every mount on /dev/fuse again, the upgrade goes through.
    let out = env.daemon_upgrade(&[]);
    assert_eq!(out.code, 0, "{out:?}");
}

#[test]
fn a_ring_the_daemon_cannot_complete_after_init_is_given_up_for_dev_fuse() {
    if !fuse_available() {
        return;
    }
    let Some(_uring) = uring_on() else {
        return;
    };
    // Room for the mount's thread and its pool's worker, not for the queue threads: the
    // kernel agreed at INIT, and must be told to give the ring up.
    let env = Env::start_configured(&[], "[limits]\nmax_mount_threads = 3\n");
    env.ctl(&["load", &memfs()]).ok();
    let a = env.mountpoint("a");
    env.ctl(&["mount", "memfs", path_str(&a), "-o", "uring"])
        .ok();
    assert!(
        transport(&env, &a).contains("no room for"),
        "{}",
        transport(&env, &a)
    );
    // Served through /dev/fuse, not held by the kernel for the ring.
    let mut writer = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo held > {}/f && cat {}/f",
            path_str(&a),
            path_str(&a)
        ))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let status = fshost_tests::wait_with_deadline(&mut writer, Duration::from_secs(10));
    if status.is_none() {
        let _ = writer.kill();
        let _ = writer.wait();
    }
    env.ctl(&["unmount", path_str(&a)]).ok();
    assert!(
        status.is_some_and(|s| s.success()),
        "the mount's requests were held"
    );
}
