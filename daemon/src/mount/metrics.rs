//! What a mount's plugin did, recorded on the data path without locks or allocation:
//! per operation the calls, the time they took (a log-scale histogram) and the calls in
//! flight, errors by errno, bytes read and written. `fshostctl stats`/`metrics` read it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use fshost_protocol::{OpStats, LATENCY_BUCKETS_US};
use fshost_sdk::abi::OPERATIONS;

const OPS: usize = OPERATIONS.len();
/// The histogram's buckets: one per bound, then one for the slower calls.
const BUCKETS: usize = LATENCY_BUCKETS_US.len() + 1;

/// One mount's counters; they live as long as the mount, through upgrades.
#[derive(Debug)]
pub struct MountStats {
    /// `read` calls served by the plugin (passthrough reads never reach it).
    pub plugin_reads: AtomicU64,
    pub plugin_writes: AtomicU64,
    /// Opens handed to the kernel as passthrough.
    pub passthrough_opens: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    calls: [AtomicU64; OPS],
    in_flight: [AtomicU64; OPS],
    nanos: [AtomicU64; OPS],
    latency: [[AtomicU64; BUCKETS]; OPS],
    /// (operation, errno) → failures. Errors are the rare path: a lock is fine there.
    errors: Mutex<BTreeMap<(usize, i32), u64>>,
    /// Where each plugin generation after the first began serving the mount: (generation,
    /// requests and errors counted until then). Written at upgrades only.
    generations: Mutex<Vec<(u32, u64, u64)>>,
}

impl Default for MountStats {
    fn default() -> Self {
        MountStats {
            plugin_reads: AtomicU64::new(0),
            plugin_writes: AtomicU64::new(0),
            passthrough_opens: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            calls: [const { AtomicU64::new(0) }; OPS],
            in_flight: [const { AtomicU64::new(0) }; OPS],
            nanos: [const { AtomicU64::new(0) }; OPS],
            latency: [const { [const { AtomicU64::new(0) }; BUCKETS] }; OPS],
            errors: Mutex::new(BTreeMap::new()),
            generations: Mutex::new(Vec::new()),
        }
    }
}

/// A call of operation `op` while it runs; `finish` records it.
pub struct Call<'a> {
    stats: &'a MountStats,
    op: usize,
    started: Instant,
}

impl MountStats {
    /// Requests and failed requests so far, all operations.
    fn totals(&self) -> (u64, u64) {
        let calls = self.calls.iter().map(|c| c.load(Ordering::Relaxed)).sum();
        let errors = self
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .sum();
        (calls, errors)
    }

    /// The mount moved from generation `from` to `to` (an upgrade, every request paused):
    /// what is counted from now on is `to`'s.
    pub fn generation_began(&self, from: u32, to: u32) {
        let (calls, errors) = self.totals();
        let mut marks = self.generations.lock().unwrap_or_else(|e| e.into_inner());
        if marks.is_empty() {
            marks.push((from, 0, 0));
        }
        marks.push((to, calls, errors));
    }

    /// Requests and errors per generation that served the mount (`current` alone if it
    /// never changed).
    pub fn by_generation(&self, current: u32) -> Vec<fshost_protocol::GenerationStats> {
        let (calls, errors) = self.totals();
        let marks = self.generations.lock().unwrap_or_else(|e| e.into_inner());
        if marks.is_empty() {
            return vec![fshost_protocol::GenerationStats {
                generation: current,
                requests: calls,
                errors,
            }];
        }
        marks
            .iter()
            .enumerate()
            .map(|(i, &(generation, from_calls, from_errors))| {
                let (to_calls, to_errors) = marks
                    .get(i + 1)
                    .map_or((calls, errors), |&(_, c, e)| (c, e));
                fshost_protocol::GenerationStats {
                    generation,
                    requests: to_calls.saturating_sub(from_calls),
                    errors: to_errors.saturating_sub(from_errors),
                }
            })
            .collect()
    }

    /// Starts recording a call of operation `op` (its index in `abi::OPERATIONS`).
    pub fn begin(&self, op: usize) -> Call<'_> {
        self.in_flight[op].fetch_add(1, Ordering::Relaxed);
        Call {
            stats: self,
            op,
            started: Instant::now(),
        }
    }

    /// The operations in flight, as "read ×2, lookup".
    pub fn in_flight(&self) -> String {
        let busy: Vec<String> = OPERATIONS
            .iter()
            .zip(&self.in_flight)
            .filter_map(|(op, n)| match n.load(Ordering::Relaxed) {
                0 => None,
                1 => Some(op.to_string()),
                n => Some(format!("{op} ×{n}")),
            })
            .collect();
        if busy.is_empty() {
            "none (the requests had just finished)".into()
        } else {
            busy.join(", ")
        }
    }

    pub fn in_flight_total(&self) -> u64 {
        self.in_flight
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .sum()
    }

    /// Every operation called at least once, with its counters.
    pub fn ops(&self) -> Vec<OpStats> {
        let errors = self
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        (0..OPS)
            .filter(|op| self.calls[*op].load(Ordering::Relaxed) > 0)
            .map(|op| OpStats {
                op: OPERATIONS[op].to_string(),
                count: self.calls[op].load(Ordering::Relaxed),
                errors: errors
                    .range((op, i32::MIN)..=(op, i32::MAX))
                    .map(|((_, errno), n)| (errno_name(*errno), *n))
                    .collect(),
                sum_us: self.nanos[op].load(Ordering::Relaxed) / 1000,
                buckets: self.latency[op]
                    .iter()
                    .map(|n| n.load(Ordering::Relaxed))
                    .collect(),
            })
            .collect()
    }
}

impl Call<'_> {
    /// Records the call's end: its time and, if it failed, its errno.
    pub fn finish(self, failed: Option<i32>) {
        let Call { stats, op, started } = self;
        let nanos = started.elapsed().as_nanos() as u64;
        let micros = nanos / 1000;
        // The first bound at or above the time: bound i is 2^i µs.
        let bucket = if micros <= 1 {
            0
        } else {
            (64 - (micros - 1).leading_zeros() as usize).min(BUCKETS - 1)
        };
        stats.latency[op][bucket].fetch_add(1, Ordering::Relaxed);
        stats.nanos[op].fetch_add(nanos, Ordering::Relaxed);
        stats.calls[op].fetch_add(1, Ordering::Relaxed);
        stats.in_flight[op].fetch_sub(1, Ordering::Relaxed);
        if let Some(errno) = failed {
            let mut errors = stats.errors.lock().unwrap_or_else(|e| e.into_inner());
            *errors.entry((op, errno)).or_default() += 1;
        }
    }
}

/// `ENOENT` for 2; the number for an errno without a name.
fn errno_name(errno: i32) -> String {
    match nix::errno::Errno::from_raw(errno) {
        nix::errno::Errno::UnknownErrno => errno.to_string(),
        known => format!("{known:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_lands_in_the_bucket_of_its_time() {
        let stats = MountStats::default();
        for failed in [None, Some(libc::ENOENT), Some(libc::ENOENT), None] {
            stats.begin(0).finish(failed);
        }
        let ops = stats.ops();
        assert_eq!(ops.len(), 1);
        assert_eq!(ops[0].op, OPERATIONS[0]);
        assert_eq!(ops[0].count, 4);
        assert_eq!(ops[0].buckets.iter().sum::<u64>(), 4);
        assert_eq!(ops[0].errors, BTreeMap::from([("ENOENT".to_string(), 2)]));
        assert_eq!(stats.in_flight_total(), 0);
        let slow = stats.begin(1);
        assert_eq!(stats.in_flight(), format!("{}", OPERATIONS[1]));
        std::thread::sleep(std::time::Duration::from_millis(3));
        slow.finish(None);
        let ops = stats.ops();
        // 3 ms and a bit: above the 2,048 µs bound, within the 4,096 µs one (bucket 12).
        assert_eq!(ops[1].buckets[12], 1, "{:?}", ops[1].buckets);
        assert_eq!(errno_name(libc::EIO), "EIO");
    }
}
