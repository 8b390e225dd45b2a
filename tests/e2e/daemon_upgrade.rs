//! Daemon upgrades (`fshostctl daemon-upgrade`, SIGUSR2): a new fshostd process takes over
//! every mount's FUSE connection, the plugins and their state, and the control socket,
//! without unmounting anything; whatever fails before the new process is ready, the old
//! one serves on.

use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fshost_tests::{artifact, eventually, fuse_available, Env};

use crate::path_str;

/// The plugins and mounts as `mounts --json` lists them: (mount point, plugin).
fn mount_list(env: &Env) -> Vec<(String, String)> {
    let out = env.ctl(&["--json", "mounts"]).ok().json();
    let mut mounts: Vec<(String, String)> = out["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["mountpoint"].as_str().unwrap().to_string(),
                m["plugin"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    mounts.sort();
    mounts
}

/// Starts the workload program in `dir` (see tests/src/bin/workload.rs).
fn workload(dir: &Path, map_bytes: usize) -> std::process::Child {
    Command::new(artifact("workload"))
        .arg(dir)
        .arg(map_bytes.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Stops a workload and returns its report; asserts it ran without an error.
fn finish(child: std::process::Child, what: &str) -> String {
    fshost_tests::finish_workload(child, what, 10)
}

#[test]
fn busy_programs_work_on_through_ten_daemon_upgrades() {
    if !fuse_available() {
        return;
    }
    let mut env = Env::start();
    for plugin in ["memfs", "hellofs", "passthroughfs"] {
        env.ctl(&["load", plugin]).ok();
    }
    let (mem, hello, pass) = (
        env.mountpoint("m"),
        env.mountpoint("h"),
        env.mountpoint("p"),
    );
    let source = env.mountpoint("source");
    env.ctl(&["mount", "memfs", path_str(&mem)]).ok();
    env.ctl(&["mount", "hellofs", path_str(&hello)]).ok();
    let source_option = format!("source={}", path_str(&source));
    env.ctl(&[
        "mount",
        "passthroughfs",
        path_str(&pass),
        "-o",
        &source_option,
    ])
    .ok();
    let before = mount_list(&env);
    fs::create_dir(mem.join("work")).unwrap();
    let identity = |path: &Path| fs::metadata(path).map(|m| (m.ino(), m.mtime_nsec(), m.len()));
    let hello_text = fs::read(hello.join("hello")).unwrap();
    let hello_id = identity(&hello.join("hello")).unwrap();
    // The workloads keep a shared map (100 MiB in memfs), an open file, their cwd; the
    // passthroughfs one's files are open through FUSE passthrough (backing ids).
    fs::create_dir(pass.join("work")).unwrap();
    let busy = workload(&mem.join("work"), 100 << 20);
    let busy_pass = workload(&pass.join("work"), 64 << 10);
    // Let them write every page of their maps first.
    assert!(eventually(Duration::from_secs(60), || {
        mem.join("work/ready").exists() && pass.join("work/ready").exists()
    }));
    // And one that opens, reads and closes a memfs file (through passthrough) over and
    // over: a close that the old process saw while paused once released a backing id the
    // new process had been handed, and the next open of the file failed.
    let opened = mem.join("opened");
    fs::write(&opened, b"open me again").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let opener = {
        let (stop, opened) = (stop.clone(), opened.clone());
        std::thread::spawn(move || {
            let (mut reads, mut errors) = (0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match fs::read(&opened) {
                    Ok(data) if data == b"open me again" => reads += 1,
                    other => errors.push(format!("{other:?}")),
                }
            }
            (reads, errors)
        })
    };
    let mut pids = vec![env.pid()];
    let mut pauses = Vec::new();
    for round in 0..10 {
        let new = if round % 2 == 0 {
            let out = env.daemon_upgrade(&[]);
            assert_eq!(out.code, 0, "round {round}: {out:?}");
            let upgrade = &out.json()["upgrade"];
            assert_eq!(
                upgrade["old_pid"].as_u64(),
                Some(u64::from(*pids.last().unwrap()))
            );
            assert_eq!(upgrade["mounts"].as_array().unwrap().len(), 3, "{upgrade}");
            pauses.push(upgrade["pause_us"].as_u64().unwrap());
            upgrade["new_pid"].as_u64().unwrap() as u32
        } else {
            // SIGUSR2 does the same, as with nginx and HAProxy.
            let old = env.pid();
            env.signal(nix::sys::signal::Signal::SIGUSR2);
            let mut new = old;
            assert!(
                eventually(Duration::from_secs(20), || {
                    new = env.status_pid();
                    new != old
                }),
                "SIGUSR2 did not upgrade: {}",
                env.log_text()
            );
            env.adopt(old, new);
            new
        };
        assert_eq!(env.status_pid(), new);
        assert!(!pids.contains(&new));
        pids.push(new);
        assert_eq!(mount_list(&env), before, "round {round}");
        assert_eq!(fs::read(hello.join("hello")).unwrap(), hello_text);
        assert_eq!(identity(&hello.join("hello")).unwrap(), hello_id);
    }
    stop.store(true, Ordering::Relaxed);
    let (reads, errors) = opener.join().unwrap();
    assert!(
        reads > 0 && errors.is_empty(),
        "{reads} reads, errors {errors:?}"
    );
    let log = env.log_text();
    assert!(!log.contains("Failed to close backing"), "{log}");
    let report = finish(busy, "memfs");
    let report_pass = finish(busy_pass, "passthroughfs");
    eprintln!("workloads: memfs {report}, passthroughfs {report_pass}; pauses (µs): {pauses:?}; pids {pids:?}");
    // What passthroughfs wrote is in its source directory.
    assert_eq!(
        fs::read(source.join("work/rw.dat")).unwrap(),
        fs::read(pass.join("work/rw.dat")).unwrap()
    );
    // Still the same plugins, generation 1: a daemon upgrade is not a plugin upgrade.
    for name in ["memfs", "hellofs", "passthroughfs"] {
        let info = env.ctl(&["--json", "info", name]).ok().json();
        assert_eq!(info["plugin"]["generation"], 1, "{info}");
    }
    // The last daemon owns the mounts as the first did: they unmount, and stop takes the
    // rest.
    env.ctl(&["unmount", path_str(&hello)]).ok();
    env.ctl(&["unmount", path_str(&pass)]).ok();
    env.terminate_successor();
    assert!(
        fshost_tests::fshost_mounts_below(env.dir.path()).is_empty(),
        "stopping the last daemon unmounts everything"
    );
}

#[test]
fn reads_in_flight_and_queued_during_a_daemon_upgrade_are_answered() {
    if !fuse_available() {
        return;
    }
    let mut env = Env::start();
    env.ctl(&["load", "faultfs"]).ok();
    let mnt = env.mountpoint("f");
    env.ctl(&["mount", "faultfs", path_str(&mnt), "-o", "slow_ms=1500"])
        .ok();
    let data = mnt.join("data");
    let expected = fs::read_to_string(&data).unwrap();
    // Each read reports on a channel, so that a read that hangs fails the test in time.
    let read = |path: std::path::PathBuf| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let began = Instant::now();
            let _ = tx.send((fs::read_to_string(path), began.elapsed()));
        });
        rx
    };
    // One read is inside the plugin when the upgrade starts: the pause waits for it.
    let in_plugin = read(data.clone());
    std::thread::sleep(Duration::from_millis(300));
    let old = env.pid();
    let upgrade = env.ctl_child(&["--json", "daemon-upgrade"]);
    // Another comes while the mount is paused: the old process may have read it from the
    // kernel already; the new one gets it again (FUSE_NOTIFY_RESEND) and answers it.
    std::thread::sleep(Duration::from_millis(200));
    let queued = read(data.clone());
    // A control request meanwhile waits for the new daemon and is answered.
    let list = env.ctl(&["list"]);
    assert_eq!(list.code, 0, "{list:?}");
    let out = upgrade.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let new = reply["result"]["upgrade"]["new_pid"].as_u64();
    env.adopt(old, new.expect("the new pid") as u32);
    for (which, reader) in [("in the plugin", in_plugin), ("queued", queued)] {
        let (text, took) = reader
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("the read {which} hangs: {}", env.log_text()));
        assert_eq!(text.unwrap(), expected, "the read {which}");
        assert!(
            took < Duration::from_secs(10),
            "the read {which} took {took:?}"
        );
    }
    assert_eq!(fs::read_to_string(&data).unwrap(), expected);
}

/// Expects `daemon-upgrade ARGS` to fail with `needle`, and the old daemon to serve on:
/// same pid, same mounts, the memfs mount at `mem` readable and writable.
fn refused_and_serving_on(env: &mut Env, args: &[&str], needle: &str, mem: &Path) {
    let pid = env.pid();
    let mounts = mount_list(env);
    let out = env.daemon_upgrade(args);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains(needle), "{out:?}");
    assert!(
        out.stderr
            .contains("this fshostd serves on, every mount as before"),
        "{out:?}"
    );
    assert_eq!(env.status_pid(), pid);
    assert_eq!(mount_list(env), mounts);
    let file = mem.join("still-here");
    fs::write(&file, needle).unwrap();
    assert_eq!(fs::read_to_string(&file).unwrap(), needle);
    // Things change again: a mount and an unmount.
    let extra = env.mountpoint("extra");
    env.ctl(&["mount", "memfs", path_str(&extra)]).ok();
    env.ctl(&["unmount", path_str(&extra)]).ok();
}

#[test]
fn a_failed_daemon_upgrade_leaves_the_old_daemon_serving() {
    if !fuse_available() {
        return;
    }
    let trigger = tempfile::NamedTempFile::new().unwrap();
    let trigger_path = trigger.path().to_path_buf();
    let mut env = Env::start_with(&[("FAULTFS_FAIL_LOAD_IF", path_str(&trigger_path))]);
    drop(trigger); // faultfs loads while the file is missing
    env.ctl(&["load", "memfs"]).ok();
    env.ctl(&["load", "faultfs"]).ok();
    let mem = env.mountpoint("m");
    env.ctl(&["mount", "memfs", path_str(&mem)]).ok();
    fs::write(mem.join("before"), b"kept").unwrap();
    let open = fs::File::open(mem.join("before")).unwrap();
    // The new binary exits at once.
    refused_and_serving_on(
        &mut env,
        &["--binary", "/bin/false"],
        "before it was ready",
        &mem,
    );
    // The new process cannot load a plugin.
    fs::write(&trigger_path, b"").unwrap();
    refused_and_serving_on(
        &mut env,
        &[],
        "plugin \"faultfs\" failed to initialise",
        &mem,
    );
    fs::remove_file(&trigger_path).unwrap();
    // The new process cannot take a mount's state over.
    let faulty = env.mountpoint("f");
    env.ctl(&["mount", "faultfs", path_str(&faulty), "-o", "fail_import=1"])
        .ok();
    refused_and_serving_on(&mut env, &[], "refused the state of", &mem);
    env.ctl(&["unmount", path_str(&faulty)]).ok();
    // The new process's instance would not do what the kernel left to the plugin when the
    // mount was made (faultfs says it clears setuid/setgid only while the trigger is
    // missing).
    let dir = tempfile::tempdir().unwrap();
    let no_kill_priv = dir.path().join("no-kill-priv");
    let option = format!("kill_priv_unless={}", path_str(&no_kill_priv));
    env.ctl(&["mount", "faultfs", path_str(&faulty), "-o", &option])
        .ok();
    fs::write(&no_kill_priv, b"").unwrap();
    refused_and_serving_on(
        &mut env,
        &[],
        "does not clear setuid and setgid itself",
        &mem,
    );
    env.ctl(&["unmount", path_str(&faulty)]).ok();
    // A mount of a plugin that cannot hand its state over.
    let minimal = env.compile_c_plugin("minimal", crate::MINIMAL_C, &[]);
    env.ctl(&["load", path_str(&minimal)]).ok();
    let plain = env.mountpoint("plain");
    env.ctl(&["mount", "minimal", path_str(&plain)]).ok();
    refused_and_serving_on(
        &mut env,
        &[],
        "plugin \"minimal\" cannot hand its mounts' state over",
        &mem,
    );
    env.ctl(&["unmount", path_str(&plain)]).ok();
    // Not a binary at all.
    let nothing = env.path("nothing");
    refused_and_serving_on(
        &mut env,
        &["--binary", path_str(&nothing)],
        "cannot open it",
        &mem,
    );
    // After all that, an upgrade goes through and the open file reads on.
    let out = env.daemon_upgrade(&[]);
    assert_eq!(out.code, 0, "{out:?}");
    let mut text = String::new();
    (&open).read_to_string(&mut text).unwrap();
    assert_eq!(text, "kept");
}
