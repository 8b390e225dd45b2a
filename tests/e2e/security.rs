//! An ordinary user (uid 65534) attacking the root daemon, as SECURITY.md's threat model
//! says they may try: path races, path swaps, connection and request floods, resource
//! exhaustion. Each attack must fail, and the daemon must keep serving root.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;

use fshost_tests::{
    artifact, eventually, fuse_available, kernel_mounts, run, tool_available, Env, COMMAND_TIMEOUT,
};

use crate::path_str;

const NOBODY: u32 = 65534;

/// A daemon that serves ordinary users memfs, with the test directory open to them.
fn user_env(extra: &str) -> Option<Env> {
    if !fuse_available() || !tool_available("setpriv") {
        return None;
    }
    let env = Env::start_configured(
        &[],
        &format!("socket_mode = \"0666\"\n[users]\nmount_plugins = [\"memfs\"]\n{extra}"),
    );
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    env.ctl(&["load", "memfs"]).ok();
    Some(env)
}

/// A directory of the user's (uid 65534) below the test directory.
fn user_dir(env: &Env, name: &str) -> PathBuf {
    dir_of(env, NOBODY, name)
}

/// A directory of `uid`'s (and of the group of that number) below the test directory.
fn dir_of(env: &Env, uid: u32, name: &str) -> PathBuf {
    let dir = env.mountpoint(name);
    nix::unistd::chown(&dir, Some(uid.into()), Some(uid.into())).unwrap();
    dir
}

/// A command run as uid/gid 65534 with no supplementary groups, from a copy of `binary`
/// in the test directory (the build directory may not be open to other users).
fn as_nobody(env: &Env, binary: &str) -> Command {
    as_nobody_in(env, binary, "--clear-groups")
}

/// Like [`as_nobody`], with setpriv's `groups` option (`--groups=100`).
fn as_nobody_in(env: &Env, binary: &str, groups: &str) -> Command {
    as_user_in(env, NOBODY, binary, groups)
}

/// Like [`as_nobody_in`], as uid `uid` and the group of that number.
fn as_user_in(env: &Env, uid: u32, binary: &str, groups: &str) -> Command {
    let copy = env.path(binary);
    if !copy.exists() {
        fshost_tests::copy_program(&artifact(binary), &copy);
    }
    fshost_tests::as_user_in(uid, groups, copy)
}

/// A tmpfs of root's, unmounted (lazily) when dropped.
struct RootTmpfs(PathBuf);

impl RootTmpfs {
    fn mount(path: &Path) -> RootTmpfs {
        fs::create_dir_all(path).unwrap();
        nix::mount::mount(
            Some("root-tmpfs"),
            path,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=1M"),
        )
        .unwrap();
        RootTmpfs(path.to_path_buf())
    }

    fn mounted(&self) -> bool {
        kernel_mounts()
            .iter()
            .any(|m| m.mountpoint == self.0 && m.fstype == "tmpfs")
    }
}

impl Drop for RootTmpfs {
    fn drop(&mut self) {
        // Whatever a failed attack stacked on it goes too.
        for _ in 0..4 {
            if !kernel_mounts().iter().any(|m| m.mountpoint == self.0) {
                break;
            }
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// Runs one `attacker race` and returns (swaps, requests, mounts made, wins).
fn race(env: &Env, a: &Path, b: &Path, op: &str, path: &Path, victim: &Path) -> [u64; 4] {
    let mut command = as_nobody(env, "attacker");
    command.arg("race").arg(&env.socket).arg("10");
    for arg in [a, b, Path::new(op), path, victim] {
        command.arg(arg);
    }
    let out = run(command);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let numbers: Vec<u64> = stdout
        .split_whitespace()
        .filter_map(|field| field.split_once('=')?.1.parse().ok())
        .collect();
    numbers.try_into().unwrap_or_else(|_| panic!("{stdout}"))
}

#[test]
fn a_mount_raced_with_symlink_swaps_never_lands_on_roots_directory() {
    let Some(env) = user_env("") else { return };
    // Root's directory `rootdir/m`; the user's `home/p/m`, whose parent the user swaps
    // with a symlink to `rootdir` (a mounted directory cannot be renamed, its parent can).
    let root_dir = env.mountpoint("rootdir");
    let victim = env.mountpoint("rootdir/m");
    let home = user_dir(&env, "home");
    user_dir(&env, "home/p");
    user_dir(&env, "home/p/m");
    std::os::unix::fs::symlink(&root_dir, home.join("q")).unwrap();
    let (parent, link) = (home.join("p"), home.join("q"));
    let [swaps, requests, mounts, wins] =
        race(&env, &parent, &link, "mount", &parent.join("m"), &victim);
    eprintln!("mount race: {swaps} swaps, {requests} requests, {mounts} mounts, {wins} wins");
    assert!(swaps >= 1000, "the race did not run: {swaps} swaps");
    assert!(requests >= 100, "the race did not run: {requests} requests");
    // Mounts that never succeed would make a race that cannot be won, nor lost.
    assert!(mounts >= 10, "the daemon made only {mounts} mounts");
    assert_eq!(wins, 0, "memfs was mounted over root's directory");
    assert!(!kernel_mounts().iter().any(|m| m.mountpoint == victim));
}

#[test]
fn an_unmount_raced_with_symlink_swaps_never_detaches_roots_mount() {
    let Some(env) = user_env("") else { return };
    let root_dir = env.mountpoint("rootdir");
    let roots = RootTmpfs::mount(&root_dir.join("m"));
    let home = user_dir(&env, "home");
    let parent = home.join("p");
    let link = home.join("q");
    fs::create_dir(&parent).unwrap();
    fs::create_dir(parent.join("m")).unwrap();
    for dir in [&parent, &parent.join("m")] {
        nix::unistd::chown(dir, Some(NOBODY.into()), Some(NOBODY.into())).unwrap();
    }
    std::os::unix::fs::symlink(&root_dir, &link).unwrap();
    let [swaps, requests, mounts, wins] =
        race(&env, &parent, &link, "unmount", &parent.join("m"), &roots.0);
    eprintln!("unmount race: {swaps} swaps, {requests} requests, {mounts} mounts, {wins} wins");
    assert!(swaps >= 1000, "the race did not run: {swaps} swaps");
    assert!(requests >= 100, "the race did not run: {requests} requests");
    assert!(
        mounts >= 10,
        "the daemon made only {mounts} mounts to unmount"
    );
    assert_eq!(wins, 0, "root's tmpfs was unmounted");
    assert!(roots.mounted(), "root's tmpfs was unmounted");
}

#[test]
fn a_renamed_parent_neither_misleads_unmount_nor_shutdown() {
    let Some(mut env) = user_env("") else { return };
    let root_dir = env.mountpoint("rootdir");
    let roots = RootTmpfs::mount(&root_dir.join("m"));
    let busy_roots = RootTmpfs::mount(&root_dir.join("busy"));
    let _open = fs::File::create(busy_roots.0.join("f")).unwrap();
    let home = user_dir(&env, "home");
    for name in ["p", "p/m", "p/busy"] {
        user_dir(&env, &format!("home/{name}"));
    }
    let ctl = |args: &[&str]| {
        let mut command = as_nobody(&env, "fshostctl");
        command.arg("--socket").arg(&env.socket).args(args);
        run(command)
    };
    for name in ["m", "busy"] {
        let out = ctl(&["mount", "memfs", path_str(&home.join("p").join(name))]);
        assert!(out.status.success(), "{out:?}");
    }
    // The user moves the parent away and puts a symlink to root's directory in its place.
    fs::rename(home.join("p"), home.join("moved")).unwrap();
    std::os::unix::fs::symlink(&root_dir, home.join("p")).unwrap();
    // The old path, sent as is, names the user's mount (the record), not root's.
    let old = env.raw(
        format!(
            "{{\"op\":\"unmount\",\"mountpoint\":\"{}\"}}\n",
            home.join("p/m").display()
        )
        .as_bytes(),
    );
    assert!(old.contains("\"ok\":true"), "{old}");
    assert!(roots.mounted(), "root's tmpfs was unmounted");
    assert!(!kernel_mounts()
        .iter()
        .any(|m| m.mountpoint == home.join("moved/m")));
    // The user finds their other mount under its new name.
    let out = ctl(&["unmount", path_str(&home.join("moved/busy"))]);
    assert!(out.status.success(), "{out:?}");
    let out = ctl(&["mount", "memfs", path_str(&home.join("moved/busy"))]);
    assert!(out.status.success(), "{out:?}");
    fs::rename(home.join("moved"), home.join("moved2")).unwrap();
    // `mounts` shows it where it is now.
    let mounts = env.ctl(&["--json", "mounts"]).ok().json();
    assert_eq!(
        mounts["mounts"][0]["mountpoint"],
        path_str(&home.join("moved2/busy"))
    );
    // Shutdown unmounts the user's mount where it is now, and nothing of root's.
    let status = env.terminate();
    assert!(status.success(), "{status:?}");
    assert!(roots.mounted(), "shutdown unmounted root's tmpfs");
    assert!(busy_roots.mounted(), "shutdown detached root's busy tmpfs");
    assert!(
        !kernel_mounts()
            .iter()
            .any(|m| m.mountpoint.starts_with(&home)),
        "the user's mount outlived the daemon"
    );
}

/// Keeps an `attacker hold` child alive until dropped (its stdin closes then).
struct Held(std::process::Child);

impl Drop for Held {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = fshost_tests::wait_with_deadline(&mut self.0, COMMAND_TIMEOUT);
    }
}

fn spawn_hold(env: &Env, n: usize) -> (Held, usize) {
    let mut command = as_nobody(env, "attacker");
    command
        .arg("hold")
        .arg(&env.socket)
        .arg(n.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut child = command.spawn().unwrap();
    let mut line = String::new();
    let stdout = child.stdout.take().unwrap();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
    let accepted = line
        .trim()
        .strip_prefix("accepted=")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    (Held(child), accepted)
}

/// What a `fshostctl` run as the user says: (exit code, stderr).
pub(crate) fn ctl_as_nobody(env: &Env, args: &[&str]) -> (i32, String) {
    ctl_as(env, NOBODY, args)
}

/// What a `fshostctl` run as `uid` (and the group of that number) says: (exit code, stderr).
fn ctl_as(env: &Env, uid: u32, args: &[&str]) -> (i32, String) {
    let mut command = as_user_in(env, uid, "fshostctl", "--clear-groups");
    command.arg("--socket").arg(&env.socket).args(args);
    let out = run(command);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_user_holding_connections_never_locks_out_root() {
    let limits = "[limits]\nmax_connections = 64\nadmin_reserved_connections = 8\nmax_connections_per_user = 1000\n";
    let Some(env) = user_env(limits) else { return };
    let (_held, accepted) = spawn_hold(&env, 400);
    assert_eq!(accepted, 56, "all but the admins' reserve");
    // Root still gets answers, and the user is told why not, clearly.
    let list = env.ctl(&["list"]).ok();
    assert!(list.stdout.contains("memfs"), "{list:?}");
    let (code, stderr) = ctl_as_nobody(&env, &["list"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("reserved for root and group members")
            && stderr.contains("(limit-reached)"),
        "{stderr}"
    );
}

#[test]
fn one_user_gets_a_bounded_number_of_connections_and_idle_ones_are_closed() {
    let Some(env) = user_env("[limits]\nidle_timeout_secs = 3\n") else {
        return;
    };
    let (held, accepted) = spawn_hold(&env, 400);
    assert_eq!(accepted, 16, "limits.max_connections_per_user's default");
    let (code, stderr) = ctl_as_nobody(&env, &["list"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("user 65534 already has 16 open"),
        "{stderr}"
    );
    env.ctl(&["list"]).ok();
    // Closing connections frees the user's places (the daemon sees the closes
    // asynchronously, hence the wait).
    drop(held);
    assert!(eventually(Duration::from_secs(5), || ctl_as_nobody(
        &env,
        &["list"]
    )
    .0 == 0));
    // Idle connections are closed after three seconds, which frees them too:
    // the user holds all 16 and sends nothing, yet gets a place again.
    let (_idle_held, accepted) = spawn_hold(&env, 16);
    assert_eq!(accepted, 16);
    assert_eq!(ctl_as_nobody(&env, &["list"]).0, 1);
    assert!(eventually(Duration::from_secs(8), || ctl_as_nobody(
        &env,
        &["list"]
    )
    .0 == 0));
    // And the idle client is told why.
    let mut idle = as_nobody(&env, "attacker");
    idle.arg("idle").arg(&env.socket);
    let out = run(idle);
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(
        answer.contains("no request for 3s") && answer.contains("\"timeout\""),
        "{answer}"
    );
}

/// Resident memory of a process in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn a_pipelining_flood_does_not_grow_the_daemon() {
    let Some(env) = user_env("[limits]\nrequests_per_second = 10\n") else {
        return;
    };
    let before = rss_kib(env.pid());
    let mut flood = as_nobody(&env, "attacker");
    flood.arg("flood").arg(&env.socket).arg("5");
    let out = run(flood);
    assert!(out.status.success(), "{out:?}");
    let after = rss_kib(env.pid());
    eprintln!(
        "flood: {} , daemon RSS {before} -> {after} KiB",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    assert!(
        after < before + 16 * 1024,
        "RSS grew from {before} to {after} KiB"
    );
    env.ctl(&["list"]).ok();
}

#[test]
fn users_mounts_are_limited_in_number_threads_and_size() {
    let users = "max_mounts = 2\nmax_size = \"8M\"\n";
    let Some(env) = user_env(users) else { return };
    let home = user_dir(&env, "home");
    for name in ["a", "b", "c"] {
        user_dir(&env, &format!("home/{name}"));
    }
    let at = |name: &str| home.join(name).display().to_string();
    let cases: [(Vec<String>, &str); 2] = [
        (
            vec![
                "mount".into(),
                "memfs".into(),
                at("a"),
                "-o".into(),
                "threads=16".into(),
            ],
            "at most 2 of their plugin's threads",
        ),
        (
            vec![
                "mount".into(),
                "memfs".into(),
                at("a"),
                "-o".into(),
                "size=1G".into(),
            ],
            "user 65534 may hold 8M in all ([users] max_size); 8M is left, 1G was asked",
        ),
    ];
    for (args, needle) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, stderr) = ctl_as_nobody(&env, &args);
        assert_eq!(code, 1, "{stderr}");
        assert!(
            stderr.contains(needle) && stderr.contains("(limit-reached)"),
            "{stderr}"
        );
    }
    let (code, stderr) = ctl_as_nobody(&env, &["mount", "memfs", &at("a"), "-o", "size=6M"]);
    assert_eq!(code, 0, "{stderr}");
    // No size given: an equal share (4M), here cut to what is left (2M).
    let (code, stderr) = ctl_as_nobody(&env, &["mount", "memfs", &at("b")]);
    assert_eq!(code, 0, "{stderr}");
    let mounts = env.ctl(&["--json", "mounts"]).ok().json();
    let sizes: Vec<&str> = mounts["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["options"]["size"].as_str().unwrap())
        .collect();
    assert_eq!(sizes, [(6 << 20).to_string(), (2 << 20).to_string()]);
    let (code, stderr) = ctl_as_nobody(&env, &["mount", "memfs", &at("c")]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("already has 2 mounts ([users] max_mounts)"),
        "{stderr}"
    );
    // Root is not limited.
    env.ctl(&["mount", "memfs", &at("c"), "-o", "threads=16"])
        .ok();
    for name in ["a", "b", "c"] {
        env.ctl(&["unmount", &at(name)]).ok();
    }
}

#[test]
fn plugin_copies_have_no_name_anyone_could_race() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    // The old copies were `.fshostd-<pid>-<n>-<file>` beside the socket: links there to a
    // file of root's must not be followed.
    let victim = env.path("victim");
    fs::write(&victim, b"root's").unwrap();
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).unwrap();
    for n in 1..=4 {
        let name = format!(".fshostd-{}-{n}-libmemfs.so", env.pid());
        std::os::unix::fs::symlink(&victim, env.path(&name)).unwrap();
    }
    env.ctl(&["load", "memfs"]).ok();
    assert_eq!(fs::read(&victim).unwrap(), b"root's");
    assert_eq!(
        fs::metadata(&victim).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // The copy is a sealed memfd, mapped under its own name only.
    let maps = fs::read_to_string(format!("/proc/{}/maps", env.pid())).unwrap();
    assert!(
        maps.lines()
            .any(|l| l.contains("/memfd:fshost-") && l.ends_with("libmemfs.so (deleted)")),
        "{maps}"
    );
    env.ctl(&["unload", "memfs"]).ok();
}

#[test]
fn plugin_directories_others_may_write_are_refused() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    let plugins = env.mountpoint("plugins");
    fs::copy(artifact("libhellofs.so"), plugins.join("libhellofs.so")).unwrap();
    fs::set_permissions(&plugins, fs::Permissions::from_mode(0o777)).unwrap();
    let refused = env.ctl(&["load", path_str(&plugins.join("libhellofs.so"))]);
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(
        refused.stderr.contains("others could replace its files")
            && refused.stderr.contains("chmod go-w"),
        "{refused:?}"
    );
    fs::set_permissions(&plugins, fs::Permissions::from_mode(0o755)).unwrap();
    env.ctl(&["load", path_str(&plugins.join("libhellofs.so"))])
        .ok();
}

#[test]
fn dead_mounts_of_users_are_cleaned_after_a_crash() {
    let Some(mut env) = user_env("") else { return };
    let home = user_dir(&env, "home");
    let mine = user_dir(&env, "home/m");
    let (code, stderr) = ctl_as_nobody(&env, &["mount", "memfs", path_str(&mine)]);
    assert_eq!(code, 0, "{stderr}");
    let roots = crate::mounted_memfs(&env, "root");
    env.crash_and_restart();
    let log = env.log_text();
    for mnt in [&mine, &roots] {
        assert!(
            log.contains(&format!(
                "detached a stale mount left by a dead fshostd mountpoint={}",
                mnt.display()
            )),
            "{log}"
        );
    }
    // The user can mount there again.
    env.ctl(&["load", "memfs"]).ok();
    let (code, stderr) = ctl_as_nobody(&env, &["mount", "memfs", path_str(&mine)]);
    assert_eq!(code, 0, "{stderr}");
    assert!(home.exists());
}

#[test]
fn sigterm_stops_twelve_busy_mounts_within_one_grace_period() {
    if !fuse_available() {
        return;
    }
    let mut env = Env::start();
    let mut open = Vec::new();
    for n in 0..12 {
        let mnt = crate::mounted_memfs(&env, &format!("busy{n}"));
        open.push(fs::File::create(mnt.join("held")).unwrap());
    }
    let started = std::time::Instant::now();
    let status = env.terminate();
    let took = started.elapsed();
    eprintln!("SIGTERM with 12 busy mounts: {took:?}");
    assert!(status.success(), "{status:?}");
    assert!(took < Duration::from_secs(10), "shutdown took {took:?}");
    assert!(fshost_tests::fshost_mounts_below(env.dir.path()).is_empty());
    drop(open);
}

#[test]
fn group_membership_comes_from_the_kernel_at_connect() {
    if !fuse_available() || !tool_available("setpriv") {
        return;
    }
    // Group `users` (gid 100 on Debian) as the admin group: a user with it as a
    // supplementary group is an admin, without it not. The daemon learns the groups from
    // SO_PEERGROUPS, not from /proc/<pid> (which a recycled pid could fake).
    let env = Env::start_configured(&[], "socket_mode = \"0666\"\ngroup = \"users\"\n");
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let load = |groups: &str| {
        let mut command = as_nobody_in(&env, "fshostctl", groups);
        command
            .arg("--socket")
            .arg(&env.socket)
            .args(["load", "hellofs"]);
        run(command)
    };
    let out = load("--clear-groups");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("only root and members of group users"));
    let out = load("--groups=100");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(env.state_of("hellofs"), Some(("live".into(), 0)));
}

/// SIGHUP applies every limit, as a user meets them on the next connection and mount:
/// per-user connections, all connections and the admins' reserve, the idle timeout, and
/// `[users]`' limits.
#[test]
fn a_reload_applies_every_limit_to_users() {
    let Some(env) = user_env("") else { return };
    let home = user_dir(&env, "home");
    for name in ["a", "b"] {
        user_dir(&env, &format!("home/{name}"));
    }
    let reload = |users: &str, limits: &str| {
        env.write_config(&format!(
            "socket_mode = \"0666\"\n[users]\nmount_plugins = [\"memfs\"]\n{users}[limits]\n{limits}"
        ));
        env.signal(Signal::SIGHUP);
    };
    reload("", "max_connections_per_user = 2\n");
    assert!(
        eventually(Duration::from_secs(10), || spawn_hold(&env, 10).1 == 2),
        "max_connections_per_user not applied"
    );
    reload(
        "max_mounts = 1\nmax_threads_per_mount = 1\n",
        "max_connections = 8\nadmin_reserved_connections = 5\nmax_connections_per_user = 4\n\
         idle_timeout_secs = 2\n",
    );
    // 8 places, 5 of them root's: the user gets 3 (not the 4 they may hold).
    let mut held = None;
    assert!(
        eventually(Duration::from_secs(10), || {
            let (hold, accepted) = spawn_hold(&env, 10);
            held = Some(hold);
            accepted == 3
        }),
        "max_connections / admin_reserved_connections not applied"
    );
    env.ctl(&["list"]).ok();
    drop(held);
    // Idle connections are closed after 2 s.
    let answer = eventually_answer(&env);
    assert!(answer.contains("no request for 2s"), "{answer}");
    let at = |name: &str| home.join(name).display().to_string();
    let (code, stderr) = ctl_as_nobody(&env, &["mount", "memfs", &at("a"), "-o", "threads=2"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("at most 1 of their plugin's threads"),
        "{stderr}"
    );
    let (code, stderr) = ctl_as_nobody(&env, &["mount", "memfs", &at("a")]);
    assert_eq!(code, 0, "{stderr}");
    let (code, stderr) = ctl_as_nobody(&env, &["mount", "memfs", &at("b")]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("max_mounts"), "{stderr}");
    let (code, stderr) = ctl_as_nobody(&env, &["unmount", &at("a")]);
    assert_eq!(code, 0, "{stderr}");
}

/// What an idle client of the user's is told when the daemon closes it (retried while the
/// user's places are still taken by connections the daemon has not yet seen close).
fn eventually_answer(env: &Env) -> String {
    let mut answer = String::new();
    eventually(Duration::from_secs(10), || {
        let mut idle = as_nobody(env, "attacker");
        idle.arg("idle").arg(&env.socket);
        answer = String::from_utf8_lossy(&run(idle).stdout).into_owned();
        !answer.contains("limit-reached")
    });
    answer
}

/// Removing files while holding them by `O_PATH` descriptors leaves memfs files the kernel
/// still references, whose space memfs gives back at once (their FORGET usually follows in
/// a moment); held that way on purpose, they must not let a mount grow past its `size=`
/// without end: at most twice it.
#[test]
fn files_removed_but_held_cannot_grow_a_memfs_without_end() {
    use std::io::Write;
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    env.ctl(&["load", "memfs"]).ok();
    let mnt = env.mountpoint("held");
    env.ctl(&["mount", "memfs", path_str(&mnt), "-o", "size=1M"])
        .ok();
    let mut held = Vec::new();
    let mut stored = 0usize;
    for i in 0..6 {
        let path = mnt.join(format!("f{i}"));
        let mut file = fs::File::create(&path).unwrap();
        let chunk = vec![1u8; 64 << 10];
        while let Ok(n) = file.write(&chunk) {
            if n == 0 {
                break;
            }
            stored += n;
        }
        drop(file);
        // CLOEXEC: without it every program another test starts meanwhile (a daemon, for
        // one) inherits the descriptor and keeps this mount busy (seen in CI).
        let fd = rustix::fs::open(
            &path,
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        fs::remove_file(&path).unwrap();
        held.push(fd);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        (1 << 20..=2 << 20).contains(&stored),
        "{stored} bytes stored with a 1 MiB limit"
    );
    drop(held);
    env.ctl(&["unmount", path_str(&mnt)]).ok();
}

/// A user's mounts take at most `[users] max_threads` of their plugin's workers together:
/// a user whose requests block in the plugin (faultfs's slow reads here; for real, say, a
/// passthroughfs over their own FUSE file system that never answers) waits for their own
/// requests, while root's mount of the same plugin is served at once.
#[test]
fn a_users_blocked_requests_hold_only_their_share_of_the_workers() {
    let Some((env, mounts)) = users_faultfs(8, 2, &[NOBODY], 3, "slow_ms=1000") else {
        return;
    };
    // Six requests the per-mount limit (2) alone would serve at once: two at a time, three
    // rounds of a second.
    let all = two_reads_each_beside_root(&env, &mounts);
    assert!(
        all >= Duration::from_millis(2900),
        "six slow reads took {all:?}"
    );
}

/// Two direct reads (no page cache: a request each) on each of `mounts`, as its owner,
/// while a read on a mount of root's answers at once (in 800 ms); how long they took in
/// all. Every mount is unmounted after.
fn two_reads_each_beside_root(env: &Env, mounts: &[(u32, PathBuf)]) -> Duration {
    let root_mount = env.mountpoint("root");
    env.ctl(&["mount", "faultfs", path_str(&root_mount)]).ok();
    let started = std::time::Instant::now();
    let readers = mounts
        .iter()
        .flat_map(|m| [m, m])
        .map(|(uid, m)| fshost_tests::direct_read(&m.join("data"), Some(*uid)))
        .collect();
    let all = fshost_tests::slow_reads_beside(
        started,
        readers,
        &root_mount.join("data"),
        Duration::from_millis(800),
    );
    for mnt in mounts.iter().map(|(_, m)| m).chain([&root_mount]) {
        env.ctl(&["unmount", path_str(mnt)]).ok();
    }
    all
}

/// A daemon whose faultfs pool has `pool` workers (users' mounts together three quarters)
/// and each user `per_user`, and `count` faultfs mounts (`-o options`) of each of `users`,
/// with their owners; None where the tools are missing.
fn users_faultfs(
    pool: usize,
    per_user: usize,
    users: &[u32],
    count: usize,
    options: &str,
) -> Option<(Env, Vec<(u32, PathBuf)>)> {
    if !fuse_available() || !tool_available("setpriv") || !tool_available("dd") {
        return None;
    }
    let config = format!("socket_mode = \"0666\"\n[limits]\nthreads_per_plugin = {pool}\n[users]\nmount_plugins = [\"faultfs\"]\nmax_threads = {per_user}\n");
    let env = Env::start_configured(&[], &config);
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    env.ctl(&["load", "faultfs"]).ok();
    let mounts = users
        .iter()
        .flat_map(|&uid| (0..count).map(move |i| (uid, i)))
        .map(|(uid, i)| {
            let dir = dir_of(&env, uid, &format!("faultfs-{uid}-{i}"));
            let (code, stderr) = ctl_as(
                &env,
                uid,
                &["mount", "faultfs", path_str(&dir), "-o", options],
            );
            assert_eq!(code, 0, "{stderr}");
            (uid, dir)
        })
        .collect();
    Some((env, mounts))
}

/// All users' mounts together take at most three quarters of a plugin's workers: users
/// whose requests block in the plugin, each within their own share, leave the rest to
/// root's mounts (here a pool of 4: users together 3, each at most 2).
#[test]
fn users_together_leave_root_a_quarter_of_the_workers() {
    let users = [NOBODY, NOBODY - 1];
    let Some((env, mounts)) = users_faultfs(4, 2, &users, 2, "slow_ms=2000") else {
        return;
    };
    // Eight slow reads, four of each user: each user's share (2) alone would let all four
    // workers be taken at once; users together may take three. Three at a time: three
    // rounds of two seconds (four at a time would take two rounds, and root's read would
    // wait for the first to end).
    let all = two_reads_each_beside_root(&env, &mounts);
    assert!(
        all >= Duration::from_millis(5900),
        "eight slow reads took {all:?}"
    );
}

/// The worker a user gives back goes to a mount of theirs whose request waits for it,
/// past mounts that waited longer but no longer need it: one whose request was withdrawn
/// (its reader killed) and one that ended (unmounted) while it waited. Either used to take
/// the worker and wake nobody, and the request behind them waited until the user sent
/// another.
#[test]
fn a_worker_given_back_goes_to_a_mount_that_needs_it() {
    let Some((env, mounts)) = users_faultfs(16, 1, &[NOBODY], 4, "slow_ms=3000") else {
        return;
    };
    let mounts: Vec<PathBuf> = mounts.into_iter().map(|(_, dir)| dir).collect();
    // The first mount's one FLUSH (answered "not needed", so the kernel sends no more), so
    // that the user's slow read below is their only request for a while: a process holds
    // the file open after it.
    let first = mounts[0].join("data");
    assert!(run(fshost_tests::nobody_sh(": < \"$1\"", &first))
        .status
        .success());
    let mut holder = fshost_tests::nobody_sh(
        "exec 3<\"$1\" && dd bs=4096 count=1 iflag=direct status=none <&3 >/dev/null && exec sleep 30",
        &first,
    )
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // Three mounts wait for the user's one worker, in this order.
    let mut waiting: Vec<std::process::Child> = mounts[1..]
        .iter()
        .map(|m| {
            let reader = fshost_tests::direct_read(&m.join("data"), Some(NOBODY));
            std::thread::sleep(Duration::from_millis(300));
            reader
        })
        .collect();
    // The first two no longer need it: a reader killed (its request was never read, so
    // the kernel withdraws it), and a reader killed and its mount unmounted.
    for reader in &mut waiting[..2] {
        reader.kill().unwrap();
        reader.wait().unwrap();
    }
    env.ctl(&["unmount", path_str(&mounts[2])]).ok();
    // The held read ends about 3 s after it began; the last mount's is served next (3 s).
    let last = fshost_tests::wait_with_deadline(&mut waiting[2], Duration::from_secs(10));
    for child in [&mut waiting[2], &mut holder] {
        child.kill().ok();
        child.wait().ok();
    }
    for mnt in [&mounts[0], &mounts[1], &mounts[3]] {
        env.ctl(&["unmount", path_str(mnt)]).ok();
    }
    let last = last.expect("the last waiting mount's read was served within 10 s");
    assert!(last.success());
}

/// Users' requests waiting for workers, through a storm of readers on two users' mounts
/// (each mount two workers at most, each user two, users together three of a pool of
/// four), four storms of 64, a quarter of them killed at random moments (waiting, parked,
/// or being served): every reader not killed is served, and afterwards every mount answers at once. A worker
/// given back that woke nobody would leave a reader waiting at the end of the storm, when
/// no later request comes to set it going; a mount left registered for nothing would not
/// answer afterwards.
#[test]
fn every_waiting_request_is_served_through_a_storm_of_readers() {
    let users = [NOBODY, NOBODY - 1];
    let Some((env, mounts)) = users_faultfs(4, 2, &users, 3, "slow_ms=30,threads=2") else {
        return;
    };
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let mut state = seed;
    let mut next = move |below: u64| {
        // xorshift64
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % below
    };
    let mut stuck = 0;
    // Four storms: a lost wake-up shows at a storm's end.
    for _ in 0..4 {
        let mut readers = Vec::new();
        for _ in 0..64 {
            let (uid, mnt) = &mounts[next(mounts.len() as u64) as usize];
            let reader = fshost_tests::direct_read(&mnt.join("data"), Some(*uid));
            let kill_after = (next(4) == 0).then(|| Duration::from_millis(next(60)));
            readers.push((reader, kill_after, std::time::Instant::now()));
            std::thread::sleep(Duration::from_millis(next(10)));
            for (reader, kill_after, started) in &mut readers {
                if kill_after.is_some_and(|after| started.elapsed() >= after) {
                    let _ = reader.kill();
                    *kill_after = Some(Duration::ZERO);
                }
            }
        }
        for (reader, kill_after, _) in &mut readers {
            if kill_after.is_some() {
                let _ = reader.kill();
                let _ = reader.wait();
            } else if !fshost_tests::wait_with_deadline(reader, Duration::from_secs(20))
                .is_some_and(|status| status.success())
            {
                stuck += 1;
            }
        }
    }
    // Every mount still answers, one read each at a time.
    let late: Vec<String> = mounts
        .iter()
        .filter_map(|(uid, mnt)| {
            let mut reader = fshost_tests::direct_read(&mnt.join("data"), Some(*uid));
            let served = fshost_tests::wait_with_deadline(&mut reader, Duration::from_secs(5))
                .is_some_and(|status| status.success());
            (!served).then(|| mnt.display().to_string())
        })
        .collect();
    for (_, mnt) in &mounts {
        env.ctl(&["unmount", path_str(mnt)]).ok();
    }
    assert_eq!(stuck, 0, "readers not served (seed {seed})");
    assert!(
        late.is_empty(),
        "mounts that no longer answer: {late:?} (seed {seed})"
    );
}

#[test]
fn a_user_may_not_ask_for_io_uring() {
    let Some(env) = user_env("") else { return };
    let mine = user_dir(&env, "mine");
    let (code, stderr) = ctl_as_nobody(&env, &["mount", "memfs", path_str(&mine), "-o", "uring"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("user 65534 may not use -o uring") && stderr.contains("mount without it"),
        "{stderr}"
    );
    let (code, stderr) = ctl_as_nobody(&env, &["mount", "memfs", path_str(&mine)]);
    assert_eq!(code, 0, "{stderr}");
    env.ctl(&["unmount", path_str(&mine)]).ok();
}
