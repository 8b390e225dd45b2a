//! Fault isolation with faultfs: panics, failing hooks, slow operations, a plugin that
//! cannot be unmapped. The daemon must survive all of them and say what happened.

use std::fs;
use std::time::{Duration, Instant};

use fshost_tests::{fshost_mounts_below, fuse_available, Env};

use crate::path_str;

fn faultfs(env: &Env) {
    env.ctl(&["load", "faultfs"]).ok();
}

#[test]
fn a_panic_in_read_gives_eio_and_taints_the_plugin() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    faultfs(&env);
    let mnt = env.mountpoint("p");
    env.ctl(&["mount", "faultfs", path_str(&mnt), "-o", "panic_in=read"])
        .ok();
    let err = fs::read(mnt.join("data")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // Other operations and the daemon go on.
    assert_eq!(fs::metadata(mnt.join("data")).unwrap().len(), 13);
    let list = env.ctl(&["list"]).ok().stdout;
    assert!(list.contains("live (tainted)"), "{list}");
    let info = env.ctl(&["--json", "info", "faultfs"]).ok().json();
    let reason = info["plugin"]["tainted"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        reason.contains("panic in read: faultfs was asked to panic in read"),
        "{info}"
    );
    env.ctl(&["unmount", path_str(&mnt)]).ok();
    env.ctl(&["unload", "faultfs"]).ok();
}

#[test]
fn a_failing_create_leaves_no_mount_and_a_failing_on_load_no_entry() {
    if !fuse_available() {
        return;
    }
    let env = Env::start_with(&[("FAULTFS_FAIL_LOAD", "1")]);
    let out = env.ctl(&["load", "faultfs"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr
            .contains("plugin \"faultfs\" failed to initialise"),
        "{out:?}"
    );
    assert!(env.plugins().is_empty());

    let env = Env::start();
    faultfs(&env);
    let mnt = env.mountpoint("c");
    let out = env.ctl(&["mount", "faultfs", path_str(&mnt), "-o", "fail_create=1"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("refused to create a filesystem"),
        "{out:?}"
    );
    assert!(fshost_mounts_below(env.dir.path()).is_empty());
    assert_eq!(env.state_of("faultfs"), Some(("live".into(), 0)));
}

#[test]
fn a_panic_in_destroy_still_ends_the_mount() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    faultfs(&env);
    let mnt = env.mountpoint("d");
    env.ctl(&[
        "mount",
        "faultfs",
        path_str(&mnt),
        "-o",
        "panic_in_destroy=1",
    ])
    .ok();
    env.ctl(&["unmount", path_str(&mnt)]).ok();
    assert_eq!(env.state_of("faultfs"), Some(("live".into(), 0)));
    let info = env.ctl(&["--json", "info", "faultfs"]).ok().json();
    assert!(
        info["plugin"]["tainted"]
            .as_str()
            .unwrap_or_default()
            .contains("panic in destroy"),
        "{info}"
    );
    env.ctl(&["unload", "faultfs"]).ok();
}

#[test]
fn a_slow_mount_does_not_hold_up_the_daemon_or_other_mounts() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    faultfs(&env);
    env.ctl(&["load", "hellofs"]).ok();
    let slow = env.mountpoint("slow");
    let fast = env.mountpoint("fast");
    env.ctl(&["mount", "faultfs", path_str(&slow), "-o", "slow_ms=3000"])
        .ok();
    env.ctl(&["mount", "hellofs", path_str(&fast)]).ok();
    // The slow reader is another process, as a real user would be. (A thread of this
    // process blocked in a FUSE read can delay this process's own fork/exec of fshostctl,
    // which would measure the test, not the daemon.)
    let mut reader = std::process::Command::new("cat")
        .arg(slow.join("data"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until cat is blocked in read(2) on the file (fd 3), by its /proc syscall entry.
    let syscall = format!("/proc/{}/syscall", reader.id());
    let in_read = format!("{} 0x3 ", libc::SYS_read);
    assert!(
        fshost_tests::eventually(Duration::from_secs(5), || fs::read_to_string(&syscall)
            .is_ok_and(|s| s.starts_with(&in_read))),
        "cat never blocked in read"
    );
    assert!(
        reader.try_wait().unwrap().is_none(),
        "the slow read was not slow"
    );
    let t = Instant::now();
    env.ctl(&["list"]).ok();
    assert_eq!(
        fs::read_to_string(fast.join("hello")).unwrap(),
        "Hello from fshost\n"
    );
    let elapsed = t.elapsed();
    assert!(
        elapsed < Duration::from_millis(1500),
        "list + other mount took {elapsed:?}"
    );
    assert!(
        reader.try_wait().unwrap().is_none(),
        "list waited for the slow read"
    );
    let out = fshost_tests::wait_with_deadline(&mut reader, Duration::from_secs(10)).unwrap();
    assert!(out.success());
    let mut data = String::new();
    std::io::Read::read_to_string(&mut reader.stdout.take().unwrap(), &mut data).unwrap();
    assert_eq!(data, "faultfs data\n");
}

/// Mounts share their plugin's workers, but a mount takes at most its `-o threads=N` of
/// them: requests of a slow mount wait for each other while another mount of the same
/// plugin is served at once.
#[test]
fn a_slow_mount_takes_only_its_share_of_its_plugins_workers() {
    if !fuse_available() {
        return;
    }
    let env = Env::start_configured(&[], "[limits]\nthreads_per_plugin = 4\n");
    faultfs(&env);
    let slow = env.mountpoint("slow");
    let fast = env.mountpoint("fast");
    env.ctl(&[
        "mount",
        "faultfs",
        path_str(&slow),
        "-o",
        "slow_ms=1500,threads=2",
    ])
    .ok();
    env.ctl(&["mount", "faultfs", path_str(&fast)]).ok();
    // Four direct reads at once (no page cache: each is a request of its own), in other
    // processes, as real users' would be; the other mount answers at once meanwhile.
    let started = Instant::now();
    let readers = (0..4)
        .map(|_| fshost_tests::direct_read(&slow.join("data"), None))
        .collect();
    let all = fshost_tests::slow_reads_beside(
        started,
        readers,
        &fast.join("data"),
        Duration::from_millis(1000),
    );
    // Two at a time: two rounds of 1.5 s (four workers would have served them in one).
    assert!(
        all >= Duration::from_millis(2900),
        "four slow reads took {all:?}"
    );
    for mnt in [&slow, &fast] {
        env.ctl(&["unmount", path_str(mnt)]).ok();
    }
}

#[test]
fn a_plugin_that_stays_mapped_is_shown_as_such() {
    if !fuse_available() {
        return;
    }
    let env = Env::start_with(&[("FAULTFS_LEAK_THREAD", "1")]);
    faultfs(&env);
    let out = env.ctl(&["unload", "faultfs"]).ok();
    assert!(out.stderr.contains("still mapped"), "{out:?}");
    assert_eq!(env.state_of("faultfs"), Some(("unloaded".into(), 0)));
    let list = env.ctl(&["list"]).ok().stdout;
    assert!(list.contains("unloaded (still mapped)"), "{list}");
    assert!(env.log_text().contains("still mapped after dlclose"));
    // The daemon is fine, and the same plugin can be loaded again (a fresh private copy).
    faultfs(&env);
    assert_eq!(env.state_of("faultfs"), Some(("live".into(), 0)));
}
