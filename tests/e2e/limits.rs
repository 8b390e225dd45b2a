//! Running out of threads or descriptors: mounts share their plugin's pool of workers, so
//! the threads are bounded by configuration whatever the number of mounts; a mount that
//! cannot get what it needs is refused with a clear error, "mounted" always means served,
//! and every other mount keeps working (before, thread creation failing inside a session
//! aborted the whole daemon, or a mount was reported made and then silently detached).

use std::fs;
use std::path::{Path, PathBuf};

use fshost_tests::{fuse_available, Env};

use crate::path_str;

/// Mounts `plugin` read-only at `<plugin>-N` until a mount is refused or `most` are made;
/// returns the mount points made and the refusal.
fn mount_until_refused(env: &Env, plugin: &str, most: usize) -> (Vec<PathBuf>, Option<String>) {
    let mut made = Vec::new();
    for i in 0..most {
        let mnt = env.mountpoint(&format!("{plugin}-{i}"));
        let out = env.ctl(&["mount", plugin, path_str(&mnt), "--read-only"]);
        if out.code != 0 {
            return (made, Some(out.stderr));
        }
        made.push(mnt);
    }
    (made, None)
}

/// Every mount made serves its file.
fn all_serve(made: &[PathBuf]) {
    for mnt in made {
        let text = fs::read_to_string(mnt.join("hello"))
            .unwrap_or_else(|e| panic!("{} is not served: {e}", mnt.display()));
        assert!(!text.is_empty());
    }
}

/// Threads of the daemon `pid` whose name starts with `prefix`.
fn threads_named(pid: u32, prefix: &str) -> usize {
    fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .filter_map(|t| fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .filter(|comm| comm.starts_with(prefix))
                .count()
        })
        .unwrap_or(0)
}

fn unmount_all(env: &Env, made: &[PathBuf]) {
    for mnt in made {
        env.ctl(&["unmount", path_str(mnt)]).ok();
    }
}

#[test]
fn mounts_share_a_bounded_pool_and_a_plugin_without_a_thread_is_refused() {
    if !fuse_available() {
        return;
    }
    let config = "[limits]\nmax_mount_threads = 3\nthreads_per_plugin = 2\n";
    let env = Env::start_configured(&[], config);
    env.ctl(&["load", "hellofs"]).ok();
    env.ctl(&["load", "memfs"]).ok();
    // Sixty mounts (which took three threads each before) fit in three threads.
    let (made, refused) = mount_until_refused(&env, "hellofs", 60);
    assert_eq!(refused, None, "made {}", made.len());
    all_serve(&made);
    let pid = env.pid();
    let serving = threads_named(pid, "serve:hellofs");
    assert!((1..=2).contains(&serving), "{serving} workers for hellofs");
    // Reading took a request while no worker waited: the pool grew to its two. A mount of
    // another plugin needs a worker of its own, and the third thread goes to making it.
    all_serve(&made);
    assert_eq!(threads_named(pid, "serve:hellofs"), 2);
    let mem = env.mountpoint("mem");
    let out = env.ctl(&["mount", "memfs", path_str(&mem)]);
    assert_ne!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains("already use 3 of the 3 threads")
            && out.stderr.contains("limits.max_mount_threads")
            && out.stderr.contains("unmount something"),
        "{}",
        out.stderr
    );
    let status = env.ctl(&["status"]).ok().stdout;
    assert!(status.contains("2 of 3 for mounts"), "{status}");
    // hellofs's pool goes with its last mount, and its threads with it.
    all_serve(&made);
    unmount_all(&env, &made);
    env.ctl(&["mount", "memfs", path_str(&mem)]).ok();
    fs::write(mem.join("f"), b"served").unwrap();
    assert_eq!(fs::read(mem.join("f")).unwrap(), b"served");
    assert_eq!(threads_named(pid, "serve:hellofs"), 0);
    env.ctl(&["unmount", path_str(&mem)]).ok();
}

#[test]
fn running_out_of_descriptors_refuses_a_mount_and_the_others_serve() {
    if !fuse_available() {
        return;
    }
    let env = Env::start_configured(&[], "");
    env.ctl(&["load", "hellofs"]).ok();
    let pid = env.pid();
    let open = fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    // Room for some mounts, not for a hundred.
    let limit = (open + 60).to_string();
    let status = std::process::Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--nofile={limit}:{limit}"),
        ])
        .status()
        .expect("prlimit");
    assert!(status.success());
    let (made, refused) = mount_until_refused(&env, "hellofs", 100);
    let refused = refused.expect("a mount is refused before 100");
    eprintln!("made {} mounts, then: {refused}", made.len());
    assert!(made.len() >= 5, "only {} mounts", made.len());
    assert!(
        refused.contains("Too many open files") && refused.contains("RLIMIT_NOFILE"),
        "{refused}"
    );
    // The daemon still answers, every mount it reported made is served, and the
    // descriptors come back with the mounts.
    all_serve(&made);
    env.ctl(&["list"]).ok();
    unmount_all(&env, &made);
    let (again, refused) = mount_until_refused(&env, "hellofs", 3);
    assert_eq!(refused, None);
    all_serve(&again);
    unmount_all(&env, &again);
}

/// A pids cgroup for one test, removed when dropped (after the daemon in it is gone).
struct PidsCgroup(PathBuf);

impl PidsCgroup {
    /// A new cgroup under the pids hierarchy (v1) or the unified one (v2) allowing `max`
    /// tasks, or None where this machine has neither to give.
    fn new(max: usize) -> Option<PidsCgroup> {
        let name = format!("fshost-test-{}", std::process::id());
        let roots = [
            Path::new("/sys/fs/cgroup/pids"),
            Path::new("/sys/fs/cgroup"),
        ];
        for root in roots {
            if !root.join("cgroup.procs").exists() {
                continue;
            }
            let dir = root.join(&name);
            if fs::create_dir(&dir).is_err() {
                continue;
            }
            if fs::write(dir.join("pids.max"), max.to_string()).is_ok() {
                return Some(PidsCgroup(dir));
            }
            let _ = fs::remove_dir(&dir);
        }
        None
    }
}

impl Drop for PidsCgroup {
    fn drop(&mut self) {
        // The daemon was killed with the Env; its threads may take a moment to be reaped.
        for _ in 0..100 {
            if fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

#[test]
fn under_a_pids_cgroup_every_mount_is_made_and_served_by_a_few_threads() {
    if !fuse_available() {
        return;
    }
    let Some(cgroup) = PidsCgroup::new(250) else {
        eprintln!("no pids cgroup can be made here; skipped");
        return;
    };
    let env = Env::start_in_cgroup(&cgroup.0.join("cgroup.procs"), "");
    env.ctl(&["load", "hellofs"]).ok();
    // Three threads a mount took before: 61 mounts were made, the 62nd refused.
    let (made, refused) = mount_until_refused(&env, "hellofs", 200);
    assert_eq!(refused, None, "made {}", made.len());
    all_serve(&made);
    let pid = env.pid();
    let threads = fs::read_dir(format!("/proc/{pid}/task")).unwrap().count();
    assert!(threads <= 40, "{threads} threads for 200 mounts");
    env.ctl(&["status"]).ok();
    unmount_all(&env, &made);
    drop(env);
    drop(cgroup);
}
