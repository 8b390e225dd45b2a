//! All `unsafe` of the daemon: `dlopen`, the ABI gate, and every call through a plugin's
//! vtable. Everything outside this file sees a safe [`Library`].
//!
//! Why the calls below are sound: the function pointers come from the plugin's descriptor
//! (copied at load) and point into the library, which stays mapped while `Library` lives
//! (it owns the handle; invariant 2 keeps it alive while any mount uses it). Every pointer we pass is
//! valid for the duration of the call, as the ABI (fs-plugins/sdk/src/abi.rs) requires.

// The calls mirror the C ABI one to one, arguments included.
#![allow(clippy::too_many_arguments)]

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::Path;
use std::sync::Mutex;

use fshost_sdk::abi::{self, EntryFn, MountOption, PluginDescriptor};
use fshost_sdk::ffi::{Outgoing, Output};
#[allow(unused_imports)] // the names the operation table uses
use fshost_sdk::ops::vocabulary::*;
use fshost_sdk::Errno;
use libloading::os::unix::{Library as RawLibrary, RTLD_LOCAL, RTLD_NOW};

/// The ABI gate's verdict on a library.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("dlopen failed: {0}")]
    Dlopen(String),
    #[error(
        "it does not export `{}` (build it with fshost_sdk::export_plugin!)",
        abi::ENTRY_SYMBOL
    )]
    MissingEntry,
    #[error("`{}` returned a null descriptor", abi::ENTRY_SYMBOL)]
    NullDescriptor,
    #[error(
        "its descriptor has magic {found:#018x}, expected {:#018x}: not an fshost plugin",
        abi::MAGIC
    )]
    BadMagic { found: u64 },
    #[error("it was built for plugin ABI version {found}, this fshostd speaks versions {} to {}; rebuild it against the matching fshost-sdk", abi::OLDEST_ABI_VERSION, abi::ABI_VERSION)]
    AbiVersion { found: u32 },
    #[error("its descriptor is {found} bytes, smaller than the {} this ABI version needs; rebuild it against the matching fshost-sdk", abi::MIN_STRUCT_SIZE)]
    StructTooSmall { found: u32 },
    #[error("its descriptor's {0} is not a valid UTF-8 string")]
    BadString(&'static str),
    #[error("it does not implement the required operation `{0}`")]
    MissingOp(&'static str),
}

/// What the gate read from a descriptor.
#[derive(Debug, Clone)]
pub struct DescriptorInfo {
    pub name: String,
    pub version: String,
    pub abi_version: u32,
}

/// Opaque per-mount handle from the plugin's `create`.
#[derive(Debug, Clone, Copy)]
pub struct Instance(*mut c_void);

// SAFETY: an instance is the plugin's `Send + Sync` filesystem value (the SDK requires it;
// C plugins promise it in the header): the plugin serializes access itself.
unsafe impl Send for Instance {}
// SAFETY: as above.
unsafe impl Sync for Instance {}

/// An open plugin library that passed the ABI gate.
pub struct Library {
    /// Our copy of the plugin's descriptor: its first `struct_size` bytes, the rest zero
    /// (an older plugin's missing entries read as absent, as nbdkit does it).
    descriptor: PluginDescriptor,
    /// Taint reason, set the first time the plugin contains a panic.
    taint: Mutex<Option<String>>,
    /// The mapping; dropping it is the `dlclose`.
    _raw: RawLibrary,
}

/// The fixed prefix every descriptor starts with, whatever its ABI version.
#[repr(C)]
struct Prefix {
    magic: u64,
    abi_version: u32,
    struct_size: u32,
}

/// Reads a descriptor string; `what` names it in the error.
///
/// # Safety
/// `p` is null or a NUL-terminated string inside the open library.
unsafe fn read_string(p: *const c_char, what: &'static str) -> Result<String, GateError> {
    if p.is_null() {
        return Err(GateError::BadString(what));
    }
    // SAFETY: per the function contract.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map(str::to_owned)
        .map_err(|_| GateError::BadString(what))
}

impl Library {
    /// Opens `path` and runs the ABI gate; nothing of the plugin runs but its ELF constructors
    /// and the entry function, which only returns a pointer to static data.
    pub fn dlopen(path: &Path) -> Result<(Library, DescriptorInfo), GateError> {
        // SAFETY: loading runs the library's constructors. That is the one thing we cannot
        // gate; a plugin's constructors are as trusted as the plugin (it was given to us by
        // an admin). RTLD_NOW makes missing symbols fail here rather than mid-request.
        let raw = unsafe { RawLibrary::open(Some(path), RTLD_NOW | RTLD_LOCAL) }
            .map_err(|e| GateError::Dlopen(e.to_string()))?;
        // SAFETY: the symbol, if present, has the type the ABI defines for it.
        let entry: EntryFn = match unsafe { raw.get::<EntryFn>(abi::ENTRY_SYMBOL.as_bytes()) } {
            Ok(symbol) => *symbol,
            Err(_) => return Err(GateError::MissingEntry),
        };
        // SAFETY: the entry function takes no arguments and only returns a pointer.
        let descriptor = unsafe { entry() };
        if descriptor.is_null() {
            return Err(GateError::NullDescriptor);
        }
        // SAFETY: every ABI version starts with this 16-byte prefix; the pointer is non-null
        // and points into the mapped library.
        let prefix = unsafe { descriptor.cast::<Prefix>().read_unaligned() };
        if prefix.magic != abi::MAGIC {
            return Err(GateError::BadMagic {
                found: prefix.magic,
            });
        }
        if !(abi::OLDEST_ABI_VERSION..=abi::ABI_VERSION).contains(&prefix.abi_version) {
            return Err(GateError::AbiVersion {
                found: prefix.abi_version,
            });
        }
        if prefix.struct_size < abi::MIN_STRUCT_SIZE {
            return Err(GateError::StructTooSmall {
                found: prefix.struct_size,
            });
        }
        let mut copy = std::mem::MaybeUninit::<PluginDescriptor>::zeroed();
        let len = (prefix.struct_size as usize).min(std::mem::size_of::<PluginDescriptor>());
        // SAFETY: the plugin promises `struct_size` readable bytes of descriptor; we copy no
        // more than that nor more than our type holds, into our own zeroed value.
        unsafe {
            std::ptr::copy_nonoverlapping(
                descriptor.cast::<u8>(),
                copy.as_mut_ptr().cast::<u8>(),
                len,
            )
        };
        // SAFETY: all-zero bytes are valid for every field (integers, raw pointers and
        // `Option<fn>`), and the copied prefix is a valid descriptor of a version this host
        // loads (version 1's differently typed entries are cleared at once).
        let mut copy = unsafe { copy.assume_init() };
        if prefix.abi_version == 1 {
            // Version 1's export_state/import_state took no descriptor callbacks: calling
            // them as version 2's would be undefined. Such a plugin serves, but cannot
            // hand state over (upgrades and daemon upgrades refuse it) until rebuilt.
            copy.export_state = None;
            copy.import_state = None;
        }
        let d = &copy;
        // SAFETY: the descriptor's strings are static data inside the library.
        let (name, version) = unsafe {
            (
                read_string(d.name, "name")?,
                read_string(d.version, "version")?,
            )
        };
        if let Some(op) = abi::missing_required(d) {
            return Err(GateError::MissingOp(op));
        }
        let info = DescriptorInfo {
            name,
            version,
            abi_version: prefix.abi_version,
        };
        let library = Library {
            descriptor: copy,
            taint: Mutex::new(None),
            _raw: raw,
        };
        Ok((library, info))
    }

    fn d(&self) -> &PluginDescriptor {
        &self.descriptor
    }

    /// Whether the plugin offers FUSE passthrough (the descriptor extension).
    pub fn offers_passthrough(&self) -> bool {
        self.d().open_backing.is_some() && self.d().create_backing.is_some()
    }

    /// Whether the plugin can hand its instances' state to a next generation, and take it
    /// from a previous one (the upgrade extension).
    pub fn upgradable(&self) -> bool {
        self.d().export_state.is_some() && self.d().import_state.is_some()
    }

    /// Whether a new instance can serve a mount whose instance died with fshostd (the
    /// resume extension).
    pub fn resumable(&self) -> bool {
        self.d().resume.is_some()
    }

    /// Why the plugin is tainted, if it is.
    pub fn taint(&self) -> Option<String> {
        self.taint.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn last_panic(&self) -> String {
        let Some(f) = self.d().last_panic else {
            return "panic (no message)".to_string();
        };
        let mut buf = vec![0u8; 1024];
        // SAFETY: `buf` is valid for `buf.len()` bytes.
        let len = unsafe { f(buf.as_mut_ptr().cast(), buf.len()) };
        buf.truncate(len.min(buf.len()));
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// Maps a plugin return code: 0 → Ok, errno → Err, a contained panic → taint + `EIO`.
    fn check(&self, op: &'static str, rc: c_int) -> Result<(), Errno> {
        match rc {
            0 => Ok(()),
            rc => Err(self.failed(op, rc)),
        }
    }

    /// The errno for a plugin's nonzero return code; a contained panic taints the plugin.
    fn failed(&self, op: &'static str, rc: c_int) -> Errno {
        match rc {
            abi::PANICKED => {
                let reason = self.last_panic();
                tracing::error!(op, %reason, "plugin panicked; answering EIO and marking it tainted");
                let mut taint = self.taint.lock().unwrap_or_else(|e| e.into_inner());
                taint.get_or_insert(reason);
                Errno::EIO
            }
            e if e > 0 => Errno(e),
            _ => Errno::EIO,
        }
    }

    pub fn on_load(&self) -> Result<(), Errno> {
        match self.d().on_load {
            // SAFETY: plugin-wide hook without arguments.
            Some(f) => self.check("on_load", unsafe { f() }),
            None => Ok(()),
        }
    }

    /// Runs the plugin's unload hook; a failure is only logged (the unload goes on).
    pub fn on_unload(&self) {
        if let Some(f) = self.d().on_unload {
            // SAFETY: plugin-wide hook without arguments.
            let _ = self.check("on_unload", unsafe { f() });
        }
    }

    /// Makes an instance from `options` (the plugin's `-o key=value` pairs); a key or
    /// value with a NUL byte is EINVAL (the daemon refuses those before it gets here).
    pub fn create<'a>(
        &self,
        options: impl Iterator<Item = (&'a String, &'a String)>,
    ) -> Result<Instance, Errno> {
        let Some(f) = self.d().create else {
            return Ok(Instance(std::ptr::null_mut()));
        };
        let c = |s: &String| CString::new(s.as_str()).map_err(|_| Errno::EINVAL);
        let strings = options
            .map(|(k, v)| Ok((c(k)?, c(v)?)))
            .collect::<Result<Vec<_>, Errno>>()?;
        let pairs: Vec<MountOption> = strings
            .iter()
            .map(|(k, v)| MountOption {
                key: k.as_ptr(),
                value: v.as_ptr(),
            })
            .collect();
        let mut out: *mut c_void = std::ptr::null_mut();
        // SAFETY: `pairs` and the strings it points to outlive the call; `out` is writable.
        let rc = unsafe { f(pairs.as_ptr(), pairs.len(), &mut out) };
        self.check("create", rc).map(|()| Instance(out))
    }

    /// Frees a mount's instance; the handle must not be used afterwards.
    pub fn destroy(&self, instance: Instance) {
        if let Some(f) = self.d().destroy {
            // SAFETY: `instance` came from `create` and is destroyed exactly once (the caller
            // consumes it).
            let _ = self.check("destroy", unsafe { f(instance.0) });
        }
    }
}

/// Declares, from the operation table (fs-plugins/sdk/src/ops.rs), one method per
/// operation that calls it through the descriptor: `ENOSYS` when the plugin left it out.
macro_rules! calls {
    ($(
        $(#[$attr:meta])* $([when $cond:ident])?
        fn $name:ident(&$recv:ident $(, $arg:ident : $ty:ty => [$($p:ident : $pt:ty),*])*)
            -> $out:ty => [$($o:ident : $ot:ty),*] $body:tt
    )*) => {
        impl Library {$(
            pub fn $name(&self, inst: Instance $(, $arg: $ty)*) -> Result<$out, Errno> {
                let f = self.d().$name.ok_or(Errno::ENOSYS)?;
                $(
                    let mut $arg = <$ty as Outgoing>::hold($arg)?;
                    let ($($p,)*) = <$ty as Outgoing>::abi(&mut $arg);
                )*
                <$out as Output>::receive(&mut |($($o,)*)| {
                    // SAFETY: `inst` is a live instance of this plugin; every argument is
                    // valid for the call (held above, as `Outgoing` says) and every
                    // out-parameter points to a slot of `Output::receive`.
                    unsafe { f(inst.0, $($($p,)*)* $($o,)*) }
                })
                .map_err(|rc| self.failed(stringify!($name), rc))
            }
        )*}
    };
}

fshost_sdk::operations!(calls);

/// Fixes glibc's mmap threshold at 1 MiB. Left dynamic, freeing one of fuser's 16 MiB
/// per-session read buffers raises the threshold past that size, and every later buffer
/// then comes from the heap, where calloc must zero (touch) all 16 MiB: 1,000 mounts cost
/// gigabytes of RSS. With the threshold fixed, each buffer is a fresh lazily-zeroed mmap.
/// (It lives here because this is the daemon's one module allowed `unsafe`.)
pub fn fix_malloc_mmap_threshold() {
    // SAFETY: mallopt only changes allocator tuning; it is called once at start, before
    // any other thread exists.
    let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20) };
    if ok != 1 {
        tracing::warn!("mallopt(M_MMAP_THRESHOLD) failed; many mounts will use more memory");
    }
}
