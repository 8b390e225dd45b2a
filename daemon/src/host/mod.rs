//! The host: combines registry transitions with the slow work they guard (loading,
//! mounting, unmounting, unloading), following DESIGN.md §2 step by step. One file per
//! operation (`load.rs`, `unload.rs`, `mount.rs`, `unmount.rs`, `shutdown.rs`, `query.rs`);
//! this one holds what they share.
//!
//! Every method is blocking and runs on a blocking thread; the registry lock is only ever
//! held for one transition at a time, never across a plugin call, a mount syscall or a wait
//! (`Condvar::wait` releases it).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fshost_protocol::{ErrorCode, PluginInfo};

use crate::config::UserPolicy;
use crate::mount::{MountError, MountStats, MoveError, UnmountError};
use crate::plugin::LoadError;
use crate::registry::{join_paths, mount_count, MountId, Registry, RegistryError};

mod effects;
mod handover;
#[cfg(test)]
mod interleavings;
mod load;
mod mount;
mod query;
mod recover;
mod shutdown;
mod unload;
mod unmount;
mod upgrade;

pub use effects::{Effects, KeptMount, MountRequest, PluginHandle, Real, TargetHandle};
pub use handover::DaemonSide;
pub use unload::{Drain, DrainEnd};

/// How long an unmount waits for the FUSE session to end after the kernel detached it.
const SESSION_END_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a host operation failed; each variant maps to one protocol error code.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("plugin \"{name}\" failed to initialise: on_load returned {}; it was not loaded", crate::mount::describe_errno(*.errno))]
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
    #[error("{what} {} must be an absolute path", .path.display())]
    NotAbsolute { what: &'static str, path: PathBuf },
    #[error("option size={0:?} is not a size like 64M or 1G")]
    BadSize(String),
    #[error("permission denied: user {uid} may not mount on {}: it is owned by uid {owner} (users may mount only on directories they own)", .path.display())]
    NotOwner { uid: u32, path: PathBuf, owner: u32 },
    #[error("permission denied: user {uid} may not unmount {}: it was mounted by uid {owner}; only its owner, root or the admin group may", .path.display())]
    NotTheirMount { uid: u32, path: PathBuf, owner: u32 },
    #[error("users' mounts may take at most {max} of their plugin's threads at once ([users] max_threads_per_mount); ask for fewer with -o threads=N")]
    TooManyThreads { max: usize },
    #[error("user {uid} already has {count} mounts ([users] max_mounts); unmount one first")]
    TooManyMounts { uid: u32, count: usize },
    #[error("user {uid} may hold {max_size} in all ([users] max_size); {} is left, {} was asked; unmount something or ask for less with -o size=", human_bytes(*.left), human_bytes(*.asked))]
    OverAllowance {
        uid: u32,
        max_size: String,
        left: u64,
        asked: u64,
    },
    #[error("{0:?} is neither an fshost mount point nor a loaded plugin with mounts (see `fshostctl mounts`)")]
    NoSuchMountOrPlugin(String),
    #[error("upgrade of plugin \"{name}\" refused: {why}; nothing was changed")]
    CannotUpgrade { name: String, why: String },
    #[error("upgrade of plugin \"{name}\" to {path} failed: {source}; every mount is still served by the previous generation, nothing was lost", path = .path.display())]
    UpgradeFailed {
        name: String,
        path: PathBuf,
        source: MoveError,
    },
    #[error(
        "daemon upgrade to {binary} failed: {why}; this fshostd serves on, every mount as before"
    )]
    DaemonUpgrade { binary: String, why: String },
    #[error("permission denied: only root may run fshostd from another binary; leave out --binary to upgrade to the installed one")]
    OtherBinary,
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
                | RegistryError::ShuttingDown
                | RegistryError::Upgrading { .. }
                | RegistryError::HandingOver => ErrorCode::Busy,
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
            HostError::NotAbsolute { .. } | HostError::BadSize(_) => ErrorCode::BadRequest,
            HostError::NotOwner { .. } | HostError::NotTheirMount { .. } => {
                ErrorCode::PermissionDenied
            }
            HostError::TooManyThreads { .. }
            | HostError::TooManyMounts { .. }
            | HostError::OverAllowance { .. } => ErrorCode::LimitReached,
            HostError::DrainEnded { .. } => ErrorCode::Timeout,
            HostError::CannotUpgrade { .. } => ErrorCode::InvalidPlugin,
            HostError::NoSuchMountOrPlugin(_) => ErrorCode::NotFound,
            HostError::DaemonUpgrade { .. } => ErrorCode::Io,
            HostError::OtherBinary => ErrorCode::PermissionDenied,
            HostError::UpgradeFailed { source, .. } => match source {
                MoveError::Busy { .. } => ErrorCode::Timeout,
                _ => ErrorCode::InvalidPlugin,
            },
        }
    }
}

/// What the host keeps of a mount beside its registry record: where it is (as descriptors)
/// and which kernel mount it is, so that unmounts act on exactly that mount.
struct MountSide<E: Effects> {
    stats: Arc<MountStats>,
    target: Arc<E::Target>,
    /// The kernel's mount id; 0 until the kernel mount exists.
    kernel_id: AtomicU64,
    /// The mount's backend, once served: what an upgrade replaces.
    slot: OnceLock<E::Slot>,
}

/// What a frozen host hands over: plugins (name, library, generation, loaded at) and the
/// served mounts with their records, descriptors and backends.
struct Frozen<E: Effects> {
    plugins: Vec<(String, Arc<E::Plugin>, u32, SystemTime)>,
    mounts: Vec<FrozenMount<E>>,
}

/// A served mount of a frozen host: where, its record, its descriptors and its backend.
type FrozenMount<E> = (
    PathBuf,
    crate::registry::MountRecord,
    Arc<MountSide<E>>,
    <E as Effects>::Slot,
);

/// State shared with mount threads, which report the end of their session through it.
struct Shared<E: Effects> {
    registry: Mutex<Registry<E::Plugin>>,
    /// Per-mount descriptors and counters, by mount id; gone with the mount.
    sides: Mutex<HashMap<MountId, Arc<MountSide<E>>>>,
    /// Signalled after every registry change that someone may be waiting for.
    changed: Condvar,
    effects: E,
}

impl<E: Effects> Shared<E> {
    fn lock(&self) -> MutexGuard<'_, Registry<E::Plugin>> {
        // The registry is plain data changed by single transitions; a panic cannot leave it
        // half-changed, so a poisoned lock is still consistent.
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies one registry transition under the lock, then wakes every waiter. Debug
    /// builds check the registry's invariants after each transition and abort on a
    /// violation, so that stress tests notice at once.
    fn transition<R>(&self, change: impl FnOnce(&mut Registry<E::Plugin>) -> R) -> R {
        self.effects.step();
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
        let side = self.sides().remove(&id);
        if let Some(kernel_id) = side.map(|s| s.kernel_id.load(std::sync::atomic::Ordering::SeqCst))
        {
            if kernel_id != 0 {
                self.effects.forget_mount(kernel_id);
            }
        }
        let released = self.transition(|reg| reg.release_mount(path, id));
        if released {
            tracing::info!(mountpoint = %path.display(), "mount ended");
        }
    }

    fn sides(&self) -> MutexGuard<'_, HashMap<MountId, Arc<MountSide<E>>>> {
        self.sides.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn side(&self, id: MountId) -> Option<Arc<MountSide<E>>> {
        self.sides().get(&id).cloned()
    }
}

/// The daemon's state and operations, over the outside world `E` (the real one but in the
/// interleaving checker).
pub struct Host<E: Effects = Real> {
    shared: Arc<Shared<E>>,
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

/// "64M", "1G" or "123 bytes": for messages.
fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 && n % (1 << 30) == 0 => format!("{}G", n >> 30),
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{}M", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{}K", n >> 10),
        n => format!("{n} bytes"),
    }
}

fn absolute(path: &str, what: &'static str) -> Result<PathBuf, HostError> {
    let path = PathBuf::from(path);
    if path.is_absolute() {
        Ok(path)
    } else {
        Err(HostError::NotAbsolute { what, path })
    }
}

impl Host<Real> {
    pub fn new(trust: Trust, socket: PathBuf, started: Instant) -> Host<Real> {
        Host::with_effects(Real, trust, socket, started)
    }
}

impl<E: Effects> Host<E> {
    pub fn with_effects(effects: E, trust: Trust, socket: PathBuf, started: Instant) -> Host<E> {
        Host {
            shared: Arc::new(Shared {
                registry: Mutex::new(Registry::new()),
                sides: Mutex::new(HashMap::new()),
                changed: Condvar::new(),
                effects,
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
        crate::mount::pool::set_user_threads(users.max_threads);
        *self.users.lock().unwrap_or_else(|e| e.into_inner()) = users;
    }

    fn trust(&self) -> Trust {
        self.trust.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn lock(&self) -> MutexGuard<'_, Registry<E::Plugin>> {
        self.shared.lock()
    }

    fn effects(&self) -> &E {
        &self.shared.effects
    }

    fn transition<R>(&self, change: impl FnOnce(&mut Registry<E::Plugin>) -> R) -> R {
        self.shared.transition(change)
    }

    /// Waits (releasing the lock) until `done` holds or the timeout passes.
    fn wait_until(&self, timeout: Duration, done: impl Fn(&Registry<E::Plugin>) -> bool) -> bool {
        let effects = self.effects();
        let deadline = effects.now() + timeout;
        let mut reg = self.lock();
        loop {
            if done(&reg) {
                return true;
            }
            let left = deadline.saturating_duration_since(effects.now());
            if left.is_zero() {
                return false;
            }
            reg = effects.wait(&self.shared.changed, &self.shared.registry, reg, left);
        }
    }

    /// A closed library that stayed mapped: `list` shows it, unloaded, until it unmaps.
    fn linger(&self, mapped_path: PathBuf, mut info: PluginInfo) {
        info.state = fshost_protocol::PluginState::Unloaded;
        info.mounts.clear();
        info.upgrading = None;
        self.lingering
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((mapped_path, info));
    }

    /// Daemon upgrade, first step: freezes the registry (every change is refused as busy
    /// until [`Host::thaw`]) and returns the plugins and the served mounts with their
    /// backends. A mount whose session is ending from outside has no backend any more and
    /// is left out; every other one is served, so it has one.
    fn freeze(&self) -> Result<Frozen<E>, HostError> {
        let (plugins, mounts) = self.transition(|reg| reg.begin_handover())?;
        let mounts = mounts
            .into_iter()
            .filter_map(|(path, record)| {
                let side = self.shared.side(record.id)?;
                let slot = side.slot.get()?.clone();
                Some((path, record, side, slot))
            })
            .collect();
        Ok(Frozen { plugins, mounts })
    }

    /// The handover failed: changes are taken again.
    fn thaw(&self) {
        self.transition(|reg| reg.end_handover());
    }

    /// Wakes every waiter so it re-checks its condition (used when a client cancels).
    pub fn wake_waiters(&self) {
        self.shared.changed.notify_all();
    }
}
