//! After a crash, under systemd: the mounts whose FUSE connections systemd kept
//! (`fdstore.rs`) are served again when their plugin can do without the dead process's
//! memory (`resume`), and detached, by name in the log, when it cannot (memfs: its
//! contents died with the process). Runs at start, before the stale-mount sweep and before
//! the control socket is served.

use std::os::fd::OwnedFd;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};

use super::{Host, MountSide, Real};
use crate::fdstore::{self, Record};
use crate::handover::from_epoch;
use crate::mount::{self, MountStats, MountTarget, SessionOptions};

/// What recovery did, for the start-up log and the tests.
#[derive(Debug, Default)]
pub struct Recovered {
    pub served: Vec<std::path::PathBuf>,
    pub detached: Vec<std::path::PathBuf>,
}

impl Host<Real> {
    /// Serves again, or detaches, each kept connection (`kept`: kernel mount id and the
    /// descriptor systemd handed back).
    pub fn recover(&self, kept: Vec<(u64, OwnedFd)>) -> Recovered {
        let mut records = fdstore::records();
        let mounted = mount::kernel_mounts().unwrap_or_default();
        let mut done = Recovered::default();
        for (kernel_id, fuse) in kept {
            let Some(record) = records.remove(&kernel_id) else {
                tracing::warn!(
                    kernel_id,
                    "systemd kept a FUSE connection without a record of its mount; closing it"
                );
                fdstore::forget(kernel_id);
                continue;
            };
            let here = mounted
                .iter()
                .find(|m| m.id == kernel_id && m.mountpoint == record.mountpoint);
            let Some(here) = here else {
                tracing::info!(mountpoint = %record.mountpoint.display(), "a kept mount is gone (unmounted while fshostd was down)");
                fdstore::forget(kernel_id);
                continue;
            };
            match self.revive(&record, fuse) {
                Ok(()) => {
                    tracing::info!(plugin = %record.plugin, mountpoint = %record.mountpoint.display(), "mount served again after fshostd died");
                    done.served.push(record.mountpoint.clone());
                }
                Err(why) => {
                    tracing::error!(plugin = %record.plugin, mountpoint = %record.mountpoint.display(), %why, "{} mount {} lost its contents when fshostd died; detached", record.plugin, record.mountpoint.display());
                    // Every request fails from now on, whoever still holds the connection,
                    // and the mount leaves the namespace: nothing hangs, nothing stale stays.
                    if let Err(e) = mount::abort_connection(&here.device) {
                        tracing::debug!(error = %e, "cannot abort the connection through fusectl");
                    }
                    let _ = mount::detach_mount_at(&record.mountpoint, kernel_id, true);
                    fdstore::forget(kernel_id);
                    done.detached.push(record.mountpoint.clone());
                }
            }
        }
        // Records whose connection systemd did not hand back: nothing to serve.
        for kernel_id in records.into_keys() {
            fdstore::forget(kernel_id);
        }
        done
    }

    /// Loads the mount's plugin if needed, makes an instance that can resume, and serves.
    fn revive(&self, record: &Record, fuse: OwnedFd) -> Result<(), String> {
        if self.lock().plugin(&record.plugin).is_none() {
            self.load(&record.source.display().to_string(), Some(&record.plugin))
                .map_err(|e| e.to_string())?;
        }
        let path = record.mountpoint.as_path();
        let session = SessionOptions::parse(&record.options).map_err(|e| e.to_string())?;
        let (plugin, id) = self
            .transition(|reg| {
                reg.reserve_mount(
                    &record.plugin,
                    path,
                    record.options.clone(),
                    record.read_only,
                    record.owner,
                    from_epoch(record.since),
                )
            })
            .map_err(|e| e.to_string())?;
        let served = self.serve_revived(record, plugin, id, &session, fuse);
        if let Err(why) = &served {
            self.shared.release_mount(path, id);
            return Err(why.clone());
        }
        self.transition(|reg| reg.mount_started(path, id));
        Ok(())
    }

    fn serve_revived(
        &self,
        record: &Record,
        plugin: Arc<crate::plugin::Plugin>,
        id: crate::registry::MountId,
        session: &SessionOptions,
        fuse: OwnedFd,
    ) -> Result<(), String> {
        let path = record.mountpoint.as_path();
        if !plugin.library.resumable() {
            return Err(format!(
                "plugin \"{}\" cannot serve on without the memory of the process that died (it has no resume)",
                record.plugin
            ));
        }
        let target = MountTarget::reattach(path, record.uid, record.mode)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let side = Arc::new(MountSide {
            stats: Arc::new(MountStats::default()),
            target: Arc::new(target),
            kernel_id: AtomicU64::new(record.kernel_id),
            slot: OnceLock::new(),
        });
        let (revived, slot) = mount::revive_mount(
            path,
            plugin,
            &record.options,
            session,
            Arc::clone(&side.stats),
            fuse,
            record.agreed,
        )
        .map_err(|e| e.to_string())?;
        let _ = side.slot.set(slot);
        self.shared.sides().insert(id, Arc::clone(&side));
        let shared = Arc::clone(&self.shared);
        let ended = path.to_path_buf();
        revived
            .start(
                Arc::clone(&side.target),
                record.kernel_id,
                record.owner,
                move || shared.release_mount(&ended, id),
            )
            .map_err(|e| format!("cannot start serving it: {e}"))
    }
}
