//! The daemon itself: arguments, config, the control socket, signals. `main.rs` only
//! calls [`main`].
//!
//! Runs in the foreground (systemd supervises it), listens on a Unix socket for `fshostctl`
//! (or takes it from systemd socket activation), applies its config file at start and on
//! SIGHUP, and on SIGTERM/SIGINT unmounts everything, unloads every plugin and removes its
//! socket.
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Parser;
use sd_notify::NotifyState;
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};

use crate::config::{self, Config};
use crate::control::daemon_upgrade::Upgrader;
use crate::control::{self, access};
use crate::handover::{self, Predecessor};
use crate::host::{Caller, Host, Trust};
use crate::{fdstore, mount, notify, notify_status};

/// Hosts user-space filesystem plugins and serves them through FUSE.
#[derive(Debug, Parser)]
#[command(name = "fshostd", version)]
struct Args {
    /// Control socket path [default: from the config, else /run/fshost/fshostd.sock].
    #[arg(long, env = fshost_protocol::SOCKET_ENV)]
    socket: Option<PathBuf>,
    /// Config file [default: /etc/fshost/fshostd.toml, if it exists].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Directory plugins may be loaded from, and where bare names are looked up (repeatable).
    #[arg(long = "plugin-dir", value_name = "DIR")]
    plugin_dirs: Vec<PathBuf>,
    /// Development mode: load plugins from anywhere, owned by anyone. Never in production.
    #[arg(long)]
    dev: bool,
    /// Log lines as text, or as one JSON object each (for log shippers).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "FSHOST_LOG_FORMAT")]
    log_format: LogFormat,
    /// How long shutdown waits for busy mounts before detaching them lazily (seconds).
    #[arg(long, default_value_t = 2)]
    shutdown_grace: u64,
    /// Internal: exit 0 if PATH is a dead FUSE mount (ENOTCONN), 1 otherwise. fshostd runs
    /// itself this way (as a mount's owner, for a user's mount) to check mounts at start.
    #[arg(long, value_name = "PATH", hide = true, requires = "mount_id")]
    probe_dead: Option<PathBuf>,
    /// Internal, with --probe-dead: the kernel id of the mount expected at PATH.
    #[arg(long, value_name = "ID", hide = true, requires = "probe_dead")]
    mount_id: Option<u64>,
    /// Internal, with --probe-dead: check as UID:GID.
    #[arg(
        long = "as",
        value_name = "UID:GID",
        hide = true,
        requires = "probe_dead"
    )]
    probe_as: Option<String>,
}

/// Runs fshostd with the process's arguments.
pub fn main() -> anyhow::Result<()> {
    crate::plugin::fix_malloc_mmap_threshold();
    let args = Args::parse();
    if let (Some(path), Some(id)) = (&args.probe_dead, args.mount_id) {
        let dead = match &args.probe_as {
            None => mount::answers_enotconn(path, id),
            Some(owner) => mount::answers_enotconn_as(path, id, owner).unwrap_or(false),
        };
        std::process::exit(if dead { 0 } else { 1 });
    }
    // Before any thread exists: started by a daemon upgrade, take the handover socket.
    let predecessor =
        handover::Predecessor::from_env().context("cannot take the daemon upgrade's handover")?;
    let systemd =
        crate::sys::systemd_fds().context("cannot take the descriptors systemd passed")?;
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && args.log_format == LogFormat::Text)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,fuser=error".into()),
        );
    match args.log_format {
        LogFormat::Text => logs.init(),
        // One JSON object per line, for log shippers.
        LogFormat::Json => logs.json().init(),
    }
    // The control plane's threads are bounded, so that they fit in the reserve the
    // mounts' thread budget leaves (mount::budget): a few workers, and at most 32 threads
    // for blocking work (more requests wait their turn).
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("fshostd")
        .worker_threads(workers)
        .max_blocking_threads(32)
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run(args, predecessor, systemd))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Everything the daemon was started with, after merging flags and config.
struct Settings {
    config_path: PathBuf,
    config_required: bool,
    socket: PathBuf,
    trust: Trust,
}

impl Settings {
    fn new(args: &Args, config: &Config) -> Settings {
        let config_required = args.config.is_some();
        let config_path = args
            .config
            .clone()
            .unwrap_or_else(|| PathBuf::from(config::DEFAULT_PATH));
        let socket = args
            .socket
            .clone()
            .or_else(|| config.socket.clone())
            .unwrap_or_else(|| PathBuf::from(fshost_protocol::DEFAULT_SOCKET));
        Settings {
            config_path,
            config_required,
            socket,
            trust: trust(args, config),
        }
    }
}

fn trust(args: &Args, config: &Config) -> Trust {
    let mut plugin_dirs = config.plugin_dirs.clone();
    // A relative --plugin-dir is taken from where the daemon was started, once: plugins
    // found there are recorded (and upgraded) by absolute paths.
    plugin_dirs.extend(
        args.plugin_dirs
            .iter()
            .map(|dir| std::path::absolute(dir).unwrap_or_else(|_| dir.clone())),
    );
    Trust {
        plugin_dirs,
        dev: args.dev || config.dev,
    }
}

/// Binds the socket, refusing to steal it from a live daemon; a stale file is replaced.
/// The socket's directory must be ours alone: in a directory others may write to, they
/// could swap the socket for a link between bind and chown/chmod, and have root change
/// the owner and mode of any file.
async fn bind(socket: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create socket directory {}", dir.display()))?;
        if let Err(why) = crate::check_private_dir(dir, nix::unistd::geteuid().as_raw()) {
            bail!("the control socket cannot live there: {why}, and a socket swapped for a link before it is chmod'ed would make fshostd change any file; put it in a directory of fshostd's own, such as /run/fshost/fshostd.sock");
        }
    }
    if socket.exists() {
        if tokio::net::UnixStream::connect(socket).await.is_ok() {
            bail!(
                "another fshostd is already listening on {}; stop it or pass a different --socket",
                socket.display()
            );
        }
        std::fs::remove_file(socket)
            .with_context(|| format!("cannot remove stale socket {}", socket.display()))?;
    }
    UnixListener::bind(socket).with_context(|| format!("cannot listen on {}", socket.display()))
}

/// Gives the socket its mode and group. A missing group is not fatal: the socket then
/// stays root's only, and the log says how to fix it.
fn secure_socket(socket: &Path, config: &Config) -> anyhow::Result<()> {
    let mode = config.socket_mode_bits()?;
    match nix::unistd::Group::from_name(&config.group) {
        Ok(Some(group)) => {
            nix::unistd::chown(socket, None, Some(group.gid)).with_context(|| {
                format!("cannot give {} to group {}", socket.display(), config.group)
            })?
        }
        _ => {
            tracing::warn!(group = %config.group, "group does not exist; only root can use the socket (create it: systemd-sysusers, or groupadd {})", config.group)
        }
    }
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set mode {mode:o} on {}", socket.display()))
}

/// The listening socket from systemd (socket activation), if we were started that way:
/// the one descriptor passed that is not a kept FUSE connection.
fn activated_listener(
    systemd: &mut Vec<(OwnedFd, String)>,
) -> anyhow::Result<Option<UnixListener>> {
    let Some(at) = systemd
        .iter()
        .position(|(_, name)| fdstore::kernel_id_of(name).is_none())
    else {
        return Ok(None);
    };
    let (fd, name) = systemd.remove(at);
    let listening = rustix::net::sockopt::socket_acceptconn(&fd).unwrap_or(false);
    if !listening {
        bail!("systemd passed descriptor {name:?}, which is not a listening socket");
    }
    let listener = std::os::unix::net::UnixListener::from(fd);
    listener.set_nonblocking(true)?;
    Ok(Some(UnixListener::from_std(listener)?))
}

/// Under systemd, every mount's connection goes into its store from now on, with its
/// record beside the control socket (`mounts/`), so that mounts survive a crash.
fn keep_connections(socket: &Path) {
    let Some(dir) = socket.parent().map(|dir| dir.join("mounts")) else {
        return;
    };
    match fdstore::enable(&dir) {
        Ok(true) => {
            tracing::info!(records = %dir.display(), "mounts are kept in systemd's file descriptor store: they survive a crash of fshostd")
        }
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(records = %dir.display(), error = %e, "cannot keep mounts for a restart after a crash")
        }
    }
}

/// The plugin each preload entry produced (by entry as written: a path or a bare name),
/// so that removing the entry unloads exactly that plugin. A name cannot be guessed from a
/// file name: `libhello_c.so` is plugin `hello-c`.
type Preloaded = BTreeMap<String, String>;

/// Loads the config's preloads and makes its mounts (errors are logged, not fatal).
fn apply(host: &Host, changes: &config::Changes, preloaded: &mut Preloaded) {
    let admin = Caller::root();
    for path in &changes.unmount {
        match host.unmount(&path.display().to_string(), false, &admin) {
            Ok(_) => tracing::info!(mountpoint = %path.display(), "config: unmounted"),
            Err(e) => {
                tracing::warn!(mountpoint = %path.display(), error = %e, "config: mount removed from the config is kept")
            }
        }
    }
    for plugin in &changes.unload {
        let Some(name) = preloaded.remove(plugin) else {
            continue; // its load failed: nothing to unload
        };
        if let Err(e) = host.unload(&name, None) {
            tracing::warn!(plugin = %name, entry = %plugin, error = %e, "config: plugin removed from preload is kept");
        }
    }
    for plugin in &changes.load {
        match host.load(plugin, None) {
            Ok(info) => {
                tracing::info!(plugin = %info.name, "config: preloaded");
                preloaded.insert(plugin.clone(), info.name);
            }
            Err(e) => tracing::error!(plugin = %plugin, error = %e, "config: preload failed"),
        }
    }
    for entry in &changes.mount {
        let mountpoint = entry.mountpoint.display().to_string();
        if let Err(e) = host.mount(
            &entry.plugin,
            &mountpoint,
            entry.options.clone(),
            entry.read_only,
            &admin,
        ) {
            tracing::error!(mountpoint = %mountpoint, error = %e, "config: mount failed");
        }
    }
}

async fn run(
    args: Args,
    predecessor: Option<Predecessor>,
    systemd: Vec<(OwnedFd, String)>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let config_path = args
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_PATH));
    let config = Config::load(&config_path, args.config.is_some())?;
    let mut settings = Settings::new(&args, &config);
    if settings.trust.dev {
        tracing::warn!("DEVELOPMENT MODE (--dev): plugins are loaded from anywhere, owned by anyone; never run like this in production");
    }
    let (host, listener, owns_socket, preloaded) = match predecessor {
        Some(predecessor) => take_over(predecessor, &mut settings, &config, started).await?,
        None => start(&mut settings, &config, started, systemd).await?,
    };
    serve(
        args,
        settings,
        config,
        host,
        listener,
        owns_socket,
        preloaded,
    )
    .await
}

/// A fresh start (or a restart after a crash): make the control socket, serve again the
/// mounts systemd kept, clear stale mounts, apply the config.
async fn start(
    settings: &mut Settings,
    config: &Config,
    started: Instant,
    mut systemd: Vec<(OwnedFd, String)>,
) -> anyhow::Result<(Arc<Host>, UnixListener, bool, Preloaded)> {
    let (listener, owns_socket) = match activated_listener(&mut systemd)? {
        Some(listener) => {
            // systemd made the socket: its path is the one to report and to put copies beside.
            if let Some(path) = listener
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(Path::to_path_buf))
            {
                settings.socket = path;
            }
            (listener, false)
        }
        None => {
            let listener = bind(&settings.socket).await?;
            secure_socket(&settings.socket, config)?;
            (listener, true)
        }
    };
    let host = Arc::new(Host::new(
        settings.trust.clone(),
        settings.socket.clone(),
        started,
    ));
    host.set_user_policy(config.users.clone());
    keep_connections(&settings.socket);
    raise_open_file_limit();
    limit_mount_threads(config);
    // The rest of what systemd passed: FUSE connections it kept for us before a crash.
    let kept: Vec<(u64, OwnedFd)> = systemd
        .into_iter()
        .filter_map(|(fd, name)| Some((fdstore::kernel_id_of(&name)?, fd)))
        .collect();
    if !kept.is_empty() {
        let recovering = Arc::clone(&host);
        let recovered = tokio::task::spawn_blocking(move || recovering.recover(kept)).await?;
        tracing::info!(
            served = recovered.served.len(),
            detached = recovered.detached.len(),
            "restart after a crash: mounts kept by systemd taken back"
        );
    }
    // Before serving: mounts of a killed fshostd answer ENOTCONN and block new mounts on
    // the same paths. Clear them (and only them) and say so.
    let stale = tokio::task::spawn_blocking(mount::detach_stale_mounts)
        .await
        .context("stale mount check failed")?;
    for m in &stale {
        tracing::warn!(mountpoint = %m.mountpoint.display(), fstype = %m.fstype, source = %m.source, "detached a stale mount left by a dead fshostd");
    }
    let initial = config::changes(&Config::default(), config);
    let applied_by = Arc::clone(&host);
    let preloaded = tokio::task::spawn_blocking(move || {
        let mut preloaded = Preloaded::new();
        apply(&applied_by, &initial, &mut preloaded);
        preloaded
    })
    .await?;
    Ok((host, listener, owns_socket, preloaded))
}

/// Takes all the descriptors the process may have: each mount holds one (its connection),
/// and the soft limit systemd and shells give (1,024) would stop fshostd near a thousand
/// mounts.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit");
            }
        }
    }
}

/// Bounds the threads mounts may use (see `mount::budget`), before any mount starts.
fn limit_mount_threads(config: &Config) {
    let (cap, bound) = mount::budget::limit_threads(config.limits.max_mount_threads);
    mount::pool::set_threads_per_plugin(config.limits.threads_per_plugin);
    tracing::info!(threads = cap, bounded_by = %bound, per_plugin = config.limits.threads_per_plugin, "threads mounts may use");
}

/// Started by a daemon upgrade: take everything the old process hands over, tell it we
/// are ready, and once it is gone serve its mounts. If anything fails the old process is
/// told why and serves on; this one exits without touching a mount.
async fn take_over(
    predecessor: Predecessor,
    settings: &mut Settings,
    config: &Config,
    started: Instant,
) -> anyhow::Result<(Arc<Host>, UnixListener, bool, Preloaded)> {
    let predecessor = Arc::new(predecessor);
    let trust = settings.trust.clone();
    let users = config.users.clone();
    let receiving = Arc::clone(&predecessor);
    let prepared = tokio::task::spawn_blocking(move || {
        let mut received = receiving.receive().map_err(|e| e.to_string())?;
        let manifest = &received.manifest;
        tracing::info!(from_pid = manifest.from_pid, from_version = %manifest.from_version, plugins = manifest.plugins.len(), mounts = manifest.mounts.len(), "daemon upgrade: taking over");
        let host = Arc::new(Host::new(trust, manifest.socket.clone(), started));
        host.set_user_policy(users);
        let (socket, owns_socket, preloaded) = (
            manifest.socket.clone(),
            manifest.owns_socket,
            manifest.preloaded.clone(),
        );
        let listener = received
            .take(received.manifest.listener)
            .map_err(|e| e.to_string())?;
        let taken = host.take_over(&mut received)?;
        Ok::<_, String>((host, listener, socket, owns_socket, preloaded, taken))
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|prepared| prepared);
    let (host, listener, socket, owns_socket, preloaded, taken) = match prepared {
        Ok(prepared) => prepared,
        Err(why) => {
            tracing::error!(%why, "daemon upgrade: cannot take over; the old fshostd serves on");
            predecessor.failed(&why);
            // Nothing of ours serves anything yet: leave without touching a mount.
            crate::sys::exit_now(1);
        }
    };
    let listener = std::os::unix::net::UnixListener::from(listener);
    listener.set_nonblocking(true)?;
    let listener = UnixListener::from_std(listener)?;
    settings.socket = socket;
    keep_connections(&settings.socket);
    predecessor.ready()?;
    let waiting = Arc::clone(&predecessor);
    let gone =
        tokio::task::spawn_blocking(move || waiting.wait_gone(Duration::from_secs(30))).await?;
    if let Err(e) = gone {
        tracing::warn!(error = %e, "daemon upgrade: serving although the old fshostd may still run");
    }
    // Now that the old process's threads are gone from the system's counts.
    raise_open_file_limit();
    limit_mount_threads(config);
    let serving = Arc::clone(&host);
    tokio::task::spawn_blocking(move || serving.serve_taken_over(taken)).await?;
    tracing::info!(
        mounts = host.status().mounts,
        "daemon upgrade: every mount taken over is served"
    );
    Ok((host, listener, owns_socket, preloaded))
}

/// Serves the control socket until SIGTERM/SIGINT, then tears everything down.
async fn serve(
    args: Args,
    settings: Settings,
    config: Config,
    host: Arc<Host>,
    listener: UnixListener,
    owns_socket: bool,
    preloaded: Preloaded,
) -> anyhow::Result<()> {
    let applied = Arc::new(Mutex::new(config.clone()));
    let preloaded = Arc::new(Mutex::new(preloaded));
    let upgrader = Arc::new(Upgrader::new(
        std::os::fd::AsFd::as_fd(&listener)
            .try_clone_to_owned()
            .context("cannot duplicate the control socket")?,
        settings.socket.clone(),
        owns_socket,
        Arc::clone(&preloaded),
    ));
    let access = Arc::new(Mutex::new(access::Policy::from_config(&config)));
    tracing::info!(socket = %settings.socket.display(), pid = std::process::id(), activated = !owns_socket, "fshostd ready");
    notify(&[NotifyState::Ready]);
    notify_status(&host);

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let metrics = config.metrics_listen.map(|address| {
        let (host, stop) = (Arc::clone(&host), stop_rx.clone());
        tokio::spawn(async move {
            if let Err(e) = control::metrics_http::serve(address, host, stop).await {
                tracing::error!(%address, error = %e, "cannot serve metrics (metrics_listen); the daemon goes on without");
            }
        })
    });
    let server = tokio::spawn(control::serve(
        listener,
        Arc::clone(&host),
        Arc::clone(&access),
        Arc::clone(&upgrader),
        stop_rx,
    ));
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut usr2 = signal(SignalKind::user_defined2()).context("cannot handle SIGUSR2")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    let which = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = usr2.recv() => {
                // As nginx and HAProxy do: SIGUSR2 upgrades to the installed binary.
                let (host, upgrader) = (Arc::clone(&host), Arc::clone(&upgrader));
                let timeout = Duration::from_secs(fshost_protocol::DEFAULT_UPGRADE_SECS);
                let task = upgrader.clone();
                match tokio::task::spawn_blocking(move || task.run(&host, None, &Caller::root(), timeout)).await {
                    Ok(Ok(info)) => upgrader.finish(&info),
                    Ok(Err(e)) => tracing::error!(error = %e, "SIGUSR2: daemon upgrade failed"),
                    Err(e) => tracing::error!(error = %e, "SIGUSR2: daemon upgrade task failed"),
                }
            }
            _ = hup.recv() => {
                notify(&[NotifyState::Reloading]);
                reload(&settings, &args, &host, &applied, &access, &preloaded).await;
                notify(&[NotifyState::Ready]);
                notify_status(&host);
            }
        }
    };
    tracing::info!(
        signal = which,
        "shutting down: unmounting everything and unloading plugins"
    );
    notify(&[NotifyState::Stopping]);
    let _ = stop_tx.send(true);
    let _ = server.await;
    if let Some(metrics) = metrics {
        let _ = metrics.await;
    }
    if owns_socket {
        let _ = std::fs::remove_file(&settings.socket);
    }
    let grace = Duration::from_secs(args.shutdown_grace);
    tokio::task::spawn_blocking(move || host.shutdown(grace))
        .await
        .context("shutdown task failed")?;
    tracing::info!("fshostd stopped");
    Ok(())
}

/// SIGHUP: re-read the config and apply the difference; a bad file changes nothing.
async fn reload(
    settings: &Settings,
    args: &Args,
    host: &Arc<Host>,
    applied: &Arc<Mutex<Config>>,
    access: &Arc<Mutex<access::Policy>>,
    preloaded: &Arc<Mutex<Preloaded>>,
) {
    let new = match Config::load(&settings.config_path, settings.config_required) {
        Ok(config) => config,
        Err(e) => {
            tracing::error!(error = %e, "reload: config rejected; keeping the running state");
            return;
        }
    };
    let old = applied.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if old.metrics_listen != new.metrics_listen {
        tracing::warn!("reload: metrics_listen changed; it takes effect at the next start");
    }
    let changes = config::changes(&old, &new);
    tracing::info!(?changes, "reload: applying config changes");
    host.set_trust(trust(args, &new));
    host.set_user_policy(new.users.clone());
    *access.lock().unwrap_or_else(|e| e.into_inner()) = access::Policy::from_config(&new);
    let task_host = Arc::clone(host);
    let preloaded = Arc::clone(preloaded);
    let applied_changes = tokio::task::spawn_blocking(move || {
        apply(
            &task_host,
            &changes,
            &mut preloaded.lock().unwrap_or_else(|e| e.into_inner()),
        )
    });
    if let Err(e) = applied_changes.await {
        tracing::error!(error = %e, "reload task failed");
    }
    *applied.lock().unwrap_or_else(|e| e.into_inner()) = new;
}
