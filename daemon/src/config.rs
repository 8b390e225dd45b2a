//! The configuration file (`/etc/fshost/fshostd.toml`): parsing, validation, and the
//! difference between two versions that a reload applies. Pure: no I/O but reading the file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the daemon looks when `--config` is not given; a missing default file is fine.
pub const DEFAULT_PATH: &str = "/etc/fshost/fshostd.toml";

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Control socket (`--socket` wins).
    pub socket: Option<PathBuf>,
    /// Group that owns the socket and whose members may do everything.
    #[serde(default = "default_group")]
    pub group: String,
    /// Permission bits of the socket, in octal (`"0660"`); `"0666"` lets every local user
    /// connect, each request still being authorized from the caller's credentials.
    #[serde(default = "default_socket_mode")]
    pub socket_mode: String,
    /// Directories plugins may be loaded from (`--plugin-dir` adds to them).
    #[serde(default)]
    pub plugin_dirs: Vec<PathBuf>,
    /// Plugins loaded at start, in order (paths or bare names).
    #[serde(default)]
    pub preload: Vec<String>,
    /// Development mode: plugins may come from anywhere and be owned by anyone.
    #[serde(default)]
    pub dev: bool,
    /// What users who are neither root nor in `group` may do.
    #[serde(default)]
    pub users: UserPolicy,
    #[serde(default)]
    pub limits: Limits,
    /// Mounts made at start, after the preloads.
    #[serde(default, rename = "mount")]
    pub mounts: Vec<MountEntry>,
    /// Serve Prometheus metrics over HTTP at this address (`"127.0.0.1:9470"`); off when
    /// absent. Read at start only.
    #[serde(default)]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserPolicy {
    /// Plugins other users may mount, on directories they own (fusermount's rule).
    #[serde(default)]
    pub mount_plugins: Vec<String>,
    /// Whether their mounts may use `-o allow_other`.
    #[serde(default)]
    pub allow_other: bool,
    /// Mounts one such user may have at once.
    #[serde(default = "default_user_max_mounts")]
    pub max_mounts: usize,
    /// Most of its plugin's threads (`-o threads=N`: requests served at once) one of their
    /// mounts may take.
    #[serde(default = "default_user_max_threads")]
    pub max_threads_per_mount: usize,
    /// Threads of one plugin that all of one user's mounts may take at once: requests of
    /// their mounts past it wait, so that a user whose requests block in the plugin cannot
    /// stall everyone's mounts of it.
    #[serde(default = "default_user_max_threads_all")]
    pub max_threads: usize,
    /// Memory their mounts may hold together (`64M`, `1G`): the sum of the `size=` of
    /// one user's mounts. A user mount without `size=` gets `max_size / max_mounts`.
    #[serde(default = "default_user_max_size")]
    pub max_size: String,
}

impl UserPolicy {
    /// `max_size` in bytes (validated at parse time).
    pub fn max_size_bytes(&self) -> u64 {
        fshost_sdk::parse_size(&self.max_size).unwrap_or(0)
    }
}

impl Default for UserPolicy {
    fn default() -> Self {
        UserPolicy {
            mount_plugins: Vec::new(),
            allow_other: false,
            max_mounts: default_user_max_mounts(),
            max_threads_per_mount: default_user_max_threads(),
            max_threads: default_user_max_threads_all(),
            max_size: default_user_max_size(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Connections served at once; more are answered with `limit-reached` and closed.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Of those, how many only root and the admin group may use, so that no user can
    /// lock the administrators out.
    #[serde(default = "default_admin_reserved_connections")]
    pub admin_reserved_connections: usize,
    /// Connections one user (neither root nor in the group) may hold at once.
    #[serde(default = "default_max_connections_per_user")]
    pub max_connections_per_user: usize,
    /// A user's connection with no request for this long is closed (seconds); admins'
    /// connections may stay idle. A request that takes longer (a drain) is not idleness.
    #[serde(default = "default_idle_timeout_secs")]
    pub idle_timeout_secs: u64,
    /// Requests one connection may have sent ahead of their answers; past that the daemon
    /// stops reading it until it catches up (the client's writes then block).
    #[serde(default = "default_max_queued_requests")]
    pub max_queued_requests: usize,
    /// Requests one connection may send per second before it is slowed down.
    #[serde(default = "default_requests_per_second")]
    pub requests_per_second: u32,
    /// Threads all mounts together may use (the workers that serve them, and one for each
    /// mount being made); a mount that would need one more is refused. 0: as many as the
    /// system allows (memory maps, the pids cgroup, threads-max), read at start, less a
    /// reserve for the daemon. Read at start only.
    #[serde(default)]
    pub max_mount_threads: usize,
    /// Workers that serve one plugin's mounts, at most (however many mounts it has; a mount
    /// takes at most its `-o threads=N` of them at once). Read at start only.
    #[serde(default = "default_threads_per_plugin")]
    pub threads_per_plugin: usize,
}

fn default_threads_per_plugin() -> usize {
    crate::mount::pool::DEFAULT_THREADS_PER_PLUGIN
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: default_max_connections(),
            admin_reserved_connections: default_admin_reserved_connections(),
            max_connections_per_user: default_max_connections_per_user(),
            idle_timeout_secs: default_idle_timeout_secs(),
            max_queued_requests: default_max_queued_requests(),
            requests_per_second: default_requests_per_second(),
            max_mount_threads: 0,
            threads_per_plugin: default_threads_per_plugin(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountEntry {
    pub plugin: String,
    pub mountpoint: PathBuf,
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    #[serde(default)]
    pub read_only: bool,
}

fn default_group() -> String {
    "fshost".into()
}
fn default_socket_mode() -> String {
    "0660".into()
}
fn default_max_connections() -> usize {
    256
}
fn default_requests_per_second() -> u32 {
    1000
}
fn default_admin_reserved_connections() -> usize {
    16
}
fn default_max_connections_per_user() -> usize {
    16
}
fn default_idle_timeout_secs() -> u64 {
    60
}
fn default_max_queued_requests() -> usize {
    16
}
fn default_user_max_mounts() -> usize {
    16
}
fn default_user_max_threads() -> usize {
    2
}
fn default_user_max_threads_all() -> usize {
    crate::mount::pool::DEFAULT_USER_THREADS
}
fn default_user_max_size() -> String {
    "1G".into()
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {}: {source}", .path.display())]
    Invalid { path: PathBuf, source: Invalid },
}

/// What is wrong in a config file's text; names the one key at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// Not TOML, an unknown key or a wrong type: toml's message names the line and the key.
    #[error("{0}")]
    Syntax(String),
    #[error("socket_mode {0:?} is not an octal mode like \"0660\"")]
    SocketMode(String),
    #[error("[limits] {0} must be at least 1")]
    LimitZero(&'static str),
    #[error("[limits] admin_reserved_connections must be less than max_connections")]
    ReserveTooLarge,
    #[error("[users] max_size {0:?} is not a size like \"512M\" or \"1G\"")]
    MaxSize(String),
    #[error("[users] max_threads_per_mount must be 1 to 16, and max_threads at least 1")]
    MaxThreads,
    #[error("[[mount]] mountpoint {} must be an absolute path", .0.display())]
    RelativeMountpoint(PathBuf),
    #[error("[[mount]] mountpoint {} appears twice", .0.display())]
    DuplicateMountpoint(PathBuf),
}

impl Config {
    /// Reads and validates a config file. `required`: a missing file is an error (it was
    /// named on the command line) rather than an empty config.
    pub fn load(path: &Path, required: bool) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                return Ok(Config::parse("").expect("the empty config is valid"))
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        Config::parse(&text).map_err(|source| ConfigError::Invalid {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Parses TOML text; the error names the line and the key (toml's message does both).
    pub fn parse(text: &str) -> Result<Config, Invalid> {
        let config: Config = toml::from_str(text)
            .map_err(|e| Invalid::Syntax(e.to_string().trim_end().to_string()))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), Invalid> {
        self.socket_mode_bits()?;
        let limits = &self.limits;
        let counts = [
            ("max_connections", limits.max_connections as u64),
            (
                "max_connections_per_user",
                limits.max_connections_per_user as u64,
            ),
            ("max_queued_requests", limits.max_queued_requests as u64),
            ("requests_per_second", u64::from(limits.requests_per_second)),
            ("idle_timeout_secs", limits.idle_timeout_secs),
        ];
        if let Some((key, _)) = counts.iter().find(|(_, value)| *value == 0) {
            return Err(Invalid::LimitZero(key));
        }
        if limits.admin_reserved_connections >= limits.max_connections {
            return Err(Invalid::ReserveTooLarge);
        }
        if fshost_sdk::parse_size(&self.users.max_size).is_none() {
            return Err(Invalid::MaxSize(self.users.max_size.clone()));
        }
        if !(1..=16).contains(&self.users.max_threads_per_mount) || self.users.max_threads == 0 {
            return Err(Invalid::MaxThreads);
        }
        let mut seen = std::collections::BTreeSet::new();
        for entry in &self.mounts {
            if !entry.mountpoint.is_absolute() {
                return Err(Invalid::RelativeMountpoint(entry.mountpoint.clone()));
            }
            if !seen.insert(&entry.mountpoint) {
                return Err(Invalid::DuplicateMountpoint(entry.mountpoint.clone()));
            }
        }
        Ok(())
    }

    pub fn socket_mode_bits(&self) -> Result<u32, Invalid> {
        u32::from_str_radix(self.socket_mode.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| Invalid::SocketMode(self.socket_mode.clone()))
    }
}

/// What a reload changes: mounts to make and to remove, plugins to load and to unload.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub load: Vec<String>,
    pub unload: Vec<String>,
    pub mount: Vec<MountEntry>,
    pub unmount: Vec<PathBuf>,
}

/// The difference between the applied config and a new one. A mount entry that changed
/// (other plugin, options or mode) is removed and made again.
pub fn changes(old: &Config, new: &Config) -> Changes {
    let old_mounts: BTreeMap<&PathBuf, &MountEntry> =
        old.mounts.iter().map(|m| (&m.mountpoint, m)).collect();
    let new_mounts: BTreeMap<&PathBuf, &MountEntry> =
        new.mounts.iter().map(|m| (&m.mountpoint, m)).collect();
    Changes {
        load: new
            .preload
            .iter()
            .filter(|p| !old.preload.contains(p))
            .cloned()
            .collect(),
        unload: old
            .preload
            .iter()
            .filter(|p| !new.preload.contains(p))
            .cloned()
            .collect(),
        mount: new
            .mounts
            .iter()
            .filter(|m| old_mounts.get(&m.mountpoint) != Some(m))
            .cloned()
            .collect(),
        unmount: old
            .mounts
            .iter()
            .filter(|m| new_mounts.get(&m.mountpoint) != Some(m))
            .map(|m| m.mountpoint.clone())
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
socket = "/run/fshost/fshostd.sock"
plugin_dirs = ["/usr/lib/fshost/plugins"]
preload = ["memfs"]

[users]
mount_plugins = ["memfs"]

[[mount]]
plugin = "memfs"
mountpoint = "/srv/scratch"
options = { size = "64M" }
"#;

    #[test]
    fn example_parses_with_defaults() {
        let config = Config::parse(EXAMPLE).unwrap();
        assert_eq!(config.group, "fshost");
        assert_eq!(config.socket_mode_bits(), Ok(0o660));
        assert_eq!(config.mounts[0].options["size"], "64M");
        assert_eq!(config.limits, Limits::default());
        assert_eq!(config.users.mount_plugins, vec!["memfs"]);
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let text = include_str!("../../systemd/fshostd.toml");
        Config::parse(text).unwrap();
    }

    #[test]
    fn unknown_keys_are_errors_with_line_and_key() {
        let err = Config::parse("preload = []\nbogus = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2"), "{err}");
        assert!(err.contains("bogus"), "{err}");
        let err = Config::parse("[[mount]]\nplugin = \"m\"\nmountpoint = \"/x\"\nopts = {}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 4") && err.contains("opts"), "{err}");
    }

    #[test]
    fn invalid_values_are_errors() {
        assert!(Config::parse("socket_mode = \"rw\"")
            .unwrap_err()
            .to_string()
            .contains("octal"));
        let twice = "[[mount]]\nplugin=\"a\"\nmountpoint=\"/x\"\n[[mount]]\nplugin=\"b\"\nmountpoint=\"/x\"\n";
        assert!(Config::parse(twice)
            .unwrap_err()
            .to_string()
            .contains("appears twice"));
        assert_eq!(
            Config::parse("[limits]\nidle_timeout_secs = 0\n").unwrap_err(),
            Invalid::LimitZero("idle_timeout_secs")
        );
        assert_eq!(
            Config::parse("[limits]\nmax_connections = 8\nadmin_reserved_connections = 8\n")
                .unwrap_err(),
            Invalid::ReserveTooLarge
        );
        assert_eq!(
            Config::parse("[users]\nmax_size = \"lots\"\n").unwrap_err(),
            Invalid::MaxSize("lots".into())
        );
        let relative = "[[mount]]\nplugin=\"a\"\nmountpoint=\"x\"\n";
        assert!(Config::parse(relative)
            .unwrap_err()
            .to_string()
            .contains("absolute"));
    }

    #[test]
    fn reload_changes_only_what_differs() {
        let old = Config::parse(EXAMPLE).unwrap();
        let mut new = old.clone();
        assert_eq!(changes(&old, &new), Changes::default());
        new.preload.push("hellofs".into());
        new.mounts.push(MountEntry {
            plugin: "hellofs".into(),
            mountpoint: "/srv/hello".into(),
            options: BTreeMap::new(),
            read_only: true,
        });
        new.mounts[0].options.insert("size".into(), "1G".into());
        let c = changes(&old, &new);
        assert_eq!(c.load, vec!["hellofs"]);
        assert!(c.unload.is_empty());
        assert_eq!(c.unmount, vec![PathBuf::from("/srv/scratch")]);
        let made: Vec<&Path> = c.mount.iter().map(|m| m.mountpoint.as_path()).collect();
        assert_eq!(
            made,
            vec![Path::new("/srv/scratch"), Path::new("/srv/hello")]
        );
        let back = changes(&new, &old);
        assert_eq!(back.unload, vec!["hellofs"]);
        assert!(back.unmount.contains(&PathBuf::from("/srv/hello")));
    }
}
