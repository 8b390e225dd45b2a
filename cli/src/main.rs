//! fshostctl: the command-line client of fshostd.
//!
//! Exit codes: 0 success, 1 refused by the daemon (message on stderr), 2 usage error,
//! 3 cannot reach the daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::CommandFactory;
use clap::{Parser, Subcommand};
use fshost_protocol::{MountInfo, MountStats, PluginInfo, Reply, Request, Status};

use fshostctl::top::sums as totals;
use fshostctl::{exchange, table};

/// Control fshostd: load and unload filesystem plugins, mount and unmount them.
#[derive(Debug, Parser)]
#[command(name = "fshostctl", version)]
struct Cli {
    /// Control socket of the daemon.
    #[arg(long, global = true, env = fshost_protocol::SOCKET_ENV, default_value = fshost_protocol::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print the daemon's JSON response instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load a plugin library (a path, or a bare name looked up in the daemon's --plugin-dir).
    Load {
        path: String,
        /// Register it under this name instead of the one it declares.
        #[arg(long)]
        name: Option<String>,
    },
    /// Unload a plugin; refused while it has mounts (see --drain).
    Unload {
        name: String,
        /// Refuse new mounts now and wait for the existing ones to be unmounted; if they
        /// are not gone within the timeout (or this command is interrupted), the plugin
        /// is live again.
        #[arg(long)]
        drain: bool,
        /// How long --drain waits, in seconds.
        #[arg(long, requires = "drain", value_name = "SECS", default_value_t = fshost_protocol::DEFAULT_DRAIN_SECS)]
        timeout: u64,
    },
    /// Replace a plugin's code with a new version while its mounts stay mounted: each
    /// mount's state moves to the new generation (open files, working directories and
    /// mmaps stay valid). Any failure leaves the old version serving every mount.
    Upgrade {
        name: String,
        /// The new library (default: the file the plugin was loaded from, so that
        /// `cp new.so over/the/old.so && fshostctl upgrade NAME` works).
        path: Option<String>,
        /// How long to wait for requests in flight on the mounts, in seconds.
        #[arg(long, value_name = "SECS", default_value_t = fshost_protocol::DEFAULT_UPGRADE_SECS)]
        timeout: u64,
    },
    /// Replace the running fshostd by a new process (a new version of the daemon) without
    /// unmounting anything: mounts, open files and plugin state carry over. Any failure
    /// leaves the running daemon serving. (`kill -USR2` on fshostd does the same.)
    DaemonUpgrade {
        /// The fshostd binary to run (default: the installed path of the running one).
        /// Only root may name one.
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
        /// How long to wait for requests in flight on the mounts, in seconds.
        #[arg(long, value_name = "SECS", default_value_t = fshost_protocol::DEFAULT_UPGRADE_SECS)]
        timeout: u64,
    },
    /// Mount a plugin on an existing directory.
    Mount {
        name: String,
        mountpoint: PathBuf,
        /// Options, KEY[=VALUE][,...] (repeatable): the daemon's own (allow_other,
        /// attr_timeout=SECS, keep_cache, nopassthrough, read_ahead_kb=N, threads=N,
        /// writeback; see README) and the plugin's (memfs: size=64M, nr_inodes=N, noxattr).
        #[arg(short = 'o', value_name = "KEY=VALUE,...")]
        options: Vec<String>,
        /// Mount read-only.
        #[arg(long)]
        read_only: bool,
    },
    /// Unmount an fshost mount.
    Unmount {
        mountpoint: PathBuf,
        /// Detach now even if busy; released when the last open file closes.
        #[arg(long)]
        lazy: bool,
    },
    /// List plugins (like lsmod).
    List,
    /// List mounts.
    Mounts,
    /// Show one plugin in detail.
    Info { name: String },
    /// Show the daemon: version, uptime, socket, counts, tainted plugins.
    Status,
    /// What the mounts did: requests, rate, errors, latency, bytes, in flight, queued in
    /// the kernel; per operation too when one mount is shown.
    Stats {
        /// A mount point, or a plugin name (its mounts); all mounts if left out.
        filter: Option<String>,
        /// Seconds between the two samples the request rate comes from (0: no rate).
        #[arg(long, value_name = "SECS", default_value_t = 1.0)]
        interval: f64,
    },
    /// A live view of every mount, busiest first (like top/iotop): requests and errors
    /// per second, p99 latency, bytes per second, in flight, queued in the kernel. Keys:
    /// q quit; r, e, l, m sort by rate, errors, latency, mount point.
    Top {
        /// Print one table after one interval and exit (for scripts; also when standard
        /// output is not a terminal).
        #[arg(long)]
        once: bool,
        /// Seconds between refreshes.
        #[arg(long, value_name = "SECS", default_value_t = 1.0)]
        interval: f64,
        /// What to sort by.
        #[arg(long, value_enum, default_value_t = fshostctl::top::SortKey::Rate)]
        sort: fshostctl::top::SortKey,
    },
    /// The mounts' statistics in Prometheus's text format (for a scrape or a textfile
    /// collector).
    Metrics {
        /// A mount point, or a plugin name (its mounts); all mounts if left out.
        filter: Option<String>,
    },
    /// Print a shell completion script (e.g. `fshostctl completions bash > /etc/bash_completion.d/fshostctl`).
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff) to stdout.
    Man,
}

fn absolute(path: &std::path::Path) -> String {
    std::path::absolute(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .display()
        .to_string()
}

/// A mount point as the daemon wants it: resolved here, as the caller (the daemon follows
/// no symlinks); as given, made absolute, when it cannot be resolved (a dead mount).
fn real_path(path: &std::path::Path) -> String {
    path.canonicalize()
        .map_or_else(|_| absolute(path), |real| real.display().to_string())
}

fn request(command: &Command) -> Request {
    match command {
        Command::Load { path, name } => Request::Load {
            // A bare name is resolved by the daemon in its plugin directories.
            path: if path.contains('/') {
                absolute(path.as_ref())
            } else {
                path.clone()
            },
            name: name.clone(),
        },
        Command::Unload {
            name,
            drain,
            timeout,
        } => Request::Unload {
            name: name.clone(),
            drain: *drain,
            timeout_secs: drain.then_some(*timeout),
        },
        Command::Mount {
            name,
            mountpoint,
            options,
            read_only,
        } => Request::Mount {
            plugin: name.clone(),
            mountpoint: real_path(mountpoint),
            options: fshost_protocol::parse_options(options),
            read_only: *read_only,
        },
        Command::Unmount { mountpoint, lazy } => Request::Unmount {
            mountpoint: real_path(mountpoint),
            lazy: *lazy,
        },
        Command::Upgrade {
            name,
            path,
            timeout,
        } => Request::Upgrade {
            name: name.clone(),
            path: path.as_deref().map(|p| {
                if p.contains('/') {
                    absolute(std::path::Path::new(p))
                } else {
                    p.to_string()
                }
            }),
            timeout_secs: Some(*timeout),
        },
        Command::DaemonUpgrade { binary, timeout } => Request::DaemonUpgrade {
            binary: binary.as_deref().map(absolute),
            timeout_secs: Some(*timeout),
        },
        Command::List => Request::List {},
        Command::Mounts => Request::Mounts {},
        Command::Info { name } => Request::Info { name: name.clone() },
        Command::Status => Request::Status {},
        Command::Stats { filter, .. } | Command::Metrics { filter } => Request::Stats {
            filter: filter.as_deref().map(|f| {
                if f.contains('/') {
                    real_path(std::path::Path::new(f))
                } else {
                    f.to_string()
                }
            }),
        },
        Command::Completions { .. } | Command::Man | Command::Top { .. } => {
            unreachable!("handled locally")
        }
    }
}

fn print_reply(reply: &Reply) {
    match reply {
        Reply::Loaded { plugin } => println!(
            "loaded {} {} from {}",
            plugin.name, plugin.version, plugin.path
        ),
        Reply::Unloaded { name, still_mapped } => {
            println!("unloaded {name}");
            if *still_mapped {
                eprintln!("warning: the library of {name} is still mapped in fshostd (it left a thread or thread-local behind); see the daemon log");
            }
        }
        Reply::Mounted { mount } => println!("mounted {} at {}", mount.plugin, mount.mountpoint),
        Reply::Unmounted {
            mountpoint,
            detached,
        } => {
            if *detached {
                println!("detached {mountpoint}; it is released when its last open file closes");
            } else {
                println!("unmounted {mountpoint}");
            }
        }
        Reply::Upgraded { upgrade } => println!(
            "upgraded {} {} → {} (generation {}): {} moved, paused {:.1} ms, {} bytes of state",
            upgrade.plugin.name,
            upgrade.from_version,
            upgrade.plugin.version,
            upgrade.plugin.generation,
            match upgrade.mounts.len() {
                1 => "1 mount".to_string(),
                n => format!("{n} mounts"),
            },
            upgrade.pause_us as f64 / 1000.0,
            upgrade.state_bytes
        ),
        Reply::DaemonUpgraded { upgrade } => println!(
            "fshostd {} → {} ({}): {} plugins and {} taken over, paused {:.1} ms, {} bytes of state",
            upgrade.old_pid,
            upgrade.new_pid,
            upgrade.binary,
            upgrade.plugins,
            match upgrade.mounts.len() {
                1 => "1 mount".to_string(),
                n => format!("{n} mounts"),
            },
            upgrade.pause_us as f64 / 1000.0,
            upgrade.state_bytes
        ),
        Reply::Stats { mounts } => print!("{}", stats_text(mounts, None)),
        Reply::Plugins { plugins } => print!("{}", plugins_table(plugins)),
        Reply::Mounts { mounts } => print!("{}", mounts_table(mounts)),
        Reply::Info { plugin } => print!("{}", info_text(plugin)),
        Reply::Status { status } => print!("{}", status_text(status)),
    }
}

fn status_text(s: &Status) -> String {
    let tainted = if s.tainted.is_empty() {
        "none".to_string()
    } else {
        s.tainted.join(", ")
    };
    let (h, m, sec) = (
        s.uptime_secs / 3600,
        s.uptime_secs % 3600 / 60,
        s.uptime_secs % 60,
    );
    let rows = [
        ("version", s.version.clone()),
        ("pid", s.pid.to_string()),
        ("uptime", format!("{h}h {m:02}m {sec:02}s")),
        ("socket", s.socket.clone()),
        ("plugins", s.plugins.to_string()),
        ("mounts", s.mounts.to_string()),
        (
            "threads",
            format!("{} of {} for mounts", s.mount_threads.0, s.mount_threads.1),
        ),
        ("tainted", tainted),
    ];
    rows.iter().map(|(k, v)| format!("{k:<8} {v}\n")).collect()
}

fn state_text(plugin: &PluginInfo) -> String {
    // Display of the state already reads "unloaded (still mapped)" for lingering plugins.
    let mut text = plugin.state.to_string();
    if plugin.tainted.is_some() {
        text.push_str(" (tainted)");
    }
    if let Some(next) = &plugin.upgrading {
        text.push_str(&format!(", upgrading to {}", next.generation));
    }
    text
}

fn plugins_table(plugins: &[PluginInfo]) -> String {
    let rows = plugins.iter().map(|p| {
        vec![
            p.name.clone(),
            state_text(p),
            p.generation.to_string(),
            p.mounts.len().to_string(),
            p.version.clone(),
            p.path.clone(),
        ]
    });
    table::render(&["NAME", "STATE", "GEN", "MOUNTS", "VERSION", "PATH"], rows)
}

fn mounts_table(mounts: &[MountInfo]) -> String {
    let rows = mounts.iter().map(|m| {
        vec![
            m.mountpoint.clone(),
            m.plugin.clone(),
            table::utc(m.since),
            if m.read_only { "ro" } else { "rw" }.to_string(),
            m.owner_uid.to_string(),
            m.transport.clone().unwrap_or_else(|| "-".into()),
        ]
    });
    table::render(
        &[
            "MOUNTPOINT",
            "PLUGIN",
            "SINCE",
            "MODE",
            "OWNER",
            "TRANSPORT",
        ],
        rows,
    )
}

/// "120 µs", "3.2 ms": a latency bucket's bound.
fn latency(us: Option<u64>) -> String {
    match us {
        None => "-".into(),
        Some(us) if us < 1000 => format!("≤{us} µs"),
        Some(us) => format!("≤{:.0} ms", us as f64 / 1000.0),
    }
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// Mounts, requests, errors, bytes read and written of one plugin generation.
type PluginSums = (usize, u64, u64, u64, u64);

/// The mounts summed per plugin (and the generation serving them now).
fn plugins_summary(mounts: &[MountStats]) -> String {
    let mut per: std::collections::BTreeMap<(&str, u32), PluginSums> =
        std::collections::BTreeMap::new();
    for m in mounts {
        let (count, errors, _) = totals(m);
        let sum = per.entry((&m.plugin, m.generation)).or_default();
        sum.0 += 1;
        sum.1 += count;
        sum.2 += errors;
        sum.3 += m.bytes_read;
        sum.4 += m.bytes_written;
    }
    let rows = per.into_iter().map(|((plugin, generation), s)| {
        vec![
            plugin.to_string(),
            generation.to_string(),
            s.0.to_string(),
            s.1.to_string(),
            s.2.to_string(),
            bytes(s.3),
            bytes(s.4),
        ]
    });
    table::render(
        &[
            "PLUGIN", "GEN", "MOUNTS", "REQUESTS", "ERRORS", "READ", "WRITTEN",
        ],
        rows,
    )
}

/// The mounts' table; with `earlier` (a sample `interval` seconds before) a rate column.
/// One mount gets its operations listed too.
fn stats_text(mounts: &[MountStats], earlier: Option<(&[MountStats], f64)>) -> String {
    let rate = |m: &MountStats| -> String {
        let Some((before, secs)) = earlier else {
            return "-".into();
        };
        let then = before
            .iter()
            .find(|b| b.mountpoint == m.mountpoint)
            .map_or(0, |b| totals(b).0);
        format!("{:.0}", totals(m).0.saturating_sub(then) as f64 / secs)
    };
    let rows = mounts.iter().map(|m| {
        let (count, errors, buckets) = totals(m);
        vec![
            m.mountpoint.clone(),
            m.plugin.clone(),
            m.generation.to_string(),
            count.to_string(),
            rate(m),
            errors.to_string(),
            latency(fshost_protocol::quantile_us(&buckets, 0.5)),
            latency(fshost_protocol::quantile_us(&buckets, 0.99)),
            bytes(m.bytes_read),
            bytes(m.bytes_written),
            m.in_flight.to_string(),
            m.waiting.map_or_else(|| "-".into(), |n| n.to_string()),
        ]
    });
    let mut out = table::render(
        &[
            "MOUNTPOINT",
            "PLUGIN",
            "GEN",
            "REQUESTS",
            "REQ/S",
            "ERRORS",
            "P50",
            "P99",
            "READ",
            "WRITTEN",
            "IN FLIGHT",
            "WAITING",
        ],
        rows,
    );
    if mounts.len() > 1 {
        out.push('\n');
        out.push_str(&plugins_summary(mounts));
    }
    if let [m] = mounts {
        if m.generations.len() > 1 {
            let rows = m.generations.iter().map(|g| {
                vec![
                    g.generation.to_string(),
                    g.requests.to_string(),
                    g.errors.to_string(),
                ]
            });
            out.push('\n');
            out.push_str(&table::render(&["GENERATION", "REQUESTS", "ERRORS"], rows));
        }
        let rows = m.ops.iter().map(|op| {
            let errors: Vec<String> = op.errors.iter().map(|(e, n)| format!("{e} {n}")).collect();
            vec![
                op.op.clone(),
                op.count.to_string(),
                latency(op.quantile_us(0.5)),
                latency(op.quantile_us(0.99)),
                format!("{:.1} µs", op.sum_us as f64 / op.count.max(1) as f64),
                if errors.is_empty() {
                    "-".into()
                } else {
                    errors.join(", ")
                },
            ]
        });
        out.push('\n');
        out.push_str(&table::render(
            &["OPERATION", "CALLS", "P50", "P99", "MEAN", "ERRORS"],
            rows,
        ));
    }
    out
}

fn info_text(p: &PluginInfo) -> String {
    let mut out = String::new();
    let mounts = if p.mounts.is_empty() {
        "-".to_string()
    } else {
        p.mounts.join(", ")
    };
    for (key, value) in [
        ("name", p.name.clone()),
        ("state", p.state.to_string()),
        ("version", p.version.clone()),
        ("path", p.path.clone()),
        ("abi", p.abi_version.to_string()),
        ("loaded", table::utc(p.loaded_at)),
        ("mounts", format!("{} ({mounts})", p.mounts.len())),
        ("tainted", p.tainted.clone().unwrap_or_else(|| "no".into())),
        ("gen", p.generation.to_string()),
        (
            "upgrade",
            p.upgrading.as_ref().map_or_else(
                || "-".into(),
                |next| {
                    format!(
                        "to generation {}, version {} from {}",
                        next.generation, next.version, next.path
                    )
                },
            ),
        ),
    ] {
        out.push_str(&format!("{key:<8} {value}\n"));
    }
    out
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "fshostctl",
                &mut std::io::stdout(),
            );
            return ExitCode::SUCCESS;
        }
        Command::Top {
            once,
            interval,
            sort,
        } => {
            let interval = std::time::Duration::from_secs_f64(interval.clamp(0.1, 3600.0));
            let shown = if *once || cli.json || !fshostctl::top::interactive() {
                fshostctl::top::once(&cli.socket, interval, *sort).map(|text| print!("{text}"))
            } else {
                fshostctl::top::live(&cli.socket, interval, *sort)
            };
            return match shown {
                Ok(()) => ExitCode::SUCCESS,
                Err(message) => {
                    eprintln!("fshostctl: {message}");
                    ExitCode::from(3)
                }
            };
        }
        Command::Man => {
            let man = clap_mangen::Man::new(Cli::command());
            return match man.render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("fshostctl: cannot write the man page: {e}");
                    ExitCode::from(1)
                }
            };
        }
        _ => {}
    }
    let request = request(&cli.command);
    // stats: a first sample for the rate; metrics: the same request, other output.
    let earlier = match &cli.command {
        Command::Stats { interval, .. } if *interval > 0.0 && !cli.json => {
            let first = exchange(&cli.socket, &request)
                .ok()
                .and_then(|(r, _)| r.result);
            std::thread::sleep(std::time::Duration::from_secs_f64(interval.min(3600.0)));
            match first {
                Some(Reply::Stats { mounts }) => Some((mounts, *interval)),
                _ => None,
            }
        }
        _ => None,
    };
    let (response, raw) = match exchange(&cli.socket, &request) {
        Ok(answer) => answer,
        Err(message) => {
            eprintln!("fshostctl: {message}");
            return ExitCode::from(3);
        }
    };
    if cli.json {
        print!("{raw}");
    }
    match (response.ok, response.result, response.error) {
        (true, Some(reply), _) => {
            match (&cli.command, &reply) {
                _ if cli.json => {}
                (Command::Metrics { .. }, Reply::Stats { mounts }) => {
                    print!("{}", fshost_protocol::prometheus_text(mounts))
                }
                (Command::Stats { .. }, Reply::Stats { mounts }) => print!(
                    "{}",
                    stats_text(
                        mounts,
                        earlier
                            .as_ref()
                            .map(|(before, secs)| (before.as_slice(), *secs))
                    )
                ),
                _ => print_reply(&reply),
            }
            ExitCode::SUCCESS
        }
        (_, _, Some(error)) => {
            eprintln!("fshostctl: {} ({})", error.message, error.code);
            ExitCode::from(1)
        }
        _ => {
            eprintln!("fshostctl: fshostd sent an answer with neither a result nor an error");
            ExitCode::from(3)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_is_an_aligned_table() {
        let plugin = PluginInfo {
            name: "memfs".into(),
            state: fshost_protocol::PluginState::Live,
            version: "0.1.0".into(),
            path: "/x/libmemfs.so".into(),
            abi_version: 1,
            mounts: vec!["/mnt/a".into()],
            loaded_at: 0,
            tainted: None,
            generation: 2,
            upgrading: None,
        };
        let text = plugins_table(&[plugin]);
        assert_eq!(
            text,
            "NAME   STATE  GEN  MOUNTS  VERSION  PATH\nmemfs  live   2    1       0.1.0    /x/libmemfs.so\n"
        );
    }
}
