//! The host: combines registry transitions with the slow work they guard (loading,
//! mounting, unmounting, unloading), following DESIGN.md §2 step by step.
//!
//! Every method is blocking and runs on a blocking thread; the registry lock is only ever
//! held for one transition at a time, never across a plugin call, a mount syscall or a wait
//! (`Condvar::wait` releases it).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fshost_protocol::{ErrorCode, MountInfo, PluginInfo, PluginState};

use crate::config::UserPolicy;
use crate::mount::{self, MountError, MountSpec, MountStats, MountTarget, UnmountError};
use crate::plugin::{self, LoadError, Plugin};
use crate::registry::{
    join_paths, mount_count, MountId, MountRecord, MountState, PluginEntry, Registry, RegistryError,
};

/// How long an unmount waits for the FUSE session to end after the kernel detached it.
const SESSION_END_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a host operation failed; each variant maps to one protocol error code.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("plugin \"{name}\" failed to initialise: on_load returned {}; it was not loaded", mount::describe_errno(*.errno))]
    OnLoad { name: String, errno: i32 },
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error(transparent)]
    Unmount(#[from] UnmountError),
    #[error("mount point {}: {reason}", .path.display())]
    BadMountpoint {
        path: PathBuf,
        reason: String,
        code: ErrorCode,
    },
    #[error("{} was unmounted but its FUSE session did not end within {}s", .0.display(), SESSION_END_TIMEOUT.as_secs())]
    SessionStuck(PathBuf),
    #[error("{0}")]
    BadRequest(String),
    #[error("permission denied: {0}")]
    Denied(String),
    #[error("{0}")]
    Limit(String),
    #[error("plugin \"{name}\" {why}: {} left ({}); it is live again", mount_count(.mounts.len()), join_paths(.mounts))]
    DrainEnded {
        name: String,
        why: DrainEnd,
        mounts: Vec<PathBuf>,
    },
}

impl HostError {
    pub fn code(&self) -> ErrorCode {
        match self {
            HostError::Registry(e) => match e {
                RegistryError::AlreadyLoaded { .. } => ErrorCode::AlreadyLoaded,
                RegistryError::UnknownPlugin { .. } | RegistryError::UnknownMount { .. } => {
                    ErrorCode::NotFound
                }
                RegistryError::NotLive { .. }
                | RegistryError::PluginBusy { .. }
                | RegistryError::MountpointInUse { .. }
                | RegistryError::MountBusy { .. }
                | RegistryError::ShuttingDown => ErrorCode::Busy,
            },
            HostError::Load(LoadError::NotFound(_) | LoadError::NotInPluginDirs { .. }) => {
                ErrorCode::NotFound
            }
            HostError::Load(LoadError::Untrusted { .. }) => ErrorCode::PermissionDenied,
            HostError::Load(LoadError::Copy { .. } | LoadError::Unreadable { .. }) => ErrorCode::Io,
            HostError::Load(_) | HostError::OnLoad { .. } => ErrorCode::InvalidPlugin,
            HostError::Mount(MountError::BadOption { .. }) => ErrorCode::BadRequest,
            HostError::Mount(MountError::Create { .. }) => ErrorCode::InvalidPlugin,
            HostError::Mount(_) => ErrorCode::Io,
            HostError::Unmount(UnmountError::Busy(_)) => ErrorCode::Busy,
            HostError::Unmount(_) => ErrorCode::Io,
            HostError::BadMountpoint { code, .. } => *code,
            HostError::SessionStuck(_) => ErrorCode::Timeout,
            HostError::BadRequest(_) => ErrorCode::BadRequest,
            HostError::Denied(_) => ErrorCode::PermissionDenied,
            HostError::Limit(_) => ErrorCode::LimitReached,
            HostError::DrainEnded { .. } => ErrorCode::Timeout,
        }
    }
}

/// How an `unload --drain` waits.
pub struct Drain<'a> {
    pub timeout: Duration,
    /// Set when the client went away; the drain then ends as if it timed out.
    pub cancelled: &'a AtomicBool,
}

/// Why a drain ended without unloading.
#[derive(Debug)]
pub enum DrainEnd {
    TimedOut(u64),
    Cancelled,
}

impl std::fmt::Display for DrainEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DrainEnd::TimedOut(secs) => write!(f, "still busy after draining for {secs}s"),
            DrainEnd::Cancelled => f.write_str("drain cancelled by the client"),
        }
    }
}

/// What the host keeps of a mount beside its registry record: where it is (as descriptors)
/// and which kernel mount it is, so that unmounts act on exactly that mount.
struct MountSide {
    stats: Arc<MountStats>,
    target: Arc<MountTarget>,
    /// The kernel's mount id; 0 until the kernel mount exists.
    kernel_id: AtomicU64,
}

/// State shared with mount threads, which report the end of their session through it.
struct Shared {
    registry: Mutex<Registry<Plugin>>,
    /// Per-mount descriptors and counters, by mount id; gone with the mount.
    sides: Mutex<HashMap<MountId, Arc<MountSide>>>,
    /// Signalled after every registry change that someone may be waiting for.
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Registry<Plugin>> {
        // The registry is plain data changed by single transitions; a panic cannot leave it
        // half-changed, so a poisoned lock is still consistent.
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies one registry transition under the lock, then wakes every waiter. Debug
    /// builds check the registry's invariants after each transition and abort on a
    /// violation, so that stress tests notice at once.
    fn transition<R>(&self, change: impl FnOnce(&mut Registry<Plugin>) -> R) -> R {
        let mut reg = self.lock();
        let result = change(&mut reg);
        if cfg!(debug_assertions) {
            if let Err(violation) = reg.check() {
                tracing::error!(%violation, "registry invariant violated");
                std::process::abort();
            }
        }
        drop(reg);
        self.changed.notify_all();
        result
    }

    /// Mount failed or session ended: drop the count and wake waiters.
    fn release_mount(&self, path: &Path, id: MountId) {
        self.sides().remove(&id);
        let released = self.transition(|reg| reg.release_mount(path, id));
        if released {
            tracing::info!(mountpoint = %path.display(), "mount ended");
        }
    }

    fn sides(&self) -> MutexGuard<'_, HashMap<MountId, Arc<MountSide>>> {
        self.sides.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn side(&self, id: MountId) -> Option<Arc<MountSide>> {
        self.sides().get(&id).cloned()
    }
}

pub struct Host {
    shared: Arc<Shared>,
    /// Plugins that were unloaded but whose library stayed mapped (the unmap proof
    /// failed), with the path of their mapping; shown by `list` until they unmap.
    lingering: Mutex<Vec<(PathBuf, PluginInfo)>>,
    /// Where plugins may come from; replaced on reload.
    trust: Mutex<Trust>,
    /// What ordinary users' mounts may take; replaced on reload.
    users: Mutex<UserPolicy>,
    socket: PathBuf,
    started: Instant,
}

pub use crate::plugin::Trust;

/// Who sent a request, from the socket's peer credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// Root or a member of the daemon's group: may do everything.
    pub admin: bool,
}

impl Caller {
    /// The daemon itself (config file, shutdown).
    pub fn root() -> Caller {
        Caller {
            uid: 0,
            gid: 0,
            admin: true,
        }
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn plugin_info(reg: &Registry<Plugin>, name: &str, entry: &PluginEntry<Plugin>) -> PluginInfo {
    let plugin = &entry.handle;
    PluginInfo {
        name: name.to_string(),
        state: entry.state,
        version: plugin.version.clone(),
        path: plugin.source.display().to_string(),
        abi_version: plugin.abi_version,
        mounts: reg
            .mounts_of(name)
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
        loaded_at: unix_secs(entry.loaded_at),
        tainted: plugin.library.taint(),
    }
}

fn mount_info(path: &Path, record: &MountRecord, stats: Option<&MountStats>) -> MountInfo {
    let count =
        |get: fn(&MountStats) -> &AtomicU64| stats.map_or(0, |s| get(s).load(Ordering::Relaxed));
    MountInfo {
        plugin_reads: count(|s| &s.plugin_reads),
        plugin_writes: count(|s| &s.plugin_writes),
        passthrough_opens: count(|s| &s.passthrough_opens),
        mountpoint: path.display().to_string(),
        plugin: record.plugin.clone(),
        since: unix_secs(record.since),
        options: record.options.clone(),
        read_only: record.read_only,
        owner_uid: record.owner,
    }
}

/// Checks a user's new mount against their allowance, with the registry locked so that two
/// mounts at once cannot both take the last place: at most `max_mounts` mounts, and `size=`
/// summing to at most `max_size`. A mount without `size=` gets an equal share,
/// `max_size / max_mounts`, or what is left if that is less.
fn within_user_limits(
    reg: &Registry<Plugin>,
    uid: u32,
    users: &UserPolicy,
    options: &mut BTreeMap<String, String>,
) -> Result<(), HostError> {
    let mine: Vec<&MountRecord> = reg
        .mounts()
        .map(|(_, r)| r)
        .filter(|r| r.owner == uid)
        .collect();
    if mine.len() >= users.max_mounts {
        return Err(HostError::Limit(format!(
            "user {uid} already has {} mounts ([users] max_mounts); unmount one first",
            mine.len()
        )));
    }
    let used: u64 = mine
        .iter()
        .filter_map(|r| r.options.get("size"))
        .filter_map(|size| fshost_sdk::parse_size(size))
        .sum();
    let left = users.max_size_bytes().saturating_sub(used);
    let share = users.max_size_bytes() / users.max_mounts.max(1) as u64;
    let wanted = match options.get("size") {
        None => share.min(left),
        Some(text) => fshost_sdk::parse_size(text).ok_or_else(|| {
            HostError::BadRequest(format!("option size={text:?} is not a size like 64M or 1G"))
        })?,
    };
    if wanted == 0 || wanted > left {
        return Err(HostError::Limit(format!(
            "user {uid} may hold {} in all ([users] max_size); {} is left, {} was asked; unmount something or ask for less with -o size=",
            users.max_size,
            human_bytes(left),
            human_bytes(wanted)
        )));
    }
    options.insert("size".into(), wanted.to_string());
    Ok(())
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 && n % (1 << 30) == 0 => format!("{}G", n >> 30),
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{}M", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{}K", n >> 10),
        n => format!("{n} bytes"),
    }
}

/// Closes a plugin that the registry no longer holds; returns true if it stays mapped.
fn close_plugin(plugin: Arc<Plugin>) -> bool {
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

fn absolute(path: &str, what: &str) -> Result<PathBuf, HostError> {
    let path = PathBuf::from(path);
    if path.is_absolute() {
        Ok(path)
    } else {
        Err(HostError::BadRequest(format!(
            "{what} {} must be an absolute path",
            path.display()
        )))
    }
}

impl Host {
    pub fn new(trust: Trust, socket: PathBuf, started: Instant) -> Host {
        Host {
            shared: Arc::new(Shared {
                registry: Mutex::new(Registry::new()),
                sides: Mutex::new(HashMap::new()),
                changed: Condvar::new(),
            }),
            lingering: Mutex::new(Vec::new()),
            trust: Mutex::new(trust),
            users: Mutex::new(UserPolicy::default()),
            socket,
            started,
        }
    }

    /// Replaces where plugins may come from (config reload); loaded plugins stay.
    pub fn set_trust(&self, trust: Trust) {
        *self.trust.lock().unwrap_or_else(|e| e.into_inner()) = trust;
    }

    /// Replaces the limits of ordinary users' mounts (start and config reload); mounts that
    /// exist stay as they are.
    pub fn set_user_policy(&self, users: UserPolicy) {
        *self.users.lock().unwrap_or_else(|e| e.into_inner()) = users;
    }

    fn trust(&self) -> Trust {
        self.trust.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn lock(&self) -> MutexGuard<'_, Registry<Plugin>> {
        self.shared.lock()
    }

    fn transition<R>(&self, change: impl FnOnce(&mut Registry<Plugin>) -> R) -> R {
        self.shared.transition(change)
    }

    /// Waits (releasing the lock) until `done` holds or the timeout passes.
    fn wait_until(&self, timeout: Duration, done: impl Fn(&Registry<Plugin>) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut reg = self.lock();
        loop {
            if done(&reg) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            reg = self
                .shared
                .changed
                .wait_timeout(reg, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// A bare name (`memfs`) is looked up in the plugin directories as `libmemfs.so`,
    /// `memfs.so` or `memfs`; anything with a slash is a path and must be absolute.
    fn resolve_plugin_path(&self, path: &str) -> Result<PathBuf, HostError> {
        if path.contains('/') {
            return absolute(path, "plugin path");
        }
        let candidates = [
            format!("lib{path}.so"),
            format!("{path}.so"),
            path.to_string(),
        ];
        let trust = self.trust();
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
            dirs: trust.plugin_dirs,
        }))
    }

    pub fn load(&self, path: &str, name: Option<&str>) -> Result<PluginInfo, HostError> {
        let path = self.resolve_plugin_path(path)?;
        let plugin = Arc::new(plugin::load(&path, name, &self.trust())?);
        let name = plugin.name.clone();
        let reserved =
            self.transition(|reg| reg.begin_load(&name, Arc::clone(&plugin), SystemTime::now()));
        if let Err(e) = reserved {
            close_plugin(plugin);
            return Err(e.into());
        }
        let loaded = plugin::on_fresh_thread(|| plugin.library.on_load());
        drop(plugin);
        if let Err(errno) = loaded {
            let removed = self.transition(|reg| reg.abort_load(&name));
            if let Ok(plugin) = removed {
                close_plugin(plugin);
            }
            return Err(HostError::OnLoad {
                name,
                errno: errno.0,
            });
        }
        self.transition(|reg| reg.finish_load(&name))?;
        tracing::info!(plugin = %name, path = %path.display(), "plugin loaded");
        self.info(&name)
    }

    /// Unloads a plugin; with `drain`, first waits for its mounts to go (see [`Drain`]).
    /// Returns true if the library is still mapped after it was closed.
    pub fn unload(&self, name: &str, drain: Option<Drain<'_>>) -> Result<bool, HostError> {
        let plugin = match drain {
            None => self.transition(|reg| reg.begin_unload(name))?,
            Some(drain) => self.drain(name, drain)?,
        };
        plugin::on_fresh_thread(|| plugin.library.on_unload());
        let mapped_path = plugin.mapped_path.clone();
        drop(plugin);
        let mut info = self.info(name)?;
        let plugin = self.transition(|reg| reg.finish_unload(name))?;
        let still_mapped = close_plugin(plugin);
        tracing::info!(plugin = %name, still_mapped, "plugin unloaded");
        if still_mapped {
            info.state = PluginState::Unloaded;
            info.mounts.clear();
            self.lingering
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((mapped_path, info));
        }
        Ok(still_mapped)
    }

    /// `Deregistering` at once (new mounts refused), then wait until the last mount has
    /// gone; on timeout or cancellation the plugin is `Live` again and the error names the
    /// mounts that kept it busy.
    fn drain(&self, name: &str, drain: Drain<'_>) -> Result<Arc<Plugin>, HostError> {
        let plugin = self.transition(|reg| reg.begin_drain(name))?;
        tracing::info!(plugin = %name, timeout = ?drain.timeout, "draining: new mounts refused until the last mount is gone");
        let cancelled = || drain.cancelled.load(Ordering::SeqCst);
        self.wait_until(drain.timeout, |reg| {
            reg.mount_count(name) == 0 || cancelled()
        });
        let mounts = self.transition(|reg| {
            let mounts = reg.mounts_of(name);
            if !mounts.is_empty() {
                reg.abort_unload(name)?;
            }
            Ok::<_, RegistryError>(mounts)
        })?;
        if mounts.is_empty() {
            return Ok(plugin);
        }
        let why = if cancelled() {
            DrainEnd::Cancelled
        } else {
            DrainEnd::TimedOut(drain.timeout.as_secs())
        };
        tracing::info!(plugin = %name, why = %why, "drain ended; plugin is live again");
        Err(HostError::DrainEnded {
            name: name.to_string(),
            why,
            mounts,
        })
    }

    /// Wakes every waiter so it re-checks its condition (used when a client cancels).
    pub fn wake_waiters(&self) {
        self.shared.changed.notify_all();
    }

    pub fn mount(
        &self,
        name: &str,
        mountpoint: &str,
        options: BTreeMap<String, String>,
        read_only: bool,
        caller: &Caller,
    ) -> Result<MountInfo, HostError> {
        let given = absolute(mountpoint, "mount point")?;
        // Resolved once, following no symlink; everything after acts on the descriptors.
        let target = MountTarget::resolve(&given).map_err(|e| {
            let code = match e {
                mount::TargetError::Missing => ErrorCode::NotFound,
                mount::TargetError::Other(_) | mount::TargetError::DeadMount => ErrorCode::Io,
                _ => ErrorCode::BadRequest,
            };
            HostError::BadMountpoint {
                path: given.clone(),
                reason: e.to_string(),
                code,
            }
        })?;
        // fusermount's rule: users mount only on directories they own.
        if !caller.admin && target.uid != caller.uid {
            return Err(HostError::Denied(format!(
                "user {} may not mount on {}: it is owned by uid {} (users may mount only on directories they own)",
                caller.uid,
                given.display(),
                target.uid
            )));
        }
        // Options are checked before anything is reserved.
        let (session, _) = mount::SessionOptions::parse(&options)?;
        let users =
            (!caller.admin).then(|| self.users.lock().unwrap_or_else(|e| e.into_inner()).clone());
        if let Some(users) = &users {
            if session.threads > users.max_threads_per_mount {
                return Err(HostError::Limit(format!(
                    "users' mounts may have at most {} session threads ([users] max_threads_per_mount); ask for fewer with -o threads=N",
                    users.max_threads_per_mount
                )));
            }
        }
        let path = target.path.clone();
        let target = Arc::new(target);
        let now = SystemTime::now();
        let mut options = options;
        let (plugin, id) = self.transition(|reg| {
            if let Some(users) = &users {
                within_user_limits(reg, caller.uid, users, &mut options)?;
            }
            Ok::<_, HostError>(reg.reserve_mount(
                name,
                &path,
                options.clone(),
                read_only,
                caller.uid,
                now,
            )?)
        })?;
        let shared = Arc::clone(&self.shared);
        let ended_path = path.clone();
        let side = Arc::new(MountSide {
            stats: Arc::new(MountStats::default()),
            target: Arc::clone(&target),
            kernel_id: AtomicU64::new(0),
        });
        self.shared.sides().insert(id, Arc::clone(&side));
        let spec = MountSpec {
            stats: Arc::clone(&side.stats),
            plugin,
            target,
            options: options.clone(),
            read_only,
            owner: (caller.uid, caller.gid),
        };
        match mount::spawn(spec, move || shared.release_mount(&ended_path, id)) {
            Ok(kernel_id) => side.kernel_id.store(kernel_id, Ordering::SeqCst),
            Err(e) => {
                self.shared.release_mount(&path, id);
                return Err(e.into());
            }
        }
        self.transition(|reg| reg.mount_started(&path, id));
        tracing::info!(plugin = %name, mountpoint = %path.display(), "mounted");
        Ok(MountInfo {
            mountpoint: path.display().to_string(),
            plugin: name.to_string(),
            since: unix_secs(now),
            options,
            read_only,
            owner_uid: caller.uid,
            plugin_reads: 0,
            plugin_writes: 0,
            passthrough_opens: 0,
        })
    }

    /// Unmounts and waits until the session has ended and the count dropped. Returns true if
    /// the mount was only detached (lazy, files still open).
    pub fn unmount(
        &self,
        mountpoint: &str,
        lazy: bool,
        caller: &Caller,
    ) -> Result<(PathBuf, bool), HostError> {
        let given = absolute(mountpoint, "mount point")?;
        let path = self.record_path(&given);
        if !caller.admin {
            let owner = self.lock().mount_owner(&path);
            if let Some(owner) = owner.filter(|owner| *owner != caller.uid) {
                return Err(HostError::Denied(format!(
                    "user {} may not unmount {}: it was mounted by uid {owner}; only its owner, root or the admin group may",
                    caller.uid,
                    path.display()
                )));
            }
        }
        self.unmount_path(&path, lazy)
    }

    /// The registry path of the mount a caller names: found by the identity of the mount
    /// the path leads to (so a mount whose parent was renamed is found under its new name),
    /// else by the path as recorded (a path that no longer resolves, e.g. swapped for a
    /// symlink). Unmounting then acts on the recorded descriptors, never on `given`.
    fn record_path(&self, given: &Path) -> PathBuf {
        let kernel_id = mount::mount_id_at(given).ok();
        let found = kernel_id.and_then(|kernel_id| {
            let ids: Vec<MountId> = self
                .shared
                .sides()
                .iter()
                .filter(|(_, side)| side.kernel_id.load(Ordering::SeqCst) == kernel_id)
                .map(|(id, _)| *id)
                .collect();
            let reg = self.lock();
            let path = reg
                .mounts()
                .find(|(_, record)| ids.contains(&record.id))
                .map(|(path, _)| path.clone());
            path
        });
        found.unwrap_or_else(|| given.to_path_buf())
    }

    fn unmount_path(&self, path: &Path, lazy: bool) -> Result<(PathBuf, bool), HostError> {
        let id = self.detach(path, lazy)?;
        let timeout = if lazy {
            Duration::from_millis(500)
        } else {
            SESSION_END_TIMEOUT
        };
        if self.wait_until(timeout, |reg| !reg.has_mount_id(id)) {
            tracing::info!(mountpoint = %path.display(), "unmounted");
            Ok((path.to_path_buf(), false))
        } else if lazy {
            tracing::info!(mountpoint = %path.display(), "detached; released when its last file closes");
            Ok((path.to_path_buf(), true))
        } else {
            Err(HostError::SessionStuck(path.to_path_buf()))
        }
    }

    /// Unmount, first half: `Unmounting`, then the kernel unmount of exactly our mount (back
    /// to `Active` if that fails). The record goes when the session has ended.
    fn detach(&self, path: &Path, lazy: bool) -> Result<MountId, HostError> {
        let id = self.transition(|reg| reg.begin_unmount(path))?;
        let side = self.shared.side(id);
        let unmounted = match &side {
            Some(side) => mount::unmount(&side.target, side.kernel_id.load(Ordering::SeqCst), lazy),
            None => Err(UnmountError::NotOurs(path.to_path_buf())),
        };
        if let Err(e) = unmounted {
            self.transition(|reg| reg.abort_unmount(path, id));
            return Err(e.into());
        }
        Ok(id)
    }

    /// Every registered plugin, then every unloaded one that is still mapped.
    pub fn list(&self) -> Vec<PluginInfo> {
        let mut plugins: Vec<PluginInfo> = {
            let reg = self.lock();
            reg.plugins()
                .map(|(name, entry)| plugin_info(&reg, name, entry))
                .collect()
        };
        let mut lingering = self.lingering.lock().unwrap_or_else(|e| e.into_inner());
        lingering.retain(|(mapped, _)| plugin::is_mapped(mapped));
        plugins.extend(lingering.iter().map(|(_, info)| info.clone()));
        plugins
    }

    pub fn mounts(&self) -> Vec<MountInfo> {
        let reg = self.lock();
        let sides = self.shared.sides();
        reg.mounts()
            .map(|(path, record)| {
                mount_info(
                    path,
                    record,
                    sides.get(&record.id).map(|s| s.stats.as_ref()),
                )
            })
            .collect()
    }

    pub fn info(&self, name: &str) -> Result<PluginInfo, HostError> {
        let reg = self.lock();
        let entry = reg
            .plugin(name)
            .ok_or_else(|| RegistryError::UnknownPlugin {
                name: name.to_string(),
            })?;
        Ok(plugin_info(&reg, name, entry))
    }

    /// One line for `systemctl status`: counts of plugins, mounts and tainted plugins.
    pub fn status_line(&self) -> String {
        let status = self.status();
        format!(
            "{} plugins ({} tainted), {} mounts",
            status.plugins,
            status.tainted.len(),
            status.mounts
        )
    }

    pub fn status(&self) -> fshost_protocol::Status {
        let plugins = self.list();
        fshost_protocol::Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            uptime_secs: self.started.elapsed().as_secs(),
            socket: self.socket.display().to_string(),
            plugins: plugins.len(),
            mounts: self.lock().mounts().count(),
            tainted: plugins
                .into_iter()
                .filter(|p| p.tainted.is_some())
                .map(|p| p.name)
                .collect(),
        }
    }

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
        loop {
            let active: Vec<PathBuf> = self
                .lock()
                .mounts()
                .filter(|(_, r)| r.state == MountState::Active)
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
                        let _ = self.transition(|reg| reg.begin_unmount(&path));
                    }
                }
            }
            if lazy {
                break;
            }
            self.wait_until(Duration::from_millis(100), |_| false);
        }
        // Sessions end as the kernel lets go of them; a lazily detached mount whose files
        // are still open ends when they close, which shutdown does not wait for.
        self.wait_until(SESSION_END_TIMEOUT.min(Duration::from_secs(2)), |reg| {
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
