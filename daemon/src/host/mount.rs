//! Mount: resolve the mount point once into descriptors, check ownership and options,
//! reserve the mount (counted from now on) within the caller's limits, then make the
//! instance and the kernel mount on the mount thread.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use fshost_protocol::{ErrorCode, MountInfo};

use super::{
    absolute, unix_secs, Caller, Effects, Host, HostError, KeptMount, MountRequest, MountSide,
    PluginHandle, TargetHandle,
};
use crate::config::UserPolicy;
use crate::mount::{self, MountStats};
use crate::registry::{MountRecord, Registry};

impl<E: Effects> Host<E> {
    pub fn mount(
        &self,
        name: &str,
        mountpoint: &str,
        options: BTreeMap<String, String>,
        read_only: bool,
        caller: &Caller,
    ) -> Result<MountInfo, HostError> {
        let given = absolute(mountpoint, "mount point")?;
        // Resolved once, following no symlink; everything after acts on the descriptors.
        let target = self.effects().resolve(&given).map_err(|e| {
            let code = match e {
                mount::TargetError::Missing => ErrorCode::NotFound,
                mount::TargetError::Other(_) | mount::TargetError::DeadMount => ErrorCode::Io,
                _ => ErrorCode::BadRequest,
            };
            HostError::BadMountpoint {
                path: given.clone(),
                reason: e.to_string(),
                code,
            }
        })?;
        // fusermount's rule: users mount only on directories they own.
        if !caller.admin && target.owner() != caller.uid {
            return Err(HostError::NotOwner {
                uid: caller.uid,
                path: given,
                owner: target.owner(),
            });
        }
        // Options are checked before anything is reserved.
        let mut session = mount::SessionOptions::parse(&options)?;
        let users =
            (!caller.admin).then(|| self.users.lock().unwrap_or_else(|e| e.into_inner()).clone());
        if let Some(users) = &users {
            if !options.contains_key("threads") {
                // Unasked, a user's mount gets the default as far as their limit allows.
                session.threads = session.threads.min(users.max_threads_per_mount.max(1));
            } else if session.threads > users.max_threads_per_mount {
                return Err(HostError::TooManyThreads {
                    max: users.max_threads_per_mount,
                });
            }
        }
        let path = target.path().to_path_buf();
        let target = Arc::new(target);
        let now = SystemTime::now();
        let mut options = options;
        let (plugin, id) = self.transition(|reg| {
            if let Some(users) = &users {
                within_user_limits(reg, caller.uid, users, &mut options)?;
            }
            Ok::<_, HostError>(reg.reserve_mount(
                name,
                &path,
                options.clone(),
                read_only,
                caller.uid,
                now,
            )?)
        })?;
        let source = plugin.source().to_path_buf();
        let shared = Arc::clone(&self.shared);
        let ended_path = path.clone();
        let side = Arc::new(MountSide {
            stats: Arc::new(MountStats::default()),
            target: Arc::clone(&target),
            kernel_id: AtomicU64::new(0),
            slot: OnceLock::new(),
        });
        self.shared.sides().insert(id, Arc::clone(&side));
        let request = MountRequest::<E> {
            stats: Arc::clone(&side.stats),
            plugin,
            target,
            session,
            options: options.clone(),
            read_only,
            owner: (caller.uid, caller.gid),
        };
        let on_end = Box::new(move || shared.release_mount(&ended_path, id));
        let slot_transport;
        match self.effects().spawn_mount(request, on_end) {
            Ok((kernel_id, slot)) => {
                slot_transport = self.effects().transport(&slot);
                side.kernel_id.store(kernel_id, Ordering::SeqCst);
                let kept = KeptMount {
                    plugin: name.to_string(),
                    source,
                    path: path.clone(),
                    kernel_id,
                    options: options.clone(),
                    read_only,
                    owner: caller.uid,
                    since: now,
                };
                self.effects().keep_mount(&kept, &side.target, &slot);
                let _ = side.slot.set(slot);
            }
            Err(e) => {
                self.shared.release_mount(&path, id);
                return Err(e.into());
            }
        }
        self.transition(|reg| reg.mount_started(&path, id));
        tracing::info!(plugin = %name, mountpoint = %path.display(), "mounted");
        Ok(MountInfo {
            mountpoint: path.display().to_string(),
            plugin: name.to_string(),
            since: unix_secs(now),
            options,
            read_only,
            owner_uid: caller.uid,
            plugin_reads: 0,
            plugin_writes: 0,
            passthrough_opens: 0,
            transport: slot_transport,
        })
    }
}

/// Checks a user's new mount against their allowance, with the registry locked so that two
/// mounts at once cannot both take the last place: at most `max_mounts` mounts, and `size=`
/// summing to at most `max_size`. A mount without `size=` gets an equal share,
/// `max_size / max_mounts`, or what is left if that is less.
fn within_user_limits<P>(
    reg: &Registry<P>,
    uid: u32,
    users: &UserPolicy,
    options: &mut BTreeMap<String, String>,
) -> Result<(), HostError> {
    let mine: Vec<&MountRecord> = reg
        .mounts()
        .map(|(_, r)| r)
        .filter(|r| r.owner == uid)
        .collect();
    if mine.len() >= users.max_mounts {
        return Err(HostError::TooManyMounts {
            uid,
            count: mine.len(),
        });
    }
    let used: u64 = mine
        .iter()
        .filter_map(|r| r.options.get("size"))
        .filter_map(|size| fshost_sdk::parse_size(size))
        .sum();
    let max_size = users.max_size_bytes();
    let left = max_size.saturating_sub(used);
    let share = max_size / users.max_mounts.max(1) as u64;
    let wanted = match options.get("size") {
        None => share.min(left),
        Some(text) => {
            fshost_sdk::parse_size(text).ok_or_else(|| HostError::BadSize(text.clone()))?
        }
    };
    if wanted == 0 || wanted > left {
        return Err(HostError::OverAllowance {
            uid,
            max_size: users.max_size.clone(),
            left,
            asked: wanted,
        });
    }
    options.insert("size".into(), wanted.to_string());
    Ok(())
}
