//! Recovery: a daemon killed with SIGKILL, and a plugin file overwritten while loaded.

use std::fs;
use std::os::unix::fs::MetadataExt;

use fshost_tests::{artifact, fshost_mounts_below, fuse_available, DetachOnDrop, Env};

use crate::{mounted_memfs, path_str};

#[test]
fn a_restarted_daemon_detaches_the_dead_mounts_of_a_killed_one() {
    if !fuse_available() {
        return;
    }
    // One mount is declared in the config, two are made by hand.
    let dir = tempfile::tempdir().unwrap();
    let _guard = DetachOnDrop(dir.path());
    let declared = dir.path().join("declared");
    fs::create_dir(&declared).unwrap();
    let config = format!(
        "preload = [\"hellofs\"]\n[[mount]]\nplugin = \"hellofs\"\nmountpoint = \"{}\"\n",
        declared.display()
    );
    let mut env = Env::start_configured(&[], &config);
    let a = mounted_memfs(&env, "a");
    let b = mounted_memfs(&env, "b");
    env.crash_and_restart();

    // The declared mount is back, served by the new daemon; the others are cleared.
    assert_eq!(
        fs::read_to_string(declared.join("hello")).unwrap(),
        "Hello from fshost\n"
    );
    assert_eq!(env.state_of("hellofs"), Some(("live".into(), 1)));

    let log = env.log_text();
    for mnt in [&a, &b] {
        assert!(
            log.contains(&format!(
                "detached a stale mount left by a dead fshostd mountpoint={}",
                mnt.display()
            )),
            "{log}"
        );
    }
    assert!(fshost_mounts_below(env.dir.path()).is_empty());
    assert!(log.contains(&format!(
        "stale mount left by a dead fshostd mountpoint={}",
        declared.display()
    )));
    // The paths are usable again.
    env.ctl(&["load", "memfs"]).ok();
    env.ctl(&["mount", "memfs", path_str(&a)]).ok();
    fs::write(a.join("again"), b"ok").unwrap();
    env.ctl(&["unmount", path_str(&a)]).ok();
    env.ctl(&["unmount", path_str(&declared)]).ok();
}

#[test]
fn overwriting_a_loaded_plugin_file_changes_nothing_until_it_is_loaded_again() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    let file = env.path("libreload.so");
    fs::copy(artifact("libmemfs.so"), &file).unwrap();
    env.ctl(&["load", path_str(&file)]).ok();
    let old = env.mountpoint("old");
    env.ctl(&["mount", "memfs", path_str(&old)]).ok();
    fs::write(old.join("kept"), b"before").unwrap();

    // Overwrite in place (same inode, like `cp new.so loaded.so`) with another plugin.
    let inode = fs::metadata(&file).unwrap().ino();
    fs::write(&file, fs::read(artifact("libhellofs.so")).unwrap()).unwrap();
    assert_eq!(fs::metadata(&file).unwrap().ino(), inode);

    // The live mount still runs the old code.
    assert_eq!(fs::read(old.join("kept")).unwrap(), b"before");
    fs::write(old.join("after"), b"still memfs").unwrap();

    // The new build loads beside it under another name and shows its new behaviour.
    env.ctl(&["load", path_str(&file), "--name", "memfs2"]).ok();
    let new = env.mountpoint("new");
    env.ctl(&["mount", "memfs2", path_str(&new)]).ok();
    assert_eq!(
        fs::read_to_string(new.join("hello")).unwrap(),
        "Hello from fshost\n"
    );
    assert_eq!(fs::read(old.join("after")).unwrap(), b"still memfs");

    // Once the old one is gone, the new build takes its own name.
    env.ctl(&["unmount", path_str(&old)]).ok();
    env.ctl(&["unload", "memfs"]).ok();
    env.ctl(&["load", path_str(&file)]).ok();
    let names: Vec<String> = env.plugins().into_iter().map(|p| p.0).collect();
    assert_eq!(names, vec!["hellofs", "memfs2"]);
    env.ctl(&["unmount", path_str(&new)]).ok();
}
