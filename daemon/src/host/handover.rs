//! Daemon upgrade, the host's part: the old process freezes the registry (nothing loads,
//! mounts, unmounts, unloads or upgrades meanwhile), pauses every mount as a plugin
//! upgrade does, exports each instance's state and connection, and hands all of it to a
//! new fshostd process ([`Host::hand_over`]); the new process loads the same plugins from
//! their private copies, makes every mount's instance again from the state and builds its
//! session without INIT ([`Host::take_over`]), and once the old process is gone serves
//! them ([`Host::serve_taken_over`]). Until the new process reports ready, any failure
//! resumes the old process's mounts and thaws its registry: it serves on as before.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use fshost_protocol::DaemonUpgradeInfo;

use super::{Caller, Frozen, Host, HostError, MountSide, Real};
use crate::handover::{
    self, from_epoch, Manifest, MountFds, MountOut, Outgoing, PluginOut, Received, Successor,
};
use crate::mount::{self, MountStats, MountTarget, ResumedMount, SessionOptions};
use crate::registry::MountId;

/// What the daemon adds to the host's state in a handover.
pub struct DaemonSide {
    /// A duplicate of the control socket's listener.
    pub listener: OwnedFd,
    pub socket: PathBuf,
    pub owns_socket: bool,
    pub preloaded: std::collections::BTreeMap<String, String>,
}

/// How long the new process may take to load everything and resume every mount.
const READY_LIMIT: Duration = Duration::from_secs(60);

/// A mount taken over, ready to be served once the old process is gone.
pub struct TakenOver {
    resumed: ResumedMount,
    target: Arc<MountTarget>,
    kernel_id: u64,
    owner: u32,
    id: MountId,
    path: PathBuf,
}

impl Host<Real> {
    /// Hands everything to a new process of `binary` (default: the installed path of the
    /// running one). On success the mounts stay paused and the registry frozen: the caller
    /// answers and exits. On failure everything resumes as it was.
    pub fn hand_over(
        &self,
        binary: Option<&str>,
        caller: &Caller,
        timeout: Duration,
        daemon: DaemonSide,
    ) -> Result<(DaemonUpgradeInfo, Successor), HostError> {
        let binary = match binary {
            None => handover::installed_binary().map_err(|e| failed("", e.to_string()))?,
            Some(_) if caller.uid != 0 => return Err(HostError::OtherBinary),
            Some(path) => PathBuf::from(path),
        };
        let exe = self.trusted_binary(&binary)?;
        let frozen = self.freeze()?;
        self.hand_over_frozen(&binary, &exe, frozen, timeout, daemon)
            .inspect_err(|e| {
                self.thaw();
                tracing::warn!(error = %e, "daemon upgrade failed; this process serves on");
            })
    }

    /// Opens the new binary once and checks that only root could have put it there.
    fn trusted_binary(&self, binary: &Path) -> Result<File, HostError> {
        let refuse = |why: String| failed(&binary.display().to_string(), why);
        let exe = File::open(binary).map_err(|e| refuse(format!("cannot open it: {e}")))?;
        let meta = exe.metadata().map_err(|e| refuse(e.to_string()))?;
        if !meta.is_file() || meta.mode() & 0o111 == 0 {
            return Err(refuse("it is not an executable file".into()));
        }
        if !self.trust().dev {
            if meta.uid() != 0 || meta.mode() & 0o022 != 0 {
                return Err(refuse(format!(
                    "it is owned by uid {} with mode {:o}; a binary fshostd runs as root must be root's and writable by no one else",
                    meta.uid(),
                    meta.mode() & 0o7777
                )));
            }
            if let Some(dir) = binary.parent() {
                crate::check_private_dir(dir, 0).map_err(refuse)?;
            }
        }
        Ok(exe)
    }

    fn hand_over_frozen(
        &self,
        binary: &Path,
        exe: &File,
        frozen: Frozen<Real>,
        timeout: Duration,
        daemon: DaemonSide,
    ) -> Result<(DaemonUpgradeInfo, Successor), HostError> {
        let began = Instant::now();
        let binary_text = binary.display().to_string();
        let fail = |why: String| failed(&binary_text, why);
        let mut outgoing = Outgoing::default();
        let mut manifest = Manifest {
            format: handover::FORMAT,
            listener: outgoing.push(daemon.listener),
            from_pid: std::process::id(),
            from_version: env!("CARGO_PKG_VERSION").into(),
            socket: daemon.socket,
            owns_socket: daemon.owns_socket,
            preloaded: daemon.preloaded,
            plugins: Vec::new(),
            mounts: Vec::new(),
        };
        let Frozen { plugins, mounts } = frozen;
        for (name, plugin, generation, loaded_at) in &plugins {
            let mounted: Vec<PathBuf> = mounts
                .iter()
                .filter(|(_, r, _, _)| &r.plugin == name)
                .map(|(path, _, _, _)| path.clone())
                .collect();
            if !plugin.library.upgradable() && !mounted.is_empty() {
                return Err(fail(format!(
                    "plugin \"{name}\" cannot hand its mounts' state over (it implements no export_state/import_state); unmount {} first",
                    crate::registry::join_paths(&mounted)
                )));
            }
            let image = plugin.image().map_err(|e| fail(e.to_string()))?;
            manifest.plugins.push(PluginOut {
                name: name.clone(),
                source: plugin.source.clone(),
                image: outgoing.push(image),
                generation: *generation,
                loaded_at: handover::epoch(*loaded_at),
            });
        }
        // A ring's requests cannot cross to another process (Linux 6.18: they stay in the
        // old process's ring entries, and the kernel does not re-send them), so a mount
        // served over io_uring holds the upgrade back.
        let ringed: Vec<PathBuf> = mounts
            .iter()
            .filter(|(_, _, _, slot)| slot.link.agreed().is_some_and(|a| a.uring))
            .map(|(path, _, _, _)| path.clone())
            .collect();
        if !ringed.is_empty() {
            return Err(fail(format!(
                "{} served over io_uring (-o uring), whose requests cannot be handed to another process; unmount {} first (mounts without -o uring cross upgrades)",
                if ringed.len() == 1 { "a mount is" } else { "mounts are" },
                crate::registry::join_paths(&ringed)
            )));
        }
        // Pause every mount at once: requests in flight finish, new ones wait (and, once
        // this process is gone, are read by the next one).
        let paused = mount::pause_all(
            mounts
                .iter()
                .map(|(path, _, _, slot)| (path.as_path(), &**slot)),
            timeout,
        )
        .map_err(|e| fail(e.to_string()))?;
        let mut state_bytes = 0;
        for ((path, record, side, slot), current) in mounts.iter().zip(&paused) {
            let mut state = handover::memfd("fshost-state").map_err(|e| fail(e.to_string()))?;
            let (mut handed, state_fds) = mount::export_mount(path, slot, current, &mut state)
                .map_err(|e| fail(e.to_string()))?;
            handed.state_fds = state_fds.into_iter().map(|fd| outgoing.push(fd)).collect();
            state_bytes += handed.state_bytes;
            let (target, parent, dir) = side.target.hand_over().map_err(|e| fail(e.to_string()))?;
            let fuse = slot
                .link
                .fd()
                .ok_or_else(|| fail(format!("{} has no connection yet", path.display())))?
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| fail(e.to_string()))?;
            let fds = MountFds {
                fuse: outgoing.push(fuse),
                parent: outgoing.push(parent),
                dir: outgoing.push(dir),
                state: outgoing.push(OwnedFd::from(state)),
            };
            manifest.mounts.push(MountOut {
                plugin: record.plugin.clone(),
                options: record.options.clone(),
                read_only: record.read_only,
                owner: record.owner,
                since: handover::epoch(record.since),
                kernel_id: side.kernel_id.load(Ordering::SeqCst),
                target,
                handed,
                fds,
            });
        }
        let mut successor =
            handover::start(binary, exe).map_err(|e| fail(format!("cannot start it: {e}")))?;
        tracing::info!(pid = successor.pid(), binary = %binary.display(), plugins = plugins.len(), mounts = manifest.mounts.len(), state_bytes, "daemon upgrade: handing over");
        if let Err(e) = successor.send(&manifest, outgoing) {
            // Most likely it died: say how.
            let how = successor
                .wait_ready(Duration::from_secs(2))
                .err()
                .unwrap_or_default();
            return Err(fail(format!("cannot hand over to it ({e}): {how}")));
        }
        successor.wait_ready(READY_LIMIT).map_err(|why| {
            fail(format!(
                "the new process (pid {}) failed: {why}",
                successor.pid()
            ))
        })?;
        // Ready: the mounts stay paused until this process exits, so that nothing changes
        // after the state was handed over; the new process re-reads what was left unread.
        std::mem::forget(paused);
        let info = DaemonUpgradeInfo {
            old_pid: std::process::id(),
            new_pid: successor.pid(),
            binary: binary_text.clone(),
            plugins: plugins.len(),
            mounts: manifest
                .mounts
                .iter()
                .map(|m| m.target.path.display().to_string())
                .collect(),
            pause_us: began.elapsed().as_micros() as u64,
            state_bytes,
        };
        Ok((info, successor))
    }

    /// The new process's part: loads the plugins the old process handed over (their
    /// private copies) and makes every mount again, not yet served. An error says what
    /// failed; the caller reports it to the old process and exits.
    pub fn take_over(&self, received: &mut Received) -> Result<Vec<TakenOver>, String> {
        let plugins = std::mem::take(&mut received.manifest.plugins);
        let mounts = std::mem::take(&mut received.manifest.mounts);
        for plugin in &plugins {
            let image = received.take(plugin.image).map_err(|e| e.to_string())?;
            let loaded =
                crate::plugin::load_handed(File::from(image), &plugin.source, &plugin.name)
                    .map_err(|e| format!("plugin \"{}\": {e}", plugin.name))?;
            self.register(Arc::new(loaded)).map_err(|e| e.to_string())?;
            self.transition(|reg| {
                reg.resumed_plugin(
                    &plugin.name,
                    plugin.generation,
                    from_epoch(plugin.loaded_at),
                )
            });
        }
        let mut taken = Vec::with_capacity(mounts.len());
        for out in mounts {
            let path = out.target.path.clone();
            let what = |e: String| format!("mount {}: {e}", path.display());
            let session = SessionOptions::parse(&out.options).map_err(|e| what(e.to_string()))?;
            let state = received
                .read_state(out.fds.state, out.handed.state_bytes)
                .map_err(|e| what(e.to_string()))?;
            let state_fds = out
                .handed
                .state_fds
                .iter()
                .map(|&i| received.take(i))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| what(e.to_string()))?;
            let fuse = received
                .take(out.fds.fuse)
                .map_err(|e| what(e.to_string()))?;
            let parent = received
                .take(out.fds.parent)
                .map_err(|e| what(e.to_string()))?;
            let dir = received
                .take(out.fds.dir)
                .map_err(|e| what(e.to_string()))?;
            let target = Arc::new(MountTarget::taken_over(out.target, parent, dir));
            let (plugin, id) = self
                .transition(|reg| {
                    reg.reserve_mount(
                        &out.plugin,
                        &path,
                        out.options.clone(),
                        out.read_only,
                        out.owner,
                        from_epoch(out.since),
                    )
                })
                .map_err(|e| what(e.to_string()))?;
            let side = Arc::new(MountSide {
                stats: Arc::new(MountStats::default()),
                target: Arc::clone(&target),
                kernel_id: AtomicU64::new(out.kernel_id),
                slot: OnceLock::new(),
            });
            self.shared.sides().insert(id, Arc::clone(&side));
            let (resumed, slot) = mount::resume_mount(
                &path,
                plugin,
                &out.options,
                &session,
                Arc::clone(&side.stats),
                fuse,
                &out.handed,
                &state,
                &state_fds,
            )
            .map_err(|e| what(e.to_string()))?;
            let _ = side.slot.set(slot);
            taken.push(TakenOver {
                resumed,
                target,
                kernel_id: out.kernel_id,
                owner: out.owner,
                id,
                path,
            });
        }
        Ok(taken)
    }

    /// Serves the mounts taken over (the old process is gone).
    pub fn serve_taken_over(&self, taken: Vec<TakenOver>) {
        for mount in taken {
            let shared = Arc::clone(&self.shared);
            let (path, id) = (mount.path.clone(), mount.id);
            let on_end = move || shared.release_mount(&path, id);
            match mount
                .resumed
                .start(mount.target, mount.kernel_id, mount.owner, on_end)
            {
                Ok(()) => {
                    self.transition(|reg| reg.mount_started(&mount.path, mount.id));
                }
                Err(e) => {
                    tracing::error!(mountpoint = %mount.path.display(), error = %e, "cannot serve a mount taken over");
                    self.shared.release_mount(&mount.path, mount.id);
                }
            }
        }
    }
}

fn failed(binary: &str, why: String) -> HostError {
    HostError::DaemonUpgrade {
        binary: binary.to_string(),
        why,
    }
}
