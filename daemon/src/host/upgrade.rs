//! Upgrade: open the new generation (private copy, ABI gate), check that it can take over,
//! reserve it as the plugin's next generation (the plugin's mounts are neither made nor
//! unmounted meanwhile), run its `on_load`, move every mount to it (all or none: see
//! `mount/upgrade.rs`), then commit; the old generation's `on_unload` runs and its library
//! closes and is proved unmapped, as at unload. Any failure closes the new generation and
//! leaves the old one serving every mount.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fshost_protocol::UpgradeInfo;

use super::{Effects, Host, HostError, KeptMount, PluginHandle};
use crate::mount::Moving;
use crate::registry::RegistryError;

impl<E: Effects> Host<E> {
    /// Upgrades plugin `name` to the library at `path` (default: the file it was loaded
    /// from), waiting up to `timeout` for its mounts' requests in flight.
    pub fn upgrade(
        &self,
        name: &str,
        path: Option<&str>,
        timeout: Duration,
    ) -> Result<UpgradeInfo, HostError> {
        // Only the path is read here: a reference to the current generation held across
        // the slow open would keep its library from closing should another upgrade or an
        // unload retire it meanwhile.
        let source = match path {
            Some(path) => path.to_owned(),
            None => self
                .lock()
                .plugin(name)
                .map(|entry| entry.handle.source().display().to_string())
                .ok_or_else(|| RegistryError::UnknownPlugin { name: name.into() })?,
        };
        let new = Arc::new(self.effects().open(&source, Some(name), &self.trust())?);
        let reserved = self.transition(|reg| reg.begin_upgrade(name, Arc::clone(&new)));
        let (current, mounts) = match reserved {
            Ok(reserved) => reserved,
            Err(e) => {
                self.effects().close(new);
                return Err(e.into());
            }
        };
        // While the upgrade is reserved nothing else can retire `current`.
        let refused = cannot_take_over(&*current, &*new);
        let from_version = current.version().to_string();
        drop(current);
        if let Some(why) = refused {
            self.abort_upgrade(name, new);
            return Err(HostError::CannotUpgrade {
                name: name.into(),
                why,
            });
        }
        tracing::info!(plugin = %name, from = %from_version, to = %new.version(), mounts = mounts.len(), "upgrading");
        if let Err(errno) = self.effects().on_load(&new) {
            self.abort_upgrade(name, new);
            return Err(HostError::OnLoad {
                name: name.into(),
                errno,
            });
        }
        // Mounts whose session ended since have no backend any more: nothing to move.
        let kept = mounts.clone();
        let generation = self.lock().plugin(name).map_or(0, |e| e.generation);
        let moving: Vec<Moving<E::Slot>> = mounts
            .into_iter()
            .filter_map(|(path, record)| {
                let slot = self.shared.side(record.id)?.slot.get()?.clone();
                Some(Moving {
                    path,
                    slot,
                    options: record.options,
                    generation,
                })
            })
            .collect();
        let paths: Vec<String> = moving
            .iter()
            .map(|m| m.path.display().to_string())
            .collect();
        let moved = self.effects().move_mounts(&new, &moving, timeout);
        // Our references to the backends go before the registry changes, so that nothing
        // of ours keeps an instance (and its library) alive past the commit or abort.
        drop(moving);
        let moved = match moved {
            Ok(moved) => moved,
            Err(source) => {
                let path = PathBuf::from(new.source());
                self.abort_upgrade(name, new);
                return Err(HostError::UpgradeFailed {
                    name: name.into(),
                    path,
                    source,
                });
            }
        };
        let source = new.source().to_path_buf();
        drop(new);
        let old = self.transition(|reg| reg.commit_upgrade(name, SystemTime::now()));
        // A restart after a crash loads the plugin from where this generation came from.
        for (path, record) in kept {
            let Some(side) = self.shared.side(record.id) else {
                continue;
            };
            let Some(slot) = side.slot.get() else {
                continue;
            };
            let kept = KeptMount {
                plugin: name.to_string(),
                source: source.clone(),
                path,
                kernel_id: side.kernel_id.load(std::sync::atomic::Ordering::SeqCst),
                options: record.options,
                read_only: record.read_only,
                owner: record.owner,
                since: record.since,
            };
            self.effects().keep_mount(&kept, &side.target, slot);
        }
        if let Some(old) = old {
            self.retire(name, old);
        }
        let plugin = self.info(name)?;
        tracing::info!(plugin = %name, version = %plugin.version, generation = plugin.generation, pause = ?moved.pause, state_bytes = moved.state_bytes, "upgraded");
        Ok(UpgradeInfo {
            plugin,
            from_version,
            mounts: paths,
            pause_us: moved.pause.as_micros() as u64,
            state_bytes: moved.state_bytes,
        })
    }

    /// The next generation goes: the current one serves on.
    fn abort_upgrade(&self, name: &str, new: Arc<E::Plugin>) {
        drop(new);
        if let Some(new) = self.transition(|reg| reg.abort_upgrade(name)) {
            self.effects().close(new);
        }
        tracing::info!(plugin = %name, "upgrade failed; the previous generation serves on");
    }

    /// A replaced generation: its `on_unload`, then its library closes (and, if it stays
    /// mapped, `list` shows it until it unmaps).
    fn retire(&self, name: &str, old: Arc<E::Plugin>) {
        self.effects().on_unload(&old);
        let mapped_path = old.mapped_path();
        // As `list` showed it before the upgrade: the new generation's entry, but its own
        // version, file and number.
        let info = self.info(name).ok().map(|mut info| {
            info.version = old.version().to_string();
            info.path = old.source().display().to_string();
            info.generation -= 1;
            info
        });
        if self.effects().close(old) {
            tracing::warn!(plugin = %name, "the replaced generation is still mapped after dlclose");
            if let Some(info) = info {
                self.linger(mapped_path, info);
            }
        }
    }
}

/// Why `new` cannot replace `current`, if it cannot.
fn cannot_take_over(current: &impl PluginHandle, new: &impl PluginHandle) -> Option<String> {
    if new.kind() != current.kind() {
        return Some(format!(
            "{} holds plugin \"{}\", not \"{}\"",
            new.source().display(),
            new.kind(),
            current.kind()
        ));
    }
    if !current.upgradable() {
        return Some(format!(
            "the running version {} cannot hand its mounts' state over (it implements no export_state/import_state; a Rust plugin sets Plugin::UPGRADABLE); unmount its mounts and load the new version instead",
            current.version()
        ));
    }
    if !new.upgradable() {
        return Some(format!(
            "version {} in {} cannot take state over (it implements no export_state/import_state)",
            new.version(),
            new.source().display()
        ));
    }
    if new.offers_passthrough() != current.offers_passthrough() {
        return Some(format!(
            "version {} {} FUSE passthrough, which the kernel agreed per mount; unmount its mounts to change that",
            new.version(),
            if new.offers_passthrough() { "turns on" } else { "turns off" }
        ));
    }
    None
}
