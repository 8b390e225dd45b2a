//! Lifecycle under pressure: drain-unload's three endings, concurrent loads, faults.

use std::fs;
use std::io::Read;
use std::time::Duration;

use fshost_tests::{eventually, fuse_available, wait_with_deadline, Env};

use crate::{memfs, mounted_memfs, path_str};

fn deregistering(env: &Env, name: &str) -> bool {
    env.state_of(name).is_some_and(|s| s.0 == "deregistering")
}

#[test]
fn drain_unload_waits_for_the_last_unmount() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    let mnt = mounted_memfs(&env, "a");
    let other = env.mountpoint("b");
    std::thread::scope(|scope| {
        let draining = scope.spawn(|| env.ctl(&["unload", "memfs", "--drain", "--timeout", "30"]));
        assert!(eventually(Duration::from_secs(5), || deregistering(
            &env, "memfs"
        )));
        let refused = env.ctl(&["mount", "memfs", path_str(&other)]);
        assert_eq!(refused.code, 1, "{refused:?}");
        assert!(refused.stderr.contains("deregistering"), "{refused:?}");
        // The existing mount keeps working while draining.
        fs::write(mnt.join("f"), b"x").unwrap();
        env.ctl(&["unmount", path_str(&mnt)]).ok();
        let done = draining.join().unwrap().ok();
        assert!(done.stdout.contains("unloaded memfs"), "{done:?}");
    });
    assert!(env.plugins().is_empty());
}

#[test]
fn drain_unload_times_out_and_the_plugin_is_live_again() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    let mnt = mounted_memfs(&env, "a");
    let out = env.ctl(&["unload", "memfs", "--drain", "--timeout", "1"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("still busy after draining for 1s")
            && out.stderr.contains(path_str(&mnt)),
        "{out:?}"
    );
    assert!(out.stderr.contains("it is live again"), "{out:?}");
    assert_eq!(env.state_of("memfs"), Some(("live".into(), 1)));
    fs::write(mnt.join("f"), b"still served").unwrap();
    let second = env.mountpoint("b");
    env.ctl(&["mount", "memfs", path_str(&second)]).ok();
}

#[test]
fn drain_unload_cancelled_by_the_client_goes_back_to_live() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    let _mnt = mounted_memfs(&env, "a");
    let mut client = env.ctl_child(&["unload", "memfs", "--drain", "--timeout", "120"]);
    assert!(eventually(Duration::from_secs(5), || deregistering(
        &env, "memfs"
    )));
    // Ctrl-C: the client dies, its connection closes, the daemon cancels the drain.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(client.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    wait_with_deadline(&mut client, Duration::from_secs(10)).expect("client exits on SIGINT");
    assert!(
        eventually(Duration::from_secs(5), || env.state_of("memfs")
            == Some(("live".into(), 1))),
        "plugin not live again: {:?}",
        env.plugins()
    );
    assert!(env.log_text().contains("drain cancelled by the client"));
}

#[test]
fn concurrent_loads_of_one_plugin_have_exactly_one_winner() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    let path = memfs();
    let results: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| scope.spawn(|| env.ctl(&["load", &path])))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let winners = results.iter().filter(|r| r.code == 0).count();
    assert_eq!(winners, 1, "{results:#?}");
    for loser in results.iter().filter(|r| r.code != 0) {
        assert_eq!(loser.code, 1, "{loser:?}");
        assert!(
            loser.stderr.contains("(already-loaded)") || loser.stderr.contains("(busy)"),
            "{loser:?}"
        );
    }
    assert_eq!(env.plugins(), vec![("memfs".into(), "live".into(), 0)]);
}

#[test]
fn a_client_that_vanishes_mid_request_leaves_a_consistent_daemon() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    let mnt = env.mountpoint("m");
    // Disconnect right after sending a load and a mount; half a line; a flood.
    {
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(&env.socket).unwrap();
        let load = format!("{{\"op\":\"load\",\"path\":\"{}\"}}\n", memfs());
        let mount = format!(
            "{{\"op\":\"mount\",\"plugin\":\"memfs\",\"mountpoint\":\"{}\"}}\n",
            path_str(&mnt)
        );
        s.write_all(load.as_bytes()).unwrap();
        s.write_all(mount.as_bytes()).unwrap();
    }
    {
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(&env.socket).unwrap();
        s.write_all(b"{\"op\":\"li").unwrap();
    }
    {
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(&env.socket).unwrap();
        let flood = "{\"op\":\"list\"}\n".repeat(5000);
        s.write_all(flood.as_bytes()).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answers = String::new();
        s.read_to_string(&mut answers).unwrap();
        assert_eq!(
            answers.lines().count(),
            5000,
            "every flooded request is answered"
        );
    }
    // Whatever of the first connection's requests ran, ran completely.
    assert!(eventually(Duration::from_secs(5), || {
        let plugins = env.plugins();
        plugins.is_empty() || plugins[0].1 == "live"
    }));
    if env.plugins().is_empty() {
        env.ctl(&["load", &memfs()]).ok();
    }
    if env.state_of("memfs").is_some_and(|s| s.1 == 1) {
        env.ctl(&["unmount", path_str(&mnt)]).ok();
    }
    env.ctl(&["mount", "memfs", path_str(&mnt)]).ok();
    env.ctl(&["unmount", path_str(&mnt)]).ok();
    env.ctl(&["unload", "memfs"]).ok();
    assert!(env.plugins().is_empty());
}

/// README's "Writing a plugin", followed to the letter: a cargo project of its own, made
/// from hellofs's source, built against the SDK by path, loaded and mounted.
#[test]
fn a_plugin_made_out_of_tree_from_hellofs_builds_loads_and_serves() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let project = env.path("myfs");
    let mut new = std::process::Command::new(&cargo);
    new.args(["new", "--lib", "--vcs", "none", "--quiet"])
        .arg(&project);
    assert!(fshost_tests::run(new).status.success());
    let source = fs::read_to_string(repo.join("fs-plugins/hellofs/src/lib.rs")).unwrap();
    let source = source
        .replace("HelloFs", "MyFs")
        .replace("\"hellofs\"", "\"myfs\"");
    fs::write(project.join("src/lib.rs"), source).unwrap();
    let mut manifest = fs::read_to_string(project.join("Cargo.toml")).unwrap();
    manifest.push_str(&format!(
        "fshost-sdk = {{ path = \"{}\" }}\n[lib]\ncrate-type = [\"cdylib\"]\n",
        repo.join("fs-plugins/sdk").display()
    ));
    fs::write(project.join("Cargo.toml"), manifest).unwrap();
    let mut build = std::process::Command::new(&cargo);
    build
        .args(["build", "--offline", "--quiet", "--manifest-path"])
        .arg(project.join("Cargo.toml"));
    let built = fshost_tests::run(build);
    assert!(built.status.success(), "{built:?}");
    let library = project.join("target/debug/libmyfs.so");
    env.ctl(&["load", path_str(&library)]).ok();
    let mnt = env.mountpoint("my");
    env.ctl(&["mount", "myfs", path_str(&mnt)]).ok();
    assert_eq!(
        fs::read_to_string(mnt.join("hello")).unwrap(),
        "Hello from fshost\n"
    );
    env.ctl(&["unmount", path_str(&mnt)]).ok();
    env.ctl(&["unload", "myfs"]).ok();
}
