//! Shared setup for the end-to-end tests: each test gets its own directory, socket and
//! daemon, and everything it mounted is detached when it ends, passed or failed.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub mod systemd;

/// Held while a daemon starts (it detaches every dead fshost mount it finds) and by a test
/// that makes dead mounts on purpose until its own daemon has cleaned them, so that no
/// other test's daemon cleans them first.
pub static DAEMON_START: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Upper bound for any one command a test runs.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Where cargo put the binaries and plugins of this build (`target/<profile>`).
pub fn build_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current test binary");
    // target/<profile>/deps/e2e-<hash>
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// Path of a built artifact, or a clear failure telling how to build it.
pub fn artifact(name: &str) -> PathBuf {
    let path = build_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `tests/run` (it builds the binaries and plugins before testing)",
        path.display()
    );
    path
}

/// Whether a tool this test needs is installed. In CI (FSHOST_REQUIRE_FUSE=1) a missing
/// tool fails the test; elsewhere the test says SKIPPED.
pub fn tool_available(tool: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()));
    if found {
        return true;
    }
    if std::env::var("FSHOST_REQUIRE_FUSE").as_deref() == Ok("1") {
        panic!("{tool} is not installed; .ci/run installs it");
    }
    eprintln!("SKIPPED: {tool} is not installed");
    false
}

/// Whether real FUSE mounts can be made here. With FSHOST_REQUIRE_FUSE=1 (CI) a missing
/// /dev/fuse or missing root fails the test instead of skipping it.
pub fn fuse_available() -> bool {
    let root = nix::unistd::geteuid().is_root();
    let dev = Path::new("/dev/fuse").exists();
    if root && dev {
        return true;
    }
    let why = format!("root: {root}, /dev/fuse: {dev}");
    if std::env::var("FSHOST_REQUIRE_FUSE").as_deref() == Ok("1") {
        panic!("FSHOST_REQUIRE_FUSE=1 but real FUSE mounts are not possible here ({why})");
    }
    eprintln!(
        "SKIPPED: needs root and /dev/fuse ({why}); set FSHOST_REQUIRE_FUSE=1 to fail instead"
    );
    false
}

/// Runs a command with a deadline; kills it and fails the test if it takes longer.
pub fn run(mut command: Command) -> Output {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // A program the test has just copied can be "busy" for a moment: a process another
    // test thread forked while the copy was open for writing holds that descriptor until
    // it execs (ETXTBSY). Try again then.
    let mut tries = 0;
    let mut child = loop {
        match command.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 100 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            spawned => break spawned.unwrap_or_else(|e| panic!("cannot run {command:?}: {e}")),
        }
    };
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let status = wait_with_deadline(&mut child, COMMAND_TIMEOUT)
        .unwrap_or_else(|| panic!("{command:?} did not finish within {COMMAND_TIMEOUT:?}"));
    Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    }
}

/// `program` run as uid/gid 65534 with no other groups (through setpriv).
pub fn as_nobody(program: impl AsRef<std::ffi::OsStr>) -> Command {
    as_user(65534, program)
}

/// `program` as uid `uid` and the group of that number, with no supplementary groups
/// (through setpriv).
pub fn as_user(uid: u32, program: impl AsRef<std::ffi::OsStr>) -> Command {
    as_user_in(uid, "--clear-groups", program)
}

/// Like [`as_user`], with setpriv's `groups` option instead (`--groups=100`).
pub fn as_user_in(uid: u32, groups: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new("setpriv");
    command
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .arg(groups)
        .arg(program);
    command
}

/// Copies the program `from` to `to` (a new file) for another user to run. Through `cp`, so
/// that this process never holds the copy open for writing: a program another test starts
/// meanwhile would inherit that descriptor until its exec, and running the copy would fail
/// with "Text file busy" (seen).
pub fn copy_program(from: &Path, to: &Path) {
    let done = run({
        let mut cp = Command::new("cp");
        cp.arg(from).arg(to);
        cp
    });
    assert!(
        done.status.success(),
        "cp {} {}",
        from.display(),
        to.display()
    );
}

/// `sh -c script` as uid/gid 65534 ([`as_nobody`]), `file` as `$1`.
pub fn nobody_sh(script: &str, file: &Path) -> Command {
    let mut sh = as_nobody("sh");
    sh.args(["-c", script, "sh"]).arg(file);
    sh
}

/// A one-page direct read of `file` (no page cache: a FUSE request of its own) by `dd`, in
/// a process of its own, as `user` if given (through [`as_user`]).
pub fn direct_read(file: &Path, user: Option<u32>) -> Child {
    let mut command = match user {
        Some(uid) => as_user(uid, "dd"),
        None => Command::new("dd"),
    };
    command
        .arg(format!("if={}", file.display()))
        .args(["iflag=direct", "bs=4096", "count=1", "status=none"])
        .stdout(Stdio::null())
        .spawn()
        .expect("start dd")
}

/// While `readers` (slow reads started at `started`) wait in a plugin, a read of
/// `bystander` must take less than `quick`; then every reader must succeed. Returns how long
/// the readers took in all.
pub fn slow_reads_beside(
    started: Instant,
    mut readers: Vec<Child>,
    bystander: &Path,
    quick: Duration,
) -> Duration {
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let text = std::fs::read_to_string(bystander).expect("the bystander's read");
    assert!(!text.is_empty());
    let took = t.elapsed();
    assert!(took < quick, "{} waited {took:?}", bystander.display());
    for reader in &mut readers {
        let status = wait_with_deadline(reader, Duration::from_secs(20)).expect("a reader ended");
        assert!(status.success());
    }
    started.elapsed()
}

/// Waits for a child; kills it and returns None after `timeout`.
pub fn wait_with_deadline(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The `fuse` module's switch for FUSE over io_uring (Linux 6.14+).
pub const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

/// Sets a kernel knob (a sysfs or procfs file) and puts the old value back when dropped,
/// also when a test fails; `None` if the knob is missing or cannot be written.
pub struct Knob {
    path: &'static str,
    old: String,
}

impl Knob {
    pub fn set(path: &'static str, value: &str) -> Option<Knob> {
        let old = std::fs::read_to_string(path).ok()?;
        std::fs::write(path, value).ok()?;
        Some(Knob {
            path,
            old: old.trim().to_string(),
        })
    }
}

impl Drop for Knob {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path, &self.old);
    }
}

/// Polls `condition` until it holds or `timeout` passes; returns whether it held.
pub fn eventually(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Result of one `fshostctl` run.
#[derive(Debug)]
pub struct Ctl {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Ctl {
    /// Fails the test unless the command succeeded.
    #[track_caller]
    pub fn ok(self) -> Self {
        assert_eq!(self.code, 0, "fshostctl failed: {self:?}");
        self
    }

    /// The `result` object of a `--json` run.
    pub fn json(&self) -> serde_json::Value {
        let response: serde_json::Value = serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"));
        response["result"].clone()
    }
}

/// Kernel mount points of type `fuse.fshost*` below `dir`, from /proc/self/mountinfo.
pub fn fshost_mounts_below(dir: &Path) -> Vec<PathBuf> {
    kernel_mounts()
        .into_iter()
        .filter(|m| m.fstype.starts_with("fuse.fshost") && m.mountpoint.starts_with(dir))
        .map(|m| m.mountpoint)
        .collect()
}

/// The kernel's mounts, as the daemon reads them (`/proc/self/mountinfo`).
pub fn kernel_mounts() -> Vec<fshostd::KernelMount> {
    fshostd::kernel_mounts().unwrap_or_default()
}

/// Detaches every fshost mount below a directory when dropped, so that a test that mounts
/// outside its `Env` directory leaves nothing behind even when it fails. Declare it after
/// the directory (drop order: guard first).
pub struct DetachOnDrop<'a>(pub &'a Path);

impl Drop for DetachOnDrop<'_> {
    fn drop(&mut self) {
        for mountpoint in fshost_mounts_below(self.0) {
            let _ = nix::mount::umount2(&mountpoint, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// Kills and reaps a child process when dropped (a daemon a test started by hand).
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One test's world: a temporary directory, a socket in it, and a running daemon.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    daemon: Option<Child>,
    /// After a daemon upgrade: the process that serves now (not our child: the daemon we
    /// started started it and exited).
    successor: Option<u32>,
    log: PathBuf,
}

impl Env {
    /// Starts a daemon on a fresh socket, with the build directory as its plugin directory.
    pub fn start() -> Env {
        Env::start_with(&[])
    }

    /// Like [`Env::start`], with extra environment variables for the daemon.
    pub fn start_with(vars: &[(&str, &str)]) -> Env {
        Env::start_configured(vars, "")
    }

    /// Like [`Env::start`], with environment variables and the text of the daemon's config
    /// file (every daemon gets its own config file, never the machine's).
    pub fn start_configured(vars: &[(&str, &str)], config: &str) -> Env {
        let mut env = Env::prepared(config);
        env.spawn_daemon(vars);
        env
    }

    /// A fresh directory with the config file, the socket's and the log's paths; no daemon.
    fn prepared(config: &str) -> Env {
        let dir = tempfile::Builder::new()
            .prefix("fshost-e2e-")
            .tempdir()
            .expect("temporary directory");
        std::fs::write(dir.path().join("fshostd.toml"), config).expect("config file");
        Env {
            socket: dir.path().join("fshostd.sock"),
            daemon: None,
            successor: None,
            log: dir.path().join("fshostd.log"),
            dir,
        }
    }

    /// Like [`Env::start_configured`], with the daemon started inside the cgroup whose
    /// `cgroup.procs` file is `procs` (it joins before it starts, so that it sees the
    /// cgroup's limits from its first thread on).
    pub fn start_in_cgroup(procs: &Path, config: &str) -> Env {
        let mut env = Env::prepared(config);
        let mut shell = Command::new("sh");
        shell
            .arg("-c")
            .arg(format!(
                "echo $$ > '{}' && exec \"$0\" \"$@\"",
                procs.display()
            ))
            .arg(artifact("fshostd"));
        let _starting = DAEMON_START.lock().unwrap_or_else(|e| e.into_inner());
        env.spawn_daemon_as(shell, &[]);
        env
    }

    fn spawn_daemon(&mut self, vars: &[(&str, &str)]) {
        let _starting = DAEMON_START.lock().unwrap_or_else(|e| e.into_inner());
        self.spawn_daemon_locked(vars);
    }

    fn spawn_daemon_locked(&mut self, vars: &[(&str, &str)]) {
        self.spawn_daemon_as(Command::new(artifact("fshostd")), vars);
    }

    fn spawn_daemon_as(&mut self, mut command: Command, vars: &[(&str, &str)]) {
        let log = std::fs::File::create(&self.log).expect("log file");
        let child = command
            .arg("--socket")
            .arg(&self.socket)
            .arg("--config")
            .arg(self.dir.path().join("fshostd.toml"))
            // Plugins are trusted from the build and from this test's own directory.
            .arg("--plugin-dir")
            .arg(build_dir())
            .arg("--plugin-dir")
            .arg(self.dir.path())
            .env("RUST_LOG", "debug,fuser=warn")
            .envs(vars.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start fshostd");
        self.daemon = Some(child);
        // Ready means answering: the daemon serves only after its config is applied.
        let up = eventually(Duration::from_secs(10), || {
            let Ok(mut stream) = UnixStream::connect(&self.socket) else {
                return false;
            };
            let mut line = String::new();
            stream.write_all(b"{\"op\":\"status\"}\n").is_ok()
                && BufReader::new(stream).read_line(&mut line).is_ok()
                && line.contains("\"ok\":true")
        });
        if !up {
            // Connections whose server is gone would make every close of a file on them
            // wait forever (FUSE flushes on close): fail them all before failing.
            abort_fuse_below(self.dir.path());
            panic!("fshostd did not start answering: {}", self.log_text());
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Makes a fresh directory to mount on.
    pub fn mountpoint(&self, name: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::create_dir_all(&path).expect("mount point");
        path
    }

    pub fn pid(&self) -> u32 {
        self.successor
            .unwrap_or_else(|| self.daemon.as_ref().expect("daemon running").id())
    }

    /// The pid `status` reports.
    pub fn status_pid(&self) -> u32 {
        let status = self.ctl(&["--json", "status"]).ok().json();
        status["status"]["pid"].as_u64().expect("a pid") as u32
    }

    /// Runs `fshostctl daemon-upgrade ARGS`; when it succeeds, the daemon this `Env` knows
    /// is the new process from then on (the old one is reaped).
    pub fn daemon_upgrade(&mut self, args: &[&str]) -> Ctl {
        let old = self.pid();
        let mut all = vec!["--json", "daemon-upgrade"];
        all.extend(args);
        let out = self.ctl(&all);
        if out.code == 0 {
            let new = out.json()["upgrade"]["new_pid"].as_u64().expect("new pid") as u32;
            self.adopt(old, new);
        }
        out
    }

    /// The daemon `old` handed over to `new`: wait for `old` to be gone, then know `new`.
    pub fn adopt(&mut self, old: u32, new: u32) {
        match self.daemon.take() {
            Some(mut child) if child.id() == old => {
                let status = wait_with_deadline(&mut child, COMMAND_TIMEOUT);
                assert!(status.is_some(), "the old fshostd {old} did not exit");
            }
            other => {
                self.daemon = other;
                let gone = eventually(COMMAND_TIMEOUT, || !alive(old));
                assert!(gone, "the old fshostd {old} did not exit");
            }
        }
        self.successor = Some(new);
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `fshostctl` against this daemon.
    pub fn ctl(&self, args: &[&str]) -> Ctl {
        let mut command = Command::new(artifact("fshostctl"));
        command.args(args).env("FSHOST_SOCKET", &self.socket);
        let out = run(command);
        Ctl {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Starts `fshostctl` without waiting for it (the caller kills or waits with a deadline).
    pub fn ctl_child(&self, args: &[&str]) -> Child {
        Command::new(artifact("fshostctl"))
            .args(args)
            .env("FSHOST_SOCKET", &self.socket)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start fshostctl")
    }

    /// The state of one plugin in `list`, if it is listed.
    pub fn state_of(&self, name: &str) -> Option<(String, usize)> {
        self.plugins()
            .into_iter()
            .find(|p| p.0 == name)
            .map(|p| (p.1, p.2))
    }

    /// Sends raw bytes on a new connection and returns the first answer line
    /// (empty if the daemon closed the connection without one).
    pub fn raw(&self, bytes: &[u8]) -> String {
        let mut stream = UnixStream::connect(&self.socket).expect("connect");
        stream.set_read_timeout(Some(COMMAND_TIMEOUT)).unwrap();
        // The daemon may close early (oversized request); a failed write is fine then.
        let _ = stream.write_all(bytes);
        let mut line = String::new();
        let _ = BufReader::new(stream).read_line(&mut line);
        line
    }

    /// `list --json` as (name, state, mounts) triples.
    pub fn plugins(&self) -> Vec<(String, String, usize)> {
        let result = self.ctl(&["--json", "list"]).ok().json();
        result["plugins"]
            .as_array()
            .expect("plugins array")
            .iter()
            .map(|p| {
                (
                    p["name"].as_str().unwrap_or_default().to_string(),
                    p["state"].as_str().unwrap_or_default().to_string(),
                    p["mounts"].as_array().map_or(0, Vec::len),
                )
            })
            .collect()
    }

    /// Sends a signal to the daemon.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), signal)
            .expect("signal fshostd");
    }

    /// Replaces the daemon's config file (apply it with SIGHUP).
    pub fn write_config(&self, text: &str) {
        std::fs::write(self.path("fshostd.toml"), text).expect("config file");
    }

    /// Sends SIGTERM and waits for the daemon to exit.
    pub fn terminate(&mut self) -> ExitStatus {
        assert!(
            self.successor.is_none(),
            "after a daemon upgrade the daemon is not our child: use terminate_successor"
        );
        let mut child = self.daemon.take().expect("daemon running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("send SIGTERM");
        wait_with_deadline(&mut child, COMMAND_TIMEOUT).expect("fshostd exits after SIGTERM")
    }

    /// Sends SIGTERM to the daemon that took over in a daemon upgrade and waits until it
    /// is gone (its exit status is its parent's to read, not ours).
    pub fn terminate_successor(&mut self) {
        let pid = self.successor.take().expect("a daemon upgrade happened");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("send SIGTERM");
        let gone = eventually(COMMAND_TIMEOUT, || !alive(pid));
        assert!(gone, "fshostd {pid} did not exit after SIGTERM");
    }

    /// Kills the daemon with SIGKILL (its mounts stay, dead) and starts a new one on the
    /// same socket, holding [`DAEMON_START`] across both so that only the new daemon can
    /// find those dead mounts.
    pub fn crash_and_restart(&mut self) {
        let _starting = DAEMON_START.lock().unwrap_or_else(|e| e.into_inner());
        let mut child = self.daemon.take().expect("daemon running");
        child.kill().expect("SIGKILL fshostd");
        child.wait().expect("reap fshostd");
        let below = |m: &fshostd::KernelMount| {
            m.fstype.starts_with("fuse.fshost") && m.mountpoint.starts_with(self.dir.path())
        };
        for mount in kernel_mounts().into_iter().filter(below) {
            // statfs always reaches the (dead) FUSE daemon; stat may be served from cache.
            // The kernel answers only the owner of a mount without allow_other (root gets
            // zeroes for a user's mount), so only root's mounts are checked here.
            if mount.super_options.contains("user_id=0,") {
                let err = nix::sys::statfs::statfs(&mount.mountpoint).expect_err("a dead mount");
                assert_eq!(err, nix::Error::ENOTCONN, "{}", mount.mountpoint.display());
            }
        }
        std::fs::rename(&self.log, self.log.with_extension("crashed.log")).expect("keep old log");
        self.spawn_daemon_locked(&[]);
    }

    /// Kills the daemon with SIGKILL and starts a new one as systemd restarts a service
    /// that failed: with the descriptors `systemd` keeps (see [`systemd::FakeSystemd`]).
    pub fn crash_and_restart_under(
        &mut self,
        systemd: &systemd::FakeSystemd,
        vars: &[(&str, &str)],
    ) {
        self.crash_and_restart_under_after(systemd, vars, || {});
    }

    /// As [`Env::crash_and_restart_under`], running `meanwhile` while no fshostd runs.
    pub fn crash_and_restart_under_after(
        &mut self,
        systemd: &systemd::FakeSystemd,
        vars: &[(&str, &str)],
        meanwhile: impl FnOnce(),
    ) {
        let _starting = DAEMON_START.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pid) = self.successor.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            assert!(eventually(COMMAND_TIMEOUT, || !alive(pid)));
        }
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        meanwhile();
        std::fs::rename(&self.log, self.log.with_extension("crashed.log")).expect("keep old log");
        let command = systemd.restart_command(&artifact("fshostd"));
        self.spawn_daemon_as(command, vars);
        systemd.spawned();
    }

    /// The log of the daemon that crashed (see [`Env::crash_and_restart_under`]).
    pub fn crashed_log_text(&self) -> String {
        std::fs::read_to_string(self.log.with_extension("crashed.log")).unwrap_or_default()
    }

    /// Compiles a C plugin from `source` against the SDK header into this test's directory,
    /// with extra `-D` definitions.
    pub fn compile_c_plugin(&self, name: &str, source: &str, defines: &[&str]) -> PathBuf {
        let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fs-plugins/sdk/include");
        let c_file = self.path(&format!("{name}.c"));
        let so = self.path(&format!("lib{name}.so"));
        std::fs::write(&c_file, source).expect("write C source");
        let mut command = Command::new("cc");
        command
            .args(["-shared", "-fPIC", "-std=c11", "-Wall", "-Werror", "-o"])
            .arg(&so)
            .arg(&c_file)
            .arg("-I")
            .arg(include);
        for define in defines {
            command.arg(format!("-D{define}"));
        }
        let out = run(command);
        assert!(
            out.status.success(),
            "cc failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        so
    }
}

/// Stops a `workload` program (tests/src/bin/workload.rs: its stdin closes) and returns its
/// first report line; fails the test unless it ran more than `min_ops` rounds without an
/// error.
pub fn finish_workload(mut child: Child, what: &str, min_ops: u64) -> String {
    drop(child.stdin.take());
    wait_with_deadline(&mut child, COMMAND_TIMEOUT).expect("the workload ends");
    let mut report = String::new();
    child
        .stdout
        .take()
        .expect("the workload's stdout is piped")
        .read_to_string(&mut report)
        .expect("the workload's report");
    let first = report.lines().next().unwrap_or_default().to_string();
    assert!(first.ends_with(" errors=0"), "{what}: {report}");
    let ops: u64 = first
        .trim_start_matches("ops=")
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(ops > min_ops, "{what}: the workload hardly ran: {report}");
    first
}

/// Aborts the FUSE connection of every fshost mount below `dir` (fusectl's `abort`), so
/// that nothing of a failed test waits on a connection nobody serves.
pub fn abort_fuse_below(dir: &Path) {
    for mount in kernel_mounts() {
        if !mount.fstype.starts_with("fuse.fshost") || !mount.mountpoint.starts_with(dir) {
            continue;
        }
        let Some((major, minor)) = mount.device.split_once(':') else {
            continue;
        };
        let (Ok(major), Ok(minor)) = (major.parse::<u64>(), minor.parse::<u64>()) else {
            continue;
        };
        let dev = (major << 20) | minor;
        let _ = std::fs::write(format!("/sys/fs/fuse/connections/{dev}/abort"), b"1");
    }
}

/// Whether process `pid` exists (and is not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            let state = stat
                .rsplit(") ")
                .next()
                .and_then(|rest| rest.chars().next());
            !matches!(state, Some('Z') | Some('X') | None)
        })
        .unwrap_or(false)
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(pid) = self.successor.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            eventually(COMMAND_TIMEOUT, || !alive(pid));
        }
        // Whatever the test left mounted goes now, lazily, so a failed test never leaves a
        // mount behind (dead mounts of a killed daemon included).
        drop(DetachOnDrop(self.dir.path()));
        if std::thread::panicking() {
            eprintln!("---- fshostd log ----\n{}", self.log_text());
        }
    }
}

/// A POSIX ACL attribute value (`system.posix_acl_access`/`_default`), written out by hand
/// so that tests do not use the code they check: version 2, then (tag, perm, id) per entry.
pub fn acl_value(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut out = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&perm.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    out
}
