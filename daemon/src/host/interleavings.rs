//! The interleaving checker: the real `Host` code, with fake effects, under a scheduler
//! that lets one operation run at a time and switches, at random (seeded by proptest), at
//! every step point: before each registry transition and at each effect (opening,
//! hooks, closing, resolving, mounting, unmounting, waiting). Real threads run the real
//! operations; a kernel of its own ends mount sessions (after an unmount, or from outside
//! as an admin's `umount` would), releasing the plugin and then calling the host's
//! end-of-session callback, as the mount thread does.
//!
//! What it checks, at every step and at the end of every run: no library is closed while
//! a hook of it runs, a mount session holds it, or anyone else still references it; no
//! `on_unload` runs while the plugin has a live mount; a library is closed at most once;
//! every run finishes (timeouts fire when nothing else can run); at the end each plugin's
//! mount count equals its live sessions, and every library opened is either registered or
//! closed. Debug builds also abort on any registry invariant violation (`Registry::check`
//! after every transition).
//!
//! `tests/mutants` plants mutations in `host/` and expects this test to catch each.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::effects::MountNow;
use super::{Caller, Drain, Effects, Host, HostError, MountRequest, PluginHandle, TargetHandle};
use crate::mount::{MountError, MoveError, Moved, Moving, TargetError, UnmountError};
use crate::plugin::Trust;

thread_local! {
    /// The scheduler's id of the current thread (none for the test's own thread).
    static ME: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Runs one scheduled thread at a time; the running one hands over at `step`.
struct Sched {
    state: Mutex<SchedState>,
    turn: Condvar,
}

struct SchedState {
    current: Option<usize>,
    /// Threads waiting at a step point for their turn.
    runnable: BTreeSet<usize>,
    /// Threads started and not yet finished.
    live: usize,
    next_id: usize,
    rng: u64,
    /// Logical time since `Model::base`; jumps when timeouts should fire.
    clock: Duration,
}

impl SchedState {
    fn random(&mut self, below: u64) -> u64 {
        // xorshift64*: enough for picking threads, and the same for the same seed.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) % below.max(1)
    }
}

impl Sched {
    fn new(seed: u64) -> Arc<Sched> {
        Arc::new(Sched {
            state: Mutex::new(SchedState {
                current: None,
                runnable: BTreeSet::new(),
                live: 0,
                next_id: 0,
                rng: seed | 1,
                clock: Duration::ZERO,
            }),
            turn: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, SchedState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts `f` on a scheduled thread; it runs when the scheduler picks it.
    fn spawn(self: &Arc<Self>, f: impl FnOnce() + Send + 'static) {
        let id = {
            let mut st = self.lock();
            st.live += 1;
            st.next_id += 1;
            st.next_id
        };
        let sched = Arc::clone(self);
        std::thread::spawn(move || {
            ME.with(|me| me.set(Some(id)));
            sched.step();
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let mut st = sched.lock();
            st.live -= 1;
            st.current = None;
            sched.pick(&mut st);
            drop(st);
            if let Err(panic) = outcome {
                std::panic::resume_unwind(panic);
            }
        });
    }

    /// A step point: let the scheduler choose who runs next (maybe this thread again).
    fn step(&self) {
        let Some(me) = ME.with(Cell::get) else {
            return;
        };
        let mut st = self.lock();
        st.runnable.insert(me);
        if st.current.is_none() || st.current == Some(me) {
            self.pick(&mut st);
        }
        while st.current != Some(me) {
            st = self.turn.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.runnable.remove(&me);
    }

    fn pick(&self, st: &mut SchedState) {
        let n = st.runnable.len() as u64;
        st.current = if n == 0 {
            None
        } else {
            let i = st.random(n) as usize;
            st.runnable.iter().nth(i).copied()
        };
        self.turn.notify_all();
    }

    /// Lets `timeout` pass when no other thread can run (so every wait ends), and now and
    /// then anyway (so that timeouts also fire while others are busy).
    fn maybe_pass(&self, timeout: Duration) {
        let mut st = self.lock();
        if st.runnable.is_empty() || st.random(8) == 0 {
            st.clock += timeout;
        }
    }

    fn random(&self, below: u64) -> u64 {
        self.lock().random(below)
    }

    fn finished(&self) -> bool {
        self.lock().live == 0
    }
}

#[derive(Debug)]
struct FakePlugin {
    id: u32,
    name: String,
    on_load_fails: bool,
}

impl PluginHandle for FakePlugin {
    fn name(&self) -> &str {
        &self.name
    }
    fn version(&self) -> &str {
        "1"
    }
    fn source(&self) -> &Path {
        Path::new("/fake")
    }
    fn abi_version(&self) -> u32 {
        1
    }
    fn taint(&self) -> Option<String> {
        None
    }
    fn mapped_path(&self) -> PathBuf {
        PathBuf::from(format!("/fake/{}", self.id))
    }
    fn kind(&self) -> &str {
        &self.name
    }
    fn upgradable(&self) -> bool {
        true
    }
    fn offers_passthrough(&self) -> bool {
        false
    }
}

struct FakeTarget(PathBuf);

impl TargetHandle for FakeTarget {
    fn path(&self) -> &Path {
        &self.0
    }
    fn owner(&self) -> u32 {
        0
    }
}

/// A mount session of the fake kernel: it holds the plugin, as the mount thread does.
struct Session {
    plugin: Arc<FakePlugin>,
    path: PathBuf,
    /// Unmounted: the session is ending and no longer found at its path.
    ending: bool,
    on_end: Option<Box<dyn FnOnce() + Send>>,
}

#[derive(Default)]
struct World {
    next_plugin: u32,
    opened: BTreeSet<u32>,
    closed: BTreeSet<u32>,
    /// Plugin ids whose hooks are running, with how many.
    in_hook: BTreeMap<u32, usize>,
    sessions: BTreeMap<u64, Session>,
    next_kernel_id: u64,
    violations: Vec<String>,
}

impl World {
    fn live_sessions_of(&self, id: u32) -> usize {
        self.sessions.values().filter(|s| s.plugin.id == id).count()
    }
}

struct Model {
    sched: Arc<Sched>,
    world: Arc<Mutex<World>>,
    base: Instant,
}

impl Model {
    fn world(&self) -> MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The safety properties that must hold at every step.
    fn check(&self) {
        let mut world = self.world();
        let closed_in_use: Vec<String> = world
            .sessions
            .values()
            .filter(|s| world.closed.contains(&s.plugin.id))
            .map(|s| {
                format!(
                    "library {} closed while mounted at {}",
                    s.plugin.id,
                    s.path.display()
                )
            })
            .chain(
                world
                    .in_hook
                    .keys()
                    .filter(|id| world.closed.contains(id))
                    .map(|id| format!("library {id} closed while a hook of it runs")),
            )
            .collect();
        world.violations.extend(closed_in_use);
    }

    /// Runs a plugin hook: two step points inside, so others can run meanwhile.
    fn hook(&self, plugin: &FakePlugin, what: &str) {
        self.step();
        {
            let mut world = self.world();
            if world.closed.contains(&plugin.id) {
                world.violations.push(format!(
                    "{what} of library {} after it was closed",
                    plugin.id
                ));
            }
            *world.in_hook.entry(plugin.id).or_default() += 1;
        }
        self.step();
        let mut world = self.world();
        if let Some(n) = world.in_hook.get_mut(&plugin.id) {
            *n -= 1;
            if *n == 0 {
                world.in_hook.remove(&plugin.id);
            }
        }
    }

    /// The fake kernel ends session `id` on a thread of its own: the plugin is released
    /// first, then the host is told (as the real mount thread does).
    fn end_session(sched: &Arc<Sched>, world: &Arc<Mutex<World>>, id: u64) {
        let (sched2, world) = (Arc::clone(sched), Arc::clone(world));
        sched.spawn(move || {
            sched2.step();
            let session = world
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .sessions
                .remove(&id);
            let Some(mut session) = session else { return };
            let on_end = session.on_end.take();
            drop(session);
            sched2.step();
            if let Some(on_end) = on_end {
                on_end();
            }
        });
    }
}

impl Effects for Model {
    type Plugin = FakePlugin;
    type Target = FakeTarget;
    /// A mount's backend is its session, by kernel id.
    type Slot = u64;

    fn step(&self) {
        self.check();
        self.sched.step();
    }

    fn open(
        &self,
        path: &str,
        name: Option<&str>,
        _trust: &Trust,
    ) -> Result<FakePlugin, HostError> {
        self.step();
        let mut world = self.world();
        world.next_plugin += 1;
        let id = world.next_plugin;
        world.opened.insert(id);
        Ok(FakePlugin {
            id,
            name: name.unwrap_or(path.trim_end_matches('!')).to_string(),
            on_load_fails: path.ends_with('!'),
        })
    }

    fn on_load(&self, plugin: &FakePlugin) -> Result<(), i32> {
        self.hook(plugin, "on_load");
        if plugin.on_load_fails {
            Err(libc::EIO)
        } else {
            Ok(())
        }
    }

    fn on_unload(&self, plugin: &FakePlugin) {
        let mounted = self.world().live_sessions_of(plugin.id);
        if mounted > 0 {
            self.world().violations.push(format!(
                "on_unload of library {} while it has {mounted} live mounts",
                plugin.id
            ));
        }
        self.hook(plugin, "on_unload");
    }

    fn close(&self, plugin: Arc<FakePlugin>) -> bool {
        self.step();
        let mut world = self.world();
        let id = plugin.id;
        let mut wrong = Vec::new();
        if !world.closed.insert(id) {
            wrong.push(format!("library {id} closed twice"));
        }
        if world.in_hook.contains_key(&id) {
            wrong.push(format!("library {id} closed while a hook of it runs"));
        }
        if world.live_sessions_of(id) > 0 {
            wrong.push(format!("library {id} closed while a session holds it"));
        }
        if Arc::strong_count(&plugin) > 1 {
            wrong.push(format!(
                "library {id} closed while {} others still reference it",
                Arc::strong_count(&plugin) - 1
            ));
        }
        world.violations.extend(wrong);
        false
    }

    fn is_mapped(&self, _mapped: &Path) -> bool {
        false
    }

    fn resolve(&self, path: &Path) -> Result<FakeTarget, TargetError> {
        self.step();
        Ok(FakeTarget(path.to_path_buf()))
    }

    fn mount_id_at(&self, path: &Path) -> Option<u64> {
        self.step();
        self.world()
            .sessions
            .iter()
            .find(|(_, s)| !s.ending && s.path == path)
            .map(|(id, _)| *id)
    }

    fn spawn_mount(
        &self,
        request: MountRequest<Self>,
        on_end: Box<dyn FnOnce() + Send>,
    ) -> Result<(u64, u64), MountError> {
        self.step();
        if self.world().closed.contains(&request.plugin.id) {
            self.world().violations.push(format!(
                "mount of library {} after it was closed",
                request.plugin.id
            ));
        }
        // Creating the instance runs plugin code, and may fail.
        self.hook(&request.plugin, "create");
        if self.sched.random(5) == 0 {
            return Err(MountError::Mount {
                path: request.target.0.clone(),
                source: std::io::Error::other("the fake kernel refused"),
            });
        }
        let mut world = self.world();
        world.next_kernel_id += 1;
        let id = world.next_kernel_id;
        world.sessions.insert(
            id,
            Session {
                plugin: request.plugin,
                path: request.target.0.clone(),
                ending: false,
                on_end: Some(on_end),
            },
        );
        Ok((id, id))
    }

    /// Pauses the sessions, runs the old instances' export and the new ones' create and
    /// import (each may fail), then hands every session still there to `new`.
    fn move_mounts(
        &self,
        new: &Arc<FakePlugin>,
        mounts: &[Moving<u64>],
        _timeout: Duration,
    ) -> Result<Moved, MoveError> {
        self.step();
        if self.sched.random(6) == 0 {
            let path = mounts.first().map_or_else(PathBuf::new, |m| m.path.clone());
            return Err(MoveError::Busy {
                path,
                waited: Duration::from_secs(5),
                in_flight: "read".into(),
            });
        }
        for mount in mounts {
            let old = self
                .world()
                .sessions
                .get(&mount.slot)
                .map(|s| Arc::clone(&s.plugin));
            if let Some(old) = old {
                self.hook(&old, "export_state");
            }
            self.hook(new, "create and import_state");
            if self.sched.random(8) == 0 {
                return Err(MoveError::Import {
                    path: mount.path.clone(),
                    state_bytes: 0,
                    errno: fshost_sdk::Errno::EINVAL,
                    panic: None,
                });
            }
        }
        let mut world = self.world();
        if world.closed.contains(&new.id) {
            world.violations.push(format!(
                "mounts moved to library {} after it was closed",
                new.id
            ));
        }
        for mount in mounts {
            if let Some(session) = world.sessions.get_mut(&mount.slot) {
                session.plugin = Arc::clone(new);
            }
        }
        Ok(Moved {
            pause: Duration::ZERO,
            state_bytes: 0,
        })
    }

    fn unmount(&self, target: &FakeTarget, id: u64, lazy: bool) -> Result<(), UnmountError> {
        self.step();
        let busy = !lazy && self.sched.random(4) == 0;
        let mut world = self.world();
        match world.sessions.get_mut(&id) {
            Some(session) if !session.ending && session.path == target.0 => {
                if busy {
                    return Err(UnmountError::Busy(target.0.clone()));
                }
                session.ending = true;
            }
            _ => return Err(UnmountError::NotOurs(target.0.clone())),
        }
        drop(world);
        Model::end_session(&self.sched, &self.world, id);
        Ok(())
    }

    fn kernel_mounts(&self, _queues: bool) -> BTreeMap<u64, MountNow> {
        let world = self.world();
        let live = world.sessions.iter().filter(|(_, s)| !s.ending);
        live.map(|(id, s)| {
            let path = s.path.clone();
            (
                *id,
                MountNow {
                    path,
                    waiting: None,
                },
            )
        })
        .collect()
    }

    fn now(&self) -> Instant {
        self.base + self.sched.lock().clock
    }

    fn wait<'a, T>(
        &self,
        _changed: &Condvar,
        mutex: &'a Mutex<T>,
        guard: MutexGuard<'a, T>,
        timeout: Duration,
    ) -> MutexGuard<'a, T> {
        drop(guard);
        self.sched.maybe_pass(timeout);
        self.step();
        mutex.lock().unwrap_or_else(|e| e.into_inner())
    }
}

const NAMES: [&str; 2] = ["a", "b"];
const PATHS: [&str; 3] = ["/p0", "/p1", "/p2"];

#[derive(Debug, Clone)]
enum Op {
    Load {
        n: usize,
        on_load_fails: bool,
    },
    Unload {
        n: usize,
        drain: bool,
    },
    Mount {
        n: usize,
        p: usize,
    },
    Unmount {
        p: usize,
        lazy: bool,
    },
    /// An admin's `umount` from outside: the session at that path ends.
    ExternalUmount {
        p: usize,
    },
    Upgrade {
        n: usize,
        on_load_fails: bool,
    },
    /// A daemon upgrade's first step and a failed handover: freeze, look, thaw.
    Handover,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..NAMES.len(), proptest::bool::weighted(0.2))
            .prop_map(|(n, on_load_fails)| Op::Load { n, on_load_fails }),
        (0..NAMES.len(), any::<bool>()).prop_map(|(n, drain)| Op::Unload { n, drain }),
        (0..NAMES.len(), 0..PATHS.len()).prop_map(|(n, p)| Op::Mount { n, p }),
        (0..PATHS.len(), any::<bool>()).prop_map(|(p, lazy)| Op::Unmount { p, lazy }),
        (0..PATHS.len()).prop_map(|p| Op::ExternalUmount { p }),
        (0..NAMES.len(), proptest::bool::weighted(0.2))
            .prop_map(|(n, on_load_fails)| Op::Upgrade { n, on_load_fails }),
        Just(Op::Handover),
    ]
}

static NOT_CANCELLED: AtomicBool = AtomicBool::new(false);

fn run(host: &Arc<Host<Model>>, op: Op) {
    let root = Caller::root();
    match op {
        Op::Load { n, on_load_fails } => {
            let path = format!("{}{}", NAMES[n], if on_load_fails { "!" } else { "" });
            let _ = host.load(&path, None);
        }
        Op::Unload { n, drain } => {
            let drain = drain.then_some(Drain {
                timeout: Duration::from_secs(5),
                cancelled: &NOT_CANCELLED,
            });
            let _ = host.unload(NAMES[n], drain);
        }
        Op::Mount { n, p } => {
            let _ = host.mount(NAMES[n], PATHS[p], BTreeMap::new(), false, &root);
        }
        Op::Unmount { p, lazy } => {
            let _ = host.unmount(PATHS[p], lazy, &root);
        }
        Op::Upgrade { n, on_load_fails } => {
            let path = format!("{}{}", NAMES[n], if on_load_fails { "!" } else { "" });
            let _ = host.upgrade(NAMES[n], Some(&path), Duration::from_secs(5));
        }
        Op::Handover => {
            let Ok(frozen) = host.freeze() else {
                return; // not settled (a load, mount, unmount or upgrade under way)
            };
            // Frozen: every mount the registry holds is served (its backend is there) or
            // ending from outside (its side gone); the handover would take all the others.
            let recorded: Vec<_> = host.lock().mounts().map(|(_, r)| r.id).collect();
            let model = host.effects();
            for id in &recorded {
                if host
                    .shared
                    .side(*id)
                    .is_some_and(|side| side.slot.get().is_none())
                {
                    model.world().violations.push(format!(
                        "a frozen mount ({id:?}) has no backend to hand over"
                    ));
                }
            }
            if frozen.mounts.len() > recorded.len() {
                model
                    .world()
                    .violations
                    .push("a handover took a mount the registry does not hold".into());
            }
            drop(frozen);
            // Others run meanwhile and must be refused; then the handover fails.
            model.step();
            host.thaw();
        }
        Op::ExternalUmount { p } => {
            let model = host.effects();
            model.step();
            let found = model
                .world()
                .sessions
                .iter_mut()
                .find(|(_, s)| !s.ending && s.path == Path::new(PATHS[p]))
                .map(|(id, s)| {
                    s.ending = true;
                    *id
                });
            if let Some(id) = found {
                Model::end_session(&model.sched, &model.world, id);
            }
        }
    }
}

/// Waits until every scheduled thread has finished; false if that takes too long.
fn settle(sched: &Sched) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sched.finished() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    true
}

/// Runs `setup` one operation after the other, then `ops` concurrently, on one host under
/// the scheduler seeded with `seed`; returns the violations seen (empty: all good).
fn explore(setup: Vec<Op>, ops: Vec<Op>, seed: u64) -> Vec<String> {
    let sched = Sched::new(seed);
    let world = Arc::new(Mutex::new(World::default()));
    let model = Model {
        sched: Arc::clone(&sched),
        world: Arc::clone(&world),
        base: Instant::now(),
    };
    let host = Arc::new(Host::with_effects(
        model,
        Trust::default(),
        PathBuf::from("/fake.sock"),
        Instant::now(),
    ));
    for op in setup {
        let host = Arc::clone(&host);
        sched.spawn(move || run(&host, op));
        if !settle(&sched) {
            return vec!["the setup did not finish: an operation waits forever".into()];
        }
    }
    for op in ops {
        let host = Arc::clone(&host);
        sched.spawn(move || run(&host, op));
    }
    if !settle(&sched) {
        return vec!["the run did not finish: an operation waits forever".into()];
    }
    let mut violations = std::mem::take(&mut world.lock().unwrap().violations);
    let world = world.lock().unwrap();
    for plugin in host.list() {
        let live = world
            .sessions
            .values()
            .filter(|s| s.plugin.name == plugin.name)
            .count();
        if plugin.mounts.len() != live {
            violations.push(format!(
                "plugin {} counts {} mounts but {live} sessions live",
                plugin.name,
                plugin.mounts.len()
            ));
        }
    }
    let registered = host.list().len();
    let unaccounted = world.opened.len() - world.closed.len();
    if unaccounted != registered {
        violations.push(format!(
            "{} libraries opened, {} closed, but {registered} registered",
            world.opened.len(),
            world.closed.len()
        ));
    }
    violations
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, .. ProptestConfig::default() })]

    #[test]
    fn the_real_host_keeps_its_invariants_in_every_interleaving(
        mounts in proptest::collection::vec((0..NAMES.len(), 0..PATHS.len()), 0..4),
        ops in proptest::collection::vec(op(), 1..7),
        seed in any::<u64>(),
    ) {
        // Both plugins loaded and some mounts made first, so that the concurrent part
        // starts from a state worth racing in.
        let setup = (0..NAMES.len())
            .map(|n| Op::Load { n, on_load_fails: false })
            .chain(mounts.into_iter().map(|(n, p)| Op::Mount { n, p }))
            .collect();
        let violations = explore(setup, ops, seed);
        prop_assert!(violations.is_empty(), "{violations:?}");
    }
}
