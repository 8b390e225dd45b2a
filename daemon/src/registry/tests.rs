//! Registry tests: every transition and refusal by hand, then random operation sequences
//! checked against a small reference model and the DESIGN.md §2 invariants.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use proptest::prelude::*;

use super::*;

type Reg = Registry<u32>;

fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH
}

fn live(reg: &mut Reg, name: &str) {
    reg.begin_load(name, Arc::new(7), now()).unwrap();
    reg.finish_load(name).unwrap();
}

fn mount(reg: &mut Reg, name: &str, path: &str) -> Result<MountId, RegistryError> {
    let (_, id) = reg.reserve_mount(name, Path::new(path), BTreeMap::new(), false, 0, now())?;
    assert!(reg.mount_started(Path::new(path), id));
    Ok(id)
}

/// Asserts that a refused transition left the registry exactly as it was.
fn refused<T: std::fmt::Debug>(
    reg: &mut Reg,
    op: impl FnOnce(&mut Reg) -> Result<T, RegistryError>,
) -> RegistryError {
    let before = format!("{reg:?}");
    let err = op(reg).expect_err("operation should be refused");
    assert_eq!(before, format!("{reg:?}"), "a refusal changed the registry");
    err
}

#[test]
fn load_goes_registering_then_live() {
    let mut reg = Reg::new();
    reg.begin_load("memfs", Arc::new(1), now()).unwrap();
    assert_eq!(reg.plugin("memfs").unwrap().state, PluginState::Registering);
    reg.finish_load("memfs").unwrap();
    assert_eq!(reg.plugin("memfs").unwrap().state, PluginState::Live);
}

#[test]
fn load_of_a_loaded_name_is_refused() {
    let mut reg = Reg::new();
    live(&mut reg, "memfs");
    let err = refused(&mut reg, |r| r.begin_load("memfs", Arc::new(2), now()));
    assert!(matches!(err, RegistryError::AlreadyLoaded { .. }));
}

#[test]
fn load_of_a_registering_name_is_busy() {
    let mut reg = Reg::new();
    reg.begin_load("memfs", Arc::new(1), now()).unwrap();
    let err = refused(&mut reg, |r| r.begin_load("memfs", Arc::new(2), now()));
    assert!(matches!(
        err,
        RegistryError::NotLive {
            state: PluginState::Registering,
            ..
        }
    ));
}

#[test]
fn failed_load_leaves_no_entry() {
    let mut reg = Reg::new();
    reg.begin_load("memfs", Arc::new(9), now()).unwrap();
    assert_eq!(*reg.abort_load("memfs").unwrap(), 9);
    assert!(reg.plugin("memfs").is_none());
}

#[test]
fn mount_refused_while_registering_or_deregistering() {
    let mut reg = Reg::new();
    reg.begin_load("memfs", Arc::new(1), now()).unwrap();
    let err = refused(&mut reg, |r| mount(r, "memfs", "/a"));
    assert!(err.to_string().contains("registering"), "{err}");
    reg.finish_load("memfs").unwrap();
    reg.begin_unload("memfs").unwrap();
    let err = refused(&mut reg, |r| mount(r, "memfs", "/a"));
    assert!(err.to_string().contains("deregistering"), "{err}");
}

#[test]
fn mount_of_unknown_plugin_is_not_found() {
    let mut reg = Reg::new();
    let err = refused(&mut reg, |r| mount(r, "nope", "/a"));
    assert!(matches!(err, RegistryError::UnknownPlugin { .. }));
}

#[test]
fn a_mount_point_serves_one_mount() {
    let mut reg = Reg::new();
    live(&mut reg, "memfs");
    live(&mut reg, "hellofs");
    mount(&mut reg, "memfs", "/a").unwrap();
    let err = refused(&mut reg, |r| mount(r, "hellofs", "/a"));
    assert!(matches!(err, RegistryError::MountpointInUse { .. }));
}

#[test]
fn unload_refused_while_mounted_lists_mount_points() {
    let mut reg = Reg::new();
    live(&mut reg, "memfs");
    mount(&mut reg, "memfs", "/mnt/a").unwrap();
    mount(&mut reg, "memfs", "/mnt/b").unwrap();
    let err = refused(&mut reg, |r| r.begin_unload("memfs"));
    assert_eq!(
        err.to_string(),
        "plugin \"memfs\" is busy: 2 mounts (/mnt/a, /mnt/b); unmount them first"
    );
}

#[test]
fn unload_after_last_unmount() {
    let mut reg = Reg::new();
    live(&mut reg, "memfs");
    let id = mount(&mut reg, "memfs", "/a").unwrap();
    assert_eq!(reg.begin_unmount(Path::new("/a")).unwrap(), id);
    assert_eq!(
        reg.mount_count("memfs"),
        1,
        "count drops only when the session ended"
    );
    assert!(reg.release_mount(Path::new("/a"), id));
    assert_eq!(reg.mount_count("memfs"), 0);
    reg.begin_unload("memfs").unwrap();
    assert_eq!(
        reg.plugin("memfs").unwrap().state,
        PluginState::Deregistering
    );
    reg.finish_unload("memfs").unwrap();
    assert!(reg.plugin("memfs").is_none());
}

#[test]
fn unmount_refusals() {
    let mut reg = Reg::new();
    live(&mut reg, "memfs");
    let err = refused(&mut reg, |r| r.begin_unmount(Path::new("/a")));
    assert!(matches!(err, RegistryError::UnknownMount { .. }));
    let (_, id) = reg
        .reserve_mount("memfs", Path::new("/a"), BTreeMap::new(), false, 0, now())
        .unwrap();
    let err = refused(&mut reg, |r| r.begin_unmount(Path::new("/a")));
    assert!(matches!(
        err,
        RegistryError::MountBusy {
            state: MountState::Pending,
            ..
        }
    ));
    reg.mount_started(Path::new("/a"), id);
    reg.begin_unmount(Path::new("/a")).unwrap();
    let err = refused(&mut reg, |r| r.begin_unmount(Path::new("/a")));
    assert!(matches!(
        err,
        RegistryError::MountBusy {
            state: MountState::Unmounting,
            ..
        }
    ));
    assert!(reg.abort_unmount(Path::new("/a"), id));
    assert_eq!(
        reg.mount(Path::new("/a")).unwrap().state,
        MountState::Active
    );
}

#[test]
fn stale_session_end_cannot_remove_a_newer_mount() {
    let mut reg = Reg::new();
    live(&mut reg, "memfs");
    let old = mount(&mut reg, "memfs", "/a").unwrap();
    assert!(reg.release_mount(Path::new("/a"), old));
    let new = mount(&mut reg, "memfs", "/a").unwrap();
    assert!(!reg.release_mount(Path::new("/a"), old));
    assert!(reg.has_mount_id(new));
}

#[test]
fn mount_that_ended_before_it_was_marked_started() {
    let mut reg = Reg::new();
    live(&mut reg, "memfs");
    let (_, id) = reg
        .reserve_mount("memfs", Path::new("/a"), BTreeMap::new(), false, 0, now())
        .unwrap();
    assert!(reg.release_mount(Path::new("/a"), id));
    assert!(!reg.mount_started(Path::new("/a"), id));
    assert_eq!(reg.mount_count("memfs"), 0);
}

#[test]
fn drain_refuses_new_mounts_and_finishes_only_without_mounts() {
    let mut reg = Reg::new();
    live(&mut reg, "memfs");
    let id = mount(&mut reg, "memfs", "/a").unwrap();
    reg.begin_drain("memfs").unwrap();
    let err = refused(&mut reg, |r| mount(r, "memfs", "/b"));
    assert!(err.to_string().contains("deregistering"), "{err}");
    let err = refused(&mut reg, |r| r.finish_unload("memfs"));
    assert!(matches!(err, RegistryError::PluginBusy { .. }));
    // Timed out: live again, the mount untouched.
    reg.abort_unload("memfs").unwrap();
    assert_eq!(reg.plugin("memfs").unwrap().state, PluginState::Live);
    reg.begin_drain("memfs").unwrap();
    reg.begin_unmount(Path::new("/a")).unwrap();
    assert!(reg.release_mount(Path::new("/a"), id));
    reg.finish_unload("memfs").unwrap();
    assert!(reg.plugin("memfs").is_none());
}

#[test]
fn a_handover_freezes_everything_until_it_ends() {
    let mut reg = Reg::new();
    live(&mut reg, "memfs");
    live(&mut reg, "hellofs");
    mount(&mut reg, "memfs", "/m").unwrap();
    // Only a settled registry is handed over: not with a mount still being made.
    let (_, pending) = reg
        .reserve_mount("hellofs", Path::new("/h"), BTreeMap::new(), false, 0, now())
        .unwrap();
    let err = refused(&mut reg, |r| r.begin_handover());
    assert!(matches!(err, RegistryError::MountBusy { .. }), "{err}");
    assert!(reg.release_mount(Path::new("/h"), pending));
    // Nor while a plugin is being upgraded.
    reg.begin_upgrade("memfs", Arc::new(8)).unwrap();
    let err = refused(&mut reg, |r| r.begin_handover());
    assert!(matches!(err, RegistryError::Upgrading { .. }), "{err}");
    reg.abort_upgrade("memfs").unwrap();
    let (plugins, mounts) = reg.begin_handover().unwrap();
    let names: Vec<&str> = plugins.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(names, ["hellofs", "memfs"]);
    assert_eq!(mounts.len(), 1);
    // Frozen: nothing starts, and a second handover is refused too.
    let frozen = |err: RegistryError| assert_eq!(err, RegistryError::HandingOver);
    frozen(refused(&mut reg, |r| r.begin_load("x", Arc::new(1), now())));
    frozen(refused(&mut reg, |r| mount(r, "memfs", "/n")));
    frozen(refused(&mut reg, |r| r.begin_unmount(Path::new("/m"))));
    frozen(refused(&mut reg, |r| r.begin_unload("hellofs")));
    frozen(refused(&mut reg, |r| r.begin_drain("hellofs")));
    frozen(refused(&mut reg, |r| {
        r.begin_upgrade("hellofs", Arc::new(9))
    }));
    frozen(refused(&mut reg, |r| r.begin_handover()));
    // A failed handover thaws it.
    reg.end_handover();
    reg.begin_unload("hellofs").unwrap();
    mount(&mut reg, "memfs", "/n").unwrap();
}

#[test]
fn closed_registry_refuses_new_loads_and_mounts_but_allows_teardown() {
    let mut reg = Reg::new();
    live(&mut reg, "memfs");
    let id = mount(&mut reg, "memfs", "/a").unwrap();
    reg.close();
    let err = refused(&mut reg, |r| r.begin_load("other", Arc::new(2), now()));
    assert_eq!(err, RegistryError::ShuttingDown);
    let err = refused(&mut reg, |r| mount(r, "memfs", "/b"));
    assert_eq!(err, RegistryError::ShuttingDown);
    reg.begin_unmount(Path::new("/a")).unwrap();
    assert!(reg.release_mount(Path::new("/a"), id));
    reg.begin_unload("memfs").unwrap();
    reg.finish_unload("memfs").unwrap();
}

// ---- model-based random sequences ----

#[derive(Debug, Clone)]
enum Op {
    BeginLoad(usize),
    FinishLoad(usize),
    AbortLoad(usize),
    Reserve(usize, usize),
    Started(usize),
    Release(usize),
    BeginUnmount(usize),
    AbortUnmount(usize),
    BeginUnload(usize),
    BeginDrain(usize),
    AbortUnload(usize),
    FinishUnload(usize),
}

const NAMES: [&str; 3] = ["a", "b", "c"];
const PATHS: [&str; 4] = ["/m0", "/m1", "/m2", "/m3"];

fn op() -> impl Strategy<Value = Op> {
    let n = 0..NAMES.len();
    let p = 0..PATHS.len();
    prop_oneof![
        n.clone().prop_map(Op::BeginLoad),
        n.clone().prop_map(Op::FinishLoad),
        n.clone().prop_map(Op::AbortLoad),
        (n.clone(), p.clone()).prop_map(|(n, p)| Op::Reserve(n, p)),
        p.clone().prop_map(Op::Started),
        p.clone().prop_map(Op::Release),
        p.clone().prop_map(Op::BeginUnmount),
        p.clone().prop_map(Op::AbortUnmount),
        n.clone().prop_map(Op::BeginUnload),
        n.clone().prop_map(Op::BeginDrain),
        n.clone().prop_map(Op::AbortUnload),
        n.prop_map(Op::FinishUnload),
    ]
}

/// The reference model: what each plugin and mount point should be, in the plainest terms.
#[derive(Default)]
struct Model {
    plugins: BTreeMap<usize, PluginState>,
    /// path -> (plugin, state, id)
    mounts: BTreeMap<usize, (usize, MountState, MountId)>,
}

impl Model {
    fn count(&self, plugin: usize) -> usize {
        self.mounts.values().filter(|m| m.0 == plugin).count()
    }
}

fn check_invariants(reg: &Reg, closed: &[u32], draining: &[usize]) {
    reg.check().unwrap();
    for (path, record) in reg.mounts() {
        let entry = reg
            .plugin(&record.plugin)
            .unwrap_or_else(|| panic!("mount {path:?} of a plugin that is gone"));
        assert_ne!(
            entry.state,
            PluginState::Registering,
            "mount on a registering plugin"
        );
        assert!(!closed.contains(&entry.handle), "mount on a closed library");
    }
    for (n, name) in NAMES.iter().enumerate() {
        if let Some(entry) = reg.plugin(name) {
            if entry.state == PluginState::Deregistering && !draining.contains(&n) {
                assert_eq!(
                    reg.mount_count(name),
                    0,
                    "deregistering with mounts, not draining"
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn random_sequences_follow_the_model(ops in proptest::collection::vec(op(), 1..80)) {
        let mut reg = Reg::new();
        let mut model = Model::default();
        let mut closed: Vec<u32> = Vec::new();
        let mut next_handle = 0u32;
        // Plugins put into Deregistering by a drain (they may still have mounts).
        let mut draining: Vec<usize> = Vec::new();
        for op in ops {
            let before = format!("{reg:?}");
            let ok = match op {
                Op::BeginLoad(n) => {
                    next_handle += 1;
                    let ok = reg.begin_load(NAMES[n], Arc::new(next_handle), now()).is_ok();
                    prop_assert_eq!(ok, !model.plugins.contains_key(&n));
                    if ok { model.plugins.insert(n, PluginState::Registering); }
                    ok
                }
                Op::FinishLoad(n) => {
                    let ok = reg.finish_load(NAMES[n]).is_ok();
                    prop_assert_eq!(ok, model.plugins.get(&n) == Some(&PluginState::Registering));
                    if ok { model.plugins.insert(n, PluginState::Live); }
                    ok
                }
                Op::AbortLoad(n) => {
                    let result = reg.abort_load(NAMES[n]);
                    prop_assert_eq!(result.is_ok(), model.plugins.get(&n) == Some(&PluginState::Registering));
                    if let Ok(handle) = &result { closed.push(**handle); model.plugins.remove(&n); }
                    result.is_ok()
                }
                Op::Reserve(n, p) => {
                    let result = reg.reserve_mount(NAMES[n], Path::new(PATHS[p]), BTreeMap::new(), false, 0, now());
                    let expect = model.plugins.get(&n) == Some(&PluginState::Live) && !model.mounts.contains_key(&p);
                    prop_assert_eq!(result.is_ok(), expect);
                    if let Ok((_, id)) = result { model.mounts.insert(p, (n, MountState::Pending, id)); }
                    expect
                }
                Op::Started(p) => {
                    let id = model.mounts.get(&p).map_or(MountId(0), |m| m.2);
                    let ok = reg.mount_started(Path::new(PATHS[p]), id);
                    prop_assert_eq!(ok, matches!(model.mounts.get(&p), Some((_, MountState::Pending, _))));
                    if ok { model.mounts.get_mut(&p).unwrap().1 = MountState::Active; }
                    ok
                }
                Op::Release(p) => {
                    let id = model.mounts.get(&p).map_or(MountId(0), |m| m.2);
                    let ok = reg.release_mount(Path::new(PATHS[p]), id);
                    prop_assert_eq!(ok, model.mounts.contains_key(&p));
                    model.mounts.remove(&p);
                    ok
                }
                Op::BeginUnmount(p) => {
                    let ok = reg.begin_unmount(Path::new(PATHS[p])).is_ok();
                    prop_assert_eq!(ok, matches!(model.mounts.get(&p), Some((_, MountState::Active, _))));
                    if ok { model.mounts.get_mut(&p).unwrap().1 = MountState::Unmounting; }
                    ok
                }
                Op::AbortUnmount(p) => {
                    let id = model.mounts.get(&p).map_or(MountId(0), |m| m.2);
                    let ok = reg.abort_unmount(Path::new(PATHS[p]), id);
                    prop_assert_eq!(ok, matches!(model.mounts.get(&p), Some((_, MountState::Unmounting, _))));
                    if ok { model.mounts.get_mut(&p).unwrap().1 = MountState::Active; }
                    ok
                }
                Op::BeginUnload(n) => {
                    let ok = reg.begin_unload(NAMES[n]).is_ok();
                    prop_assert_eq!(ok, model.plugins.get(&n) == Some(&PluginState::Live) && model.count(n) == 0);
                    if ok { model.plugins.insert(n, PluginState::Deregistering); }
                    ok
                }
                Op::BeginDrain(n) => {
                    let ok = reg.begin_drain(NAMES[n]).is_ok();
                    prop_assert_eq!(ok, model.plugins.get(&n) == Some(&PluginState::Live));
                    if ok {
                        model.plugins.insert(n, PluginState::Deregistering);
                        draining.push(n);
                    }
                    ok
                }
                Op::AbortUnload(n) => {
                    let ok = reg.abort_unload(NAMES[n]).is_ok();
                    prop_assert_eq!(ok, model.plugins.get(&n) == Some(&PluginState::Deregistering));
                    if ok {
                        model.plugins.insert(n, PluginState::Live);
                        draining.retain(|d| *d != n);
                    }
                    ok
                }
                Op::FinishUnload(n) => {
                    let result = reg.finish_unload(NAMES[n]);
                    prop_assert_eq!(
                        result.is_ok(),
                        model.plugins.get(&n) == Some(&PluginState::Deregistering) && model.count(n) == 0
                    );
                    if let Ok(handle) = &result {
                        closed.push(**handle);
                        model.plugins.remove(&n);
                        draining.retain(|d| *d != n);
                    }
                    result.is_ok()
                }
            };
            if !ok {
                prop_assert_eq!(&before, &format!("{reg:?}"), "refused op changed the registry");
            }
            check_invariants(&reg, &closed, &draining);
            for (n, name) in NAMES.iter().enumerate() {
                prop_assert_eq!(reg.plugin(name).map(|e| e.state), model.plugins.get(&n).copied());
                prop_assert_eq!(reg.mount_count(name), model.count(n));
            }
            let paths: Vec<PathBuf> = reg.mounts().map(|(p, _)| p.clone()).collect();
            let model_paths: Vec<PathBuf> = model.mounts.keys().map(|p| PathBuf::from(PATHS[*p])).collect();
            prop_assert_eq!(paths, model_paths);
        }
    }
}
