//! Everything the host does outside its own state, behind one trait: opening and closing
//! libraries, the plugin-wide hooks, resolving mount points, making, ending and finding
//! kernel mounts, waiting and the clock. [`Real`] does it for real; the interleaving
//! checker (`interleavings.rs`) passes fakes and drives the real `Host` code step by step.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{absolute, HostError};
use crate::mount::UnmountError;
use crate::mount::{
    self, MountError, MountSpec, MountTarget, MoveError, Moved, Moving, Swappable, TargetError,
};
use crate::plugin::{self, LoadError, Plugin, Trust};

/// What the host reads of a loaded plugin.
pub trait PluginHandle: Send + Sync + 'static {
    fn name(&self) -> &str;
    fn version(&self) -> &str;
    /// The file the admin asked to load.
    fn source(&self) -> &Path;
    fn abi_version(&self) -> u32;
    /// Why the plugin is tainted (it panicked), if it is.
    fn taint(&self) -> Option<String>;
    /// How the loaded copy shows in the process's mappings (for the unmap proof).
    fn mapped_path(&self) -> PathBuf;
    /// The name its descriptor gives (the registered name may differ: `load --name`).
    fn kind(&self) -> &str;
    /// Whether its instances can hand their state over and take it (upgrades).
    fn upgradable(&self) -> bool;
    /// Whether it offers FUSE passthrough (agreed with the kernel per session).
    fn offers_passthrough(&self) -> bool;
}

/// What the host reads of a resolved mount point.
pub trait TargetHandle: Send + Sync + 'static {
    /// The path as the caller gave it (the registry's key).
    fn path(&self) -> &Path;
    /// Owner of the directory mounted on.
    fn owner(&self) -> u32;
}

/// A kernel mount as it is now.
pub struct MountNow {
    pub path: PathBuf,
    /// Requests the kernel has queued on its FUSE connection, when asked for and readable.
    pub waiting: Option<u64>,
}

/// A served mount, as a restart after a crash needs it.
pub struct KeptMount {
    pub plugin: String,
    /// The library the plugin was loaded from.
    pub source: PathBuf,
    pub path: PathBuf,
    pub kernel_id: u64,
    pub options: BTreeMap<String, String>,
    pub read_only: bool,
    pub owner: u32,
    pub since: std::time::SystemTime,
}

/// A mount to make: the plugin, where, and how.
pub type MountRequest<E> = MountSpec<<E as Effects>::Plugin, <E as Effects>::Target>;

/// The host's outside world. Every method may block; none is called with the registry
/// lock held (but `wait`, which releases it).
pub trait Effects: Send + Sync + Sized + 'static {
    type Plugin: PluginHandle;
    type Target: TargetHandle;
    /// A served mount's replaceable backend.
    type Slot: Clone + Send + Sync + 'static;

    /// Called before every registry transition: a point where another operation may run.
    /// The real host does nothing; the checker switches threads here.
    fn step(&self) {}

    /// Finds (bare names in the plugin directories), checks and opens a plugin library.
    fn open(
        &self,
        path: &str,
        name: Option<&str>,
        trust: &Trust,
    ) -> Result<Self::Plugin, HostError>;
    /// The plugin's `on_load`; an error is its errno.
    fn on_load(&self, plugin: &Self::Plugin) -> Result<(), i32>;
    fn on_unload(&self, plugin: &Self::Plugin);
    /// Closes a library the registry no longer holds; true if it is still mapped after.
    fn close(&self, plugin: Arc<Self::Plugin>) -> bool;
    /// Whether a closed library's copy is still mapped.
    fn is_mapped(&self, mapped: &Path) -> bool;

    /// Resolves a mount point once (no symlinks followed).
    fn resolve(&self, path: &Path) -> Result<Self::Target, TargetError>;
    /// Kernel id of the mount at `path`, if the path resolves.
    fn mount_id_at(&self, path: &Path) -> Option<u64>;
    /// Makes the plugin instance and the kernel mount and serves it on a thread of its
    /// own; returns the kernel mount id. `on_end` runs once the session has fully ended
    /// (instance destroyed, the plugin released), never if this returns an error. Returns
    /// the kernel mount id and the mount's backend.
    fn spawn_mount(
        &self,
        request: MountRequest<Self>,
        on_end: Box<dyn FnOnce() + Send>,
    ) -> Result<(u64, Self::Slot), MountError>;
    /// Moves the mounts to `new`, all or none: pauses them all, hands each instance's state
    /// to a new instance, swaps, resumes, and destroys the old instances.
    fn move_mounts(
        &self,
        new: &Arc<Self::Plugin>,
        mounts: &[Moving<Self::Slot>],
        timeout: Duration,
    ) -> Result<Moved, MoveError>;
    /// A mount is served: keep what serving it again after a crash of fshostd needs (the
    /// real world: systemd's file descriptor store, when systemd runs fshostd).
    fn keep_mount(&self, _mount: &KeptMount, _target: &Self::Target, _slot: &Self::Slot) {}
    /// Which transport carries a served mount's requests, for people (`info`, `mounts`).
    fn transport(&self, _slot: &Self::Slot) -> Option<String> {
        None
    }
    /// A mount ended: forget what `keep_mount` kept.
    fn forget_mount(&self, _kernel_id: u64) {}
    /// Unmounts exactly the kernel mount `id` at `target`.
    fn unmount(&self, target: &Self::Target, id: u64, lazy: bool) -> Result<(), UnmountError>;
    /// Where the kernel's mounts are now, by kernel id (a parent may have been renamed
    /// since a mount was made), and with `queues` how many requests the kernel has queued
    /// for each FUSE mount (where that can be read).
    fn kernel_mounts(&self, queues: bool) -> BTreeMap<u64, MountNow>;

    fn now(&self) -> Instant;
    /// Releases `guard`, waits until `changed` is signalled or `timeout` passes (or
    /// spuriously), and locks `mutex` again.
    fn wait<'a, T>(
        &self,
        changed: &Condvar,
        mutex: &'a Mutex<T>,
        guard: MutexGuard<'a, T>,
        timeout: Duration,
    ) -> MutexGuard<'a, T>;
}

/// The real world: dlopen, FUSE, the kernel's mounts, the system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct Real;

impl PluginHandle for Plugin {
    fn name(&self) -> &str {
        &self.name
    }
    fn version(&self) -> &str {
        &self.version
    }
    fn source(&self) -> &Path {
        &self.source
    }
    fn abi_version(&self) -> u32 {
        self.abi_version
    }
    fn taint(&self) -> Option<String> {
        self.library.taint()
    }
    fn mapped_path(&self) -> PathBuf {
        self.mapped_path.clone()
    }
    fn kind(&self) -> &str {
        &self.kind
    }
    fn upgradable(&self) -> bool {
        self.library.upgradable()
    }
    fn offers_passthrough(&self) -> bool {
        self.library.offers_passthrough()
    }
}

impl TargetHandle for MountTarget {
    fn path(&self) -> &Path {
        &self.path
    }
    fn owner(&self) -> u32 {
        self.uid
    }
}

/// A bare name (`memfs`) is looked up in the plugin directories as `libmemfs.so`,
/// `memfs.so` or `memfs`; anything with a slash is a path and must be absolute.
fn resolve_plugin_path(path: &str, trust: &Trust) -> Result<PathBuf, HostError> {
    if path.contains('/') {
        return absolute(path, "plugin path");
    }
    let candidates = [
        format!("lib{path}.so"),
        format!("{path}.so"),
        path.to_string(),
    ];
    for dir in &trust.plugin_dirs {
        for candidate in &candidates {
            let full = dir.join(candidate);
            if full.is_file() {
                return Ok(full);
            }
        }
    }
    Err(HostError::Load(LoadError::NotInPluginDirs {
        name: path.to_string(),
        dirs: trust.plugin_dirs.clone(),
    }))
}

impl Effects for Real {
    type Plugin = Plugin;
    type Target = MountTarget;
    type Slot = Arc<Swappable>;

    fn open(&self, path: &str, name: Option<&str>, trust: &Trust) -> Result<Plugin, HostError> {
        let path = resolve_plugin_path(path, trust)?;
        Ok(plugin::load(&path, name, trust)?)
    }

    fn on_load(&self, plugin: &Plugin) -> Result<(), i32> {
        plugin::on_fresh_thread(|| plugin.library.on_load()).map_err(|errno| errno.0)
    }

    fn on_unload(&self, plugin: &Plugin) {
        plugin::on_fresh_thread(|| plugin.library.on_unload());
    }

    fn close(&self, plugin: Arc<Plugin>) -> bool {
        match Arc::try_unwrap(plugin) {
            Ok(plugin) => {
                let name = plugin.name.clone();
                let still_mapped = plugin::close(plugin);
                if still_mapped {
                    tracing::warn!(plugin = %name, "library is still mapped after dlclose: it left a thread or a thread-local destructor behind");
                }
                still_mapped
            }
            Err(plugin) => {
                // Cannot happen while invariant 2 holds; never dlclose under a user.
                tracing::error!(plugin = %plugin.name, "plugin still referenced at unload; leaving it mapped");
                true
            }
        }
    }

    fn is_mapped(&self, mapped: &Path) -> bool {
        plugin::is_mapped(mapped)
    }

    fn resolve(&self, path: &Path) -> Result<MountTarget, TargetError> {
        MountTarget::resolve(path)
    }

    fn mount_id_at(&self, path: &Path) -> Option<u64> {
        mount::mount_id_at(path).ok()
    }

    fn spawn_mount(
        &self,
        request: MountRequest<Self>,
        on_end: Box<dyn FnOnce() + Send>,
    ) -> Result<(u64, Arc<Swappable>), MountError> {
        mount::spawn(request, on_end)
    }

    fn move_mounts(
        &self,
        new: &Arc<Plugin>,
        mounts: &[Moving],
        timeout: Duration,
    ) -> Result<Moved, MoveError> {
        mount::move_mounts(new, mounts, timeout)
    }

    fn unmount(&self, target: &MountTarget, id: u64, lazy: bool) -> Result<(), UnmountError> {
        mount::unmount(target, id, lazy)
    }

    fn transport(&self, slot: &Arc<Swappable>) -> Option<String> {
        Some(slot.link.transport().to_string())
    }

    fn keep_mount(&self, kept: &KeptMount, target: &MountTarget, slot: &Arc<Swappable>) {
        let (Some(agreed), Some(fuse)) = (slot.link.agreed(), slot.link.fd()) else {
            return;
        };
        let record = crate::fdstore::Record {
            plugin: kept.plugin.clone(),
            source: kept.source.clone(),
            mountpoint: kept.path.clone(),
            kernel_id: kept.kernel_id,
            options: kept.options.clone(),
            read_only: kept.read_only,
            owner: kept.owner,
            uid: target.uid,
            mode: target.mode,
            since: crate::handover::epoch(kept.since),
            agreed,
        };
        crate::fdstore::keep(&record, fuse.as_fd());
    }

    fn forget_mount(&self, kernel_id: u64) {
        crate::fdstore::forget(kernel_id);
    }

    fn kernel_mounts(&self, queues: bool) -> BTreeMap<u64, MountNow> {
        mount::kernel_mounts()
            .unwrap_or_default()
            .into_iter()
            .map(|m| {
                let fuse = m.fstype.starts_with("fuse.fshost");
                let waiting = (queues && fuse)
                    .then(|| mount::fuse_waiting(&m.device))
                    .flatten();
                (
                    m.id,
                    MountNow {
                        path: m.mountpoint,
                        waiting,
                    },
                )
            })
            .collect()
    }

    fn now(&self) -> Instant {
        Instant::now()
    }

    fn wait<'a, T>(
        &self,
        changed: &Condvar,
        _mutex: &'a Mutex<T>,
        guard: MutexGuard<'a, T>,
        timeout: Duration,
    ) -> MutexGuard<'a, T> {
        changed
            .wait_timeout(guard, timeout)
            .unwrap_or_else(|e| e.into_inner())
            .0
    }
}
