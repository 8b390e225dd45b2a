//! What the FUSE adapter calls for one mount: a loaded plugin's instance through the C ABI
//! (`Hosted`: what fshostd serves), or a `fshost_sdk::Plugin` called directly (`Direct`:
//! the standalone benchmark binary, which measures what hosting costs).

use std::sync::Arc;

#[allow(unused_imports)] // the names the operation table uses
use fshost_sdk::ops::vocabulary::*;

use crate::plugin::{Instance, Plugin};

type Result<T> = std::result::Result<T, Errno>;

/// A plugin instance served by hosting it: calls go through the plugin's C descriptor.
/// Dropping it destroys the instance.
pub struct Hosted {
    plugin: Arc<Plugin>,
    instance: Instance,
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
