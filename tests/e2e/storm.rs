//! The race storm: many clients hammer one daemon with load / mount / unmount / unload /
//! upgrade / list through the real socket, and every answer and every snapshot must be
//! consistent.
//!
//! Seeded: set FSHOST_STORM_SEED to replay a run (the seed is printed either way).
//! FSHOST_STORM_CLIENTS and FSHOST_STORM_OPS change the size (defaults 64 × 150).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use fshost_tests::{eventually, fuse_available, Env, COMMAND_TIMEOUT};

const PLUGINS: [&str; 3] = ["memfs", "hellofs", "faultfs"];
const MOUNT_POINTS: usize = 8;

/// A persistent connection speaking the JSON-lines protocol.
struct Client {
    reader: BufReader<UnixStream>,
}

impl Client {
    fn connect(socket: &Path) -> Client {
        let stream = UnixStream::connect(socket).expect("connect");
        stream.set_read_timeout(Some(COMMAND_TIMEOUT)).unwrap();
        Client {
            reader: BufReader::new(stream),
        }
    }

    fn call(&mut self, request: &Value) -> Value {
        let mut line = request.to_string();
        line.push('\n');
        self.reader
            .get_mut()
            .write_all(line.as_bytes())
            .expect("send");
        let mut answer = String::new();
        self.reader.read_line(&mut answer).expect("answer");
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("bad answer {answer:?}: {e}"))
    }
}

/// xorshift64*: small, seedable, good enough to pick operations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Checks one `list` snapshot (taken under the daemon's lock): only live plugins have
/// mounts, and no mount point is counted twice.
fn check_snapshot(list: &Value) -> Result<(), String> {
    let mut seen = BTreeSet::new();
    for plugin in list["result"]["plugins"]
        .as_array()
        .ok_or("no plugins array")?
    {
        let state = plugin["state"].as_str().unwrap_or_default();
        let mounts = plugin["mounts"].as_array().ok_or("no mounts array")?;
        if state != "live" && !plugin["upgrading"].is_null() {
            return Err(format!(
                "plugin in state {state} is being upgraded: {plugin}"
            ));
        }
        if state != "live" && !mounts.is_empty() {
            return Err(format!("plugin in state {state} has mounts: {plugin}"));
        }
        for m in mounts {
            if !seen.insert(m.as_str().unwrap_or_default().to_string()) {
                return Err(format!("mount point {m} counted twice"));
            }
        }
    }
    Ok(())
}

/// The daemon's mounts (path → plugin) as `mounts` reports them.
fn daemon_mounts(client: &mut Client) -> BTreeMap<PathBuf, String> {
    let answer = client.call(&json!({"op": "mounts"}));
    answer["result"]["mounts"]
        .as_array()
        .expect("mounts array")
        .iter()
        .map(|m| {
            (
                PathBuf::from(m["mountpoint"].as_str().unwrap()),
                m["plugin"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The kernel's fshost mounts below `dir` (path → plugin, from the fstype).
fn kernel_mounts(dir: &Path) -> BTreeMap<PathBuf, String> {
    fshost_tests::kernel_mounts()
        .into_iter()
        .filter(|m| m.mountpoint.starts_with(dir))
        .filter_map(|m| {
            let plugin = m.fstype.strip_prefix("fuse.fshost-")?.to_string();
            Some((m.mountpoint, plugin))
        })
        .collect()
}

/// Threads of the daemon that serve mounts (mount threads, plugins' pool workers and the
/// threads that report a closed pool's last mount).
fn mount_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .filter(|comm| {
                    ["mount:", "serve:", "ended:"]
                        .iter()
                        .any(|p| comm.starts_with(p))
                })
                .count()
        })
        .unwrap_or(0)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[derive(Default)]
struct Tally {
    /// (op, outcome) → count; outcome is "ok" or the error code.
    outcomes: BTreeMap<(String, String), u64>,
    violations: Vec<String>,
}

fn one_client(env: &Env, seed: u64, ops: u64, mount_points: &[PathBuf], tally: &Mutex<Tally>) {
    let mut rng = Rng(seed | 1);
    let mut client = Client::connect(&env.socket);
    let mut local: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut violations = Vec::new();
    for _ in 0..ops {
        let plugin = PLUGINS[rng.below(PLUGINS.len())];
        let mount_point = mount_points[rng.below(mount_points.len())]
            .display()
            .to_string();
        let (op, request) = match rng.below(100) {
            // Fewer mounts than unmounts keeps plugins idle often enough for unloads.
            0..=11 => ("list", json!({"op": "list"})),
            12..=26 => ("load", json!({"op": "load", "path": plugin})),
            27..=44 => ("unload", json!({"op": "unload", "name": plugin})),
            45..=62 => (
                "mount",
                json!({"op": "mount", "plugin": plugin, "mountpoint": mount_point}),
            ),
            63..=72 => ("upgrade", json!({"op": "upgrade", "name": plugin})),
            _ => (
                "unmount",
                json!({"op": "unmount", "mountpoint": mount_point}),
            ),
        };
        let answer = client.call(&request);
        let outcome = if answer["ok"] == true {
            "ok".to_string()
        } else {
            answer["error"]["code"].as_str().unwrap_or("?").to_string()
        };
        let allowed = ["ok", "busy", "not-found", "already-loaded"];
        if !allowed.contains(&outcome.as_str()) {
            violations.push(format!("{request} → unexpected {answer}"));
        }
        match (op, outcome.as_str()) {
            ("list", "ok") => {
                if let Err(v) = check_snapshot(&answer) {
                    violations.push(v);
                }
            }
            ("mount", "ok") if answer["result"]["mount"]["plugin"] != plugin => {
                violations.push(format!("mount answered for the wrong plugin: {answer}"));
            }
            ("unload", "busy") => {
                let message = answer["error"]["message"].as_str().unwrap_or_default();
                if message.contains("mount")
                    && !message.contains(&env.dir.path().display().to_string())
                {
                    violations.push(format!("busy unload does not list mount points: {message}"));
                }
            }
            _ => {}
        }
        *local.entry((op.to_string(), outcome)).or_default() += 1;
    }
    let mut tally = tally.lock().unwrap();
    for (key, n) in local {
        *tally.outcomes.entry(key).or_default() += n;
    }
    tally.violations.extend(violations);
}

/// Unmounts and unloads everything, through the socket.
fn tear_down(env: &Env) {
    let mut client = Client::connect(&env.socket);
    for path in daemon_mounts(&mut client).keys() {
        let answer = client.call(&json!({"op": "unmount", "mountpoint": path}));
        assert_eq!(answer["ok"], true, "{answer}");
    }
    for plugin in PLUGINS {
        let answer = client.call(&json!({"op": "unload", "name": plugin}));
        assert!(
            answer["ok"] == true || answer["error"]["code"] == "not-found",
            "{answer}"
        );
    }
}

#[test]
fn race_storm_keeps_every_invariant() {
    if !fuse_available() {
        return;
    }
    let seed = env_number(
        "FSHOST_STORM_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    let clients = env_number("FSHOST_STORM_CLIENTS", 64);
    let ops = env_number("FSHOST_STORM_OPS", 150);
    eprintln!("race storm: seed {seed} (replay with FSHOST_STORM_SEED={seed}), {clients} clients × {ops} ops");
    let env = Env::start();
    let mount_points: Vec<PathBuf> = (0..MOUNT_POINTS)
        .map(|i| env.mountpoint(&format!("m{i}")))
        .collect();
    let pid = env.pid();
    let mut fds_after_round = Vec::new();

    for round in 0..2 {
        let tally = Mutex::new(Tally::default());
        let started = Instant::now();
        std::thread::scope(|scope| {
            for c in 0..clients {
                let (env, mount_points, tally) = (&env, &mount_points, &tally);
                let client_seed =
                    seed ^ (round * 1_000_003 + c).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                scope.spawn(move || one_client(env, client_seed, ops, mount_points, tally));
            }
        });
        let elapsed = started.elapsed();
        let tally = tally.into_inner().unwrap();
        let total: u64 = tally.outcomes.values().sum();
        eprintln!("round {round}: {total} operations in {elapsed:?}");
        for ((op, outcome), n) in &tally.outcomes {
            eprintln!("  {op:<8} {outcome:<15} {n}");
        }
        assert!(
            tally.violations.is_empty(),
            "violations (seed {seed}): {:#?}",
            tally.violations
        );
        assert_eq!(total, clients * ops);

        // Quiescent: the daemon's view equals the kernel's, and counts add up.
        let mut client = Client::connect(&env.socket);
        let daemon = daemon_mounts(&mut client);
        assert_eq!(
            daemon,
            kernel_mounts(env.dir.path()),
            "daemon and kernel disagree (seed {seed})"
        );
        let list = client.call(&json!({"op": "list"}));
        check_snapshot(&list).unwrap();
        let counted: usize = list["result"]["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["mounts"].as_array().unwrap().len())
            .sum();
        assert_eq!(counted, daemon.len());
        drop(client);

        tear_down(&env);
        assert!(env.plugins().is_empty(), "plugins left after tear-down");
        assert!(
            kernel_mounts(env.dir.path()).is_empty(),
            "kernel mounts left"
        );
        assert!(
            eventually(Duration::from_secs(5), || mount_threads(pid) == 0),
            "mount or FUSE threads left: {}",
            mount_threads(pid)
        );
        // Connections close asynchronously; wait for the fd count to settle.
        let mut last = open_fds(pid);
        eventually(Duration::from_secs(5), || {
            let now = open_fds(pid);
            let settled = now == last;
            last = now;
            settled && fds_after_round.first().is_none_or(|first| now <= *first)
        });
        fds_after_round.push(open_fds(pid));
    }
    assert!(
        fds_after_round[1] <= fds_after_round[0],
        "file descriptors grew across rounds: {fds_after_round:?}"
    );
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(
        !maps.contains("/memfd:fshost-"),
        "a plugin copy is still mapped:\n{maps}"
    );
}
