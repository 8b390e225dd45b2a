//! fshostd: hosts filesystem plugins and serves them through FUSE.
//!
//! Runs in the foreground (systemd supervises it), listens on a Unix socket for `fshostctl`,
//! and on SIGTERM/SIGINT unmounts everything, unloads every plugin and removes its socket.
#![deny(unsafe_code)]

mod control;
mod host;
mod mount;
mod plugin;
mod registry;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Parser;
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};

use host::Host;

/// Hosts user-space filesystem plugins and serves them through FUSE.
#[derive(Debug, Parser)]
#[command(name = "fshostd", version)]
struct Args {
    /// Control socket path.
    #[arg(long, env = fshost_protocol::SOCKET_ENV, default_value = fshost_protocol::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Directory searched when `load` is given a bare plugin name (repeatable).
    #[arg(long = "plugin-dir", value_name = "DIR")]
    plugin_dirs: Vec<PathBuf>,
    /// Where private copies of loaded libraries are made [default: the socket's directory].
    #[arg(long, value_name = "DIR")]
    runtime_dir: Option<PathBuf>,
    /// How long shutdown waits for busy mounts before detaching them lazily (seconds).
    #[arg(long, default_value_t = 2)]
    shutdown_grace: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,fuser=warn".into()),
        )
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("fshostd")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run(args))
}

/// Binds the socket, refusing to steal it from a live daemon; a stale file is replaced.
async fn bind(socket: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create socket directory {}", dir.display()))?;
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

async fn run(args: Args) -> anyhow::Result<()> {
    // Before serving: mounts of a killed fshostd answer ENOTCONN and block new mounts on
    // the same paths. Clear them (and only them) and say so.
    let stale = tokio::task::spawn_blocking(mount::detach_stale_mounts)
        .await
        .context("stale mount check failed")?;
    for m in &stale {
        tracing::warn!(mountpoint = %m.mountpoint.display(), fstype = %m.fstype, source = %m.source, "detached a stale mount left by a dead fshostd");
    }
    let listener = bind(&args.socket).await?;
    let copy_dir = args
        .runtime_dir
        .clone()
        .or_else(|| args.socket.parent().map(Path::to_path_buf))
        .unwrap_or_else(std::env::temp_dir);
    let host = Arc::new(Host::new(args.plugin_dirs.clone(), copy_dir));
    tracing::info!(socket = %args.socket.display(), pid = std::process::id(), "fshostd listening");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(control::serve(listener, Arc::clone(&host), stop_rx));
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let which = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(
        signal = which,
        "shutting down: unmounting everything and unloading plugins"
    );
    let _ = stop_tx.send(true);
    let _ = server.await;
    let _ = std::fs::remove_file(&args.socket);
    let grace = Duration::from_secs(args.shutdown_grace);
    tokio::task::spawn_blocking(move || host.shutdown(grace))
        .await
        .context("shutdown task failed")?;
    tracing::info!("fshostd stopped");
    Ok(())
}
