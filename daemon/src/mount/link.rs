//! What a mount's FUSE connection carries beyond the plugin instance: the `/dev/fuse`
//! descriptor, what the kernel and we agreed at INIT, and the open files' handles of a
//! passthrough plugin (ours, the plugin's, and the backing ids registered on the
//! connection). A daemon upgrade hands all of it to the next process ([`LinkState`]).

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use fuser::BackingId;
use serde::{Deserialize, Serialize};

use super::ring::Transport;

/// What INIT agreed for a connection, which a resumed session must keep to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Agreed {
    /// The protocol version the kernel reported.
    pub version: (u32, u32),
    /// The kernel's writeback cache is on.
    pub writeback: bool,
    /// FUSE passthrough is on.
    pub passthrough: bool,
    /// POSIX ACLs are on (and the kernel leaves the umask to us): `FUSE_POSIX_ACL` and
    /// `FUSE_DONT_MASK`. Records of older daemons lack it: off.
    #[serde(default)]
    pub posix_acl: bool,
    /// FUSE over io_uring was agreed (`-o uring`): once the ring is complete the kernel
    /// sends requests only through it. Records of older daemons lack it: off.
    #[serde(default)]
    pub uring: bool,
    /// The plugin clears setuid and setgid itself (`FUSE_HANDLE_KILLPRIV_V2`): the kernel
    /// no longer does. Records of older daemons lack it: off.
    #[serde(default)]
    pub kill_priv: bool,
}

impl Agreed {
    /// What an instance that wants `wants` ([`fshost_sdk::Plugin::wants`]) would fail to do
    /// on this connection, whose kernel left it to the plugin at INIT; None if nothing.
    /// (The other way round is harmless: the kernel goes on doing it itself.)
    pub fn unmet_by(&self, wants: u64) -> Option<&'static str> {
        use fshost_sdk::abi::{WANT_KILL_PRIV, WANT_POSIX_ACL};
        if self.kill_priv && wants & WANT_KILL_PRIV == 0 {
            return Some("it does not clear setuid and setgid itself (WANT_KILL_PRIV), which the kernel left to the plugin when the mount was made");
        }
        if self.posix_acl && wants & WANT_POSIX_ACL == 0 {
            return Some("it does not keep POSIX ACLs (WANT_POSIX_ACL), which the kernel enforces on this mount since it was made");
        }
        None
    }
}

/// Open files of a passthrough-capable plugin.
#[derive(Default)]
pub struct Handles {
    pub next: u64,
    /// our fh → (inode, plugin fh, uses the inode's backing file)
    pub open: HashMap<u64, (u64, u64, bool)>,
    /// inode → its backing file and the number of opens using it. The kernel wants one
    /// backing file per inode, kept registered while any open uses it.
    pub backing: HashMap<u64, (BackingId, usize)>,
}

/// One mount's connection state (see the module docs).
pub struct Link {
    fuse: Mutex<Connection>,
    agreed: Mutex<Option<Agreed>>,
    /// Which transport carries the requests (what `info` shows).
    transport: Mutex<Transport>,
    handles: Mutex<Handles>,
}

/// How a link reaches its `/dev/fuse` descriptor.
enum Connection {
    None,
    /// A duplicate of its own, while no session serves the connection.
    Kept(Arc<OwnedFd>),
    /// The serving session's, as long as it is served: no descriptor more per mount
    /// (10,000 mounts would otherwise need 20,000 for their connections).
    Served(Weak<dyn AsFd + Send + Sync>),
}

/// A connection's state as it crosses to the next process; the descriptor goes beside it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinkState {
    pub agreed: Agreed,
    pub next: u64,
    pub open: Vec<(u64, u64, u64, bool)>,
    /// inode → (raw backing id, opens using it)
    pub backing: Vec<(u64, u32, usize)>,
}

/// Where our file handles start: the current time in nanoseconds. After a crash the
/// kernel still holds the lost process's handles, and new ones must never equal any of them.
fn first_handle() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
}

impl Default for Link {
    /// A new connection's state.
    fn default() -> Link {
        Link {
            fuse: Mutex::new(Connection::None),
            agreed: Mutex::new(None),
            transport: Mutex::new(Transport::Dev),
            handles: Mutex::new(Handles {
                next: first_handle(),
                ..Handles::default()
            }),
        }
    }
}

impl LinkState {
    /// The state of a connection whose server died with everything it knew but what INIT
    /// agreed (crash recovery): no handles of ours yet.
    pub fn fresh(agreed: Agreed) -> LinkState {
        LinkState {
            agreed,
            next: first_handle(),
            open: Vec::new(),
            backing: Vec::new(),
        }
    }
}

impl Link {
    /// The state of a connection handed over by the previous process. Its backing ids
    /// are adopted later ([`Link::adopt_backing`]), once that process is gone.
    pub fn resumed(fuse: OwnedFd, state: &LinkState) -> Link {
        let link = Link::default();
        link.keep_fd(fuse);
        *link.agreed.lock().unwrap_or_else(|e| e.into_inner()) = Some(state.agreed);
        {
            let mut handles = link.handles();
            handles.next = state.next;
            handles.open = state
                .open
                .iter()
                .map(|&(fh, ino, plugin_fh, passthrough)| (fh, (ino, plugin_fh, passthrough)))
                .collect();
        }
        link
    }

    /// Keeps a duplicate of the connection's descriptor, to hand it over later.
    pub fn keep_fd(&self, fuse: OwnedFd) {
        *self.connection() = Connection::Kept(Arc::new(fuse));
    }

    /// Reaches the descriptor through the session that serves it from now on (the kept
    /// duplicate is closed).
    pub fn served_by(&self, session: Weak<dyn AsFd + Send + Sync>) {
        *self.connection() = Connection::Served(session);
    }

    /// The connection's descriptor (while its session lives, if served).
    pub fn fd(&self) -> Option<Arc<dyn AsFd + Send + Sync>> {
        match &*self.connection() {
            Connection::None => None,
            Connection::Kept(fd) => Some(Arc::clone(fd) as Arc<dyn AsFd + Send + Sync>),
            Connection::Served(session) => session.upgrade(),
        }
    }

    fn connection(&self) -> MutexGuard<'_, Connection> {
        self.fuse.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn agree(&self, agreed: Agreed) {
        *self.agreed.lock().unwrap_or_else(|e| e.into_inner()) = Some(agreed);
    }

    pub fn agreed(&self) -> Option<Agreed> {
        *self.agreed.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_transport(&self, transport: Transport) {
        *self.transport.lock().unwrap_or_else(|e| e.into_inner()) = transport;
    }

    pub fn transport(&self) -> Transport {
        self.transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn handles(&self) -> MutexGuard<'_, Handles> {
        self.handles.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The state to hand over; `None` while INIT has not happened.
    pub fn state(&self) -> Option<LinkState> {
        let agreed = self.agreed()?;
        let handles = self.handles();
        Some(LinkState {
            agreed,
            next: handles.next,
            open: handles
                .open
                .iter()
                .map(|(&fh, &(ino, plugin_fh, passthrough))| (fh, ino, plugin_fh, passthrough))
                .collect(),
            backing: handles
                .backing
                .iter()
                .map(|(&ino, (id, users))| (ino, id.as_raw(), *users))
                .collect(),
        })
    }

    /// Takes ownership of the backing ids the previous process registered (`wrap` makes
    /// each a `BackingId` of this session); from now on their last release closes them.
    pub fn adopt_backing(&self, state: &LinkState, wrap: impl Fn(u32) -> BackingId) {
        let mut handles = self.handles();
        for &(ino, raw, users) in &state.backing {
            handles.backing.insert(ino, (wrap(raw), users));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Agreed;
    use fshost_sdk::abi::{WANT_KILL_PRIV, WANT_POSIX_ACL};

    fn agreed(kill_priv: bool, posix_acl: bool) -> Agreed {
        Agreed {
            version: (7, 41),
            writeback: false,
            passthrough: true,
            posix_acl,
            uring: false,
            kill_priv,
        }
    }

    #[test]
    fn what_the_kernel_left_to_the_plugin_must_be_wanted() {
        let both = WANT_KILL_PRIV | WANT_POSIX_ACL;
        assert_eq!(agreed(false, false).unmet_by(0), None);
        assert_eq!(agreed(false, false).unmet_by(both), None);
        assert_eq!(agreed(true, true).unmet_by(both), None);
        assert!(agreed(true, false)
            .unmet_by(WANT_POSIX_ACL)
            .is_some_and(|why| why.contains("setuid")));
        assert!(agreed(false, true)
            .unmet_by(WANT_KILL_PRIV)
            .is_some_and(|why| why.contains("POSIX ACLs")));
    }

    #[test]
    fn records_of_older_daemons_agreed_to_no_kill_priv() {
        let old = r#"{"version":[7,41],"writeback":false,"passthrough":true,"posix_acl":true,"uring":false}"#;
        let agreed: Agreed = serde_json::from_str(old).unwrap();
        assert!(!agreed.kill_priv);
    }
}
