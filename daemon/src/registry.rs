//! The registry: the seed's state machine. One value behind one mutex holds every plugin's
//! state and every mount record; the transitions below are the only way to change them.
//!
//! Pure by design: no I/O, no plugin calls, no waiting. Callers take the lock, call one
//! transition, drop the lock, and only then do the slow part (dlopen, `on_load`, mount,
//! umount, dlclose). Every refused transition returns an error and leaves the registry
//! exactly as it was.
//!
//! Architecture Invariant: a mount record is only ever created for a `Live` plugin (it may
//! then see its plugin go `Deregistering` during a drain), and a plugin's mount count is the
//! number of its mount records (derived, never stored separately).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

pub use fshost_protocol::PluginState;

/// Identifies one mount for its whole life, so a late "session ended" for an old mount can
/// never remove a newer record at the same path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MountId(pub u64);

/// Where a mount is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountState {
    /// Reserved: the plugin instance and the kernel mount are being made.
    Pending,
    /// Mounted and served.
    Active,
    /// An unmount is in progress.
    Unmounting,
}

impl fmt::Display for MountState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MountState::Pending => "still being mounted",
            MountState::Active => "mounted",
            MountState::Unmounting => "being unmounted",
        })
    }
}

/// One plugin known to the daemon.
#[derive(Debug)]
pub struct PluginEntry<P> {
    pub state: PluginState,
    pub handle: Arc<P>,
    pub loaded_at: SystemTime,
    /// 1 when loaded; each committed upgrade adds one.
    pub generation: u32,
    /// The next generation while an upgrade installs it: registering until the mounts
    /// have moved to it, then it replaces `handle`. Mounts of the plugin are neither made
    /// nor unmounted meanwhile (their sessions may still end from outside).
    pub upgrading: Option<Arc<P>>,
}

/// One mount, pending or live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountRecord {
    pub id: MountId,
    pub plugin: String,
    pub state: MountState,
    pub since: SystemTime,
    pub options: BTreeMap<String, String>,
    pub read_only: bool,
    /// Uid of the caller who mounted it (root for the daemon's own mounts).
    pub owner: u32,
}

/// Why a transition was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("plugin \"{name}\" is already loaded; unload it first or load this one with --name")]
    AlreadyLoaded { name: String },
    #[error("plugin \"{name}\" is busy: it is {state}; try again when it is live")]
    NotLive { name: String, state: PluginState },
    #[error("plugin \"{name}\" is not loaded (see `fshostctl list`)")]
    UnknownPlugin { name: String },
    #[error("plugin \"{name}\" is busy: {} ({}); unmount them first", mount_count(.mounts.len()), join_paths(.mounts))]
    PluginBusy { name: String, mounts: Vec<PathBuf> },
    #[error("{} is already an fshost mount point (plugin \"{plugin}\"); unmount it first", .path.display())]
    MountpointInUse { path: PathBuf, plugin: String },
    #[error("{} is not an fshost mount point (see `fshostctl mounts`)", .path.display())]
    UnknownMount { path: PathBuf },
    #[error("mount {} is busy: it is {state}; try again in a moment", .path.display())]
    MountBusy { path: PathBuf, state: MountState },
    #[error("fshostd is shutting down and takes no new loads or mounts")]
    ShuttingDown,
    #[error("plugin \"{name}\" is being upgraded; try again when the upgrade has finished")]
    Upgrading { name: String },
    #[error("fshostd is handing everything over to a new fshostd process (daemon-upgrade); try again in a few seconds")]
    HandingOver,
}

/// "1 mount", "2 mounts": for messages.
pub fn mount_count(n: usize) -> String {
    if n == 1 {
        "1 mount".to_string()
    } else {
        format!("{n} mounts")
    }
}

/// Paths as "a, b, c": for messages.
pub fn join_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Mount records with their mount points.
pub type Mounts = Vec<(PathBuf, MountRecord)>;

/// All plugins and mounts of one daemon.
#[derive(Debug)]
pub struct Registry<P> {
    plugins: BTreeMap<String, PluginEntry<P>>,
    mounts: BTreeMap<PathBuf, MountRecord>,
    next_mount_id: u64,
    /// Set at shutdown: no new loads or mounts from then on.
    closed: bool,
    /// Set while a daemon upgrade hands everything to the next process: nothing changes.
    handing_over: bool,
}

impl<P> Default for Registry<P> {
    fn default() -> Self {
        Registry {
            plugins: BTreeMap::new(),
            mounts: BTreeMap::new(),
            next_mount_id: 1,
            closed: false,
            handing_over: false,
        }
    }
}

impl<P> Registry<P> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn plugins(&self) -> impl Iterator<Item = (&String, &PluginEntry<P>)> {
        self.plugins.iter()
    }

    pub fn plugin(&self, name: &str) -> Option<&PluginEntry<P>> {
        self.plugins.get(name)
    }

    pub fn mounts(&self) -> impl Iterator<Item = (&PathBuf, &MountRecord)> {
        self.mounts.iter()
    }

    #[cfg(test)]
    pub fn mount(&self, path: &Path) -> Option<&MountRecord> {
        self.mounts.get(path)
    }

    /// The mount points of one plugin; their number is its mount count.
    pub fn mounts_of(&self, name: &str) -> Vec<PathBuf> {
        self.mounts
            .iter()
            .filter(|(_, record)| record.plugin == name)
            .map(|(path, _)| path.clone())
            .collect()
    }

    pub fn mount_owner(&self, path: &Path) -> Option<u32> {
        self.mounts.get(path).map(|r| r.owner)
    }

    pub fn mount_count(&self, name: &str) -> usize {
        self.mounts.values().filter(|r| r.plugin == name).count()
    }

    /// True while the mount with this id still has its record.
    pub fn has_mount_id(&self, id: MountId) -> bool {
        self.mounts.values().any(|r| r.id == id)
    }

    /// The path the mount with this id is recorded at, while it has its record.
    pub fn mount_path(&self, id: MountId) -> Option<PathBuf> {
        let mut mounts = self.mounts.iter();
        mounts
            .find(|(_, r)| r.id == id)
            .map(|(path, _)| path.clone())
    }

    /// Refuses every later load and mount; what exists stays and can still be unmounted
    /// and unloaded. Used at shutdown so nothing new appears while everything is torn down.
    pub fn close(&mut self) {
        self.closed = true;
    }

    /// Refused while shutting down or handing over: nothing new may start.
    fn open_for_new(&self) -> Result<(), RegistryError> {
        if self.closed {
            return Err(RegistryError::ShuttingDown);
        }
        self.not_handing_over()
    }

    fn not_handing_over(&self) -> Result<(), RegistryError> {
        if self.handing_over {
            return Err(RegistryError::HandingOver);
        }
        Ok(())
    }

    /// Daemon upgrade, step 1: nothing may change from now until [`Registry::end_handover`]
    /// (loads, mounts, unmounts, unloads and upgrades are refused as busy; a session that
    /// ends from outside still releases its mount). Refused unless everything is settled:
    /// every plugin Live and not being upgraded, every mount served. Returns the plugins
    /// (name, library, generation, loaded at) and the mounts to hand over.
    #[allow(clippy::type_complexity)]
    pub fn begin_handover(
        &mut self,
    ) -> Result<(Vec<(String, Arc<P>, u32, SystemTime)>, Mounts), RegistryError> {
        self.open_for_new()?;
        if let Some((name, entry)) = self
            .plugins
            .iter()
            .find(|(_, e)| e.state != PluginState::Live || e.upgrading.is_some())
        {
            return Err(match entry.state {
                PluginState::Live => RegistryError::Upgrading { name: name.clone() },
                state => RegistryError::NotLive {
                    name: name.clone(),
                    state,
                },
            });
        }
        if let Some((path, record)) = self
            .mounts
            .iter()
            .find(|(_, r)| r.state != MountState::Active)
        {
            return Err(RegistryError::MountBusy {
                path: path.clone(),
                state: record.state,
            });
        }
        self.handing_over = true;
        let plugins = self
            .plugins
            .iter()
            .map(|(name, e)| {
                (
                    name.clone(),
                    Arc::clone(&e.handle),
                    e.generation,
                    e.loaded_at,
                )
            })
            .collect();
        let mounts = self
            .mounts
            .iter()
            .map(|(path, r)| (path.clone(), r.clone()))
            .collect();
        Ok((plugins, mounts))
    }

    /// The handover failed: this process serves on and things may change again.
    pub fn end_handover(&mut self) {
        self.handing_over = false;
    }

    /// A plugin taken over from the previous process keeps its generation and age.
    pub fn resumed_plugin(&mut self, name: &str, generation: u32, loaded_at: SystemTime) {
        if let Some(entry) = self.plugins.get_mut(name) {
            entry.generation = generation;
            entry.loaded_at = loaded_at;
        }
    }

    /// Load, step 1: reserve the name in `Registering` (its library is already open).
    pub fn begin_load(
        &mut self,
        name: &str,
        handle: Arc<P>,
        now: SystemTime,
    ) -> Result<(), RegistryError> {
        self.open_for_new()?;
        if let Some(entry) = self.plugins.get(name) {
            return Err(match entry.state {
                PluginState::Live => RegistryError::AlreadyLoaded { name: name.into() },
                state => RegistryError::NotLive {
                    name: name.into(),
                    state,
                },
            });
        }
        self.plugins.insert(
            name.to_string(),
            PluginEntry {
                state: PluginState::Registering,
                handle,
                loaded_at: now,
                generation: 1,
                upgrading: None,
            },
        );
        Ok(())
    }

    /// Load, step 2 (on_load succeeded): `Registering` → `Live`.
    pub fn finish_load(&mut self, name: &str) -> Result<(), RegistryError> {
        let entry = self.entry_in(name, PluginState::Registering)?;
        entry.state = PluginState::Live;
        Ok(())
    }

    /// Load failed after the reservation: remove the entry and hand back the library to close.
    pub fn abort_load(&mut self, name: &str) -> Result<Arc<P>, RegistryError> {
        self.entry_in(name, PluginState::Registering)?;
        Ok(self.remove(name))
    }

    /// Mount, step 1: count the mount before it exists, so an unload cannot slip in.
    pub fn reserve_mount(
        &mut self,
        name: &str,
        path: &Path,
        options: BTreeMap<String, String>,
        read_only: bool,
        owner: u32,
        now: SystemTime,
    ) -> Result<(Arc<P>, MountId), RegistryError> {
        self.open_for_new()?;
        let entry = self.entry_in(name, PluginState::Live)?;
        let handle = Arc::clone(&entry.handle);
        if entry.upgrading.is_some() {
            return Err(RegistryError::Upgrading { name: name.into() });
        }
        if let Some(existing) = self.mounts.get(path) {
            return Err(RegistryError::MountpointInUse {
                path: path.to_path_buf(),
                plugin: existing.plugin.clone(),
            });
        }
        let id = MountId(self.next_mount_id);
        self.next_mount_id += 1;
        self.mounts.insert(
            path.to_path_buf(),
            MountRecord {
                id,
                plugin: name.to_string(),
                state: MountState::Pending,
                since: now,
                options,
                read_only,
                owner,
            },
        );
        Ok((handle, id))
    }

    /// Mount, step 2: the kernel mount exists. Returns false if the mount already ended
    /// (an admin unmounted it in between), which is not an error.
    pub fn mount_started(&mut self, path: &Path, id: MountId) -> bool {
        match self.mounts.get_mut(path) {
            Some(record) if record.id == id && record.state == MountState::Pending => {
                record.state = MountState::Active;
                true
            }
            _ => false,
        }
    }

    /// The mount failed, or its session has fully ended: the count drops by one.
    /// Returns false if there was no such record (nothing changes then).
    pub fn release_mount(&mut self, path: &Path, id: MountId) -> bool {
        match self.mounts.get(path) {
            Some(record) if record.id == id => {
                self.mounts.remove(path);
                true
            }
            _ => false,
        }
    }

    /// Unmount, step 1: `Active` → `Unmounting`, so that two unmounts cannot race.
    pub fn begin_unmount(&mut self, path: &Path) -> Result<MountId, RegistryError> {
        self.not_handing_over()?;
        let record = self
            .mounts
            .get_mut(path)
            .ok_or_else(|| RegistryError::UnknownMount {
                path: path.to_path_buf(),
            })?;
        if record.state != MountState::Active {
            return Err(RegistryError::MountBusy {
                path: path.to_path_buf(),
                state: record.state,
            });
        }
        if let Some(entry) = self.plugins.get(&record.plugin) {
            if entry.upgrading.is_some() {
                return Err(RegistryError::Upgrading {
                    name: record.plugin.clone(),
                });
            }
        }
        record.state = MountState::Unmounting;
        Ok(record.id)
    }

    /// The umount call failed (e.g. EBUSY): the mount stays, `Unmounting` → `Active`.
    pub fn abort_unmount(&mut self, path: &Path, id: MountId) -> bool {
        match self.mounts.get_mut(path) {
            Some(record) if record.id == id && record.state == MountState::Unmounting => {
                record.state = MountState::Active;
                true
            }
            _ => false,
        }
    }

    /// Unload, step 1: `Live` with no mounts → `Deregistering`; new mounts are refused from now.
    pub fn begin_unload(&mut self, name: &str) -> Result<Arc<P>, RegistryError> {
        self.not_handing_over()?;
        let mounts = self.mounts_of(name);
        let entry = self.live_entry(name)?;
        if !mounts.is_empty() {
            return Err(RegistryError::PluginBusy {
                name: name.to_string(),
                mounts,
            });
        }
        entry.state = PluginState::Deregistering;
        Ok(Arc::clone(&entry.handle))
    }

    /// Drain-unload, step 1: `Live` → `Deregistering` even with mounts. New mounts are
    /// refused from now; the existing ones go on until they are unmounted.
    pub fn begin_drain(&mut self, name: &str) -> Result<Arc<P>, RegistryError> {
        self.not_handing_over()?;
        let entry = self.live_entry(name)?;
        entry.state = PluginState::Deregistering;
        Ok(Arc::clone(&entry.handle))
    }

    /// A drain that timed out or was cancelled: `Deregistering` → `Live`.
    pub fn abort_unload(&mut self, name: &str) -> Result<(), RegistryError> {
        let entry = self.entry_in(name, PluginState::Deregistering)?;
        entry.state = PluginState::Live;
        Ok(())
    }

    /// Unload, last step (on_unload has run): remove the entry; the caller closes the
    /// library. Refused while any mount is left, so a library never closes under a user.
    pub fn finish_unload(&mut self, name: &str) -> Result<Arc<P>, RegistryError> {
        let mounts = self.mounts_of(name);
        self.entry_in(name, PluginState::Deregistering)?;
        if !mounts.is_empty() {
            return Err(RegistryError::PluginBusy {
                name: name.to_string(),
                mounts,
            });
        }
        Ok(self.remove(name))
    }

    /// Upgrade, step 1 (the new generation's library is open): `name` is Live, not being
    /// upgraded, and every mount of it is served; `new` is kept as the registering next
    /// generation, and the plugin's mounts are neither made nor unmounted until the upgrade
    /// commits or aborts. Returns the current generation and the mounts to move.
    pub fn begin_upgrade(
        &mut self,
        name: &str,
        new: Arc<P>,
    ) -> Result<(Arc<P>, Mounts), RegistryError> {
        self.open_for_new()?;
        let mounts: Vec<(PathBuf, &MountRecord)> = self
            .mounts
            .iter()
            .filter(|(_, r)| r.plugin == name)
            .map(|(path, r)| (path.clone(), r))
            .collect();
        if let Some((path, record)) = mounts.iter().find(|(_, r)| r.state != MountState::Active) {
            return Err(RegistryError::MountBusy {
                path: path.clone(),
                state: record.state,
            });
        }
        let mounts = mounts
            .into_iter()
            .map(|(path, r)| (path, r.clone()))
            .collect();
        let entry = self.live_entry(name)?;
        entry.upgrading = Some(new);
        Ok((Arc::clone(&entry.handle), mounts))
    }

    /// The upgrade failed: the next generation goes (the caller closes it); the current
    /// one serves on, as it did throughout.
    pub fn abort_upgrade(&mut self, name: &str) -> Option<Arc<P>> {
        self.plugins.get_mut(name)?.upgrading.take()
    }

    /// Upgrade, last step (every mount now runs the new generation's code): the next
    /// generation becomes the plugin; returns the old one for the caller to close.
    pub fn commit_upgrade(&mut self, name: &str, now: SystemTime) -> Option<Arc<P>> {
        let entry = self.plugins.get_mut(name)?;
        let new = entry.upgrading.take()?;
        entry.generation += 1;
        entry.loaded_at = now;
        Some(std::mem::replace(&mut entry.handle, new))
    }

    /// Checks the invariants of DESIGN.md §2 that the registry alone can see; returns the
    /// first violation. Debug builds of the daemon run it after every transition.
    pub fn check(&self) -> Result<(), String> {
        for (path, record) in &self.mounts {
            match self.plugins.get(&record.plugin) {
                None => {
                    return Err(format!(
                        "mount {} of unknown plugin {}",
                        path.display(),
                        record.plugin
                    ))
                }
                Some(entry) if entry.state == PluginState::Registering => {
                    return Err(format!("mount {} on a registering plugin", path.display()))
                }
                Some(_) => {}
            }
        }
        if let Some((name, _)) = self
            .plugins
            .iter()
            .find(|(_, e)| e.upgrading.is_some() && e.state != PluginState::Live)
        {
            return Err(format!("plugin {name} is upgraded while not live"));
        }
        let mut ids: Vec<MountId> = self.mounts.values().map(|r| r.id).collect();
        ids.sort();
        ids.dedup();
        if ids.len() != self.mounts.len() {
            return Err("two mounts share an id".into());
        }
        if ids.last().is_some_and(|id| id.0 >= self.next_mount_id) {
            return Err("a mount id was handed out twice".into());
        }
        Ok(())
    }

    /// The entry of `name`, refused unless it is in `state`.
    fn entry_in(
        &mut self,
        name: &str,
        state: PluginState,
    ) -> Result<&mut PluginEntry<P>, RegistryError> {
        match self.plugins.get_mut(name) {
            None => Err(RegistryError::UnknownPlugin { name: name.into() }),
            Some(entry) if entry.state != state => Err(RegistryError::NotLive {
                name: name.into(),
                state: entry.state,
            }),
            Some(entry) => Ok(entry),
        }
    }

    /// The entry of `name` if it is Live and not being upgraded.
    fn live_entry(&mut self, name: &str) -> Result<&mut PluginEntry<P>, RegistryError> {
        let entry = self.entry_in(name, PluginState::Live)?;
        if entry.upgrading.is_some() {
            return Err(RegistryError::Upgrading { name: name.into() });
        }
        Ok(entry)
    }

    fn remove(&mut self, name: &str) -> Arc<P> {
        debug_assert_eq!(
            self.mount_count(name),
            0,
            "only a plugin without mounts goes"
        );
        self.plugins
            .remove(name)
            .map(|entry| entry.handle)
            .expect("caller checked that the entry exists")
    }
}

#[cfg(test)]
mod tests;
