//! Running out of threads: a mount that would take fshostd past what it may have is
//! refused with a clear error, "mounted" always means served, and every other mount keeps
//! working (before, thread creation failing inside a session aborted the whole daemon, or
//! a mount was reported made and then silently detached).

use std::fs;
use std::path::{Path, PathBuf};

use fshost_tests::{fuse_available, Env};

use crate::path_str;

/// Mounts hellofs (two session threads, so three threads a mount) at `hello-N` until a
/// mount is refused or `most` are made; returns the mount points made and the refusal.
fn mount_until_refused(env: &Env, most: usize) -> (Vec<PathBuf>, Option<String>) {
    let mut made = Vec::new();
    for i in 0..most {
        let mnt = env.mountpoint(&format!("hello-{i}"));
        let out = env.ctl(&[
            "mount",
            "hellofs",
            path_str(&mnt),
            "--read-only",
            "-o",
            "threads=2",
        ]);
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

#[test]
fn a_mount_past_the_configured_thread_limit_is_refused_and_the_others_serve() {
    if !fuse_available() {
        return;
    }
    let env = Env::start_configured(&[], "[limits]\nmax_mount_threads = 9\n");
    env.ctl(&["load", "hellofs"]).ok();
    let (made, refused) = mount_until_refused(&env, 10);
    assert_eq!(made.len(), 3, "three mounts of three threads fit in nine");
    let refused = refused.expect("the fourth mount is refused");
    assert!(
        refused.contains("already use 9 of the 9 threads")
            && refused.contains("limits.max_mount_threads")
            && refused.contains("unmount something"),
        "{refused}"
    );
    all_serve(&made);
    let status = env.ctl(&["status"]).ok().stdout;
    assert!(status.contains("9 of 9 for mounts"), "{status}");
    // The threads come back with the mount.
    env.ctl(&["unmount", path_str(&made[0])]).ok();
    let again = env.mountpoint("again");
    env.ctl(&[
        "mount",
        "hellofs",
        path_str(&again),
        "--read-only",
        "-o",
        "threads=2",
    ])
    .ok();
    all_serve(&[again.clone(), made[1].clone(), made[2].clone()]);
    for mnt in [&again, &made[1], &made[2]] {
        env.ctl(&["unmount", path_str(mnt)]).ok();
    }
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
fn under_a_pids_cgroup_mounts_are_refused_before_the_system_refuses_threads() {
    if !fuse_available() {
        return;
    }
    let Some(cgroup) = PidsCgroup::new(250) else {
        eprintln!("no pids cgroup can be made here; skipped");
        return;
    };
    let env = Env::start_in_cgroup(&cgroup.0.join("cgroup.procs"), "");
    env.ctl(&["load", "hellofs"]).ok();
    let (made, refused) = mount_until_refused(&env, 200);
    eprintln!("made {} mounts, then: {refused:?}", made.len());
    let refused = refused.expect("a mount is refused before 200");
    assert!(refused.contains("pids cgroup"), "{refused}");
    // 250 tasks, less the daemon's own threads and a reserve of 64: about 60 mounts.
    assert!(made.len() >= 30, "only {} mounts", made.len());
    // Every mount reported made is served, and the daemon still answers.
    all_serve(&made);
    env.ctl(&["status"]).ok();
    for mnt in &made {
        env.ctl(&["unmount", path_str(mnt)]).ok();
    }
    drop(env);
    drop(cgroup);
}
