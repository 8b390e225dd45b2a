//! The read-only operations: `list`, `mounts`, `info`, `status`.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use fshost_protocol::{MountInfo, NextGeneration, PluginInfo};

use super::{unix_secs, Effects, Host, HostError, PluginHandle};
use crate::mount::MountStats;
use crate::registry::{MountRecord, PluginEntry, Registry, RegistryError};

fn plugin_info<P: PluginHandle>(
    reg: &Registry<P>,
    name: &str,
    entry: &PluginEntry<P>,
) -> PluginInfo {
    let plugin = &entry.handle;
    PluginInfo {
        name: name.to_string(),
        state: entry.state,
        version: plugin.version().to_string(),
        path: plugin.source().display().to_string(),
        abi_version: plugin.abi_version(),
        mounts: reg
            .mounts_of(name)
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
        loaded_at: unix_secs(entry.loaded_at),
        tainted: plugin.taint(),
        generation: entry.generation,
        upgrading: entry.upgrading.as_ref().map(|next| NextGeneration {
            generation: entry.generation + 1,
            version: next.version().to_string(),
            path: next.source().display().to_string(),
        }),
    }
}

fn mount_info(
    path: &Path,
    record: &MountRecord,
    stats: Option<&MountStats>,
    transport: Option<String>,
) -> MountInfo {
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
        transport,
    }
}

impl<E: Effects> Host<E> {
    /// Every registered plugin, then every unloaded one that is still mapped.
    pub fn list(&self) -> Vec<PluginInfo> {
        let mut plugins: Vec<PluginInfo> = {
            let reg = self.lock();
            reg.plugins()
                .map(|(name, entry)| plugin_info(&reg, name, entry))
                .collect()
        };
        let mut lingering = self.lingering.lock().unwrap_or_else(|e| e.into_inner());
        lingering.retain(|(mapped, _)| self.effects().is_mapped(mapped));
        plugins.extend(lingering.iter().map(|(_, info)| info.clone()));
        plugins
    }

    /// Every mount, where it is now: a mount whose parent was renamed is shown at its new
    /// path (where `unmount` finds it too).
    pub fn mounts(&self) -> Vec<MountInfo> {
        let now_at = self.effects().kernel_mounts(false);
        let reg = self.lock();
        let sides = self.shared.sides();
        reg.mounts()
            .map(|(path, record)| {
                let side = sides.get(&record.id);
                let kernel_id = side.map(|s| s.kernel_id.load(Ordering::SeqCst));
                let path = kernel_id
                    .and_then(|id| now_at.get(&id))
                    .map_or(path.as_path(), |m| &m.path);
                let transport = side
                    .and_then(|s| s.slot.get())
                    .and_then(|slot| self.effects().transport(slot));
                mount_info(path, record, side.map(|s| s.stats.as_ref()), transport)
            })
            .collect()
    }

    /// What each mount did (all of them, those of one plugin, or the one at a mount
    /// point), at its current path.
    pub fn stats(
        &self,
        filter: Option<&str>,
    ) -> Result<Vec<fshost_protocol::MountStats>, HostError> {
        let kernel = self.effects().kernel_mounts(true);
        let now = std::time::SystemTime::now();
        let reg = self.lock();
        let sides = self.shared.sides();
        let mut out = Vec::new();
        for (recorded, record) in reg.mounts() {
            let Some(side) = sides.get(&record.id) else {
                continue;
            };
            let kernel_id = side.kernel_id.load(Ordering::SeqCst);
            let now_at = kernel.get(&kernel_id);
            let path = now_at.map_or(recorded.as_path(), |m| &m.path);
            let wanted = filter.is_none_or(|f| {
                f == record.plugin || Path::new(f) == path || Path::new(f) == recorded
            });
            if !wanted {
                continue;
            }
            let entry = reg.plugin(&record.plugin);
            let stats = &side.stats;
            out.push(fshost_protocol::MountStats {
                mountpoint: path.display().to_string(),
                plugin: record.plugin.clone(),
                generation: entry.map_or(0, |e| e.generation),
                tainted: entry.is_some_and(|e| e.handle.taint().is_some()),
                age_secs: now.duration_since(record.since).map_or(0, |d| d.as_secs()),
                in_flight: stats.in_flight_total(),
                waiting: now_at.and_then(|m| m.waiting),
                bytes_read: stats.bytes_read.load(Ordering::Relaxed),
                bytes_written: stats.bytes_written.load(Ordering::Relaxed),
                passthrough_opens: stats.passthrough_opens.load(Ordering::Relaxed),
                ops: stats.ops(),
                generations: stats.by_generation(entry.map_or(0, |e| e.generation)),
            });
        }
        if out.is_empty() {
            if let Some(f) = filter {
                return Err(HostError::NoSuchMountOrPlugin(f.to_string()));
            }
        }
        Ok(out)
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
            mount_threads: crate::mount::budget::threads(),
        }
    }
}
