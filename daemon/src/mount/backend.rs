//! What the FUSE adapter calls for one mount: a loaded plugin's instance through the C ABI
//! (`Hosted`: what fshostd serves), or a `fshost_sdk::Plugin` called directly (`Direct`:
//! the standalone benchmark binary, which measures what hosting costs).

use std::sync::Arc;

use fshost_sdk::abi::OPERATIONS;
use parking_lot::RwLock;

#[allow(unused_imports)] // the names the operation table uses
use fshost_sdk::ops::vocabulary::*;

use super::MountStats;
use crate::plugin::{Instance, Plugin};

type Result<T> = std::result::Result<T, Errno>;

/// A plugin instance served by hosting it: calls go through the plugin's C descriptor.
/// Dropping it destroys the instance.
pub struct Hosted {
    pub(super) plugin: Arc<Plugin>,
    pub(super) instance: Instance,
}

impl Hosted {
    pub fn new(plugin: Arc<Plugin>, instance: Instance) -> Self {
        Hosted { plugin, instance }
    }
}

impl Drop for Hosted {
    fn drop(&mut self) {
        self.plugin.library.destroy(self.instance);
    }
}

/// A hosted mount's backend, replaceable under its live FUSE session (`fshostctl upgrade`).
/// Every request holds the lock shared while the plugin serves it; an upgrade takes it
/// alone, which waits for the requests in flight and holds new ones back (parking_lot's
/// lock is fair: readers queue behind a waiting writer), so that no request ever sees half
/// an upgrade and the state handed over cannot change while it is copied.
pub struct Swappable {
    name: String,
    /// Fixed for the life of the session (the kernel agreed to it at INIT).
    passthrough: bool,
    pub(super) current: RwLock<Hosted>,
    /// Every call is recorded here (calls, time, errors, in flight); an upgrade that
    /// waits in vain names the calls in flight.
    pub(super) stats: Arc<MountStats>,
    /// Whether calls are recorded at all (`-o nostats`: no statistics, and an upgrade that
    /// waits in vain cannot say which calls were in flight).
    record: bool,
    /// The mount's connection state, which a daemon upgrade hands over with the instance's.
    pub link: Arc<super::Link>,
}

impl Swappable {
    pub fn new(
        hosted: Hosted,
        stats: Arc<MountStats>,
        record: bool,
        link: Arc<super::Link>,
    ) -> Arc<Swappable> {
        Arc::new(Swappable {
            name: hosted.plugin.name.clone(),
            passthrough: hosted.plugin.library.offers_passthrough(),
            current: RwLock::new(hosted),
            stats,
            record,
            link,
        })
    }
}

/// The position of `name` in `abi::OPERATIONS`, at compile time.
const fn op_index(name: &str) -> usize {
    let mut i = 0;
    while i < OPERATIONS.len() {
        let (a, b) = (OPERATIONS[i].as_bytes(), name.as_bytes());
        if a.len() == b.len() {
            let mut j = 0;
            while j < a.len() && a[j] == b[j] {
                j += 1;
            }
            if j == a.len() {
                return i;
            }
        }
        i += 1;
    }
    panic!("not an operation of the table")
}

/// A `Plugin` linked into the binary and called directly: no daemon, no C ABI.
pub struct Direct<P> {
    name: String,
    plugin: P,
}

impl<P: fshost_sdk::Plugin> Direct<P> {
    pub fn new(name: &str, plugin: P) -> Self {
        Direct {
            name: name.to_string(),
            plugin,
        }
    }
}

/// Declares `Backend` from the operation table (fs-plugins/sdk/src/ops.rs): the
/// operations the FUSE adapter needs from a filesystem, each forwarded to the plugin's
/// C descriptor for `Hosted` and to the `fshost_sdk::Plugin` method for `Direct`.
macro_rules! backend {
    ($(
        $(#[$attr:meta])* $([when $cond:ident])?
        fn $name:ident(&$recv:ident $(, $arg:ident : $ty:ty => [$($p:ident : $pt:ty),*])*)
            -> $out:ty => [$($o:ident : $ot:ty),*] $body:tt
    )*) => {
        /// The operations the FUSE adapter needs from a filesystem.
        pub trait Backend: Send + Sync + 'static {
            /// The plugin's name, for log lines.
            fn name(&self) -> &str;
            /// Whether opens go through `open_backing`/`create_backing` (FUSE passthrough).
            fn offers_passthrough(&self) -> bool;
            $(fn $name(&self $(, $arg: $ty)*) -> Result<$out>;)*
        }

        impl Backend for Hosted {
            fn name(&self) -> &str {
                &self.plugin.name
            }
            fn offers_passthrough(&self) -> bool {
                self.plugin.library.offers_passthrough()
            }
            $(fn $name(&self $(, $arg: $ty)*) -> Result<$out> {
                self.plugin.library.$name(self.instance $(, $arg)*)
            })*
        }

        impl Backend for Arc<Swappable> {
            fn name(&self) -> &str {
                &self.name
            }
            fn offers_passthrough(&self) -> bool {
                self.passthrough
            }
            $(fn $name(&self $(, $arg: $ty)*) -> Result<$out> {
                const OP: usize = op_index(stringify!($name));
                let current = self.current.read();
                if !self.record {
                    return current.$name($($arg),*);
                }
                let call = self.stats.begin(OP);
                let result = current.$name($($arg),*);
                call.finish(result.as_ref().err().map(|e| e.0));
                result
            })*
        }

        impl<P: fshost_sdk::Plugin> Backend for Direct<P> {
            fn name(&self) -> &str {
                &self.name
            }
            fn offers_passthrough(&self) -> bool {
                P::PASSTHROUGH
            }
            $(fn $name(&self $(, $arg: $ty)*) -> Result<$out> {
                self.plugin.$name($($arg),*)
            })*
        }
    };
}

fshost_sdk::operations!(backend);
