//! Who may do what. Each request is authorized from the caller's credentials, taken from the
//! kernel when it connected (SO_PEERCRED, SO_PEERGROUPS):
//! root and members of the daemon's group may do everything; other users may look
//! (`list`, `mounts`, `info`, `status`) and, where the config allows, mount the plugins it
//! names on directories they own and unmount their own mounts (host/ checks ownership).

use fshost_protocol::Request;

use crate::config::{Config, Limits};
use crate::host::Caller;

/// Why a request was refused before it ran.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "user {uid} may not load or unload plugins: only root and members of group {group} may"
    )]
    NotAdmin { uid: u32, group: String },
    #[error("user {uid} may not mount plugin \"{plugin}\": it is not in the config's [users] mount_plugins")]
    PluginNotForUsers { uid: u32, plugin: String },
    #[error("user {uid} may not use -o allow_other: the config's [users] allow_other is false")]
    AllowOther { uid: u32 },
    #[error("user {uid} may not use -o uring: it gives the mount a thread per CPU of its own, outside the users' limits; ask an administrator to mount it, or mount without it")]
    Uring { uid: u32 },
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub group: String,
    group_gid: Option<u32>,
    mount_plugins: Vec<String>,
    allow_other: bool,
    pub limits: Limits,
}

impl Policy {
    pub fn from_config(config: &Config) -> Policy {
        Policy {
            group: config.group.clone(),
            group_gid: nix::unistd::Group::from_name(&config.group)
                .ok()
                .flatten()
                .map(|g| g.gid.as_raw()),
            mount_plugins: config.users.mount_plugins.clone(),
            allow_other: config.users.allow_other,
            limits: config.limits.clone(),
        }
    }

    /// Turns peer credentials into a caller: admin if root or in the group (primary or
    /// supplementary, as the kernel recorded them when the peer connected).
    pub fn caller(&self, uid: u32, gid: u32, groups: &[u32]) -> Caller {
        let in_group = self
            .group_gid
            .is_some_and(|group| gid == group || groups.contains(&group));
        Caller {
            uid,
            gid,
            admin: uid == 0 || in_group,
        }
    }

    /// The rules that need no file system access; host/ adds the ownership rules.
    pub fn authorize(&self, caller: &Caller, request: &Request) -> Result<(), Refusal> {
        if caller.admin {
            return Ok(());
        }
        let uid = caller.uid;
        match request {
            Request::List {}
            | Request::Mounts {}
            | Request::Info { .. }
            | Request::Status {}
            | Request::Stats { .. } => Ok(()),
            Request::Unmount { .. } => Ok(()),
            Request::Load { .. }
            | Request::Unload { .. }
            | Request::Upgrade { .. }
            | Request::DaemonUpgrade { .. } => Err(Refusal::NotAdmin {
                uid,
                group: self.group.clone(),
            }),
            Request::Mount {
                plugin, options, ..
            } => {
                if !self.mount_plugins.contains(plugin) {
                    return Err(Refusal::PluginNotForUsers {
                        uid,
                        plugin: plugin.clone(),
                    });
                }
                if options.contains_key("allow_other") && !self.allow_other {
                    return Err(Refusal::AllowOther { uid });
                }
                if options.contains_key("uring") {
                    return Err(Refusal::Uring { uid });
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn policy() -> Policy {
        Policy {
            group: "fshost".into(),
            group_gid: Some(990),
            mount_plugins: vec!["memfs".into()],
            allow_other: false,
            limits: Limits::default(),
        }
    }

    fn mount(plugin: &str, allow_other: bool) -> Request {
        let mut options = BTreeMap::new();
        if allow_other {
            options.insert("allow_other".to_string(), String::new());
        }
        Request::Mount {
            plugin: plugin.into(),
            mountpoint: "/home/u/m".into(),
            options,
            read_only: false,
        }
    }

    #[test]
    fn root_and_group_members_are_admins() {
        let p = policy();
        assert!(p.caller(0, 0, &[]).admin);
        assert!(p.caller(1000, 990, &[]).admin);
        assert!(!p.caller(1000, 1000, &[]).admin);
        assert!(p.caller(1000, 1000, &[4, 990]).admin);
        assert!(!p.caller(1000, 1000, &[4, 991]).admin);
    }

    #[test]
    fn users_may_look_and_mount_what_the_config_allows() {
        let p = policy();
        let user = p.caller(65534, 65534, &[]);
        assert!(p.authorize(&user, &Request::List {}).is_ok());
        assert!(p.authorize(&user, &Request::Status {}).is_ok());
        assert!(p.authorize(&user, &mount("memfs", false)).is_ok());
        let err = p
            .authorize(&user, &mount("hellofs", false))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("user 65534 may not mount plugin \"hellofs\""),
            "{err}"
        );
        let err = p
            .authorize(&user, &mount("memfs", true))
            .unwrap_err()
            .to_string();
        assert!(err.contains("allow_other"), "{err}");
        let load = Request::Load {
            path: "memfs".into(),
            name: None,
        };
        let err = p.authorize(&user, &load).unwrap_err().to_string();
        assert!(
            err.contains("only root and members of group fshost"),
            "{err}"
        );
    }
}
