//! Crash survival under systemd (played by `fshost_tests::systemd::FakeSystemd`): every
//! mount's FUSE connection is kept in the descriptor store; after fshostd is killed, the
//! restarted one serves again the mounts of plugins that can resume (hellofs, hello-c,
//! passthroughfs) and detaches, by name in the log, those whose contents died (memfs).

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use fshost_tests::systemd::FakeSystemd;
use fshost_tests::{artifact, eventually, fshost_mounts_below, fuse_available, Env};

use crate::path_str;

/// Holds `$1` open for reading and `$2` for reading and writing, says `open`, waits for a
/// line, then prints both (the first, `--`, the second) and appends to the second.
const HOLDER: &str = r#"exec 3<"$0" 4<>"$1"; echo open; read -r _; cat <&3; echo --; cat <&4; printf ', and after' >&4"#;

#[test]
fn mounts_of_resumable_plugins_survive_a_crash_and_memfs_is_detached_by_name() {
    if !fuse_available() {
        return;
    }
    let systemd = FakeSystemd::new();
    let notify = [("NOTIFY_SOCKET", path_str(systemd.socket()))];
    let mut env = Env::start_with(&notify);
    for plugin in ["memfs", "hellofs", "passthroughfs"] {
        env.ctl(&["load", plugin]).ok();
    }
    env.ctl(&["load", path_str(&artifact("libhello_c.so"))])
        .ok();
    env.ctl(&["load", "faultfs"]).ok();
    let faulty = env.mountpoint("f");
    env.ctl(&["mount", "faultfs", path_str(&faulty)]).ok();
    // Upgraded before the crash: the restart must load generation 2, from its own file.
    let next = artifact("libfaultfs_next.so");
    env.ctl(&["upgrade", "faultfs", path_str(&next)]).ok();
    assert_eq!(
        fs::read_to_string(faulty.join("data")).unwrap(),
        "faultfs DATA\n"
    );
    let (mem, hello, hello_c, pass) = (
        env.mountpoint("m"),
        env.mountpoint("h"),
        env.mountpoint("c"),
        env.mountpoint("p"),
    );
    let source = env.mountpoint("source");
    fs::create_dir(source.join("sub")).unwrap();
    fs::write(source.join("sub/old"), b"before the crash").unwrap();
    env.ctl(&["mount", "memfs", path_str(&mem)]).ok();
    env.ctl(&["mount", "hellofs", path_str(&hello)]).ok();
    env.ctl(&["mount", "hello-c", path_str(&hello_c)]).ok();
    let source_option = format!("source={}", path_str(&source));
    env.ctl(&[
        "mount",
        "passthroughfs",
        path_str(&pass),
        "-o",
        &source_option,
    ])
    .ok();
    fs::write(mem.join("gone"), b"memfs data dies with the process").unwrap();
    let hello_text = fs::read(hello.join("hello")).unwrap();
    let old_ino = fs::metadata(pass.join("sub/old")).unwrap().ino();
    // Files open across the crash, one through passthrough and one served by the plugin,
    // in a process of their own: FUSE flushes on every close, and the restarted daemon is
    // forked from this process, whose exec would close (flush) them before any daemon
    // could answer.
    let mut holder = Command::new("bash")
        .arg("-c")
        .arg(HOLDER)
        .arg(hello.join("hello"))
        .arg(pass.join("sub/old"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = [0u8; 5];
    holder
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut said)
        .unwrap();
    assert_eq!(&said, b"open\n");
    // systemd holds every connection.
    assert!(
        eventually(Duration::from_secs(10), || systemd.stored().len() == 5),
        "{:?}",
        systemd.stored()
    );

    env.crash_and_restart_under(&systemd, &notify);

    // Served again: the same mounts, the same inode numbers, open files work on.
    assert_eq!(fs::read(hello.join("hello")).unwrap(), hello_text);
    holder.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    drop(holder.stdin.take());
    let out = holder.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let expected_report = format!(
        "{}--\nbefore the crash",
        String::from_utf8_lossy(&hello_text)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected_report);
    assert_eq!(fs::read_dir(&hello_c).unwrap().count(), 1);
    assert_eq!(
        fs::read_to_string(faulty.join("data")).unwrap(),
        "faultfs DATA\n"
    );
    assert_eq!(
        fs::metadata(pass.join("sub/old")).unwrap().ino(),
        old_ino,
        "passthroughfs answers for the inode the kernel knew"
    );
    assert_eq!(
        fs::read_to_string(source.join("sub/old")).unwrap(),
        "before the crash, and after"
    );
    fs::write(pass.join("sub/new"), b"made after the crash").unwrap();
    assert_eq!(
        fs::read(source.join("sub/new")).unwrap(),
        b"made after the crash"
    );
    // memfs's contents died: its mount is gone, said by name, nothing stale is left.
    let log = env.log_text();
    let lost = format!(
        "memfs mount {} lost its contents when fshostd died",
        mem.display()
    );
    assert!(log.contains(&lost), "{log}");
    let mut mounted = fshost_mounts_below(env.dir.path());
    mounted.sort();
    let mut expected = vec![hello.clone(), hello_c.clone(), pass.clone(), faulty.clone()];
    expected.sort();
    assert_eq!(mounted, expected);
    assert!(!mem.join("gone").exists());
    let listed = env.ctl(&["mounts"]).ok().stdout;
    for path in &expected {
        assert!(listed.contains(path_str(path)), "{listed}");
    }
    // The store holds what is mounted; unmounting empties it, and a daemon upgrade keeps it.
    assert!(eventually(Duration::from_secs(10), || systemd
        .stored()
        .len()
        == 4));
    let old_pid = env.pid();
    let out = env.daemon_upgrade(&[]);
    assert_eq!(out.code, 0, "{out:?}");
    let new_pid = env.pid();
    assert!(
        systemd
            .messages()
            .iter()
            .any(|m| m.contains(&format!("MAINPID={new_pid}"))),
        "the old fshostd ({old_pid}) named its successor to systemd: {:?}",
        systemd.messages()
    );
    assert_eq!(fs::read(hello.join("hello")).unwrap(), hello_text);
    for path in &expected {
        env.ctl(&["unmount", path_str(path)]).ok();
    }
    assert!(
        eventually(Duration::from_secs(10), || systemd.stored().is_empty()),
        "{:?}",
        systemd.stored()
    );
}

#[test]
fn a_mount_served_over_io_uring_is_served_again_after_a_crash() {
    if !fuse_available() {
        return;
    }
    let Some(_uring) = crate::tuning::uring_on() else {
        return;
    };
    let systemd = FakeSystemd::new();
    let notify = [("NOTIFY_SOCKET", path_str(systemd.socket()))];
    let mut env = Env::start_with(&notify);
    env.ctl(&["load", "passthroughfs"]).ok();
    let (source, pass) = (env.mountpoint("source"), env.mountpoint("p"));
    let options = format!("source={},uring", path_str(&source));
    env.ctl(&["mount", "passthroughfs", path_str(&pass), "-o", &options])
        .ok();
    fs::write(pass.join("before"), b"written before the crash").unwrap();
    assert!(crate::tuning::transport(&env, &pass).starts_with("io_uring"));
    assert!(eventually(Duration::from_secs(10), || systemd
        .stored()
        .len()
        == 1));

    // A reader that comes while no fshostd runs: its request waits on its CPU's queue,
    // for an entry, until the restarted daemon has registered its own.
    let mut waiting = None;
    env.crash_and_restart_under_after(&systemd, &notify, || {
        let reader = Command::new("cat")
            .arg(pass.join("before"))
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        waiting = Some(reader);
    });
    let mut reader = waiting.unwrap();
    let read = fshost_tests::wait_with_deadline(&mut reader, Duration::from_secs(10));
    if read.is_none() {
        let _ = reader.kill();
    }
    let read_out = reader.wait_with_output().unwrap();

    // The connection's ring outlived its queues: the new process registers its own, or
    // every request would wait for an entry forever. Each step in a child with a deadline.
    let script = format!(
        "cat {p}/before && for i in $(seq 100); do echo $i > {p}/f$i; done && ls {p} | wc -l",
        p = path_str(&pass)
    );
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(&script)
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let done = fshost_tests::wait_with_deadline(&mut child, Duration::from_secs(10));
    if done.is_none() {
        // Every process of the script (one waits in the kernel, holding the pipe).
        let group = nix::unistd::Pid::from_raw(-(child.id() as i32));
        let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
    }
    let out = child.wait_with_output().unwrap();
    let transport = crate::tuning::transport(&env, &pass);
    env.ctl(&["unmount", path_str(&pass)]).ok();
    assert!(
        read.is_some_and(|s| s.success()),
        "a request that came during the crash was never served"
    );
    assert_eq!(read_out.stdout, b"written before the crash");
    assert!(
        done.is_some_and(|s| s.success()),
        "requests held after the crash"
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "written before the crash101\n"
    );
    assert!(transport.starts_with("io_uring"), "{transport}");
}
