//! Running as a service: systemd units, socket activation, readiness notification, config
//! reload, access control for unprivileged users, the mount(8) helper.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;

use fshost_tests::{
    artifact, build_dir, eventually, fuse_available, run, tool_available, wait_with_deadline,
    DetachOnDrop, Env, KillOnDrop, DAEMON_START,
};

use crate::path_str;

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    if !tool_available("systemd-analyze") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for unit in ["fshostd.service", "fshostd.socket"] {
        let text = fs::read_to_string(repo_file(&format!("systemd/{unit}"))).unwrap();
        // verify checks that ExecStart exists: point it at the binary we built.
        let text = text.replace("/usr/bin/fshostd", path_str(&artifact("fshostd")));
        fs::write(dir.path().join(unit), text).unwrap();
    }
    let mut verify = Command::new("systemd-analyze");
    verify
        .current_dir(dir.path())
        .args(["verify", "./fshostd.service", "./fshostd.socket"]);
    let out = run(verify);
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn socket_activation_hands_the_daemon_its_listening_socket() {
    if !fuse_available() || !tool_available("systemd-socket-activate") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _guard = DetachOnDrop(dir.path());
    let socket = dir.path().join("activated.sock");
    let config = dir.path().join("fshostd.toml");
    fs::write(&config, "").unwrap();
    let _starting = DAEMON_START.lock().unwrap_or_else(|e| e.into_inner());
    let mut activator = KillOnDrop(
        Command::new("systemd-socket-activate")
            .arg("-l")
            .arg(&socket)
            .arg(artifact("fshostd"))
            .arg("--config")
            .arg(&config)
            .arg("--plugin-dir")
            .arg(build_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(eventually(Duration::from_secs(10), || socket.exists()));
    let ctl = |args: &[&str]| {
        let mut command = Command::new(artifact("fshostctl"));
        command.arg("--socket").arg(&socket).args(args);
        run(command)
    };
    // The first connection starts the daemon on the inherited socket.
    let out = ctl(&["load", "hellofs"]);
    assert!(out.status.success(), "{out:?}");
    let mnt = dir.path().join("h");
    fs::create_dir(&mnt).unwrap();
    assert!(ctl(&["mount", "hellofs", path_str(&mnt)]).status.success());
    assert_eq!(
        fs::read_to_string(mnt.join("hello")).unwrap(),
        "Hello from fshost\n"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(activator.0.id() as i32),
        Signal::SIGTERM,
    )
    .unwrap();
    let status = wait_with_deadline(&mut activator.0, Duration::from_secs(30)).expect("exits");
    assert!(status.success(), "{status:?}");
    assert!(
        fs::read_dir(&mnt).unwrap().next().is_none(),
        "still mounted after SIGTERM"
    );
}

/// Reads datagrams until one contains `needle` (or the deadline passes).
fn expect_notification(socket: &UnixDatagram, needle: &str) -> String {
    let mut buf = vec![0u8; 4096];
    let mut seen = Vec::new();
    while let Ok(n) = socket.recv(&mut buf) {
        let message = String::from_utf8_lossy(&buf[..n]).into_owned();
        if message.contains(needle) {
            return message;
        }
        seen.push(message);
    }
    panic!("no {needle:?} notification; got {seen:?}");
}

#[test]
fn readiness_and_status_are_sent_to_systemd() {
    if !fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut env = Env::start_configured(
        &[("NOTIFY_SOCKET", path_str(&notify_path))],
        "preload = [\"hellofs\"]\n",
    );
    expect_notification(&notify, "READY=1");
    let status = expect_notification(&notify, "STATUS=");
    assert!(
        status.contains("1 plugins (0 tainted), 0 mounts"),
        "{status}"
    );
    env.ctl(&["load", "memfs"]).ok();
    let status = expect_notification(&notify, "STATUS=");
    assert!(status.contains("2 plugins"), "{status}");
    env.terminate();
    expect_notification(&notify, "STOPPING=1");
}

#[test]
fn sighup_applies_config_changes_and_keeps_state_on_a_bad_file() {
    if !fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _guard = DetachOnDrop(dir.path());
    let (h, m) = (dir.path().join("h"), dir.path().join("m"));
    fs::create_dir(&h).unwrap();
    fs::create_dir(&m).unwrap();
    let first = format!(
        "preload = [\"hellofs\"]\n[[mount]]\nplugin = \"hellofs\"\nmountpoint = \"{}\"\nread_only = true\n",
        h.display()
    );
    let env = Env::start_configured(&[], &first);
    assert_eq!(
        env.state_of("hellofs"),
        Some(("live".into(), 1)),
        "mounted at start"
    );
    assert_eq!(
        fs::read_to_string(h.join("hello")).unwrap(),
        "Hello from fshost\n"
    );

    let second = format!(
        "preload = [\"hellofs\", \"memfs\"]\n[[mount]]\nplugin = \"memfs\"\nmountpoint = \"{}\"\n",
        m.display()
    );
    env.write_config(&second);
    env.signal(Signal::SIGHUP);
    assert!(
        eventually(Duration::from_secs(10), || env.state_of("memfs")
            == Some(("live".into(), 1))
            && env.state_of("hellofs") == Some(("live".into(), 0))),
        "reload not applied: {:?}",
        env.plugins()
    );
    fs::write(m.join("f"), b"x").unwrap();

    env.write_config("preload = [\"memfs\"]\nbogus_key = 1\n");
    env.signal(Signal::SIGHUP);
    assert!(eventually(Duration::from_secs(10), || env
        .log_text()
        .contains("config rejected")));
    let log = env.log_text();
    assert!(log.contains("line 2") && log.contains("bogus_key"), "{log}");
    assert_eq!(
        env.state_of("memfs"),
        Some(("live".into(), 1)),
        "a bad config changed nothing"
    );
    assert_eq!(fs::read(m.join("f")).unwrap(), b"x");
}

#[test]
fn unprivileged_users_get_exactly_what_the_config_allows() {
    use crate::security::ctl_as_nobody;
    if !fuse_available() || !tool_available("setpriv") {
        return;
    }
    let env = Env::start_configured(
        &[],
        "socket_mode = \"0666\"\n[users]\nmount_plugins = [\"memfs\"]\n",
    );
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    env.ctl(&["load", "memfs"]).ok();
    env.ctl(&["load", "hellofs"]).ok();
    let root_mnt = env.mountpoint("root-owned");
    let mine = env.mountpoint("mine");
    nix::unistd::chown(&mine, Some(65534.into()), Some(65534.into())).unwrap();

    let (code, _) = ctl_as_nobody(&env, &["list"]);
    assert_eq!(code, 0, "users may list");
    let cases: [(&[&str], &str); 5] = [
        (
            &["load", "faultfs"],
            "user 65534 may not load or unload plugins: only root and members of group fshost may",
        ),
        (&["unload", "memfs"], "may not load or unload plugins"),
        (
            &["mount", "hellofs", path_str(&mine)],
            "may not mount plugin \"hellofs\": it is not in the config's [users] mount_plugins",
        ),
        (
            &["mount", "memfs", path_str(&root_mnt)],
            "it is owned by uid 0 (users may mount only on directories they own)",
        ),
        (
            &["mount", "memfs", path_str(&mine), "-o", "allow_other"],
            "may not use -o allow_other",
        ),
    ];
    for (args, needle) in cases {
        let (code, stderr) = ctl_as_nobody(&env, args);
        assert_eq!(code, 1, "{args:?}: {stderr}");
        assert!(
            stderr.contains(needle) && stderr.contains("(permission-denied)"),
            "{args:?}: {stderr}"
        );
    }
    // What is allowed works, and the mount is the user's.
    let (code, stderr) = ctl_as_nobody(&env, &["mount", "memfs", path_str(&mine)]);
    assert_eq!(code, 0, "{stderr}");
    let mounts = env.ctl(&["--json", "mounts"]).ok().json();
    assert_eq!(mounts["mounts"][0]["owner_uid"], 65534);
    let mut write = Command::new("setpriv");
    write
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
        ])
        .arg(format!(
            "echo hi > {}/f && cat {}/f",
            mine.display(),
            mine.display()
        ));
    let out = run(write);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n", "{out:?}");
    // Others' mounts are not theirs to unmount; their own are.
    env.ctl(&["mount", "memfs", path_str(&root_mnt)]).ok();
    let (code, stderr) = ctl_as_nobody(&env, &["unmount", path_str(&root_mnt)]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("it was mounted by uid 0"), "{stderr}");
    let (code, stderr) = ctl_as_nobody(&env, &["unmount", path_str(&mine)]);
    assert_eq!(code, 0, "{stderr}");
    env.ctl(&["unmount", path_str(&root_mnt)]).ok();
}

#[test]
fn the_mount_helper_mounts_through_the_daemon_and_umount_works_as_usual() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    env.ctl(&["load", "hellofs"]).ok();
    let mnt = env.mountpoint("fstab");
    let mut helper = Command::new(artifact("mount_fshost"));
    helper.arg("none").arg(&mnt).arg("-o").arg(format!(
        "ro,noauto,plugin=hellofs,socket={}",
        env.socket.display()
    ));
    let out = run(helper);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        fs::read_to_string(mnt.join("hello")).unwrap(),
        "Hello from fshost\n"
    );
    let mut umount = Command::new("umount");
    umount.arg(&mnt);
    assert!(run(umount).status.success());
    assert!(eventually(Duration::from_secs(2), || env
        .state_of("hellofs")
        == Some(("live".into(), 0))));
    let mut helper = Command::new(artifact("mount_fshost"));
    helper
        .arg("none")
        .arg(&mnt)
        .arg("-o")
        .arg(format!("plugin=nosuch,socket={}", env.socket.display()));
    let out = run(helper);
    assert_eq!(out.status.code(), Some(32), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("plugin \"nosuch\" is not loaded"));
}

#[test]
fn connection_and_request_rate_limits_hold() {
    if !fuse_available() {
        return;
    }
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    let env = Env::start_configured(
        &[],
        "[limits]\nmax_connections = 2\nadmin_reserved_connections = 0\nrequests_per_second = 10\n",
    );
    // Take both slots, with two connections that are really served (the start-up probe's
    // connection may still hold a slot for a moment; then try again).
    // A refused connection is closed by the daemon: any I/O error means "not served".
    let ask = |stream: &UnixStream| {
        let mut line = String::new();
        let mut writer = stream.try_clone().unwrap();
        writer.write_all(b"{\"op\":\"status\"}\n").is_ok()
            && BufReader::new(stream.try_clone().unwrap())
                .read_line(&mut line)
                .is_ok()
            && line.contains("\"ok\":true")
    };
    let mut held = None;
    assert!(eventually(Duration::from_secs(5), || {
        let first = UnixStream::connect(&env.socket).unwrap();
        let second = UnixStream::connect(&env.socket).unwrap();
        let served = ask(&first) && ask(&second);
        held = served.then_some((first, second));
        served
    }));
    let (first, _second) = held.unwrap();
    // A third client is turned away.
    let refused = env.raw(b"{\"op\":\"list\"}\n");
    assert!(
        refused.contains("\"code\":\"limit-reached\"") && refused.contains("max_connections"),
        "{refused}"
    );

    // One connection sending 25 requests at once gets them answered at 10 per second.
    let started = std::time::Instant::now();
    let mut writer = first.try_clone().unwrap();
    writer
        .write_all("{\"op\":\"list\"}\n".repeat(25).as_bytes())
        .unwrap();
    let mut reader = BufReader::new(first);
    for _ in 0..25 {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.contains("\"ok\":true"), "{line}");
    }
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "not rate limited: {:?}",
        started.elapsed()
    );
}

#[test]
fn sighup_unloads_removed_preloads_and_applies_new_limits() {
    if !fuse_available() {
        return;
    }
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    // `hello_c` is the file libhello_c.so, whose plugin is named `hello-c`.
    let env = Env::start_configured(&[], "preload = [\"hello_c\", \"hellofs\"]\n");
    assert_eq!(env.state_of("hello-c"), Some(("live".into(), 0)));
    env.write_config(
        "preload = [\"hellofs\"]\n[limits]\nmax_connections = 2\nadmin_reserved_connections = 0\n",
    );
    env.signal(Signal::SIGHUP);
    assert!(
        eventually(Duration::from_secs(10), || env
            .state_of("hello-c")
            .is_none()),
        "hello-c was not unloaded: {:?}",
        env.plugins()
    );
    assert_eq!(env.state_of("hellofs"), Some(("live".into(), 0)));
    // The new connection limit holds: two served connections, a third refused.
    let served = |stream: &UnixStream| {
        let mut line = String::new();
        stream
            .try_clone()
            .unwrap()
            .write_all(b"{\"op\":\"status\"}\n")
            .is_ok()
            && BufReader::new(stream.try_clone().unwrap())
                .read_line(&mut line)
                .is_ok()
            && line.contains("\"ok\":true")
    };
    let mut held = Vec::new();
    assert!(eventually(Duration::from_secs(5), || {
        held = vec![
            UnixStream::connect(&env.socket).unwrap(),
            UnixStream::connect(&env.socket).unwrap(),
        ];
        held.iter().all(served)
    }));
    let refused = env.raw(b"{\"op\":\"list\"}\n");
    assert!(
        refused.contains("fshostd already serves 2 (limits.max_connections)"),
        "{refused}"
    );
}
