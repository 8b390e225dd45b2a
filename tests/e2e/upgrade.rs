//! Live plugin upgrades (`fshostctl upgrade`): mounts move to a new generation of their
//! plugin without unmounting; whatever fails, the old generation serves every mount on.
//! faultfs is built twice (`faultfs`, generation 1, and `faultfs-next`, generation 2, whose
//! `data` says so), which shows which code serves.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use fshost_tests::{artifact, eventually, fuse_available, wait_with_deadline, Env};

use crate::path_str;

const GENERATION_1: &str = "faultfs data\n";
const GENERATION_2: &str = "faultfs DATA\n";

/// faultfs loaded from a copy in the test directory (so that the test can put a new
/// version in its place) and mounted with `options`; returns the copy and the mount.
fn faultfs_from_copy(env: &Env, options: &[&str]) -> (PathBuf, PathBuf) {
    let copy = env.path("libfaultfs.so");
    fs::copy(artifact("libfaultfs.so"), &copy).unwrap();
    env.ctl(&["load", path_str(&copy)]).ok();
    let mnt = env.mountpoint("f");
    let mut args = vec!["mount", "faultfs", path_str(&mnt)];
    for option in options {
        args.extend(["-o", option]);
    }
    env.ctl(&args).ok();
    (copy, mnt)
}

/// The plugin as `info --json` shows it.
fn info(env: &Env, name: &str) -> serde_json::Value {
    env.ctl(&["--json", "info", name]).ok().json()["plugin"].clone()
}

/// Only one entry of `name` in `list`: no replaced generation lingers mapped.
fn listed_once(env: &Env, name: &str) -> bool {
    env.plugins().iter().filter(|(n, _, _)| n == name).count() == 1
}

#[test]
fn an_upgrade_moves_mounts_to_the_new_code_without_unmounting() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    let (copy, mnt) = faultfs_from_copy(&env, &[]);
    let data = mnt.join("data");
    assert_eq!(fs::read_to_string(&data).unwrap(), GENERATION_1);
    let mut open = fs::File::open(&data).unwrap();
    let before = fs::metadata(&data).unwrap();
    // The normal way: the new version over the old file, then upgrade.
    fs::copy(artifact("libfaultfs_next.so"), &copy).unwrap();
    let out = env.ctl(&["upgrade", "faultfs"]).ok();
    assert!(
        out.stdout
            .contains("upgraded faultfs 0.1.0 → 0.2.0 (generation 2): 1 mount moved"),
        "{out:?}"
    );
    assert_eq!(fs::read_to_string(&data).unwrap(), GENERATION_2);
    // The file opened before the upgrade reads on, from the new code.
    let mut text = String::new();
    open.read_to_string(&mut text).unwrap();
    assert_eq!(text, GENERATION_2);
    let after = fs::metadata(&data).unwrap();
    assert_eq!((before.ino(), before.dev()), (after.ino(), after.dev()));
    let plugin = info(&env, "faultfs");
    assert_eq!(plugin["generation"], 2, "{plugin}");
    assert_eq!(plugin["version"], "0.2.0", "{plugin}");
    assert_eq!(plugin["mounts"].as_array().unwrap().len(), 1, "{plugin}");
    assert!(listed_once(&env, "faultfs"), "{:?}", env.plugins());
    drop(open);
    // The mount is the daemon's as before: it unmounts, and the plugin then unloads.
    env.ctl(&["unmount", path_str(&mnt)]).ok();
    env.ctl(&["unload", "faultfs"]).ok();
}

/// Runs `upgrade faultfs PATH-OF-GENERATION-2` and expects it refused with `needle`, the
/// mount at `mnt` still served by generation 1 and nothing of generation 2 left.
fn refused_and_rolled_back(env: &Env, mnt: &Path, extra: &[&str], needle: &str) {
    let next = artifact("libfaultfs_next.so");
    let mut args = vec!["upgrade", "faultfs", path_str(&next)];
    args.extend(extra);
    let out = env.ctl(&args);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains(needle), "{out:?}");
    assert_eq!(fs::read_to_string(mnt.join("data")).unwrap(), GENERATION_1);
    let plugin = info(env, "faultfs");
    assert_eq!(plugin["generation"], 1, "{plugin}");
    assert!(plugin["upgrading"].is_null(), "{plugin}");
    assert!(listed_once(env, "faultfs"), "{:?}", env.plugins());
}

#[test]
fn a_failing_on_load_of_the_new_generation_changes_nothing() {
    if !fuse_available() {
        return;
    }
    let env = Env::start_with(&[("FAULTFS_FAIL_LOAD_GENERATION", "2")]);
    let (_, mnt) = faultfs_from_copy(&env, &[]);
    refused_and_rolled_back(&env, &mnt, &[], "failed to initialise");
    env.ctl(&["unmount", path_str(&mnt)]).ok();
}

#[test]
fn a_refused_or_panicking_import_changes_nothing() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    let (_, mnt) = faultfs_from_copy(&env, &["fail_import=1"]);
    refused_and_rolled_back(&env, &mnt, &[], "the new generation refused the state of");
    env.ctl(&["unmount", path_str(&mnt)]).ok();
    let env = Env::start();
    let (_, mnt) = faultfs_from_copy(&env, &["panic_in=import_state"]);
    refused_and_rolled_back(
        &env,
        &mnt,
        &[],
        "it panicked: panic in import_state: faultfs was asked to panic in import_state",
    );
    // The generation that panicked is gone; the one serving never panicked.
    assert!(info(&env, "faultfs")["tainted"].is_null());
    env.ctl(&["unmount", path_str(&mnt)]).ok();
    // A panic in the serving generation's export: it serves on, tainted.
    let env = Env::start();
    let (_, mnt) = faultfs_from_copy(&env, &["panic_in=export_state"]);
    refused_and_rolled_back(&env, &mnt, &[], "could not export the state of");
    let tainted = info(&env, "faultfs")["tainted"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(tainted.contains("panic in export_state"), "{tainted}");
    env.ctl(&["unmount", path_str(&mnt)]).ok();
}

/// What the kernel left to the plugin when a mount was made (here clearing setuid and
/// setgid, `FUSE_HANDLE_KILLPRIV_V2`) the new generation must do too: a generation that
/// would not is refused, and nothing changes. The other way round is allowed (the kernel
/// goes on clearing them itself).
#[test]
fn a_new_generation_must_do_what_the_kernel_left_to_the_plugin() {
    if !fuse_available() {
        return;
    }
    // Made while the trigger is missing, faultfs clears them itself; made after, not.
    let dir = tempfile::tempdir().unwrap();
    let trigger = dir.path().join("trigger");
    let option = format!("kill_priv_unless={}", path_str(&trigger));
    let env = Env::start();
    let (_, mnt) = faultfs_from_copy(&env, &[&option]);
    fs::write(&trigger, b"").unwrap();
    refused_and_rolled_back(
        &env,
        &mnt,
        &[],
        "does not clear setuid and setgid itself (WANT_KILL_PRIV), which the kernel left to the plugin when the mount was made; unmount it to change that",
    );
    env.ctl(&["unmount", path_str(&mnt)]).ok();
    // The other way round: the kernel goes on clearing them itself.
    let env = Env::start();
    let (_, mnt) = faultfs_from_copy(&env, &[&option]);
    fs::remove_file(&trigger).unwrap();
    env.ctl(&[
        "upgrade",
        "faultfs",
        path_str(&artifact("libfaultfs_next.so")),
    ])
    .ok();
    assert_eq!(fs::read_to_string(mnt.join("data")).unwrap(), GENERATION_2);
    env.ctl(&["unmount", path_str(&mnt)]).ok();
}

#[test]
fn a_new_library_that_fails_the_gate_changes_nothing() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    let (_, mnt) = faultfs_from_copy(&env, &[]);
    let not_a_plugin = env.path("libnot.so");
    fs::write(&not_a_plugin, b"\x7fELF, but nothing more").unwrap();
    let out = env.ctl(&["upgrade", "faultfs", path_str(&not_a_plugin)]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("not a complete shared object"),
        "{out:?}"
    );
    assert_eq!(fs::read_to_string(mnt.join("data")).unwrap(), GENERATION_1);
    assert_eq!(info(&env, "faultfs")["generation"], 1);
    env.ctl(&["unmount", path_str(&mnt)]).ok();
}

#[test]
fn the_c_plugin_upgrades_as_a_stateless_one() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    env.ctl(&["load", "hello_c"]).ok();
    let mnt = env.mountpoint("c");
    env.ctl(&["mount", "hello-c", path_str(&mnt)]).ok();
    let before = fs::read_to_string(mnt.join("hello")).unwrap();
    let out = env.ctl(&["upgrade", "hello-c"]).ok();
    assert!(
        out.stdout.contains("(generation 2): 1 mount moved"),
        "{out:?}"
    );
    assert_eq!(fs::read_to_string(mnt.join("hello")).unwrap(), before);
    env.ctl(&["unmount", path_str(&mnt)]).ok();
}

#[test]
fn an_upgrade_waits_for_a_stuck_request_only_so_long() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    let (_, mnt) = faultfs_from_copy(&env, &["slow_ms=4000"]);
    let mut reader = Command::new("cat")
        .arg(mnt.join("data"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let syscall = format!("/proc/{}/syscall", reader.id());
    let in_read = format!("{} 0x3 ", libc::SYS_read);
    assert!(
        eventually(Duration::from_secs(5), || fs::read_to_string(&syscall)
            .is_ok_and(|s| s.starts_with(&in_read))),
        "cat never blocked in read"
    );
    refused_and_rolled_back(
        &env,
        &mnt,
        &["--timeout", "1"],
        // Others may follow the read: other tests' daemons, starting, statfs every fshost
        // mount, and such a statfs waits behind the upgrade (seen in CI).
        "stayed busy for 1s (requests in flight: read",
    );
    // The stuck read completes, from the generation that was serving it.
    wait_with_deadline(&mut reader, Duration::from_secs(15)).unwrap();
    let mut data = String::new();
    reader
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut data)
        .unwrap();
    assert_eq!(data, GENERATION_1);
    env.ctl(&["unmount", path_str(&mnt)]).ok();
}

#[test]
fn plugins_without_state_handover_are_refused_before_anything_changes() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    let minimal = env.compile_c_plugin("minimal", crate::MINIMAL_C, &[]);
    env.ctl(&["load", path_str(&minimal)]).ok();
    let out = env.ctl(&["upgrade", "minimal"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("cannot hand its mounts' state over"),
        "{out:?}"
    );
    // Another plugin's library is not a new generation of this one.
    env.ctl(&["load", "faultfs"]).ok();
    let out = env.ctl(&["upgrade", "faultfs", path_str(&artifact("libhellofs.so"))]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr
            .contains("holds plugin \"hellofs\", not \"faultfs\""),
        "{out:?}"
    );
    assert_eq!(info(&env, "faultfs")["generation"], 1);
}

/// Upgrades `plugin` 20 times while a program keeps working in `mnt` (its cwd there, a
/// file open for reading and writing, a memory map), with a 100 MiB file beside it: not
/// one error, every byte as written, every inode number the same. Returns the pauses.
fn works_on_through_twenty_upgrades(env: &Env, plugin: &str, mnt: &Path) -> Vec<u64> {
    fs::create_dir(mnt.join("work")).unwrap();
    let big: Vec<u8> = (0..100u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    fs::write(mnt.join("big"), &big).unwrap();
    // The workload changes `work` (its mtime); `big` nothing at all.
    let identity = |path: &Path| fs::metadata(path).map(|m| (m.ino(), m.mtime_nsec(), m.len()));
    let work_ino = fs::metadata(mnt.join("work")).unwrap().ino();
    let before = identity(&mnt.join("big")).unwrap();
    let workload = Command::new(artifact("workload"))
        .arg(mnt.join("work"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pauses = Vec::new();
    for _ in 0..20 {
        let out = env.ctl(&["--json", "upgrade", plugin]).ok().json();
        pauses.push(out["upgrade"]["pause_us"].as_u64().unwrap());
    }
    let first = fshost_tests::finish_workload(workload, plugin, 20);
    eprintln!("{plugin}: workload {first}; pauses (µs): {pauses:?}");
    assert_eq!(info(env, plugin)["generation"], 21);
    assert_eq!(identity(&mnt.join("big")).unwrap(), before);
    assert_eq!(fs::metadata(mnt.join("work")).unwrap().ino(), work_ino);
    assert!(fs::read(mnt.join("big")).unwrap() == big, "big differs");
    assert!(listed_once(env, plugin), "{:?}", env.plugins());
    pauses
}

#[test]
fn a_busy_program_works_on_through_twenty_upgrades_of_memfs() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    env.ctl(&["load", "memfs"]).ok();
    let mnt = env.mountpoint("m");
    env.ctl(&["mount", "memfs", path_str(&mnt)]).ok();
    works_on_through_twenty_upgrades(&env, "memfs", &mnt);
    env.ctl(&["unmount", path_str(&mnt)]).ok();
}

/// The same through passthroughfs, whose open files (and the kernel's passthrough
/// registrations of them) must survive: the new instance takes duplicates of the old
/// one's descriptors under the same handles.
#[test]
fn a_busy_program_works_on_through_twenty_upgrades_of_passthroughfs() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    env.ctl(&["load", "passthroughfs"]).ok();
    let source = env.mountpoint("source");
    let mnt = env.mountpoint("p");
    let option = format!("source={}", path_str(&source));
    env.ctl(&["mount", "passthroughfs", path_str(&mnt), "-o", &option])
        .ok();
    works_on_through_twenty_upgrades(&env, "passthroughfs", &mnt);
    env.ctl(&["unmount", path_str(&mnt)]).ok();
}

/// Overwriting the plugin's file while upgrades read it crashes nothing: each upgrade
/// works from its own private copy, or refuses a file caught half-written.
#[test]
fn overwriting_the_plugin_file_during_upgrades_is_harmless() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    let (copy, mnt) = faultfs_from_copy(&env, &[]);
    let versions = [
        fs::read(artifact("libfaultfs.so")).unwrap(),
        fs::read(artifact("libfaultfs_next.so")).unwrap(),
    ];
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, copy) = (std::sync::Arc::clone(&stop), copy.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                // In place, as `cp` does it (same inode, truncated and rewritten).
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .truncate(true)
                    .open(&copy)
                    .unwrap();
                file.write_all(&versions[i % 2]).unwrap();
                i += 1;
                // Complete for a moment now and then, so that some upgrades go through.
                std::thread::sleep(Duration::from_millis(i as u64 % 2 * 20));
            }
        })
    };
    let mut upgraded = 0;
    let mut refusals = std::collections::BTreeSet::new();
    for _ in 0..10 {
        let out = env.ctl(&["upgrade", "faultfs"]);
        assert!(out.code == 0 || out.code == 1, "{out:?}");
        upgraded += usize::from(out.code == 0);
        if out.code == 1 {
            // The kind of refusal, without the test's paths.
            let text = out.stderr.replace(path_str(&copy), "FILE");
            refusals.insert(text.chars().take(90).collect::<String>());
        }
        let data = fs::read_to_string(mnt.join("data")).unwrap();
        assert!(data == GENERATION_1 || data == GENERATION_2, "{data}");
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    writer.join().unwrap();
    eprintln!("{upgraded} of 10 upgrades went through while the file was rewritten; refusals: {refusals:#?}");
    let plugin = info(&env, "faultfs");
    assert_eq!(plugin["generation"], upgraded + 1, "{plugin}");
    assert!(listed_once(&env, "faultfs"), "{:?}", env.plugins());
    env.ctl(&["unmount", path_str(&mnt)]).ok();
}

/// A plugin file copied only in part (its headers there, its segments not) is refused:
/// dlopen would map segments past the end of the copy, and touching them kills the daemon.
#[test]
fn a_half_copied_plugin_file_is_refused() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    let whole = fs::read(artifact("libhellofs.so")).unwrap();
    let half = env.path("libhalf.so");
    // 64 KiB: the ELF and program headers, not all the code they describe.
    fs::write(&half, &whole[..64 << 10]).unwrap();
    let out = env.ctl(&["load", path_str(&half)]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr
            .contains("is not a complete shared object (a segment ends past its"),
        "{out:?}"
    );
    assert!(env.plugins().is_empty());
}
