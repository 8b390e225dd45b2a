//! Control-protocol types shared by `fshostd` and `fshostctl`: one JSON object per line each way.
//!
//! A request is tagged by `op`; a response is `{"ok":true,"result":{...}}` or
//! `{"ok":false,"error":{"code":"busy","message":"..."}}`. The error codes are a closed set
//! so that scripts can branch on them.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Default path of the daemon's control socket.
pub const DEFAULT_SOCKET: &str = "/run/fshost/fshostd.sock";

/// Environment variable that overrides the socket path for both binaries.
pub const SOCKET_ENV: &str = "FSHOST_SOCKET";

/// How long `unload --drain` waits by default, and at most.
pub const DEFAULT_DRAIN_SECS: u64 = 30;
/// How long an upgrade waits for requests in flight unless told otherwise (seconds).
pub const DEFAULT_UPGRADE_SECS: u64 = 5;
pub const MAX_DRAIN_SECS: u64 = 24 * 3600;

/// Longest request line the daemon accepts (bytes, newline excluded).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// One request from a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Open a plugin library and register it (Registering, then Live).
    Load {
        path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// Deregister a plugin and close its library; refused while it has mounts, unless
    /// `drain` is set: then new mounts are refused at once and the unload waits (up to
    /// `timeout_secs`) for the existing mounts to go; if they do not, the plugin is live again.
    Unload {
        name: String,
        #[serde(default)]
        drain: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_secs: Option<u64>,
    },
    /// Mount a Live plugin at an existing directory.
    Mount {
        plugin: String,
        mountpoint: String,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        options: BTreeMap<String, String>,
        #[serde(default)]
        read_only: bool,
    },
    /// Unmount a mount served by this daemon.
    Unmount {
        mountpoint: String,
        #[serde(default)]
        lazy: bool,
    },
    /// Replace a Live plugin's code with a new generation (from `path`, else the file it was
    /// loaded from) and move every mount of it over without unmounting: each mount is
    /// paused, its instance's state handed to an instance of the new generation, and
    /// resumed. Waits up to `timeout_secs` (default 5) for requests in flight; any failure
    /// leaves the old generation serving every mount.
    Upgrade {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_secs: Option<u64>,
    },
    /// Replace the running fshostd by a new process of `binary` (default: the installed
    /// path of the running one) without unmounting anything: every mount's FUSE connection,
    /// plugin state and the control socket are handed over. Waits up to `timeout_secs`
    /// (default 5) for requests in flight; any failure leaves this process serving. Only
    /// root may name another binary.
    DaemonUpgrade {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        binary: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_secs: Option<u64>,
    },
    /// What the mounts did: requests, errors, latency and bytes per mount and operation.
    /// `filter` keeps the mount at that mount point, or the mounts of that plugin.
    Stats {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        filter: Option<String>,
    },
    /// All plugins, like `lsmod`.
    List {},
    /// All mounts.
    Mounts {},
    /// One plugin in detail.
    Info { name: String },
    /// The daemon itself: version, uptime, counts.
    Status {},
}

/// One response to a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Reply>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

impl Response {
    pub fn success(result: Reply) -> Self {
        Response {
            ok: true,
            result: Some(result),
            error: None,
        }
    }

    pub fn failure(code: ErrorCode, message: impl Into<String>) -> Self {
        Response {
            ok: false,
            result: None,
            error: Some(ErrorBody {
                code,
                message: message.into(),
            }),
        }
    }
}

/// What a successful request returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Reply {
    Loaded {
        plugin: PluginInfo,
    },
    Unloaded {
        name: String,
        /// The library is still mapped after `dlclose` (see ARCHITECTURE.md, "unmap proof").
        still_mapped: bool,
    },
    Mounted {
        mount: MountInfo,
    },
    Unmounted {
        mountpoint: String,
        /// True when the mount was detached lazily and is released when its last file closes.
        detached: bool,
    },
    Upgraded {
        upgrade: UpgradeInfo,
    },
    DaemonUpgraded {
        upgrade: DaemonUpgradeInfo,
    },
    Stats {
        mounts: Vec<MountStats>,
    },
    Plugins {
        plugins: Vec<PluginInfo>,
    },
    Mounts {
        mounts: Vec<MountInfo>,
    },
    Info {
        plugin: PluginInfo,
    },
    Status {
        status: Status,
    },
}

/// What `status` reports about the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    pub uptime_secs: u64,
    pub socket: String,
    pub plugins: usize,
    pub mounts: usize,
    /// Names of tainted plugins.
    pub tainted: Vec<String>,
    /// Threads the mounts use, and the most they may (absent from older daemons).
    #[serde(default)]
    pub mount_threads: (usize, usize),
}

/// Life-cycle state of a plugin (the seed's state machine).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PluginState {
    Registering,
    Live,
    Deregistering,
    /// Only in `list`: unloaded, but its library is still mapped in the daemon because it
    /// left a thread or thread-local destructor behind. Never a registry state.
    Unloaded,
}

impl fmt::Display for PluginState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PluginState::Registering => "registering",
            PluginState::Live => "live",
            PluginState::Deregistering => "deregistering",
            PluginState::Unloaded => "unloaded (still mapped)",
        })
    }
}

/// A plugin as `list` and `info` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginInfo {
    pub name: String,
    pub state: PluginState,
    pub version: String,
    pub path: String,
    pub abi_version: u32,
    /// Mount points served by this plugin (pending ones included).
    pub mounts: Vec<String>,
    /// Seconds since the Unix epoch.
    pub loaded_at: u64,
    /// Why the plugin is tainted (it panicked), if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tainted: Option<String>,
    /// 1 when loaded; each upgrade adds one.
    #[serde(default = "first_generation")]
    pub generation: u32,
    /// The generation an upgrade is installing right now, if one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrading: Option<NextGeneration>,
}

fn first_generation() -> u32 {
    1
}

/// Upper bounds of the latency histogram's buckets, in microseconds (1 µs to 4 s,
/// doubling); one more bucket counts everything slower.
pub const LATENCY_BUCKETS_US: [u64; 23] = {
    let mut bounds = [0u64; 23];
    let mut i = 0;
    while i < bounds.len() {
        bounds[i] = 1 << i;
        i += 1;
    }
    bounds
};

/// What one mount did since it was made (through every generation of its plugin).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountStats {
    pub mountpoint: String,
    pub plugin: String,
    /// The plugin generation serving it now.
    pub generation: u32,
    pub tainted: bool,
    /// Seconds since it was mounted.
    pub age_secs: u64,
    /// Requests the plugin is serving right now.
    pub in_flight: u64,
    /// Requests of the connection the kernel waits on, queued or being served (fusectl's
    /// `N/waiting`), when it could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<u64>,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub passthrough_opens: u64,
    /// Per operation that was called at least once.
    pub ops: Vec<OpStats>,
    /// Requests and errors per plugin generation that served the mount (one entry until
    /// an upgrade; the counters above go on across upgrades).
    #[serde(default)]
    pub generations: Vec<GenerationStats>,
}

/// What one plugin generation served of one mount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationStats {
    pub generation: u32,
    pub requests: u64,
    pub errors: u64,
}

/// One operation of one mount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpStats {
    pub op: String,
    pub count: u64,
    /// Failed calls by errno name (`ENOENT`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub errors: BTreeMap<String, u64>,
    /// Total time the plugin took, in microseconds.
    pub sum_us: u64,
    /// Calls per latency bucket (`LATENCY_BUCKETS_US`, then slower), not cumulative.
    pub buckets: Vec<u64>,
}

impl OpStats {
    /// See [`quantile_us`].
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        quantile_us(&self.buckets, q)
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// The latency below which `q` (0.5, 0.99) of the calls counted in `buckets` (as
/// `OpStats::buckets`) finished, as the upper bound of its bucket, in microseconds; `None`
/// past the last bound or without calls.
pub fn quantile_us(buckets: &[u64], q: f64) -> Option<u64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let wanted = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, n) in buckets.iter().enumerate() {
        seen += n;
        if seen >= wanted {
            return LATENCY_BUCKETS_US.get(i).copied();
        }
    }
    None
}

/// The mounts' statistics in Prometheus's text exposition format (version 0.0.4):
/// `fshost_requests_total`, `fshost_request_errors_total`, `fshost_request_duration_seconds`
/// (a histogram), `fshost_read_bytes_total`, `fshost_written_bytes_total`,
/// `fshost_requests_in_flight`, `fshost_requests_waiting`, `fshost_mount_age_seconds`,
/// `fshost_plugin_generation`. Labels: `plugin`, `mountpoint`, and `op` and `errno` where
/// they apply; only operations that were called appear.
pub fn prometheus_text(mounts: &[MountStats]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let escape = |s: &str| {
        s.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    };
    // `plugin="…",mountpoint="…"`, then `,op="…"` for an operation's series.
    let labels = |m: &MountStats, op: Option<&OpStats>| {
        let mut labels = format!(
            "plugin=\"{}\",mountpoint=\"{}\"",
            escape(&m.plugin),
            escape(&m.mountpoint)
        );
        if let Some(op) = op {
            let _ = write!(labels, ",op=\"{}\"", op.op);
        }
        labels
    };
    let family = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    let ops = || {
        mounts
            .iter()
            .flat_map(|m| m.ops.iter().map(move |op| (labels(m, Some(op)), op)))
    };
    family(
        &mut out,
        "fshost_requests_total",
        "counter",
        "Requests the plugin served, by operation.",
    );
    for (labels, op) in ops() {
        let _ = writeln!(out, "fshost_requests_total{{{labels}}} {}", op.count);
    }
    family(
        &mut out,
        "fshost_generation_requests_total",
        "counter",
        "Requests each plugin generation served, all operations.",
    );
    for m in mounts {
        for g in &m.generations {
            let _ = writeln!(
                out,
                "fshost_generation_requests_total{{{},generation=\"{}\"}} {}",
                labels(m, None),
                g.generation,
                g.requests
            );
        }
    }
    family(
        &mut out,
        "fshost_request_errors_total",
        "counter",
        "Requests the plugin failed, by operation and errno.",
    );
    for (labels, op) in ops() {
        for (errno, n) in &op.errors {
            let _ = writeln!(
                out,
                "fshost_request_errors_total{{{labels},errno=\"{errno}\"}} {n}"
            );
        }
    }
    family(
        &mut out,
        "fshost_request_duration_seconds",
        "histogram",
        "How long the plugin took per request.",
    );
    for (labels, op) in ops() {
        let mut cumulative = 0;
        for (i, n) in op.buckets.iter().enumerate() {
            cumulative += n;
            let le = LATENCY_BUCKETS_US
                .get(i)
                .map_or_else(|| "+Inf".to_string(), |us| format!("{}", *us as f64 / 1e6));
            let _ = writeln!(
                out,
                "fshost_request_duration_seconds_bucket{{{labels},le=\"{le}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "fshost_request_duration_seconds_sum{{{labels}}} {}",
            op.sum_us as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "fshost_request_duration_seconds_count{{{labels}}} {cumulative}"
        );
    }
    /// A per-mount value: its name, type, help and how to read it.
    type PerMount = (
        &'static str,
        &'static str,
        &'static str,
        fn(&MountStats) -> Option<u64>,
    );
    let gauges: [PerMount; 6] = [
        (
            "fshost_read_bytes_total",
            "counter",
            "Bytes the plugin read.",
            |m| Some(m.bytes_read),
        ),
        (
            "fshost_written_bytes_total",
            "counter",
            "Bytes the plugin wrote.",
            |m| Some(m.bytes_written),
        ),
        (
            "fshost_requests_in_flight",
            "gauge",
            "Requests the plugin is serving now.",
            |m| Some(m.in_flight),
        ),
        (
            "fshost_requests_waiting",
            "gauge",
            "Requests the kernel has queued for the mount.",
            |m| m.waiting,
        ),
        (
            "fshost_mount_age_seconds",
            "gauge",
            "Seconds since the mount was made.",
            |m| Some(m.age_secs),
        ),
        (
            "fshost_plugin_generation",
            "gauge",
            "The plugin generation serving the mount.",
            |m| Some(m.generation.into()),
        ),
    ];
    for (name, kind, help, value) in gauges {
        family(&mut out, name, kind, help);
        for m in mounts {
            if let Some(v) = value(m) {
                let _ = writeln!(out, "{name}{{{}}} {v}", labels(m, None));
            }
        }
    }
    out
}

/// The generation an upgrade installs, while it does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NextGeneration {
    pub generation: u32,
    pub version: String,
    pub path: String,
}

/// What a daemon upgrade did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonUpgradeInfo {
    /// The process that served until now (it exits after this answer).
    pub old_pid: u32,
    /// The process that serves from now on.
    pub new_pid: u32,
    /// The binary it runs.
    pub binary: String,
    /// Plugins reloaded and mounts resumed by the new process.
    pub plugins: usize,
    pub mounts: Vec<String>,
    /// How long the mounts were paused in the old process before the new one took over,
    /// in microseconds (until the new process reported ready; it starts reading at once).
    pub pause_us: u64,
    /// Bytes of plugin state handed over, in all.
    pub state_bytes: u64,
}

/// What `upgrade` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeInfo {
    /// The plugin as it is now (the new generation).
    pub plugin: PluginInfo,
    /// The version the mounts ran before.
    pub from_version: String,
    /// The mounts that moved, all of them.
    pub mounts: Vec<String>,
    /// How long the mounts were paused (requests held back), in microseconds.
    pub pause_us: u64,
    /// Bytes of state handed over, in all.
    pub state_bytes: u64,
}

/// A mount as `mounts` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountInfo {
    pub mountpoint: String,
    pub plugin: String,
    /// Seconds since the Unix epoch.
    pub since: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub options: BTreeMap<String, String>,
    #[serde(default)]
    pub read_only: bool,
    /// Uid of the user who made the mount.
    #[serde(default)]
    pub owner_uid: u32,
    /// `read` calls the plugin served (reads through FUSE passthrough never reach it).
    #[serde(default)]
    pub plugin_reads: u64,
    #[serde(default)]
    pub plugin_writes: u64,
    /// Opens handed to the kernel as FUSE passthrough.
    #[serde(default)]
    pub passthrough_opens: u64,
    /// What carries the mount's requests: `/dev/fuse`, or `io_uring (…)` with `-o uring`
    /// (or why not). Absent from older daemons.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
}

/// Error payload of a failed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

/// The closed set of error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    Busy,
    NotFound,
    AlreadyLoaded,
    InvalidPlugin,
    PermissionDenied,
    BadRequest,
    Io,
    Timeout,
    Internal,
    /// A limit of the daemon's (`[limits]`, `[users]`) refused it: too many connections,
    /// mounts, threads or bytes for this caller. Retry after freeing some.
    LimitReached,
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The wire name is the display name, so logs and JSON agree.
        let name = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        f.write_str(&name)
    }
}

/// A request line that is not a request; says what is wrong in words a client author can
/// act on (serde_json's message names the field and the column).
#[derive(Debug)]
pub struct MalformedRequest(serde_json::Error);

impl fmt::Display for MalformedRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "malformed request: {} (expected one JSON object per line with an \"op\", see protocol/)",
            self.0
        )
    }
}

impl std::error::Error for MalformedRequest {}

/// Decodes one request line (without its newline). Never panics, whatever the input.
pub fn decode_request(line: &str) -> Result<Request, MalformedRequest> {
    serde_json::from_str(line).map_err(MalformedRequest)
}

/// Mount options as people write them after `-o`: `KEY[=VALUE][,...]`, in one or more
/// groups. A key without `=` gets the empty value (a flag); empty items are skipped.
pub fn parse_options<S: AsRef<str>>(groups: &[S]) -> BTreeMap<String, String> {
    groups
        .iter()
        .flat_map(|group| group.as_ref().split(','))
        .filter(|item| !item.is_empty())
        .map(|item| {
            let (key, value) = item.split_once('=').unwrap_or((item, ""));
            (key.to_string(), value.to_string())
        })
        .collect()
}

/// Encodes a value as one JSON line (with the trailing newline).
pub fn to_line<T: Serialize>(value: &T) -> String {
    // Serializing these plain types cannot fail: no maps with non-string keys, no floats.
    let mut line = serde_json::to_string(value).unwrap_or_else(|e| {
        format!(r#"{{"ok":false,"error":{{"code":"internal","message":"encode: {e}"}}}}"#)
    });
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_on_commas_and_equals() {
        let opts = parse_options(&["a=1,b", "c=x=y"]);
        assert_eq!(opts.get("a").map(String::as_str), Some("1"));
        assert_eq!(opts.get("b").map(String::as_str), Some(""));
        assert_eq!(opts.get("c").map(String::as_str), Some("x=y"));
    }

    #[test]
    fn request_wire_format_is_tagged_by_op() {
        let req: Request =
            serde_json::from_str(r#"{"op":"mount","plugin":"memfs","mountpoint":"/mnt/a"}"#)
                .unwrap();
        assert_eq!(
            req,
            Request::Mount {
                plugin: "memfs".into(),
                mountpoint: "/mnt/a".into(),
                options: BTreeMap::new(),
                read_only: false
            }
        );
        assert_eq!(to_line(&Request::List {}), "{\"op\":\"list\"}\n");
    }

    #[test]
    fn unknown_fields_and_ops_are_rejected() {
        assert!(serde_json::from_str::<Request>(r#"{"op":"list","x":1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"format-disk"}"#).is_err());
    }

    #[test]
    fn error_response_has_code_and_message() {
        let line = to_line(&Response::failure(ErrorCode::AlreadyLoaded, "plugin x"));
        assert_eq!(
            line,
            "{\"ok\":false,\"error\":{\"code\":\"already-loaded\",\"message\":\"plugin x\"}}\n"
        );
        assert_eq!(ErrorCode::NotFound.to_string(), "not-found");
    }
}
