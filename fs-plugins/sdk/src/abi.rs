//! The C ABI between fshostd and a plugin: `#[repr(C)]` types that mirror `include/fshost_plugin.h`.
//!
//! Rules (as in nbdkit): the descriptor starts with `magic`, `abi_version` and `struct_size`;
//! new fields are only ever appended, and the host treats an entry beyond a plugin's
//! `struct_size` as absent. Every operation returns 0 or a positive errno; a null function
//! pointer means "not supported" (`ENOSYS`). [`PANICKED`] means the plugin panicked and
//! contained it: the host answers `EIO` and marks the plugin tainted.

use std::ffi::{c_char, c_int, c_void};

/// `"FSHOSTPL"` read as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"FSHOSTPL");
/// The ABI version this SDK and host speak.
pub const ABI_VERSION: u32 = 1;
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

/// Who is asking: the calling process's credentials.
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timespec {
    pub sec: i64,
    pub nsec: u32,
    pub reserved: u32,
}

/// File attributes; `mode` carries the file type bits (`S_IFREG`, `S_IFDIR`, ...) too.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
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

/// An opaque per-mount instance handle, made by `create` and freed by `destroy`.
pub type Instance = *mut c_void;

type Ctx = *const Context;

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

    // Filesystem operations.
    pub lookup: Option<
        unsafe extern "C" fn(
            Instance,
            Ctx,
            parent: u64,
            name: *const c_char,
            out: *mut Attr,
        ) -> c_int,
    >,
    pub forget: Option<unsafe extern "C" fn(Instance, ino: u64, nlookup: u64) -> c_int>,
    pub getattr: Option<unsafe extern "C" fn(Instance, Ctx, ino: u64, out: *mut Attr) -> c_int>,
    pub setattr: Option<
        unsafe extern "C" fn(Instance, Ctx, ino: u64, set: *const Setattr, out: *mut Attr) -> c_int,
    >,
    pub readlink: Option<
        unsafe extern "C" fn(
            Instance,
            Ctx,
            ino: u64,
            buf: *mut u8,
            cap: usize,
            len: *mut usize,
        ) -> c_int,
    >,
    pub mknod: Option<
        unsafe extern "C" fn(
            Instance,
            Ctx,
            parent: u64,
            name: *const c_char,
            mode: u32,
            rdev: u32,
            out: *mut Attr,
        ) -> c_int,
    >,
    pub mkdir: Option<
        unsafe extern "C" fn(
            Instance,
            Ctx,
            parent: u64,
            name: *const c_char,
            mode: u32,
            out: *mut Attr,
        ) -> c_int,
    >,
    pub unlink:
        Option<unsafe extern "C" fn(Instance, Ctx, parent: u64, name: *const c_char) -> c_int>,
    pub rmdir:
        Option<unsafe extern "C" fn(Instance, Ctx, parent: u64, name: *const c_char) -> c_int>,
    pub symlink: Option<
        unsafe extern "C" fn(
            Instance,
            Ctx,
            parent: u64,
            name: *const c_char,
            target: *const c_char,
            out: *mut Attr,
        ) -> c_int,
    >,
    pub rename: Option<
        unsafe extern "C" fn(
            Instance,
            Ctx,
            parent: u64,
            name: *const c_char,
            newparent: u64,
            newname: *const c_char,
            flags: u32,
        ) -> c_int,
    >,
    pub link: Option<
        unsafe extern "C" fn(
            Instance,
            Ctx,
            ino: u64,
            newparent: u64,
            newname: *const c_char,
            out: *mut Attr,
        ) -> c_int,
    >,
    pub open:
        Option<unsafe extern "C" fn(Instance, Ctx, ino: u64, flags: i32, fh: *mut u64) -> c_int>,
    pub read: Option<
        unsafe extern "C" fn(
            Instance,
            Ctx,
            ino: u64,
            fh: u64,
            offset: u64,
            buf: *mut u8,
            size: usize,
            len: *mut usize,
        ) -> c_int,
    >,
    pub write: Option<
        unsafe extern "C" fn(
            Instance,
            Ctx,
            ino: u64,
            fh: u64,
            offset: u64,
            data: *const u8,
            size: usize,
            flags: i32,
            written: *mut usize,
        ) -> c_int,
    >,
    pub flush: Option<unsafe extern "C" fn(Instance, Ctx, ino: u64, fh: u64) -> c_int>,
    pub release:
        Option<unsafe extern "C" fn(Instance, Ctx, ino: u64, fh: u64, flags: i32) -> c_int>,
    pub fsync:
        Option<unsafe extern "C" fn(Instance, Ctx, ino: u64, fh: u64, datasync: c_int) -> c_int>,
    pub opendir:
        Option<unsafe extern "C" fn(Instance, Ctx, ino: u64, flags: i32, fh: *mut u64) -> c_int>,
    pub readdir: Option<
        unsafe extern "C" fn(
            Instance,
            Ctx,
            ino: u64,
            fh: u64,
            offset: u64,
            fill: FillDir,
            fill_buf: *mut c_void,
        ) -> c_int,
    >,
    pub releasedir: Option<unsafe extern "C" fn(Instance, Ctx, ino: u64, fh: u64) -> c_int>,
    pub statfs: Option<unsafe extern "C" fn(Instance, Ctx, ino: u64, out: *mut Statfs) -> c_int>,
    pub setxattr: Option<
        unsafe extern "C" fn(
            Instance,
            Ctx,
            ino: u64,
            name: *const c_char,
            value: *const u8,
            size: usize,
            flags: i32,
        ) -> c_int,
    >,
    /// With `cap == 0` only `*len` (the value's size) is set; a too-small `cap` gives `ERANGE`.
    pub getxattr: Option<
        unsafe extern "C" fn(
            Instance,
            Ctx,
            ino: u64,
            name: *const c_char,
            buf: *mut u8,
            cap: usize,
            len: *mut usize,
        ) -> c_int,
    >,
    /// Names, each NUL-terminated; `cap` works as for `getxattr`.
    pub listxattr: Option<
        unsafe extern "C" fn(
            Instance,
            Ctx,
            ino: u64,
            buf: *mut u8,
            cap: usize,
            len: *mut usize,
        ) -> c_int,
    >,
    pub removexattr:
        Option<unsafe extern "C" fn(Instance, Ctx, ino: u64, name: *const c_char) -> c_int>,
    pub create_file: Option<
        unsafe extern "C" fn(
            Instance,
            Ctx,
            parent: u64,
            name: *const c_char,
            mode: u32,
            flags: i32,
            out: *mut Attr,
            fh: *mut u64,
        ) -> c_int,
    >,

    // ---- Appended after the first release: present when `struct_size` covers them. ----
    /// FUSE passthrough: like `open`, and may also hand over an open file descriptor of the
    /// backing file in `*backing_fd` (or leave it at -1). The host owns that fd from then
    /// on. With it, the kernel reads and writes the backing file directly; `read`/`write`
    /// stay the fallback where the kernel cannot do passthrough.
    pub open_backing: Option<
        unsafe extern "C" fn(
            Instance,
            Ctx,
            ino: u64,
            flags: i32,
            fh: *mut u64,
            backing_fd: *mut c_int,
        ) -> c_int,
    >,
    /// FUSE passthrough for `create_file`, as `open_backing` is for `open`.
    pub create_backing: Option<
        unsafe extern "C" fn(
            Instance,
            Ctx,
            parent: u64,
            name: *const c_char,
            mode: u32,
            flags: i32,
            out: *mut Attr,
            fh: *mut u64,
            backing_fd: *mut c_int,
        ) -> c_int,
    >,
}

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

/// The type of `fshost_plugin_entry`.
pub type EntryFn = unsafe extern "C" fn() -> *const PluginDescriptor;
