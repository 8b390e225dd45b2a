//! All `unsafe` of the daemon: `dlopen`, the ABI gate, and every call through a plugin's
//! vtable. Everything outside this file sees a safe [`Library`].
//!
//! Why the calls below are sound: the function pointers come from the plugin's descriptor
//! (copied at load) and point into the library, which stays mapped while `Library` lives
//! (it owns the handle; invariant 2 keeps it alive while any mount uses it). Every pointer we pass is
//! valid for the duration of the call, as the ABI (fs-plugins/sdk/src/abi.rs) requires.

// The wrappers mirror the C ABI one to one, arguments included.
#![allow(clippy::too_many_arguments)]

use std::ffi::{c_char, c_int, c_void, CStr, CString, OsStr};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Mutex;

use fshost_sdk::abi::{
    self, Attr, Context, EntryFn, MountOption, PluginDescriptor, Setattr, Statfs,
};
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
    #[error("it was built for plugin ABI version {found}, this fshostd speaks version {}; rebuild it against the matching fshost-sdk", abi::ABI_VERSION)]
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

/// Takes ownership of a file descriptor a plugin handed over (-1: none).
fn owned_fd(fd: c_int) -> Option<OwnedFd> {
    // SAFETY: the ABI transfers ownership of a non-negative `backing_fd` to the host; the
    // plugin no longer uses or closes it, so this is its only owner.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
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
        if prefix.abi_version != abi::ABI_VERSION {
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
        // `Option<fn>`), and the copied prefix is a valid descriptor of this ABI version.
        let copy = unsafe { copy.assume_init() };
        let d = &copy;
        // SAFETY: the descriptor's strings are static data inside the library.
        let (name, version) = unsafe {
            (
                read_string(d.name, "name")?,
                read_string(d.version, "version")?,
            )
        };
        if d.lookup.is_none() {
            return Err(GateError::MissingOp("lookup"));
        }
        if d.getattr.is_none() {
            return Err(GateError::MissingOp("getattr"));
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

    /// `open`, through `open_backing` when the plugin offers passthrough: then the backing
    /// file's descriptor, if the plugin handed one over, comes back too.
    pub fn open_backing(
        &self,
        inst: Instance,
        ctx: &Context,
        ino: u64,
        flags: i32,
    ) -> Result<(u64, Option<OwnedFd>), Errno> {
        let Some(f) = self.d().open_backing else {
            return self.open(inst, ctx, ino, flags).map(|fh| (fh, None));
        };
        let (mut fh, mut fd) = (0u64, -1 as c_int);
        // SAFETY: `inst` is live, `ctx` valid, both outputs writable.
        let rc = unsafe { f(inst.0, ctx, ino, flags, &mut fh, &mut fd) };
        self.check("open_backing", rc)?;
        Ok((fh, owned_fd(fd)))
    }

    /// `create_file`, through `create_backing` when the plugin offers passthrough.
    pub fn create_backing(
        &self,
        inst: Instance,
        ctx: &Context,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
    ) -> Result<(Attr, u64, Option<OwnedFd>), Errno> {
        let Some(f) = self.d().create_backing else {
            return self
                .create_file(inst, ctx, parent, name, mode, flags)
                .map(|(attr, fh)| (attr, fh, None));
        };
        let name = name.hold()?;
        let (mut attr, mut fh, mut fd) = (Attr::default(), 0u64, -1 as c_int);
        // SAFETY: `inst` is live, `ctx`/`name` valid, every output writable.
        let rc = unsafe {
            f(
                inst.0,
                ctx,
                parent,
                name.as_ptr(),
                mode,
                flags,
                &mut attr,
                &mut fh,
                &mut fd,
            )
        };
        self.check("create_backing", rc)?;
        Ok((attr, fh, owned_fd(fd)))
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
            abi::PANICKED => {
                let reason = self.last_panic();
                tracing::error!(op, %reason, "plugin panicked; answering EIO and marking it tainted");
                let mut taint = self.taint.lock().unwrap_or_else(|e| e.into_inner());
                taint.get_or_insert(reason);
                Err(Errno::EIO)
            }
            e if e > 0 => Err(Errno(e)),
            _ => Err(Errno::EIO),
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

    pub fn create(&self, options: &[(&CStr, &CStr)]) -> Result<Instance, Errno> {
        let Some(f) = self.d().create else {
            return Ok(Instance(std::ptr::null_mut()));
        };
        let pairs: Vec<MountOption> = options
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

    pub fn forget(&self, inst: Instance, ino: u64, nlookup: u64) {
        if let Some(f) = self.d().forget {
            // SAFETY: `inst` is a live instance.
            let _ = self.check("forget", unsafe { f(inst.0, ino, nlookup) });
        }
    }
}

/// Declares a vtable call that fills one output value.
macro_rules! call_out {
    ($name:ident($($arg:ident: $ty:ty),*) -> $out:ty) => {
        pub fn $name(&self, inst: Instance, ctx: &Context $(, $arg: $ty)*) -> Result<$out, Errno> {
            let f = self.d().$name.ok_or(Errno::ENOSYS)?;
            $(let $arg = $arg.hold()?;)*
            let mut out = <$out>::default();
            // SAFETY: `inst` is live, `ctx` and every argument (held above) are valid for the
            // call, and `out` is writable.
            let rc = unsafe { f(inst.0, ctx $(, $arg.abi())*, &mut out) };
            self.check(stringify!($name), rc).map(|()| out)
        }
    };
}

/// Declares a vtable call without output.
macro_rules! call_unit {
    ($name:ident($($arg:ident: $ty:ty),*)) => {
        pub fn $name(&self, inst: Instance, ctx: &Context $(, $arg: $ty)*) -> Result<(), Errno> {
            let f = self.d().$name.ok_or(Errno::ENOSYS)?;
            $(let $arg = $arg.hold()?;)*
            // SAFETY: `inst` is live; `ctx` and every argument (held above) are valid for the call.
            let rc = unsafe { f(inst.0, ctx $(, $arg.abi())*) };
            self.check(stringify!($name), rc)
        }
    };
}

/// How a safe argument crosses the ABI: `hold` makes what must live through the call (a
/// NUL-terminated copy of a name; a name with a NUL byte is EINVAL), `abi` passes it.
trait Hold {
    type Held: Held;
    fn hold(self) -> Result<Self::Held, Errno>;
}

trait Held {
    type Abi;
    fn abi(&self) -> Self::Abi;
}

macro_rules! plain_arg {
    ($($t:ty),*) => {$(
        impl Hold for $t {
            type Held = $t;
            fn hold(self) -> Result<$t, Errno> {
                Ok(self)
            }
        }
        impl Held for $t {
            type Abi = $t;
            fn abi(&self) -> $t {
                *self
            }
        }
    )*};
}
plain_arg!(u64, u32, i32);

impl Hold for &OsStr {
    type Held = CString;
    fn hold(self) -> Result<CString, Errno> {
        CString::new(self.as_bytes()).map_err(|_| Errno::EINVAL)
    }
}
impl Held for CString {
    type Abi = *const c_char;
    fn abi(&self) -> *const c_char {
        self.as_ptr()
    }
}
impl<'a> Hold for &'a Setattr {
    type Held = &'a Setattr;
    fn hold(self) -> Result<&'a Setattr, Errno> {
        Ok(self)
    }
}
impl Held for &Setattr {
    type Abi = *const Setattr;
    fn abi(&self) -> *const Setattr {
        *self
    }
}

impl Library {
    call_out!(lookup(parent: u64, name: &OsStr) -> Attr);
    call_out!(getattr(ino: u64) -> Attr);
    call_out!(setattr(ino: u64, set: &Setattr) -> Attr);
    call_out!(mknod(parent: u64, name: &OsStr, mode: u32, rdev: u32) -> Attr);
    call_out!(mkdir(parent: u64, name: &OsStr, mode: u32) -> Attr);
    call_out!(symlink(parent: u64, name: &OsStr, target: &OsStr) -> Attr);
    call_out!(link(ino: u64, newparent: u64, newname: &OsStr) -> Attr);
    call_out!(open(ino: u64, flags: i32) -> u64);
    call_out!(opendir(ino: u64, flags: i32) -> u64);
    call_out!(statfs(ino: u64) -> Statfs);
    call_unit!(unlink(parent: u64, name: &OsStr));
    call_unit!(rmdir(parent: u64, name: &OsStr));
    call_unit!(rename(parent: u64, name: &OsStr, newparent: u64, newname: &OsStr, flags: u32));
    call_unit!(flush(ino: u64, fh: u64));
    call_unit!(release(ino: u64, fh: u64, flags: i32));
    call_unit!(releasedir(ino: u64, fh: u64));
    call_unit!(removexattr(ino: u64, name: &OsStr));

    pub fn fsync(
        &self,
        inst: Instance,
        ctx: &Context,
        ino: u64,
        fh: u64,
        datasync: bool,
    ) -> Result<(), Errno> {
        let f = self.d().fsync.ok_or(Errno::ENOSYS)?;
        // SAFETY: `inst` is live and `ctx` valid for the call.
        let rc = unsafe { f(inst.0, ctx, ino, fh, c_int::from(datasync)) };
        self.check("fsync", rc)
    }

    pub fn create_file(
        &self,
        inst: Instance,
        ctx: &Context,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
    ) -> Result<(Attr, u64), Errno> {
        let f = self.d().create_file.ok_or(Errno::ENOSYS)?;
        let name = name.hold()?;
        let (mut attr, mut fh) = (Attr::default(), 0u64);
        // SAFETY: `inst` is live, `ctx`/`name` valid, both outputs writable.
        let rc = unsafe {
            f(
                inst.0,
                ctx,
                parent,
                name.as_ptr(),
                mode,
                flags,
                &mut attr,
                &mut fh,
            )
        };
        self.check("create_file", rc).map(|()| (attr, fh))
    }

    /// Reads into `buf`; returns how many bytes the plugin filled.
    pub fn read(
        &self,
        inst: Instance,
        ctx: &Context,
        ino: u64,
        fh: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, Errno> {
        let f = self.d().read.ok_or(Errno::ENOSYS)?;
        let mut len = 0usize;
        // SAFETY: `buf` is initialized and valid for `buf.len()` bytes; `len` is writable.
        let rc = unsafe {
            f(
                inst.0,
                ctx,
                ino,
                fh,
                offset,
                buf.as_mut_ptr(),
                buf.len(),
                &mut len,
            )
        };
        self.check("read", rc).map(|()| len.min(buf.len()))
    }

    pub fn write(
        &self,
        inst: Instance,
        ctx: &Context,
        ino: u64,
        fh: u64,
        offset: u64,
        data: &[u8],
        flags: i32,
    ) -> Result<usize, Errno> {
        let f = self.d().write.ok_or(Errno::ENOSYS)?;
        let mut written = 0usize;
        // SAFETY: `data` is valid for `data.len()` bytes; `written` is writable.
        let rc = unsafe {
            f(
                inst.0,
                ctx,
                ino,
                fh,
                offset,
                data.as_ptr(),
                data.len(),
                flags,
                &mut written,
            )
        };
        self.check("write", rc).map(|()| written.min(data.len()))
    }

    pub fn setxattr(
        &self,
        inst: Instance,
        ctx: &Context,
        ino: u64,
        name: &OsStr,
        value: &[u8],
        flags: i32,
    ) -> Result<(), Errno> {
        let f = self.d().setxattr.ok_or(Errno::ENOSYS)?;
        let name = name.hold()?;
        // SAFETY: `name` is a C string and `value` valid for its length, for the call.
        let rc = unsafe {
            f(
                inst.0,
                ctx,
                ino,
                name.as_ptr(),
                value.as_ptr(),
                value.len(),
                flags,
            )
        };
        self.check("setxattr", rc)
    }

    /// Variable-length answers: with `cap == 0` the plugin only reports the size.
    fn sized(
        &self,
        op: &'static str,
        cap: usize,
        call: impl FnOnce(*mut u8, usize, *mut usize) -> c_int,
    ) -> Result<Answer, Errno> {
        let mut buf = vec![0u8; cap];
        let mut len = 0usize;
        let rc = call(buf.as_mut_ptr(), cap, &mut len);
        self.check(op, rc)?;
        if cap == 0 {
            Ok(Answer::Size(len))
        } else {
            buf.truncate(len.min(cap));
            Ok(Answer::Data(buf))
        }
    }

    pub fn readlink(&self, inst: Instance, ctx: &Context, ino: u64) -> Result<Vec<u8>, Errno> {
        let f = self.d().readlink.ok_or(Errno::ENOSYS)?;
        let cap = libc::PATH_MAX as usize;
        // SAFETY: `sized` passes a buffer valid for `cap` bytes and a writable `len`.
        match self.sized("readlink", cap, |buf, cap, len| unsafe {
            f(inst.0, ctx, ino, buf, cap, len)
        })? {
            Answer::Data(target) => Ok(target),
            Answer::Size(_) => Err(Errno::EIO),
        }
    }

    pub fn getxattr(
        &self,
        inst: Instance,
        ctx: &Context,
        ino: u64,
        name: &OsStr,
        cap: usize,
    ) -> Result<Answer, Errno> {
        let f = self.d().getxattr.ok_or(Errno::ENOSYS)?;
        let name = name.hold()?;
        // SAFETY: `sized` passes a buffer valid for `cap` bytes and a writable `len`; `name`
        // is a C string.
        self.sized("getxattr", cap, |buf, cap, len| unsafe {
            f(inst.0, ctx, ino, name.as_ptr(), buf, cap, len)
        })
    }

    pub fn listxattr(
        &self,
        inst: Instance,
        ctx: &Context,
        ino: u64,
        cap: usize,
    ) -> Result<Answer, Errno> {
        let f = self.d().listxattr.ok_or(Errno::ENOSYS)?;
        // SAFETY: `sized` passes a buffer valid for `cap` bytes and a writable `len`.
        self.sized("listxattr", cap, |buf, cap, len| unsafe {
            f(inst.0, ctx, ino, buf, cap, len)
        })
    }

    /// Lists a directory from `offset`; `add(ino, next_offset, mode, name)` returns true when
    /// the reply is full.
    pub fn readdir(
        &self,
        inst: Instance,
        ctx: &Context,
        ino: u64,
        fh: u64,
        offset: u64,
        mut add: &mut dyn FnMut(u64, u64, u32, &OsStr) -> bool,
    ) -> Result<(), Errno> {
        let f = self.d().readdir.ok_or(Errno::ENOSYS)?;
        let buf = (&mut add as *mut &mut dyn FnMut(u64, u64, u32, &OsStr) -> bool).cast::<c_void>();
        // SAFETY: `buf` points to `add`, a `&mut dyn FnMut` as `fill_closure` needs, and
        // stays valid until the call returns.
        let rc = unsafe {
            f(
                inst.0,
                ctx,
                ino,
                fh,
                offset,
                fshost_sdk::ffi::fill_closure,
                buf,
            )
        };
        self.check("readdir", rc)
    }
}

/// A variable-length answer: the size asked for, or the data.
pub enum Answer {
    Size(usize),
    Data(Vec<u8>),
}

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
