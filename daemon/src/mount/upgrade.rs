//! Moving live mounts to a new generation of their plugin (`fshostctl upgrade`): every
//! mount is paused (its backend lock taken alone: requests in flight finish, new ones
//! wait), each old instance's state is exported and imported into a new instance made
//! with the mount's options, and only when every import has succeeded are the backends
//! swapped and the mounts resumed. Any failure before the swap drops the new instances
//! and resumes the old ones untouched: nothing changed.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fshost_sdk::{Errno, SavedState, StateWriter};

use super::backend::{Backend, Hosted, Swappable};
use super::describe_errno;
use super::options::plugin_options;
use crate::plugin::Plugin;

/// One mount to move: where it is, its backend (fakes in the host's interleaving
/// checker), and its options, with which the new instance is made.
pub struct Moving<S = Arc<Swappable>> {
    pub path: PathBuf,
    pub slot: S,
    pub options: BTreeMap<String, String>,
    /// The generation serving it now (the next one counts from the swap on).
    pub generation: u32,
}

/// What a move did.
#[derive(Debug, Clone, Copy)]
pub struct Moved {
    /// From the first mount paused to the last resumed.
    pub pause: Duration,
    pub state_bytes: u64,
}

/// Why mounts could not move; each leaves every mount on the old generation.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("{} stayed busy for {}s (requests in flight: {in_flight}); a client may hold a request open; try again, or with a longer --timeout", .path.display(), .waited.as_secs())]
    Busy {
        path: PathBuf,
        waited: Duration,
        in_flight: String,
    },
    #[error("the current generation could not export the state of {}: {}{}", .path.display(), describe_errno(.errno.0), panicked(.panic))]
    Export {
        path: PathBuf,
        errno: Errno,
        panic: Option<String>,
    },
    #[error("the new generation could not create an instance for {}: {}{}", .path.display(), describe_errno(.errno.0), panicked(.panic))]
    Create {
        path: PathBuf,
        errno: Errno,
        panic: Option<String>,
    },
    #[error("the plugin cannot serve {} again after fshostd died: {}{}", .path.display(), describe_errno(.errno.0), panicked(.panic))]
    Resume {
        path: PathBuf,
        errno: Errno,
        panic: Option<String>,
    },
    #[error("the new code cannot serve {} as its kernel connection was set up: {why}; unmount it to change that", .path.display())]
    Unmet { path: PathBuf, why: &'static str },
    #[error("the new generation refused the state of {} ({state_bytes} bytes): {}{}", .path.display(), describe_errno(.errno.0), panicked(.panic))]
    Import {
        path: PathBuf,
        state_bytes: usize,
        errno: Errno,
        panic: Option<String>,
    },
}

/// ", it panicked: ..." when the failure was a contained panic (the generation that
/// panicked is tainted).
fn panicked(panic: &Option<String>) -> String {
    panic
        .as_ref()
        .map_or_else(String::new, |reason| format!(" (it panicked: {reason})"))
}

/// Moves every mount in `mounts` to `new`, all or none (see the module docs). Runs the
/// plugins' code on a thread of its own that ends before this returns, as their hooks do.
pub fn move_mounts(
    new: &Arc<Plugin>,
    mounts: &[Moving],
    timeout: Duration,
) -> Result<Moved, MoveError> {
    crate::plugin::on_fresh_thread(|| move_all(new, mounts, timeout))
}

/// A paused mount: its backend held alone.
pub type Paused<'a> = parking_lot::RwLockWriteGuard<'a, Hosted>;

/// Pauses every mount of `mounts` (path, backend) within `timeout` in all: requests in
/// flight finish, new ones wait until the guards go.
pub fn pause_all<'a>(
    mounts: impl IntoIterator<Item = (&'a Path, &'a Swappable)>,
    timeout: Duration,
) -> Result<Vec<Paused<'a>>, MoveError> {
    let deadline = Instant::now() + timeout;
    let mut paused = Vec::new();
    for (path, slot) in mounts {
        let guard = slot
            .current
            .try_write_until(deadline)
            .ok_or_else(|| MoveError::Busy {
                path: path.to_path_buf(),
                waited: timeout,
                in_flight: slot.stats.in_flight(),
            })?;
        paused.push(guard);
    }
    Ok(paused)
}

fn move_all(new: &Arc<Plugin>, mounts: &[Moving], timeout: Duration) -> Result<Moved, MoveError> {
    let started = Instant::now();
    let paused = pause_all(mounts.iter().map(|m| (m.path.as_path(), &*m.slot)), timeout)?;
    let mut state_bytes = 0u64;
    let mut next = Vec::with_capacity(mounts.len());
    for (mount, current) in mounts.iter().zip(&paused) {
        let hosted = take_over(new, mount, current)?;
        state_bytes += hosted.1;
        next.push(hosted.0);
    }
    // Every import succeeded: swap, and resume each mount as soon as it is swapped.
    let mut old = Vec::with_capacity(mounts.len());
    for ((mut guard, hosted), mount) in paused.into_iter().zip(next).zip(mounts) {
        old.push(std::mem::replace(&mut *guard, hosted));
        mount
            .slot
            .stats
            .generation_began(mount.generation, mount.generation + 1);
    }
    // New requests wait from the moment the first mount's lock is asked for.
    let pause = started.elapsed();
    tracing::debug!(?pause, "mounts moved");
    // The old instances are destroyed here, before the caller may close their library.
    drop(old);
    Ok(Moved { pause, state_bytes })
}

/// A new generation's instance holding what `current` exported, and its state's size.
fn take_over(
    new: &Arc<Plugin>,
    mount: &Moving,
    current: &Hosted,
) -> Result<(Hosted, u64), MoveError> {
    let began = Instant::now();
    let mut state = Vec::new();
    let fds = export(&mount.path, current, &mut |chunk| {
        state.extend_from_slice(chunk);
        true
    })?;
    let exported = began.elapsed();
    let hosted = instance_from(new, &mount.path, &mount.options, &state, &fds)?;
    if let Some(agreed) = mount.slot.link.agreed() {
        keeps_to(&agreed, &hosted, &mount.path)?;
    }
    tracing::debug!(mount = %mount.path.display(), ?exported, imported = ?(began.elapsed() - exported), bytes = state.len(), fds = fds.len(), "state handed over");
    Ok((hosted, state.len() as u64))
}

/// Refuses `hosted` for a connection whose INIT `agreed` left to the plugin what it would
/// not do (see [`super::Agreed::unmet_by`]).
pub(super) fn keeps_to(
    agreed: &super::Agreed,
    hosted: &Hosted,
    path: &Path,
) -> Result<(), MoveError> {
    match agreed.unmet_by(hosted.wants().unwrap_or(0)) {
        Some(why) => Err(MoveError::Unmet {
            path: path.to_path_buf(),
            why,
        }),
        None => Ok(()),
    }
}

/// Exports the state of `current` (paused) into `sink` (false: no more room); returns
/// duplicates of the descriptors the state names.
pub(super) fn export(
    path: &Path,
    current: &Hosted,
    sink: &mut dyn FnMut(&[u8]) -> bool,
) -> Result<Vec<OwnedFd>, MoveError> {
    let mut fds = Vec::new();
    StateWriter::over(sink, &mut fds, |out| current.export_state(out)).map_err(|errno| {
        MoveError::Export {
            path: path.to_path_buf(),
            errno,
            panic: current.plugin.library.taint(),
        }
    })?;
    Ok(fds)
}

/// A new instance of `plugin` made with the mount's `options`.
pub(super) fn new_instance(
    plugin: &Arc<Plugin>,
    path: &Path,
    options: &BTreeMap<String, String>,
) -> Result<Hosted, MoveError> {
    let instance = plugin
        .library
        .create(plugin_options(options))
        .map_err(|errno| MoveError::Create {
            path: path.to_path_buf(),
            errno,
            panic: plugin.library.taint(),
        })?;
    Ok(Hosted::new(Arc::clone(plugin), instance))
}

/// A new instance of `plugin` made with the mount's `options`, holding `state` (and the
/// descriptors it names, `fds`); destroyed again if the import fails.
pub(super) fn instance_from(
    plugin: &Arc<Plugin>,
    path: &Path,
    options: &BTreeMap<String, String>,
    state: &[u8],
    fds: &[OwnedFd],
) -> Result<Hosted, MoveError> {
    let hosted = new_instance(plugin, path, options)?;
    SavedState::over(state, fds, |saved| hosted.import_state(saved)).map_err(|errno| {
        MoveError::Import {
            path: path.to_path_buf(),
            state_bytes: state.len(),
            errno,
            panic: plugin.library.taint(),
        }
    })?;
    Ok(hosted)
}
