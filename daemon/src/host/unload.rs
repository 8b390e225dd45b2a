//! Unload, plain or draining: `Deregistering` (refused while mounted, unless draining),
//! `on_unload`, remove the entry, close the library and prove it unmapped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{Effects, Host, HostError, PluginHandle};
use crate::registry::RegistryError;

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

impl<E: Effects> Host<E> {
    /// Unloads a plugin; with `drain`, first waits for its mounts to go (see [`Drain`]).
    /// Returns true if the library is still mapped after it was closed.
    pub fn unload(&self, name: &str, drain: Option<Drain<'_>>) -> Result<bool, HostError> {
        let plugin = match drain {
            None => self.transition(|reg| reg.begin_unload(name))?,
            Some(drain) => self.drain(name, drain)?,
        };
        self.effects().on_unload(&plugin);
        let mapped_path = plugin.mapped_path();
        drop(plugin);
        let info = self.info(name)?;
        let plugin = self.transition(|reg| reg.finish_unload(name))?;
        let still_mapped = self.effects().close(plugin);
        tracing::info!(plugin = %name, still_mapped, "plugin unloaded");
        if still_mapped {
            self.linger(mapped_path, info);
        }
        Ok(still_mapped)
    }

    /// `Deregistering` at once (new mounts refused), then wait until the last mount has
    /// gone; on timeout or cancellation the plugin is `Live` again and the error names the
    /// mounts that kept it busy.
    fn drain(&self, name: &str, drain: Drain<'_>) -> Result<Arc<E::Plugin>, HostError> {
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
}
