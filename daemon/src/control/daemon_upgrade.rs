//! `fshostctl daemon-upgrade` and SIGUSR2: the daemon's side of a handover (the host's is
//! `host/handover.rs`). While it runs the control socket accepts no one: clients that
//! connect meanwhile wait in the listen queue, which the next process takes over, or are
//! accepted here again if the handover fails.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fshost_protocol::DaemonUpgradeInfo;
use sd_notify::NotifyState;
use tokio::sync::watch;

use crate::handover::Successor;
use crate::host::{Caller, DaemonSide, Host, HostError};

pub struct Upgrader {
    /// A duplicate of the control socket's listener, to hand over.
    listener: OwnedFd,
    socket: PathBuf,
    owns_socket: bool,
    preloaded: Arc<Mutex<BTreeMap<String, String>>>,
    /// False while a handover runs: the accept loop waits.
    accepting: watch::Sender<bool>,
    /// The process that took over, kept until this one exits: closing our end of the
    /// handover socket is what tells it we are gone.
    successor: Mutex<Option<Successor>>,
}

impl Upgrader {
    pub fn new(
        listener: OwnedFd,
        socket: PathBuf,
        owns_socket: bool,
        preloaded: Arc<Mutex<BTreeMap<String, String>>>,
    ) -> Upgrader {
        Upgrader {
            listener,
            socket,
            owns_socket,
            preloaded,
            accepting: watch::Sender::new(true),
            successor: Mutex::new(None),
        }
    }

    pub fn accepting(&self) -> watch::Receiver<bool> {
        self.accepting.subscribe()
    }

    /// Hands everything to a new process (blocking). On success this process must answer
    /// the caller and then [`Upgrader::finish`].
    pub fn run(
        &self,
        host: &Host,
        binary: Option<&str>,
        caller: &Caller,
        timeout: Duration,
    ) -> Result<DaemonUpgradeInfo, HostError> {
        let listener = self
            .listener
            .try_clone()
            .map_err(|e| HostError::DaemonUpgrade {
                binary: binary.unwrap_or("the installed fshostd").into(),
                why: format!("cannot duplicate the control socket: {e}"),
            })?;
        let daemon = DaemonSide {
            listener,
            socket: self.socket.clone(),
            owns_socket: self.owns_socket,
            preloaded: self
                .preloaded
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        };
        self.accepting.send_replace(false);
        match host.hand_over(binary, caller, timeout, daemon) {
            Ok((info, successor)) => {
                *self.successor.lock().unwrap_or_else(|e| e.into_inner()) = Some(successor);
                Ok(info)
            }
            Err(e) => {
                self.accepting.send_replace(true);
                Err(e)
            }
        }
    }

    /// Ends this process after a handover: systemd is told the new main process first.
    /// Nothing is unmounted or unloaded: the successor serves the same connections.
    pub fn finish(&self, info: &DaemonUpgradeInfo) -> ! {
        if std::env::var_os("NOTIFY_SOCKET").is_some() {
            crate::notify(&[NotifyState::MainPid(info.new_pid)]);
        }
        tracing::info!(
            new_pid = info.new_pid,
            "daemon upgrade: the new fshostd serves; this one exits"
        );
        crate::sys::exit_now(0)
    }
}
