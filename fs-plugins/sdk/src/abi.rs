//! The C ABI between fshostd and a plugin: `#[repr(C)]` types that mirror `include/fshost_plugin.h`.
//!
//! Rules (as in nbdkit): the descriptor starts with `magic`, `abi_version` and `struct_size`;
//! new fields are only ever appended, and the host treats an entry beyond a plugin's
//! `struct_size` as absent. Every operation returns 0 or a positive errno; a null function
//! pointer means "not supported" (`ENOSYS`). [`PANICKED`] means the plugin panicked and
//! contained it: the host answers `EIO` and marks the plugin tainted.

use std::ffi::{c_char, c_int, c_void};

#[allow(unused_imports)] // the names the operation table uses
use crate::ops::vocabulary::*;

/// `"FSHOSTPL"` read as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"FSHOSTPL");
/// The ABI version this SDK and host speak.
pub const ABI_VERSION: u32 = 2;
/// The oldest version the host still loads. Version 2 changed `export_state` and
/// `import_state` (descriptors shared by index, so that they can cross processes); the
/// host loads a version 1 plugin without them.
pub const OLDEST_ABI_VERSION: u32 = 1;
/// Returned by an operation that panicked (the SDK caught it).
pub const PANICKED: c_int = -1;
/// Name of the one symbol a plugin exports.
pub const ENTRY_SYMBOL: &str = "fshost_plugin_entry";

/// `setattr` field selectors (`Setattr::valid`).
pub const SET_MODE: u32 = 1 << 0;
pub const SET_UID: u32 = 1 << 1;
pub const SET_GID: u32 = 1 << 2;
pub const SET_SIZE: u32 = 1 << 3;
pub const SET_ATIME: u32 = 1 << 4;
pub const SET_MTIME: u32 = 1 << 5;
pub const SET_ATIME_NOW: u32 = 1 << 6;
pub const SET_MTIME_NOW: u32 = 1 << 7;
pub const SET_CTIME: u32 = 1 << 8;
pub const SET_FH: u32 = 1 << 9;

/// [`crate::Plugin::wants`]: POSIX ACLs. The kernel enforces the ACLs it finds in the
/// `system.posix_acl_access`/`_default` attributes, and no longer applies the umask:
/// `mknod`, `mkdir`, `create_file` and `tmpfile` get the mode as asked and the caller's
/// umask in `Context::umask`, which the plugin applies unless the directory's default ACL
/// replaces it (see [`crate::acl`]).
pub const WANT_POSIX_ACL: u64 = 1 << 0;

/// [`crate::Plugin::wants`]: the plugin clears setuid and setgid itself
/// (`FUSE_HANDLE_KILLPRIV_V2`), so that the kernel need not ask for `security.capability`
/// before every write (it asks once, until the file's attributes change). The plugin must
/// then clear setuid, and setgid if the group may execute: of any node but a directory on
/// a change of its owner or group; of a regular file on a truncation by a caller other than
/// root (the kernel's rule is "without CAP_FSETID", which FUSE does not pass on), and on a
/// `setattr` that sets nothing (`valid` 0 but for `SET_FH`) from such a caller, which is how
/// the kernel says that their write, through passthrough or not, must drop them (root's
/// writes send one too, for a file with capabilities, which the kernel removes itself; the
/// bits stay). On those two, setgid without group execute goes too for a caller outside the
/// file's group.
pub const WANT_KILL_PRIV: u64 = 1 << 1;

/// Who is asking: the calling process's credentials (and, for plugins that want POSIX
/// ACLs, the umask of a call that creates a node; 0 otherwise, the host applied it).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Context {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    pub umask: u32,
}

/// Seconds and nanoseconds since the Unix epoch.
#[repr(C)]
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct Timespec {
    pub sec: i64,
    pub nsec: u32,
    pub reserved: u32,
}

/// File attributes; `mode` carries the file type bits (`S_IFREG`, `S_IFDIR`, ...) too.
/// Serde-able so that a plugin can hand its inodes to its next generation as they are.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
}

/// The attribute changes a `setattr` asks for; only fields selected by `valid` are meaningful.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Setattr {
    pub valid: u32,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
    pub fh: u64,
}

/// Filesystem statistics for `statfs`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Statfs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
    pub reserved: u32,
}

/// One `-o key=value` mount option.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct MountOption {
    pub key: *const c_char,
    pub value: *const c_char,
}

/// Adds one directory entry to a `readdir` reply; returns nonzero when the reply is full.
pub type FillDir = unsafe extern "C" fn(
    buf: *mut c_void,
    ino: u64,
    next_offset: u64,
    mode: u32,
    name: *const c_char,
) -> c_int;

/// Appends bytes to the state an `export_state` writes; returns nonzero (an errno) when
/// the host cannot take more.
pub type WriteState = unsafe extern "C" fn(buf: *mut c_void, data: *const u8, len: usize) -> c_int;

/// Names a descriptor in the state an `export_state` writes: the host keeps a duplicate
/// (the instance keeps its own) and returns its index, or a negative errno.
pub type ShareFd = unsafe extern "C" fn(buf: *mut c_void, fd: c_int) -> c_int;

/// Gives the instance in `import_state` its own duplicate of the state's descriptor
/// `index`; returns it (the instance owns it from then on), or a negative errno.
pub type TakeFd = unsafe extern "C" fn(fds: *mut c_void, index: u32) -> c_int;

/// An opaque per-mount instance handle, made by `create` and freed by `destroy`.
pub type Instance = *mut c_void;

/// Declares the descriptor from the operation table (`ops.rs`), with the list of its
/// operations and the check for the required ones.
macro_rules! descriptor {
    ($(
        $(#[$attr:meta])* $([when $cond:ident])?
        fn $name:ident(&$recv:ident $(, $arg:ident : $ty:ty => [$($p:ident : $pt:ty),*])*)
            -> $out:ty => [$($o:ident : $ot:ty),*] $body:tt
    )*) => {
        /// The plugin descriptor that `fshost_plugin_entry` returns (static data, never freed).
        #[repr(C)]
        pub struct PluginDescriptor {
            pub magic: u64,
            pub abi_version: u32,
            pub struct_size: u32,
            pub name: *const c_char,
            pub version: *const c_char,

            // Plugin as a whole (run while Registering / Deregistering).
            pub on_load: Option<unsafe extern "C" fn() -> c_int>,
            pub on_unload: Option<unsafe extern "C" fn() -> c_int>,
            /// Copies the last contained panic's message into `buf`; returns its full length.
            pub last_panic: Option<unsafe extern "C" fn(buf: *mut c_char, cap: usize) -> usize>,

            // Per mount.
            pub create: Option<
                unsafe extern "C" fn(
                    options: *const MountOption,
                    count: usize,
                    out: *mut Instance,
                ) -> c_int,
            >,
            pub destroy: Option<unsafe extern "C" fn(instance: Instance) -> c_int>,

            // Filesystem operations, in table order.
            $(
                $(#[$attr])*
                pub $name: Option<unsafe extern "C" fn(Instance, $($($p: $pt,)*)* $($o: $ot,)*) -> c_int>,
            )*
        }

        /// The filesystem operations, in descriptor order.
        pub const OPERATIONS: &[&str] = &[$(stringify!($name)),*];

        /// The first operation a plugin must implement but whose descriptor leaves out.
        pub fn missing_required(d: &PluginDescriptor) -> Option<&'static str> {
            $(if required!($body) && d.$name.is_none() {
                return Some(stringify!($name));
            })*
            None
        }
    };
}

/// Whether a table entry's default body is `;` (the operation is required).
macro_rules! required {
    (;) => {
        true
    };
    ($body:block) => {
        false
    };
}

crate::operations!(descriptor);

// SAFETY: the descriptor is immutable static data; its raw pointers point to static,
// NUL-terminated strings and its function pointers are plain code addresses.
unsafe impl Sync for PluginDescriptor {}
// SAFETY: as above; nothing in it is tied to a thread.
unsafe impl Send for PluginDescriptor {}

/// Smallest `struct_size` the host accepts: the descriptor of the first release, everything
/// up to and including `create_file`. Fields after it are optional extensions.
pub const MIN_STRUCT_SIZE: u32 = std::mem::offset_of!(PluginDescriptor, open_backing) as u32;

/// `struct_size` of a descriptor that has the passthrough extension.
pub const PASSTHROUGH_STRUCT_SIZE: u32 =
    (std::mem::offset_of!(PluginDescriptor, create_backing) + std::mem::size_of::<usize>()) as u32;

/// `struct_size` of a descriptor that has the upgrade extension (state handover).
pub const UPGRADE_STRUCT_SIZE: u32 =
    (std::mem::offset_of!(PluginDescriptor, import_state) + std::mem::size_of::<usize>()) as u32;

/// `struct_size` of a descriptor that has the space extension (fallocate, lseek).
pub const SPACE_STRUCT_SIZE: u32 =
    (std::mem::offset_of!(PluginDescriptor, lseek) + std::mem::size_of::<usize>()) as u32;

/// `struct_size` of a descriptor that has the resume extension (crash survival).
pub const RESUME_STRUCT_SIZE: u32 =
    (std::mem::offset_of!(PluginDescriptor, resume) + std::mem::size_of::<usize>()) as u32;

/// `struct_size` of a descriptor that has the tmpfile extension (`O_TMPFILE`).
pub const TMPFILE_STRUCT_SIZE: u32 =
    (std::mem::offset_of!(PluginDescriptor, tmpfile) + std::mem::size_of::<usize>()) as u32;

/// `struct_size` of a descriptor that has `wants` (what an instance asks of the kernel).
pub const WANTS_STRUCT_SIZE: u32 =
    (std::mem::offset_of!(PluginDescriptor, wants) + std::mem::size_of::<usize>()) as u32;

/// `struct_size` of a descriptor that has `birth_time`.
pub const BIRTH_STRUCT_SIZE: u32 =
    (std::mem::offset_of!(PluginDescriptor, birth_time) + std::mem::size_of::<usize>()) as u32;

/// `struct_size` of a descriptor that has the flags extension (chattr).
pub const FLAGS_STRUCT_SIZE: u32 =
    (std::mem::offset_of!(PluginDescriptor, set_flags) + std::mem::size_of::<usize>()) as u32;

/// `struct_size` of a descriptor that has `tmpfile_backing`.
pub const TMPFILE_BACKING_STRUCT_SIZE: u32 =
    (std::mem::offset_of!(PluginDescriptor, tmpfile_backing) + std::mem::size_of::<usize>()) as u32;

/// The type of `fshost_plugin_entry`.
pub type EntryFn = unsafe extern "C" fn() -> *const PluginDescriptor;
