//! How many threads the mounts may use, so that fshostd never runs into the operating
//! system's limits. Past those, creating a thread fails, and a thread that starts when
//! memory maps run out aborts the whole process inside the Rust runtime (its signal
//! stack cannot be mapped): every mount would be lost. Each mount takes its threads (the
//! session's and one that waits for its end) from here before it is made, and gives them
//! back when it ends; a mount that does not fit is refused with a clear error.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Threads one more thread costs in memory maps (its stack and guard, its signal stack and
/// guard), with room to spare.
const MAPS_PER_THREAD: usize = 5;
/// Threads (and maps) left for the daemon itself: the control plane, the runtime, plugins'
/// own, and the processes a cgroup shares with us.
const RESERVE: usize = 64;

static CAP: AtomicUsize = AtomicUsize::new(usize::MAX);
static USED: AtomicUsize = AtomicUsize::new(0);
/// What bounds `CAP`, for error messages.
static WHY: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

/// Sets how many threads mounts may use: `configured` (0: no setting) or what the system
/// allows, whichever is smaller. Returns the cap and what bounds it, for the log.
pub fn limit_threads(configured: usize) -> (usize, String) {
    let mut bounds = system_bounds();
    if configured > 0 {
        bounds.push((configured, "limits.max_mount_threads".into()));
    }
    let (cap, why) = bounds
        .into_iter()
        .min_by_key(|(n, _)| *n)
        .unwrap_or((usize::MAX, "nothing".into()));
    CAP.store(cap, Ordering::Relaxed);
    *WHY.lock().unwrap_or_else(|e| e.into_inner()) = why.clone();
    (cap, why)
}

/// Threads mounts use now, and the most they may.
pub fn threads() -> (usize, usize) {
    (USED.load(Ordering::Relaxed), CAP.load(Ordering::Relaxed))
}

/// What bounds the threads mounts may use.
pub fn bound() -> String {
    WHY.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// `n` threads taken for one mount; given back when dropped.
#[derive(Debug)]
pub struct Threads(usize);

impl Threads {
    /// Takes `n` threads, or says why not.
    pub fn take(n: usize) -> Result<Threads, (usize, usize)> {
        let cap = CAP.load(Ordering::Relaxed);
        USED.fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
            (used + n <= cap).then_some(used + n)
        })
        .map(|_| Threads(n))
        .map_err(|used| (used, cap))
    }

    /// Takes `n` threads even past the cap: for mounts that already exist and must go on
    /// being served (a daemon upgrade's or a crash's takeover), so that the count stays
    /// true.
    pub fn take_anyway(n: usize) -> Threads {
        USED.fetch_add(n, Ordering::AcqRel);
        Threads(n)
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        USED.fetch_sub(self.0, Ordering::AcqRel);
    }
}

/// What the system lets this process have in threads, from each limit there is.
fn system_bounds() -> Vec<(usize, String)> {
    let mut bounds = Vec::new();
    let own = count_entries("/proc/self/task").unwrap_or(1);
    if let Some(max_maps) = read_number("/proc/sys/vm/max_map_count") {
        let maps = std::fs::read_to_string("/proc/self/maps").map_or(0, |m| m.lines().count());
        let room = max_maps.saturating_sub(maps) / MAPS_PER_THREAD;
        bounds.push((room.saturating_sub(RESERVE), "vm.max_map_count".into()));
    }
    if let Some(max) = read_number("/proc/sys/kernel/threads-max") {
        let all = read_number_field("/proc/loadavg", 3).unwrap_or(own);
        bounds.push((
            max.saturating_sub(all + RESERVE),
            "kernel.threads-max".into(),
        ));
    }
    if let Some((room, path)) = cgroup_pids_room() {
        bounds.push((
            room.saturating_sub(RESERVE),
            format!("the pids cgroup ({})", path.display()),
        ));
    }
    // RLIMIT_NPROC counts the user's threads; root is exempt.
    if !nix::unistd::geteuid().is_root() {
        let nproc = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NPROC);
        if let Ok((soft, _)) = nproc.map(|(soft, hard)| (soft as usize, hard)) {
            bounds.push((soft.saturating_sub(own + RESERVE), "RLIMIT_NPROC".into()));
        }
    }
    bounds
}

/// Room left in the tightest pids cgroup above us (v2, or v1's pids hierarchy).
fn cgroup_pids_room() -> Option<(usize, PathBuf)> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let dir = cgroups.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let path = path.trim_start_matches('/');
        match controllers {
            "" => Some(Path::new("/sys/fs/cgroup").join(path)),
            c if c.split(',').any(|c| c == "pids") => {
                Some(Path::new("/sys/fs/cgroup/pids").join(path))
            }
            _ => None,
        }
        .filter(|dir| dir.join("pids.current").exists())
    })?;
    let mut tightest: Option<(usize, PathBuf)> = None;
    for level in dir
        .ancestors()
        .take_while(|p| p.starts_with("/sys/fs/cgroup"))
    {
        let (Some(max), Some(current)) = (
            read_number(level.join("pids.max")),
            read_number(level.join("pids.current")),
        ) else {
            continue; // "max", or no pids controller at this level
        };
        let room = max.saturating_sub(current);
        if tightest.as_ref().is_none_or(|(r, _)| room < *r) {
            tightest = Some((room, level.to_path_buf()));
        }
    }
    tightest
}

fn read_number(path: impl AsRef<Path>) -> Option<usize> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The `index`th whitespace-separated field; for /proc/loadavg's "running/total" the total.
fn read_number_field(path: &str, index: usize) -> Option<usize> {
    let text = std::fs::read_to_string(path).ok()?;
    let field = text.split_whitespace().nth(index)?;
    field.rsplit('/').next()?.parse().ok()
}

fn count_entries(path: &str) -> io::Result<usize> {
    Ok(std::fs::read_dir(path)?.count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_come_back_when_their_mount_ends() {
        // The one test that touches the process-wide count: others would race it.
        CAP.store(10, Ordering::Relaxed);
        let a = Threads::take(4).unwrap();
        let b = Threads::take(6).unwrap();
        assert_eq!(Threads::take(1).unwrap_err(), (10, 10));
        drop(a);
        let c = Threads::take(3).unwrap();
        assert_eq!(threads(), (9, 10));
        let over = Threads::take_anyway(5);
        assert_eq!(threads(), (14, 10));
        drop((b, c, over));
        assert_eq!(threads(), (0, 10));
        CAP.store(usize::MAX, Ordering::Relaxed);
    }

    #[test]
    fn the_system_bounds_are_found() {
        let bounds = system_bounds();
        assert!(
            bounds.iter().any(|(_, why)| why == "vm.max_map_count"),
            "{bounds:?}"
        );
    }
}
