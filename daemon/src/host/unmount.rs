//! Unmount: find the record by the kernel identity of the mount the caller names (or by
//! the path it was mounted at), then unmount exactly that mount through its pinned
//! descriptors and wait until its session has ended and the count dropped.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{absolute, Caller, Effects, Host, HostError, SESSION_END_TIMEOUT};
use crate::mount::UnmountError;
use crate::registry::MountId;

impl<E: Effects> Host<E> {
    /// Unmounts and waits until the session has ended and the count dropped. Returns true if
    /// the mount was only detached (lazy, files still open).
    pub fn unmount(
        &self,
        mountpoint: &str,
        lazy: bool,
        caller: &Caller,
    ) -> Result<(PathBuf, bool), HostError> {
        let given = absolute(mountpoint, "mount point")?;
        let path = self.record_path(&given);
        if !caller.admin {
            let owner = self.lock().mount_owner(&path);
            if let Some(owner) = owner.filter(|owner| *owner != caller.uid) {
                return Err(HostError::NotTheirMount {
                    uid: caller.uid,
                    path,
                    owner,
                });
            }
        }
        self.unmount_path(&path, lazy)
    }

    /// The registry path of the mount a caller names: found by the identity of the mount
    /// the path leads to (so a mount whose parent was renamed is found under its new name),
    /// else by the path as recorded (a path that no longer resolves, e.g. swapped for a
    /// symlink). Unmounting then acts on the recorded descriptors, never on `given`.
    fn record_path(&self, given: &Path) -> PathBuf {
        let ours = self.effects().mount_id_at(given).and_then(|kernel_id| {
            let sides = self.shared.sides();
            let mut ids = sides.iter();
            ids.find(|(_, side)| side.kernel_id.load(Ordering::SeqCst) == kernel_id)
                .map(|(id, _)| *id)
        });
        ours.and_then(|id| self.lock().mount_path(id))
            .unwrap_or_else(|| given.to_path_buf())
    }

    pub(super) fn unmount_path(
        &self,
        path: &Path,
        lazy: bool,
    ) -> Result<(PathBuf, bool), HostError> {
        let id = self.detach(path, lazy)?;
        let timeout = if lazy {
            Duration::from_millis(500)
        } else {
            SESSION_END_TIMEOUT
        };
        if self.wait_until(timeout, |reg| !reg.has_mount_id(id)) {
            tracing::info!(mountpoint = %path.display(), "unmounted");
            Ok((path.to_path_buf(), false))
        } else if lazy {
            tracing::info!(mountpoint = %path.display(), "detached; released when its last file closes");
            Ok((path.to_path_buf(), true))
        } else {
            Err(HostError::SessionStuck(path.to_path_buf()))
        }
    }

    /// Unmount, first half: `Unmounting`, then the kernel unmount of exactly our mount (back
    /// to `Active` if that fails). The record goes when the session has ended.
    pub(super) fn detach(&self, path: &Path, lazy: bool) -> Result<MountId, HostError> {
        let id = self.transition(|reg| reg.begin_unmount(path))?;
        let side = self.shared.side(id);
        let unmounted = match &side {
            Some(side) => {
                let kernel_id = side.kernel_id.load(Ordering::SeqCst);
                self.effects().unmount(&side.target, kernel_id, lazy)
            }
            None => Err(UnmountError::NotOurs(path.to_path_buf())),
        };
        if let Err(e) = unmounted {
            self.transition(|reg| reg.abort_unmount(path, id));
            return Err(e.into());
        }
        Ok(id)
    }
}
