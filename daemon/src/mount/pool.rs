//! The threads that serve mounts: each plugin's mounts share one pool of workers that wait
//! on all of their `/dev/fuse` connections with one epoll, so that an idle mount costs no
//! thread and the threads are bounded by configuration, not by the number of mounts.
//!
//! A connection is registered one-shot: the worker that is woken for it reads one request
//! and, while fewer than the mount's `-o threads=N` requests of it are being served, arms
//! it again before serving, so that others may read the next. A mount thus holds at most N
//! workers (a stuck plugin instance or a paused mount cannot take its plugin's whole pool),
//! and a pool grows by one worker whenever a worker takes a request and none is left
//! waiting, up to `[limits] threads_per_plugin`; a worker idle for a while ends (the last
//! one stays while the plugin has mounts).
//!
//! Plugin code runs only on threads that end before its library may be closed (DESIGN.md
//! §8): when a plugin's last mount ends its pool closes, every worker ends, and only a
//! thread that joined them all reports that last mount's end (after which the plugin may
//! be unloaded). Per plugin rather than one pool for the daemon for that reason, and so
//! that one plugin's stuck requests never hold another plugin's mounts.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use fuser::{Polled, Received, ReplySink, RequestBuf, Session};
use parking_lot::{Mutex, MutexGuard, RwLock};
use rustix::buffer::spare_capacity;
use rustix::event::{epoll, eventfd, EventfdFlags, Timespec};

use super::budget;
use super::link::{Agreed, Link};
use super::ring::{self, Ring, Transport};
use super::{Adapter, MountTarget, Swappable};

/// A mount's connection, served by a pool.
type Connection = Polled<Adapter<Arc<Swappable>>>;

/// What to run when a mount's session has ended.
pub type OnEnd = Box<dyn FnOnce() + Send>;

/// Workers one plugin's pool may have unless configured.
pub const DEFAULT_THREADS_PER_PLUGIN: usize = 16;
/// A worker that had no request for this long ends, unless it is its pool's last.
const IDLE: Duration = Duration::from_secs(10);
/// The epoll token of the pool's wake-up descriptor (mount tokens count up from 0).
const WAKE: u64 = u64::MAX;

static THREADS_PER_PLUGIN: AtomicUsize = AtomicUsize::new(DEFAULT_THREADS_PER_PLUGIN);
/// Workers of one pool that the mounts of one user (an owner other than root) may hold at
/// once, unless configured (`[users] max_threads`).
pub const DEFAULT_USER_THREADS: usize = 4;
static USER_THREADS: AtomicUsize = AtomicUsize::new(DEFAULT_USER_THREADS);
/// The pool of each plugin (by name) that has mounts.
static POOLS: Mutex<BTreeMap<String, Arc<Pool>>> = Mutex::new(BTreeMap::new());

/// Sets the most workers one plugin's pool may have (at start, before any mount).
pub fn set_threads_per_plugin(n: usize) {
    THREADS_PER_PLUGIN.store(n.max(1), Ordering::Relaxed);
}

/// Sets how many workers of a pool one user's mounts may hold at once (at start and reload).
pub fn set_user_threads(n: usize) {
    USER_THREADS.store(n.max(1), Ordering::Relaxed);
}

/// Why a mount could not be served.
#[derive(Debug)]
pub enum ServeError {
    /// The thread budget has no room for the pool's first worker: (used, cap).
    Budget(usize, usize),
    /// The system refused a thread, or the connection could not be registered.
    Io(io::Error),
}

/// Serves `session` (the mount at `target`, kernel id `kernel_id`, of plugin `plugin`) from
/// the plugin's pool, at most `cap` of its requests at once, until the session ends; then
/// the plugin instance is destroyed and `on_end` runs. `anyway`: the mount exists already
/// and must be served (a takeover), so its pool's first worker is made even past the
/// thread budget. On an error nothing serves the mount, `on_end` is dropped unrun and the
/// instance destroyed; the caller unmounts. Once served, `link` reaches the connection's
/// descriptor through the pool. `owner`: the uid whose mounts together take at most
/// `[users] max_threads` workers (root's are not counted).
#[allow(clippy::too_many_arguments)]
pub fn serve(
    plugin: &str,
    session: Session<Adapter<Arc<Swappable>>>,
    link: &Link,
    target: Arc<MountTarget>,
    kernel_id: u64,
    cap: usize,
    owner: u32,
    anyway: bool,
    on_end: OnEnd,
) -> Result<(), ServeError> {
    let conn = session.into_polled().map_err(ServeError::Io)?;
    loop {
        let pool = pool_for(plugin).map_err(ServeError::Io)?;
        let mut control = pool.control.lock();
        if pool.closing.load(Ordering::Acquire) {
            continue; // it just lost its last mount and left `POOLS`; a new one is made
        }
        if control.workers == 0 {
            if let Err(e) = pool.spawn_worker(&mut control, anyway) {
                drop(control);
                pool.forget_if_empty();
                return Err(e);
            }
        }
        let token = pool.next_token.fetch_add(1, Ordering::Relaxed);
        let served = Arc::new(Served {
            conn,
            token,
            target,
            kernel_id,
            cap: cap.max(1),
            user: (owner != 0).then_some(owner),
            state: AtomicU64::new(ARMED),
            ring: Mutex::new(None),
            end: EndGuard {
                on_end: Mutex::new(Some(on_end)),
                pool: Arc::clone(&pool),
            },
        });
        // In the table before the epoll can wake a worker for it.
        pool.mounts.write().insert(token, Arc::clone(&served));
        if let Err(e) = epoll::add(
            &pool.epoll,
            &served.conn,
            epoll::EventData::new_u64(token),
            armed_flags(),
        ) {
            // Nothing read it: the instance goes, but the mount never was served.
            pool.mounts.write().remove(&token);
            *served.end.on_end.lock() = None;
            drop(control);
            drop(served);
            pool.forget_if_empty();
            return Err(ServeError::Io(e.into()));
        }
        link.served_by(Arc::downgrade(&served) as Weak<dyn AsFd + Send + Sync>);
        if link.agreed().is_some_and(|a| a.uring) {
            served.start_ring(&pool, link, plugin, anyway)?;
        }
        return Ok(());
    }
}

fn armed_flags() -> epoll::EventFlags {
    epoll::EventFlags::IN | epoll::EventFlags::ONESHOT
}

/// The pool of `plugin`, made if it has none.
fn pool_for(plugin: &str) -> io::Result<Arc<Pool>> {
    let mut pools = POOLS.lock();
    if let Some(pool) = pools.get(plugin) {
        return Ok(Arc::clone(pool));
    }
    let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
    let wake = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
    // Level-triggered: once written, it wakes every waiting worker of a closing pool.
    epoll::add(
        &epoll,
        &wake,
        epoll::EventData::new_u64(WAKE),
        epoll::EventFlags::IN,
    )?;
    let pool = Arc::new(Pool {
        name: plugin.to_string(),
        epoll,
        wake,
        mounts: RwLock::new(HashMap::new()),
        shares: Mutex::new(Shares::default()),
        next_token: AtomicU64::new(0),
        idle: AtomicUsize::new(0),
        closing: AtomicBool::new(false),
        control: Mutex::new(Control::default()),
    });
    pools.insert(plugin.to_string(), Arc::clone(&pool));
    Ok(pool)
}

/// One plugin's workers and the mounts they serve. What every request touches is
/// atomic or read-locked; `control` only when workers come and go and mounts end.
struct Pool {
    name: String,
    epoll: OwnedFd,
    /// An eventfd in `epoll`, written when the pool closes.
    wake: OwnedFd,
    mounts: RwLock<HashMap<u64, Arc<Served>>>,
    /// Workers users' mounts hold, and their mounts waiting for one (see `Shares`).
    shares: Mutex<Shares>,
    next_token: AtomicU64,
    /// Workers waiting for a request.
    idle: AtomicUsize,
    /// The last mount went: every worker ends, and the pool is out of `POOLS`. Set
    /// with `control` held.
    closing: AtomicBool,
    control: Mutex<Control>,
}

/// The workers users' mounts hold. A user whose requests could block in the plugin (a
/// passthroughfs over their own FUSE file system that never answers) would otherwise hold
/// every worker with enough mounts, and stall everyone else's mounts of the plugin; and
/// users together would, with enough users. So each user holds at most `[users]
/// max_threads` of a pool's workers, and all users together at most [`users_cap`], which
/// leaves root's mounts a quarter of the pool.
///
/// A mount of a user without room waits *parked* (`PARKED`, registered in the epoll for
/// its end only) in `parked`, first come first served, until a request is answered that
/// leaves room for its user. Parking and waking happen under this lock, and a mount is
/// parked only by the worker woken for it (nobody else has it armed), so an entry is
/// either that of a parked mount or stale (the mount ended, or was woken and is no longer
/// parked) and passed over: every worker given back wakes a mount that waits for it, if
/// any does.
#[derive(Default)]
struct Shares {
    /// Requests of each user's mounts being served.
    held: HashMap<u32, usize>,
    /// Requests of all users' mounts being served.
    total: usize,
    /// Mounts waiting for a worker, with their users, first come first served.
    parked: VecDeque<(u32, Weak<Served>)>,
}

impl Shares {
    fn room_for(&self, user: u32) -> bool {
        self.total < users_cap()
            && self.held.get(&user).copied().unwrap_or(0) < USER_THREADS.load(Ordering::Relaxed)
    }
}

/// The workers of a pool that users' mounts may hold together: all but a quarter of
/// `threads_per_plugin` (at least one kept for root's mounts, unless the pool has one).
fn users_cap() -> usize {
    let all = THREADS_PER_PLUGIN.load(Ordering::Relaxed);
    all.saturating_sub((all / 4).max(1)).max(1)
}

#[derive(Default)]
struct Control {
    /// Workers alive.
    workers: usize,
    /// Every worker started and not yet joined (finished ones are pruned now and then).
    handles: Vec<JoinHandle<()>>,
    /// Ends of mounts to report once every worker has ended (the pool is closing).
    deferred: Vec<OnEnd>,
}

impl Pool {
    /// Starts one more worker, its thread taken from the budget (`anyway`: even past it).
    fn spawn_worker(
        self: &Arc<Self>,
        control: &mut Control,
        anyway: bool,
    ) -> Result<(), ServeError> {
        let thread = if anyway {
            budget::Threads::take_anyway(1)
        } else {
            budget::Threads::take(1).map_err(|(used, cap)| ServeError::Budget(used, cap))?
        };
        let pool = Arc::clone(self);
        let handle = std::thread::Builder::new()
            .name(format!("serve:{}", self.name))
            .spawn(move || {
                let _thread = thread;
                pool.work();
            })
            .map_err(ServeError::Io)?;
        control.workers += 1;
        control.handles.retain(|h| !h.is_finished());
        control.handles.push(handle);
        Ok(())
    }

    /// A worker: waits for a connection with a request and serves one request of it, until
    /// the pool closes or (when not its pool's last) it has been idle for `IDLE`.
    fn work(self: Arc<Self>) {
        let mut buf = RequestBuf::new();
        let mut events = Vec::with_capacity(1);
        let idle = Timespec {
            tv_sec: IDLE.as_secs() as i64,
            tv_nsec: 0,
        };
        loop {
            self.idle.fetch_add(1, Ordering::AcqRel);
            events.clear();
            let waited = epoll::wait(&self.epoll, spare_capacity(&mut events), Some(&idle));
            let idle_now = self.idle.fetch_sub(1, Ordering::AcqRel) - 1;
            if self.closing.load(Ordering::Acquire) {
                self.leave(self.control.lock());
                return;
            }
            let event = match waited {
                Ok(_) => events.first().map(|e| (e.data.u64(), e.flags)),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    tracing::error!(plugin = %self.name, error = %e, "waiting for FUSE requests failed");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            let Some((token, flags)) = event else {
                // Idle for a while: end, unless the plugin's mounts need this one.
                let mut control = self.control.lock();
                if control.workers > 1 && !self.closing.load(Ordering::Acquire) {
                    control.workers -= 1;
                    return;
                }
                continue;
            };
            let Some(served) = self.mounts.read().get(&token).cloned() else {
                continue; // the wake-up of a pool that is not closing, or a mount gone
            };
            if idle_now == 0 {
                // Someone must wait for the next request while this one is served.
                let mut control = self.control.lock();
                if control.workers < THREADS_PER_PLUGIN.load(Ordering::Relaxed) {
                    if let Err(e) = self.spawn_worker(&mut control, false) {
                        tracing::debug!(plugin = %self.name, error = ?e, "no worker more for now");
                    }
                }
            }
            // In error: the connection ended (a parked mount is woken only for that).
            let ended = flags.intersects(epoll::EventFlags::ERR | epoll::EventFlags::HUP);
            Served::serve(&served, &self, &mut buf, ended);
        }
    }

    /// Takes a worker for a request of `user`'s mount `served` (whose worker this is);
    /// false if the user's mounts, or all users' together, hold all they may: then the mount
    /// waits parked, unless another worker armed it meanwhile or it ended.
    fn take_share(&self, user: u32, served: &Arc<Served>) -> bool {
        let mut shares = self.shares.lock();
        if shares.room_for(user) {
            *shares.held.entry(user).or_default() += 1;
            shares.total += 1;
            return true;
        }
        let parked = served.park(self);
        if let Ok(true) = parked {
            // Places of mounts gone since go here rather than at the next worker given back.
            shares.parked.retain(|(_, m)| m.strong_count() > 0);
            shares.parked.push_back((user, Arc::downgrade(served)));
        }
        drop(shares);
        if let Err(e) = parked {
            served.broken(self, &e);
        }
        false
    }

    /// Gives back a worker of `user`'s, and wakes the mount that waited longest among those
    /// with a request whose users may have it.
    fn give_share(&self, user: u32) {
        let mut shares = self.shares.lock();
        let Some(held) = shares.held.get_mut(&user) else {
            return;
        };
        *held -= 1;
        if *held == 0 {
            shares.held.remove(&user);
        }
        shares.total -= 1;
        self.wake_parked(shares);
    }

    /// Passes on a worker a user's mount may have been woken for and does not take (it
    /// ended): wakes the mount that waited longest among those whose users have room.
    fn pass_on(&self) {
        self.wake_parked(self.shares.lock());
    }

    /// Wakes the parked mount that waited longest among those with a request whose users
    /// have room, passing over stale places.
    fn wake_parked(&self, mut shares: MutexGuard<'_, Shares>) {
        // Mounts looked at are dropped only once the lock is given back: one may be the
        // last reference to a mount that left the pool meanwhile, whose end is then reported.
        let mut seen = Vec::new();
        let mut broken = None;
        let mut at = 0;
        while at < shares.parked.len() {
            if !shares.room_for(shares.parked[at].0) {
                at += 1;
                continue;
            }
            let Some(next) = shares.parked.remove(at).and_then(|(_, m)| m.upgrade()) else {
                continue;
            };
            match next.unpark(self) {
                Ok(false) => seen.push(next),
                Ok(true) => break,
                Err(e) => {
                    broken = Some((next, e));
                    break;
                }
            }
        }
        drop(shares);
        if let Some((served, e)) = broken {
            served.broken(self, &e);
        }
    }

    /// The end of a worker of a closing pool; the last one has every worker joined and
    /// then the ends of the pool's mounts reported.
    fn leave(&self, mut control: MutexGuard<'_, Control>) {
        control.workers -= 1;
        if control.workers > 0 {
            return;
        }
        let handles = std::mem::take(&mut control.handles);
        let deferred = std::mem::take(&mut control.deferred);
        drop(control);
        let report = move || {
            for handle in handles {
                let _ = handle.join();
            }
            for on_end in deferred {
                on_end();
            }
        };
        if let Err(e) = std::thread::Builder::new()
            .name(format!("ended:{}", self.name))
            .spawn(report)
        {
            // Cannot happen often (threads are bounded); the plugin's library may then stay
            // mapped after an unload until this thread ends, which the unload reports.
            tracing::warn!(plugin = %self.name, error = %e, "cannot start the thread that reports the end of the last mount");
        }
    }

    /// Stops serving the mount `token` (its session ended and no request of it is being
    /// served); the pool closes if it was the last.
    fn remove(&self, token: u64) {
        let control = self.control.lock();
        let (served, last) = {
            let mut mounts = self.mounts.write();
            let Some(served) = mounts.remove(&token) else {
                return;
            };
            (served, mounts.is_empty())
        };
        let _ = epoll::delete(&self.epoll, &served.conn);
        if last {
            self.close();
        }
        drop(control);
        // Its queue threads end with the connection; they hold the mount until then.
        if let Some(ring) = served.ring.lock().take() {
            ring.join();
        }
        // Usually the last reference: the instance is destroyed and the end reported.
        drop(served);
    }

    /// Marks the pool closing (`control` held), takes it out of `POOLS` and wakes every
    /// waiting worker.
    fn close(&self) {
        self.closing.store(true, Ordering::Release);
        let mut pools = POOLS.lock();
        if pools
            .get(&self.name)
            .is_some_and(|p| std::ptr::eq(Arc::as_ptr(p), self))
        {
            pools.remove(&self.name);
        }
        drop(pools);
        if let Err(e) = rustix::io::write(&self.wake, &1u64.to_ne_bytes()) {
            tracing::error!(plugin = %self.name, error = %e, "cannot wake the workers of a closing pool");
        }
    }

    /// Closes a pool left without mounts by a mount that could not be served.
    fn forget_if_empty(&self) {
        let _control = self.control.lock();
        if self.mounts.read().is_empty() && !self.closing.load(Ordering::Acquire) {
            // Its workers (if any) end; no mount's end is waiting to be reported.
            self.close();
        }
    }
}

/// A mount served by a pool.
struct Served {
    /// Dropped before `end`: the instance is destroyed before the end is reported.
    conn: Connection,
    token: u64,
    target: Arc<MountTarget>,
    kernel_id: u64,
    /// Requests of this mount served at once, at most.
    cap: usize,
    /// Its owner, if its requests count against a user's share of the workers.
    user: Option<u32>,
    /// `ARMED`, `ENDED`, `REMOVED`, `PARKED` and the requests in flight (times `ONE`).
    /// Atomic, not locked: with a mutex, the two workers of a busy mount met on it at every
    /// request (measured: 47,656 sched_yield with parking_lot's, 126,724 futex calls with
    /// std's, for 80,000 requests; 23,408 futex calls with a thread per mount).
    state: AtomicU64,
    /// Its FUSE-over-io_uring queue threads (`-o uring`), joined when it leaves the pool.
    ring: Mutex<Option<Ring>>,
    end: EndGuard,
}

impl ring::Serve for Served {
    fn connection(&self) -> BorrowedFd<'_> {
        self.conn.as_fd()
    }

    fn dispatch_to(&self, buf: &RequestBuf, sink: Arc<dyn ReplySink>) -> std::io::Result<Received> {
        self.conn.dispatch_to(buf, sink)
    }

    fn failed(&self, error: &std::io::Error) {
        // Requests queued for that CPU would wait forever: detach rather than hang users.
        tracing::warn!(mountpoint = %self.target.path.display(), %error, "FUSE over io_uring failed; detaching the mount");
        let _ = self.target.detach(self.kernel_id, true);
    }
}

impl AsFd for Served {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.conn.as_fd()
    }
}

/// Registered in the epoll to wake a worker (as far as we know: a worker woken for the
/// mount clears it when it starts).
const ARMED: u64 = 1;
/// The session has ended; once nothing is in flight the mount leaves the pool.
const ENDED: u64 = 2;
/// The mount has left (or is leaving) the pool.
const REMOVED: u64 = 4;
/// Waiting for a worker of its user's share (see [`Shares`]); `ARMED` too meanwhile, so that
/// no other worker registers it for requests.
const PARKED: u64 = 8;
/// One request read and not yet answered.
const ONE: u64 = 16;

impl Served {
    /// Serves the mount's FUSE-over-io_uring queues too (INIT agreed to it). If the kernel
    /// was made to give the ring up, `/dev/fuse` serves and `link` says so. An error when
    /// nothing can serve the mount: the kernel holds its requests for a ring that cannot be
    /// made, or (`anyway`: a takeover, whose ring was complete before) sends them to
    /// queues no thread serves. The caller then detaches the mount, which ends the session,
    /// and reports the failure itself: no end is reported here.
    fn start_ring(
        self: &Arc<Self>,
        pool: &Pool,
        link: &Link,
        plugin: &str,
        anyway: bool,
    ) -> Result<(), ServeError> {
        // Held as a request in flight until the ring is in place, so that the mount cannot
        // leave the pool (which joins the ring's threads) before.
        self.state.fetch_add(ONE, Ordering::AcqRel);
        let started = Ring::start(Arc::clone(self) as Arc<dyn ring::Serve>, plugin, anyway);
        let failed = match started {
            Err(e) => Some(e),
            Ok((ring, transport)) => {
                *self.ring.lock() = ring;
                match transport {
                    Transport::Fallback(why) if anyway => Some(io::Error::other(why)),
                    Transport::Fallback(why) => {
                        tracing::info!(mountpoint = %self.target.path.display(), "FUSE over io_uring not used: {why}");
                        // The kernel gave the ring up: `/dev/fuse` carries everything.
                        if let Some(agreed) = link.agreed() {
                            link.agree(Agreed {
                                uring: false,
                                ..agreed
                            });
                        }
                        link.set_transport(Transport::Fallback(why));
                        None
                    }
                    transport => {
                        if let (true, Transport::Uring(queues, _)) = (anyway, &transport) {
                            // Taken over after a crash: start what waited meanwhile.
                            let target = Arc::clone(&self.target);
                            Ring::nudge(*queues, move || target.ask_statfs());
                        }
                        link.set_transport(transport);
                        None
                    }
                }
            }
        };
        let now = self.state.fetch_sub(ONE, Ordering::AcqRel) - ONE;
        self.leave_if_done(pool, now);
        match failed {
            None => Ok(()),
            Some(e) => {
                *self.end.on_end.lock() = None;
                Err(ServeError::Io(io::Error::new(
                    e.kind(),
                    format!("FUSE over io_uring agreed, but no ring can serve it ({e}); mount without -o uring"),
                )))
            }
        }
    }

    /// Reads and serves one request (woken by the epoll for this mount; `ended`: woken
    /// because its connection ended).
    fn serve(self: &Arc<Self>, pool: &Pool, buf: &mut RequestBuf, ended: bool) {
        // Woken while parked only by its end, which leaves its place in the queue stale.
        let woken = if ended { ARMED | PARKED } else { ARMED };
        let gone = self.state.fetch_and(!woken, Ordering::AcqRel) & ENDED != 0;
        if self.user.is_some() && (gone || ended) {
            // It may have been woken for a worker of its user's that it will not take.
            pool.pass_on();
        }
        if gone {
            return;
        }
        // An ended connection gives no request more: read its end at once.
        let share = self.user.filter(|_| !ended);
        if let Some(user) = share {
            if !pool.take_share(user, self) {
                return;
            }
        }
        let outcome = self.receive_and_dispatch(pool, buf);
        if let Some(user) = share {
            pool.give_share(user);
        }
        self.finish(pool, outcome);
    }

    /// Reads one request and serves it, while fewer than `cap` of the mount's are being
    /// served letting another worker read the next.
    fn receive_and_dispatch(&self, pool: &Pool, buf: &mut RequestBuf) -> std::io::Result<Received> {
        match self.conn.receive(buf) {
            Ok(Received::Request) => {
                let in_flight = self.state.fetch_add(ONE, Ordering::AcqRel) / ONE + 1;
                if in_flight < self.cap as u64 {
                    self.arm(pool);
                }
                let served = self.conn.dispatch(buf);
                self.state.fetch_sub(ONE, Ordering::AcqRel);
                served
            }
            other => other,
        }
    }

    /// Waits for a worker of its user's share (`shares` locked by the caller): marked
    /// parked and registered for its end only. False if another worker armed it since this
    /// one was woken, or it ended: then that worker, or its end, follows.
    fn park(&self, pool: &Pool) -> io::Result<bool> {
        let marked = self
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                (v & (ARMED | ENDED) == 0).then_some(v | ARMED | PARKED)
            });
        if marked.is_err() {
            return Ok(false);
        }
        self.modify(pool, epoll::EventFlags::ONESHOT)?;
        Ok(true)
    }

    /// A worker its user may have is free (`shares` locked by the caller): unless it is no
    /// longer parked, waits for requests again; true if it has one waiting, so that the
    /// worker is its. (A mount whose waiting request was withdrawn meanwhile, its reader
    /// killed, is armed all the same and passes the worker on.)
    fn unpark(&self, pool: &Pool) -> io::Result<bool> {
        // `ARMED` stays: its registration is this one's to make.
        let was = self.state.fetch_and(!PARKED, Ordering::AcqRel);
        if was & PARKED == 0 || was & ENDED != 0 {
            return Ok(false);
        }
        let waiting = {
            use rustix::event::{poll, PollFd, PollFlags};
            let mut fds = [PollFd::new(&self.conn, PollFlags::IN)];
            // An ended connection polls as an error, and then it takes no worker.
            poll(&mut fds, Some(&Timespec::default())).is_ok()
                && fds[0].revents() & (PollFlags::IN | PollFlags::ERR) == PollFlags::IN
        };
        self.modify(pool, armed_flags())?;
        Ok(waiting)
    }

    /// What follows a request served, or a read that gave none.
    fn finish(&self, pool: &Pool, outcome: std::io::Result<Received>) {
        match outcome {
            Ok(Received::Request | Received::Empty) => self.arm(pool),
            Ok(Received::Ended) => self.end(pool),
            Err(e) => {
                // The kernel did not end the session, so the mount is still there but no
                // longer served: detach it rather than leave a dead mount behind.
                tracing::warn!(mountpoint = %self.target.path.display(), error = %e, "FUSE session failed; detaching the mount");
                let _ = self.target.detach(self.kernel_id, true);
                self.end(pool);
            }
        }
    }

    /// Registers the connection again, unless it is or the session ended, so that a
    /// worker is woken for its next request.
    fn arm(&self, pool: &Pool) {
        if !self.register(pool, armed_flags()) {
            // Armed by another worker, or ended: then the one whose request was the last
            // in flight takes the mount out.
            self.leave_if_done(pool, self.state.load(Ordering::Acquire));
        }
    }

    /// Marks the mount armed and registers its connection in the epoll for `events`, unless
    /// it is armed already or ended (then false).
    fn register(&self, pool: &Pool, events: epoll::EventFlags) -> bool {
        let marked = self
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                (v & (ARMED | ENDED) == 0).then_some(v | ARMED)
            });
        if marked.is_err() {
            return false;
        }
        if let Err(e) = self.modify(pool, events) {
            self.broken(pool, &e);
        }
        true
    }

    /// Registers the connection in the epoll for `events` (it is marked armed).
    fn modify(&self, pool: &Pool, events: epoll::EventFlags) -> io::Result<()> {
        let data = epoll::EventData::new_u64(self.token);
        epoll::modify(&pool.epoll, &self.conn, data, events).map_err(io::Error::from)
    }

    /// The mount cannot be waited for (`error`): it is detached and ends.
    fn broken(&self, pool: &Pool, error: &io::Error) {
        tracing::error!(mountpoint = %self.target.path.display(), %error, "cannot wait for the mount's requests; detaching it");
        let _ = self.target.detach(self.kernel_id, true);
        self.end(pool);
    }

    /// The session ended: the mount leaves the pool once no request of it is in flight.
    fn end(&self, pool: &Pool) {
        let now = self.state.fetch_or(ENDED, Ordering::AcqRel) | ENDED;
        self.leave_if_done(pool, now);
    }

    /// Takes the mount out of the pool if, in state `now`, it has ended and nothing is in
    /// flight; of all workers that see so, only one does.
    fn leave_if_done(&self, pool: &Pool, now: u64) {
        if now & ENDED == 0 || now / ONE != 0 {
            return;
        }
        if self.state.fetch_or(REMOVED, Ordering::AcqRel) & REMOVED == 0 {
            pool.remove(self.token);
        }
    }
}

/// Reports a mount's end when dropped (after its instance, declared before it in `Served`):
/// at once, or, if its pool is closing, once every worker of the pool has ended.
struct EndGuard {
    /// In a mutex only so that `Served` may be shared; taken once, at the drop.
    on_end: Mutex<Option<OnEnd>>,
    pool: Arc<Pool>,
}

impl Drop for EndGuard {
    fn drop(&mut self) {
        let Some(on_end) = self.on_end.get_mut().take() else {
            return;
        };
        let mut control = self.pool.control.lock();
        if self.pool.closing.load(Ordering::Acquire) {
            control.deferred.push(on_end);
        } else {
            drop(control);
            on_end();
        }
    }
}
