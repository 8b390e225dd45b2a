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
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserPolicy {
    /// Plugins other users may mount, on directories they own (fusermount's rule).
    #[serde(default)]
    pub mount_plugins: Vec<String>,
    /// Whether their mounts may use `-o allow_other`.
    #[serde(default)]
    pub allow_other: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Connections served at once; more are answered with `busy` and closed.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Requests one connection may send per second before it is slowed down.
    #[serde(default = "default_requests_per_second")]
    pub requests_per_second: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: default_max_connections(),
            requests_per_second: default_requests_per_second(),
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

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {}: {message}", .path.display())]
    Invalid { path: PathBuf, message: String },
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
        Config::parse(&text).map_err(|message| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parses TOML text; the error names the line and the key (toml's message does both).
    pub fn parse(text: &str) -> Result<Config, String> {
        let config: Config =
            toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        self.socket_mode_bits()?;
        if self.limits.max_connections == 0 || self.limits.requests_per_second == 0 {
            return Err("limits must be at least 1".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for entry in &self.mounts {
            if !entry.mountpoint.is_absolute() {
                return Err(format!(
                    "[[mount]] mountpoint {} must be an absolute path",
                    entry.mountpoint.display()
                ));
            }
            if !seen.insert(&entry.mountpoint) {
                return Err(format!(
                    "[[mount]] mountpoint {} appears twice",
                    entry.mountpoint.display()
                ));
            }
        }
        Ok(())
    }

    pub fn socket_mode_bits(&self) -> Result<u32, String> {
        u32::from_str_radix(self.socket_mode.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                format!(
                    "socket_mode {:?} is not an octal mode like \"0660\"",
                    self.socket_mode
                )
            })
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
        let err = Config::parse("preload = []\nbogus = 1\n").unwrap_err();
        assert!(err.contains("line 2"), "{err}");
        assert!(err.contains("bogus"), "{err}");
        let err = Config::parse("[[mount]]\nplugin = \"m\"\nmountpoint = \"/x\"\nopts = {}\n")
            .unwrap_err();
        assert!(err.contains("line 4") && err.contains("opts"), "{err}");
    }

    #[test]
    fn invalid_values_are_errors() {
        assert!(Config::parse("socket_mode = \"rw\"")
            .unwrap_err()
            .contains("octal"));
        let twice = "[[mount]]\nplugin=\"a\"\nmountpoint=\"/x\"\n[[mount]]\nplugin=\"b\"\nmountpoint=\"/x\"\n";
        assert!(Config::parse(twice).unwrap_err().contains("appears twice"));
        let relative = "[[mount]]\nplugin=\"a\"\nmountpoint=\"x\"\n";
        assert!(Config::parse(relative).unwrap_err().contains("absolute"));
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
