//! The mount options fshostd handles itself (`-o threads=N`, `attr_timeout`, `keep_cache`,
//! `read_ahead_kb`, `writeback`, `nopassthrough`, `allow_other`, `nostats`, `uring`), parsed and checked; the rest go
//! to the plugin.

use std::collections::BTreeMap;

use super::{CachePolicy, MountError};

/// Mount options the daemon handles itself instead of passing them to the plugin.
pub const DAEMON_OPTIONS: [&str; 9] = [
    "allow_other",
    "attr_timeout",
    "keep_cache",
    "nopassthrough",
    "nostats",
    "read_ahead_kb",
    "threads",
    "uring",
    "writeback",
];

/// Requests served at once per mount unless `-o threads=N` says otherwise (see `SessionOptions`).
const DEFAULT_THREADS: usize = 2;

/// Kernel readahead per mount unless `-o read_ahead_kb=N` says otherwise: 1 MiB, the
/// largest request FUSE sends (max_pages 256), instead of the kernel's 128 KiB, so that a
/// sequential read costs one round trip per MiB instead of eight.
const DEFAULT_READ_AHEAD_KB: u32 = 1024;

/// How long the kernel may cache attributes and entries unless `-o attr_timeout=SECS`
/// says otherwise. Plugins that own their tree can keep it; a mirror of a directory that
/// others change (passthroughfs) may want 0.
const DEFAULT_ATTR_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// The mount options fshostd handles itself (`DAEMON_OPTIONS`), parsed.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub allow_other: bool,
    /// Requests of the mount served at once, at most (workers of its plugin's pool it may
    /// hold). Two by default: with one, a create on memfs took 290 µs instead of 100 (this
    /// VM); more than two did not help.
    pub threads: usize,
    pub read_ahead_kb: u32,
    pub cache: CachePolicy,
    /// Record every call in the mount's statistics (`-o nostats` turns it off: only for
    /// measuring what recording costs).
    pub record_stats: bool,
}

/// A number option within `range`, or `default` when absent.
fn number<T: std::str::FromStr + PartialOrd + std::fmt::Display>(
    options: &BTreeMap<String, String>,
    key: &str,
    default: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<T, MountError> {
    match options.get(key) {
        None => Ok(default),
        Some(text) => text
            .parse::<T>()
            .ok()
            .filter(|n| range.contains(n))
            .ok_or_else(|| MountError::BadOption {
                key: key.into(),
                value: text.clone(),
                expected: format!("a number from {} to {}", range.start(), range.end()),
            }),
    }
}

impl SessionOptions {
    /// Parses the daemon's options out of `options` (see [`plugin_options`] for the rest),
    /// and checks that every option can travel to the plugin.
    pub fn parse(options: &BTreeMap<String, String>) -> Result<SessionOptions, MountError> {
        // Options travel to the plugin as C strings.
        if let Some((key, value)) = options
            .iter()
            .find(|(key, value)| key.contains('\0') || value.contains('\0'))
        {
            return Err(MountError::BadOption {
                key: key.clone(),
                value: value.clone(),
                expected: "free of NUL bytes".into(),
            });
        }
        let attr_timeout = number(
            options,
            "attr_timeout",
            DEFAULT_ATTR_TIMEOUT.as_secs_f64(),
            0.0..=86_400.0,
        )?;
        Ok(SessionOptions {
            allow_other: options.contains_key("allow_other"),
            threads: number(options, "threads", DEFAULT_THREADS, 1..=16)?,
            read_ahead_kb: number(options, "read_ahead_kb", DEFAULT_READ_AHEAD_KB, 0..=65_536)?,
            cache: CachePolicy {
                ttl: std::time::Duration::from_secs_f64(attr_timeout),
                // Keep the page cache between opens: right when nothing but this mount
                // changes the files (memfs), wrong for a mirror others write to.
                keep_cache: options.contains_key("keep_cache"),
                writeback: options.contains_key("writeback"),
                // The kernel agrees to passthrough only without the writeback cache: do not
                // ask for it there (each open's backing registration would fail).
                passthrough: !options.contains_key("nopassthrough")
                    && !options.contains_key("writeback"),
                uring: options.contains_key("uring"),
            },
            record_stats: !options.contains_key("nostats"),
        })
    }
}

/// The options that are the plugin's: all but the daemon's own.
pub fn plugin_options(
    options: &BTreeMap<String, String>,
) -> impl Iterator<Item = (&String, &String)> {
    options
        .iter()
        .filter(|(key, _)| !DAEMON_OPTIONS.contains(&key.as_str()))
}
