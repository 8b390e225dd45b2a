//! Host operations as multi-step processes over the registry, run in every interleaving
//! proptest picks. Each process takes the same steps, in the same order, as `host/`:
//! a transition under the lock, then the slow part (plugin code, mount, umount, waiting)
//! with the lock released, then the next transition. The slow parts are where another
//! process may run; this test lets any process run there.
//!
//! What it proves, for the step sequences of host/: (1) no library is closed while a
//! process still runs its code or serves a mount from it (invariant 2), (2) a plugin's
//! count always equals its mounts that have been reserved and not yet fully ended
//! (invariant 1), (3) the registry's own checks hold after every step, and (4) every
//! process finishes (nothing waits forever once timeouts fire).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use proptest::prelude::*;

use super::*;

const NAMES: [&str; 2] = ["a", "b"];
const PATHS: [&str; 3] = ["/p0", "/p1", "/p2"];

#[derive(Debug, Clone)]
enum Spec {
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
        mount_fails: bool,
    },
    Unmount {
        p: usize,
        busy: bool,
    },
    /// An admin's `umount` from outside: the session ends if something is mounted there.
    ExternalUmount {
        p: usize,
    },
}

fn spec() -> impl Strategy<Value = Spec> {
    prop_oneof![
        (0..NAMES.len(), any::<bool>()).prop_map(|(n, f)| Spec::Load {
            n,
            on_load_fails: f
        }),
        (0..NAMES.len(), any::<bool>()).prop_map(|(n, drain)| Spec::Unload { n, drain }),
        (
            0..NAMES.len(),
            0..PATHS.len(),
            proptest::bool::weighted(0.2)
        )
            .prop_map(|(n, p, f)| Spec::Mount {
                n,
                p,
                mount_fails: f
            }),
        (0..PATHS.len(), proptest::bool::weighted(0.2))
            .prop_map(|(p, busy)| Spec::Unmount { p, busy }),
        (0..PATHS.len()).prop_map(|p| Spec::ExternalUmount { p }),
    ]
}

/// Where a process is; `handle` is the library it is using, if any.
#[derive(Debug, Clone, PartialEq)]
enum Pc {
    Start,
    /// Load: on_load is running.
    OnLoad(u32),
    /// Unload: draining, waiting for the count to reach zero.
    Draining,
    /// Unload: on_unload is running.
    OnUnload(u32),
    /// Mount: instance being created and mounted.
    Mounting(u32, MountId),
    /// Mount: serving until the kernel ends the session.
    Serving(u32, MountId),
    /// Unmount: umount(2) is running.
    Umounting(MountId),
    /// Unmount: waiting for the session end.
    WaitingForEnd(MountId),
    Done,
}

impl Pc {
    fn handle_in_use(&self) -> Option<u32> {
        match self {
            Pc::OnLoad(h) | Pc::OnUnload(h) | Pc::Mounting(h, _) | Pc::Serving(h, _) => Some(*h),
            _ => None,
        }
    }
}

struct World {
    reg: Registry<u32>,
    closed: BTreeSet<u32>,
    next_handle: u32,
    /// Kernel mounts that umount(2) has detached, by mount id; their sessions now end.
    detached: BTreeSet<MountId>,
}

impl World {
    fn path(p: usize) -> &'static Path {
        Path::new(PATHS[p])
    }

    fn close(&mut self, handle: Arc<u32>) {
        assert!(self.closed.insert(*handle), "library {handle} closed twice");
    }

    /// One step of `spec` at `pc`, if it can run now (`timeouts` lets waits give up).
    fn step(&mut self, spec: &Spec, pc: &Pc, timeouts: bool) -> Option<Pc> {
        let now = SystemTime::UNIX_EPOCH;
        Some(match (spec, pc) {
            (Spec::Load { n, .. }, Pc::Start) => {
                self.next_handle += 1;
                let h = self.next_handle;
                match self.reg.begin_load(NAMES[*n], Arc::new(h), now) {
                    Ok(()) => Pc::OnLoad(h),
                    Err(_) => {
                        self.closed.insert(h); // never registered: closed right away
                        Pc::Done
                    }
                }
            }
            (Spec::Load { n, on_load_fails }, Pc::OnLoad(_)) => {
                if *on_load_fails {
                    let handle = self.reg.abort_load(NAMES[*n]).expect("abort own load");
                    self.close(handle);
                } else {
                    self.reg.finish_load(NAMES[*n]).expect("finish own load");
                }
                Pc::Done
            }
            (Spec::Unload { n, drain: false }, Pc::Start) => match self.reg.begin_unload(NAMES[*n])
            {
                Ok(handle) => Pc::OnUnload(*handle),
                Err(_) => Pc::Done,
            },
            (Spec::Unload { n, drain: true }, Pc::Start) => match self.reg.begin_drain(NAMES[*n]) {
                Ok(_) => Pc::Draining,
                Err(_) => Pc::Done,
            },
            (Spec::Unload { n, .. }, Pc::Draining) => {
                if self.reg.mount_count(NAMES[*n]) == 0 {
                    Pc::OnUnload(*self.reg.plugin(NAMES[*n]).expect("draining entry").handle)
                } else if timeouts {
                    self.reg.abort_unload(NAMES[*n]).expect("abort own drain");
                    Pc::Done
                } else {
                    return None;
                }
            }
            (Spec::Unload { n, .. }, Pc::OnUnload(_)) => {
                let handle = self
                    .reg
                    .finish_unload(NAMES[*n])
                    .expect("finish own unload");
                self.close(handle);
                Pc::Done
            }
            (Spec::Mount { n, p, .. }, Pc::Start) => {
                match self.reg.reserve_mount(
                    NAMES[*n],
                    Self::path(*p),
                    BTreeMap::new(),
                    false,
                    0,
                    now,
                ) {
                    Ok((handle, id)) => Pc::Mounting(*handle, id),
                    Err(_) => Pc::Done,
                }
            }
            (Spec::Mount { p, mount_fails, .. }, Pc::Mounting(h, id)) => {
                if *mount_fails {
                    assert!(self.reg.release_mount(Self::path(*p), *id));
                    Pc::Done
                } else {
                    self.reg.mount_started(Self::path(*p), *id);
                    Pc::Serving(*h, *id)
                }
            }
            (Spec::Mount { p, .. }, Pc::Serving(_, id)) => {
                // The session ends only after the kernel detached the mount.
                if !self.detached.contains(id) {
                    return None;
                }
                self.reg.release_mount(Self::path(*p), *id);
                Pc::Done
            }
            (Spec::Unmount { p, .. }, Pc::Start) => match self.reg.begin_unmount(Self::path(*p)) {
                Ok(id) => Pc::Umounting(id),
                Err(_) => Pc::Done,
            },
            (Spec::Unmount { p, busy }, Pc::Umounting(id)) => {
                if *busy {
                    self.reg.abort_unmount(Self::path(*p), *id);
                    Pc::Done
                } else {
                    self.detached.insert(*id);
                    Pc::WaitingForEnd(*id)
                }
            }
            (Spec::Unmount { .. }, Pc::WaitingForEnd(id)) => {
                if self.reg.has_mount_id(*id) {
                    return None;
                }
                Pc::Done
            }
            (Spec::ExternalUmount { p }, Pc::Start) => {
                if let Some(record) = self.reg.mounts().find(|(path, _)| *path == Self::path(*p)) {
                    if record.1.state != MountState::Pending {
                        self.detached.insert(record.1.id);
                    }
                }
                Pc::Done
            }
            (spec, pc) => unreachable!("{spec:?} has no step at {pc:?}"),
        })
    }
}

fn check(world: &World, specs: &[Spec], pcs: &[Pc]) {
    world.reg.check().unwrap();
    for pc in pcs {
        if let Some(handle) = pc.handle_in_use() {
            assert!(
                !world.closed.contains(&handle),
                "library {handle} closed while in use at {pc:?}"
            );
        }
    }
    for (n, name) in NAMES.iter().enumerate() {
        let live_mounts = specs
            .iter()
            .zip(pcs)
            .filter(|(s, pc)| {
                matches!(s, Spec::Mount { n: m, .. } if *m == n)
                    && matches!(pc, Pc::Mounting(..) | Pc::Serving(..))
            })
            .count();
        assert_eq!(world.reg.mount_count(name), live_mounts, "count of {name}");
    }
    let paths: Vec<PathBuf> = world.reg.mounts().map(|(p, _)| p.clone()).collect();
    let unique: BTreeSet<&PathBuf> = paths.iter().collect();
    assert_eq!(unique.len(), paths.len());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn every_interleaving_of_host_operations_keeps_the_invariants(
        specs in proptest::collection::vec(spec(), 1..10),
        schedule in proptest::collection::vec(any::<usize>(), 0..80),
    ) {
        let mut world = World {
            reg: Registry::new(),
            closed: BTreeSet::new(),
            next_handle: 0,
            detached: BTreeSet::new(),
        };
        let mut pcs = vec![Pc::Start; specs.len()];
        // Run the schedule: each entry picks one of the processes that can step now.
        for pick in schedule {
            let runnable: Vec<usize> = (0..specs.len())
                .filter(|&i| pcs[i] != Pc::Done)
                .collect();
            if runnable.is_empty() {
                break;
            }
            let i = runnable[pick % runnable.len()];
            if let Some(next) = world.step(&specs[i], &pcs[i], false) {
                pcs[i] = next;
            }
            check(&world, &specs, &pcs);
        }
        // Then let everything finish: waits may time out; sessions end by a final unmount.
        for round in 0.. {
            let mut progressed = false;
            for i in 0..specs.len() {
                if pcs[i] == Pc::Done {
                    continue;
                }
                if let Some(next) = world.step(&specs[i], &pcs[i], true) {
                    pcs[i] = next;
                    progressed = true;
                    check(&world, &specs, &pcs);
                }
            }
            if !progressed {
                // Only serving mounts are left: unmount them as shutdown would.
                let serving: Vec<MountId> = pcs.iter().filter_map(|pc| match pc {
                    Pc::Serving(_, id) => Some(*id),
                    _ => None,
                }).collect();
                prop_assert!(!serving.is_empty() || pcs.iter().all(|pc| *pc == Pc::Done),
                    "stuck: {:?}", pcs);
                if serving.is_empty() {
                    break;
                }
                world.detached.extend(serving);
            }
            prop_assert!(round < 100, "no progress: {:?}", pcs);
        }
        prop_assert_eq!(world.reg.mounts().count(), 0);
    }
}
