//! Shutdown (SIGTERM/SIGINT): no new loads or mounts, every mount unmounted within one
//! deadline (the busy ones lazily after it), then every plugin unloaded.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::{Effects, Host, HostError};
use crate::mount::UnmountError;
use crate::registry::MountState;

/// How long shutdown waits, after the deadline, for the sessions of the mounts it detached.
const SESSION_END_AT_SHUTDOWN: Duration = Duration::from_secs(2);

impl<E: Effects> Host<E> {
    /// Unmounts everything (lazily for mounts still busy after `grace`), then unloads every
    /// plugin. Used on SIGTERM/SIGINT. One deadline for all mounts, not one per mount, so
    /// that many busy mounts stop as fast as one (systemd's TimeoutStopSec is for all).
    pub fn shutdown(&self, grace: Duration) {
        self.transition(|reg| reg.close());
        let deadline = Instant::now() + grace;
        // Let mounts that are being set up finish first, so none is missed.
        self.wait_until(Duration::from_secs(5), |reg| {
            reg.mounts().all(|(_, r)| r.state != MountState::Pending)
        });
        let mut detached = Vec::new();
        // Mounts whose unmount failed for another reason than being busy: not retried.
        let mut failed = Vec::new();
        loop {
            let active: Vec<PathBuf> = self
                .lock()
                .mounts()
                .filter(|(p, r)| r.state == MountState::Active && !failed.contains(*p))
                .map(|(p, _)| p.clone())
                .collect();
            if active.is_empty() {
                break;
            }
            let lazy = Instant::now() >= deadline;
            for path in active {
                match self.detach(&path, lazy) {
                    Ok(id) => detached.push((path, id)),
                    Err(HostError::Unmount(UnmountError::Busy(_))) => {}
                    Err(e) => {
                        tracing::warn!(mountpoint = %path.display(), error = %e, "unmount at shutdown failed");
                        failed.push(path);
                    }
                }
            }
            if lazy {
                break;
            }
            // Busy ones are tried again when something changes, or in 100 ms.
            self.wait_until(Duration::from_millis(100), |_| false);
        }
        // Sessions end as the kernel lets go of them; a lazily detached mount whose files
        // are still open ends when they close, which shutdown does not wait for.
        self.wait_until(SESSION_END_AT_SHUTDOWN, |reg| {
            detached.iter().all(|(_, id)| !reg.has_mount_id(*id))
        });
        for (path, id) in &detached {
            if self.lock().has_mount_id(*id) {
                tracing::warn!(mountpoint = %path.display(), "still busy after the grace period; detached lazily, its files keep it until they close");
            }
        }
        let names: Vec<String> = self.lock().plugins().map(|(n, _)| n.clone()).collect();
        for name in names {
            if let Err(e) = self.unload(&name, None) {
                tracing::warn!(plugin = %name, error = %e, "unload at shutdown failed");
            }
        }
    }
}
