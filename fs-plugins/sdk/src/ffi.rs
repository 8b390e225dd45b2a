//! The plugin side of the C ABI: `extern "C"` wrappers that turn host calls into safe
//! [`Plugin`] calls. All `unsafe` of the SDK lives here.
//!
//! Host contract (see `abi.rs` and `include/fshost_plugin.h`): the instance pointer is the one
//! this plugin's `create` returned and is not yet destroyed; `ctx`, names and output pointers
//! are valid, aligned and exclusively ours for the duration of the call; buffers are
//! initialized memory of the given length.

use std::ffi::{c_char, c_int, c_void, CStr, CString, OsStr};
use std::marker::PhantomData;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Mutex;

use crate::abi::{
    self, Attr, Context, FillDir, Instance, MountOption, PluginDescriptor, Setattr, ShareFd,
    Statfs, TakeFd, WriteState,
};
#[allow(unused_imports)] // the names the operation table uses
use crate::ops::vocabulary::*;
use crate::{Errno, Options, Plugin, Result};

/// Message of the last panic a wrapper contained; read by the host through `last_panic`.
/// A plain static (not a thread-local) so that it never keeps the library mapped.
static LAST_PANIC: Mutex<String> = Mutex::new(String::new());

/// Runs one plugin call: maps `Ok` to 0, `Err` to its errno, and a panic to [`abi::PANICKED`].
fn guard(op: &'static str, f: impl FnOnce() -> Result<()>) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => 0,
        Ok(Err(Errno(e))) if e > 0 => e,
        Ok(Err(_)) => libc::EIO,
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".to_string());
            let mut last = LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner());
            *last = format!("panic in {op}: {what}");
            abi::PANICKED
        }
    }
}

/// Copies a variable-length answer into a host buffer (`cap == 0` asks for the size only).
///
/// # Safety
/// `buf` is valid for `cap` bytes and `len` is valid for a write.
unsafe fn copy_out(data: &[u8], buf: *mut u8, cap: usize, len: *mut usize) -> Result<()> {
    // SAFETY: the caller guarantees `len` is writable.
    unsafe { len.write(data.len()) };
    if cap == 0 {
        return Ok(());
    }
    if data.len() > cap {
        return Err(Errno::ERANGE);
    }
    // SAFETY: `buf` has room for `cap >= data.len()` bytes and cannot overlap `data`,
    // which the plugin owns.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buf, data.len()) };
    Ok(())
}

/// A [`FillDir`] that hands each entry to a Rust closure: `buf` must point to a
/// `&mut dyn FnMut(ino, next_offset, mode, name) -> bool` (true: the reply is full) that
/// stays valid for the whole `readdir` call. Hosts pass it to a plugin's `readdir`.
///
/// # Safety
/// `buf` as above; `name` a C string valid during the call.
pub unsafe extern "C" fn fill_closure(
    buf: *mut c_void,
    ino: u64,
    next_offset: u64,
    mode: u32,
    name: *const c_char,
) -> c_int {
    if name.is_null() {
        return 0;
    }
    // SAFETY: the caller guarantees what `buf` points to and that `name` is a C string.
    let (add, name) = unsafe {
        (
            &mut *buf.cast::<&mut dyn FnMut(u64, u64, u32, &OsStr) -> bool>(),
            CStr::from_ptr(name),
        )
    };
    c_int::from(add(
        ino,
        next_offset,
        mode,
        OsStr::from_bytes(name.to_bytes()),
    ))
}

/// Adds directory entries to a `readdir` reply that the host owns.
///
/// The lifetime ties a filler to the listing it belongs to, so that safe code cannot keep
/// one (or swap two made by nested [`DirFiller::over`] calls) past that listing.
pub struct DirFiller<'a> {
    fill: FillDir,
    buf: *mut c_void,
    listing: PhantomData<&'a mut c_void>,
}

impl DirFiller<'_> {
    /// Adds one entry; returns true when the reply is full (this entry was not added).
    /// `mode` needs only the file type bits; `next_offset` is where the next call resumes.
    pub fn add(&mut self, ino: u64, next_offset: u64, mode: u32, name: &OsStr) -> bool {
        let Ok(name) = CString::new(name.as_bytes()) else {
            return false; // a name with a NUL byte cannot exist; skip it
        };
        // SAFETY: `fill` and `buf` come from the host's readdir call, which is still running.
        unsafe { (self.fill)(self.buf, ino, next_offset, mode, name.as_ptr()) != 0 }
    }

    /// Runs `list` with a filler whose entries go to `add(ino, next_offset, mode, name)`
    /// (which returns true when the reply is full): for hosts that call a [`Plugin`]
    /// directly instead of through the C ABI, and for testing a plugin's `readdir`.
    ///
    /// A filler cannot leave its listing, not even by swapping it with another one:
    ///
    /// ```compile_fail
    /// use fshost_sdk::DirFiller;
    /// let (mut a, mut b) = (|_, _, _, _: &_| false, |_, _, _, _: &_| false);
    /// DirFiller::over(&mut a, |outer| {
    ///     DirFiller::over(&mut b, |inner| std::mem::swap(outer, inner));
    /// });
    /// ```
    pub fn over<R>(
        mut add: &mut dyn FnMut(u64, u64, u32, &OsStr) -> bool,
        list: impl FnOnce(&mut DirFiller<'_>) -> R,
    ) -> R {
        let buf = (&mut add as *mut &mut dyn FnMut(u64, u64, u32, &OsStr) -> bool).cast();
        list(&mut DirFiller {
            fill: fill_closure,
            buf,
            listing: PhantomData,
        })
    }

    /// Lists a fixed set of `(ino, mode, name)` entries from `offset` on, each resuming at
    /// its index + 1: all a directory of a few static entries needs.
    pub fn add_entries(&mut self, offset: u64, entries: &[(u64, u32, &str)]) {
        for (i, (ino, mode, name)) in entries.iter().enumerate().skip(offset as usize) {
            if self.add(*ino, i as u64 + 1, *mode, OsStr::new(name)) {
                break;
            }
        }
    }
}

/// # Safety
/// `inst` came from `create::<T>` and is not destroyed yet.
unsafe fn fs<'a, T: Plugin>(inst: Instance) -> &'a T {
    // SAFETY: per the function contract it points to a live `T` made by `Box::into_raw`.
    unsafe { &*(inst as *const T) }
}

/// # Safety
/// `p` is a valid NUL-terminated string that outlives the call.
unsafe fn os<'a>(p: *const c_char) -> &'a OsStr {
    // SAFETY: per the function contract.
    OsStr::from_bytes(unsafe { CStr::from_ptr(p) }.to_bytes())
}

unsafe extern "C" fn on_load<T: Plugin>() -> c_int {
    guard("on_load", T::on_load)
}

unsafe extern "C" fn on_unload<T: Plugin>() -> c_int {
    guard("on_unload", || {
        T::on_unload();
        Ok(())
    })
}

unsafe extern "C" fn last_panic(buf: *mut c_char, cap: usize) -> usize {
    let last = LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner());
    let n = last.len().min(cap);
    // SAFETY: the host passes a buffer valid for `cap` bytes; `n <= cap`.
    unsafe { std::ptr::copy_nonoverlapping(last.as_ptr(), buf.cast::<u8>(), n) };
    last.len()
}

unsafe extern "C" fn create<T: Plugin>(
    options: *const MountOption,
    count: usize,
    out: *mut Instance,
) -> c_int {
    guard("create", || {
        let mut map = std::collections::BTreeMap::new();
        if count > 0 {
            // SAFETY: host contract: `options` points to `count` pairs of valid C strings.
            let pairs = unsafe { std::slice::from_raw_parts(options, count) };
            for pair in pairs {
                // SAFETY: as above.
                let (key, value) =
                    unsafe { (CStr::from_ptr(pair.key), CStr::from_ptr(pair.value)) };
                map.insert(
                    key.to_string_lossy().into_owned(),
                    value.to_string_lossy().into_owned(),
                );
            }
        }
        let instance = Box::new(T::create(&Options(map))?);
        // SAFETY: host contract: `out` is valid for a write.
        unsafe { out.write(Box::into_raw(instance).cast()) };
        Ok(())
    })
}

unsafe extern "C" fn destroy<T: Plugin>(inst: Instance) -> c_int {
    guard("destroy", || {
        if !inst.is_null() {
            // SAFETY: host contract: `inst` came from `create::<T>` and is destroyed exactly once.
            drop(unsafe { Box::from_raw(inst.cast::<T>()) });
        }
        Ok(())
    })
}

/// Declares, from the operation table (`ops.rs`), the `extern "C"` wrapper of every
/// operation and `descriptor`, which puts them in a descriptor.
macro_rules! wrappers {
    ($(
        $(#[$attr:meta])* $([when $cond:ident])?
        fn $name:ident(&$recv:ident $(, $arg:ident : $ty:ty => [$($p:ident : $pt:ty),*])*)
            -> $out:ty => [$($o:ident : $ot:ty),*] $body:tt
    )*) => {
        $(
            unsafe extern "C" fn $name<T: Plugin>(
                inst: Instance,
                $($($p: $pt,)*)*
                $($o: $ot,)*
            ) -> c_int {
                guard(stringify!($name), || {
                    // SAFETY: host contract (module docs): `inst` is a live instance of `T`,
                    // every argument is valid for this call as its `Incoming` impl needs,
                    // and the out-parameters are writable.
                    unsafe {
                        $(let mut $arg = <$ty as Incoming<'_>>::receive(($($p,)*));)*
                        let result = fs::<T>(inst).$name($(<$ty as Incoming<'_>>::lend(&mut $arg)),*)?;
                        <$out as Output>::put(result, ($($o,)*))
                    }
                })
            }
        )*

        /// Builds the descriptor for `T`; used by [`crate::export_plugin!`].
        pub const fn descriptor<T: Plugin>(
            name: *const c_char,
            version: *const c_char,
        ) -> PluginDescriptor {
            PluginDescriptor {
                magic: abi::MAGIC,
                abi_version: abi::ABI_VERSION,
                struct_size: std::mem::size_of::<PluginDescriptor>() as u32,
                name,
                version,
                on_load: Some(on_load::<T>),
                on_unload: Some(on_unload::<T>),
                last_panic: Some(last_panic),
                create: Some(create::<T>),
                destroy: Some(destroy::<T>),
                $($name: if true $(&& T::$cond)? { Some($name::<T>) } else { None },)*
            }
        }
    };
}

crate::operations!(wrappers);

/// A [`WriteState`] that hands each chunk to a Rust closure: `buf` must point to a
/// [`ExportSinks`] valid for the whole call.
///
/// # Safety
/// `buf` as above; `data` valid for `len` bytes.
unsafe extern "C" fn write_closure(buf: *mut c_void, data: *const u8, len: usize) -> c_int {
    // SAFETY: the caller guarantees what `buf` points to.
    let sinks = unsafe { &mut *buf.cast::<ExportSinks<'_, '_>>() };
    let chunk = if len == 0 {
        &[][..]
    } else {
        // SAFETY: the caller guarantees `data` is valid for `len` bytes.
        unsafe { std::slice::from_raw_parts(data, len) }
    };
    if (sinks.bytes)(chunk) {
        0
    } else {
        libc::ENOSPC
    }
}

/// A [`ShareFd`] that keeps a duplicate of `fd` in the [`ExportSinks`] `buf` points to.
///
/// # Safety
/// `buf` as for [`write_closure`]; `fd` an open descriptor of the caller's.
unsafe extern "C" fn share_closure(buf: *mut c_void, fd: c_int) -> c_int {
    // SAFETY: the caller guarantees what `buf` points to.
    let sinks = unsafe { &mut *buf.cast::<ExportSinks<'_, '_>>() };
    if fd < 0 {
        return -libc::EBADF;
    }
    // SAFETY: the caller (the exporting instance) owns `fd` and keeps it open during
    // this call; we only duplicate it.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    match borrowed.try_clone_to_owned() {
        Ok(copy) => match c_int::try_from(sinks.fds.len()) {
            Ok(index) => {
                sinks.fds.push(copy);
                index
            }
            Err(_) => -libc::EMFILE,
        },
        Err(e) => -e.raw_os_error().unwrap_or(libc::EBADF),
    }
}

/// Where [`StateWriter::over`] sends an export: bytes to a closure, descriptors into a list.
struct ExportSinks<'s, 'f> {
    bytes: &'s mut dyn FnMut(&[u8]) -> bool,
    fds: &'f mut Vec<OwnedFd>,
}

/// Where an `export_state` writes the instance's state; an [`std::io::Write`] whose bytes
/// go straight to the host. Descriptors the state needs (open files) are named with
/// [`StateWriter::share_fd`]. The lifetime ties it to the export it belongs to.
pub struct StateWriter<'a> {
    write: WriteState,
    share: ShareFd,
    buf: *mut c_void,
    export: PhantomData<&'a mut c_void>,
}

impl StateWriter<'_> {
    /// Runs `export` with a writer whose bytes go to `sink` (false: no more room) and whose
    /// shared descriptors are duplicated into `fds`: for hosts, and for testing a plugin's
    /// `export_state` (then hand `fds` to [`SavedState::over`]).
    pub fn over<R>(
        sink: &mut dyn FnMut(&[u8]) -> bool,
        fds: &mut Vec<OwnedFd>,
        export: impl FnOnce(&mut StateWriter<'_>) -> R,
    ) -> R {
        let mut sinks = ExportSinks { bytes: sink, fds };
        let buf = (&mut sinks as *mut ExportSinks<'_, '_>).cast();
        export(&mut StateWriter {
            write: write_closure,
            share: share_closure,
            buf,
            export: PhantomData,
        })
    }

    /// Names an open descriptor of this instance in the state: the host keeps its own
    /// duplicate, so that the new instance can take one ([`SavedState::fd`]) while this
    /// one, paused but alive, keeps the original. Nothing is handed over by ownership, so
    /// nothing leaks when an upgrade fails and is rolled back. The descriptor may cross to
    /// another process (a daemon upgrade): the number in the state is an index, not the fd.
    pub fn share_fd(&mut self, fd: &impl std::os::fd::AsFd) -> Result<SharedFd> {
        use std::os::fd::AsRawFd;
        // SAFETY: `share` and `buf` come from the host's export_state call, still running;
        // the descriptor is ours and open for the call.
        match unsafe { (self.share)(self.buf, fd.as_fd().as_raw_fd()) } {
            index if index >= 0 => Ok(SharedFd(index as u32)),
            e => Err(Errno(-e)),
        }
    }
}

impl std::io::Write for StateWriter<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        // SAFETY: `write` and `buf` come from the host's export_state call, still running.
        match unsafe { (self.write)(self.buf, data.as_ptr(), data.len()) } {
            0 => Ok(data.len()),
            e => Err(std::io::Error::from_raw_os_error(e)),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'h, 'w: 'h> Incoming<'h> for &'h mut StateWriter<'w> {
    type Abi = (WriteState, ShareFd, *mut c_void);
    type Held = StateWriter<'w>;
    unsafe fn receive((write, share, buf): (WriteState, ShareFd, *mut c_void)) -> StateWriter<'w> {
        StateWriter {
            write,
            share,
            buf,
            export: PhantomData,
        }
    }
    fn lend(held: &'h mut StateWriter<'w>) -> &'h mut StateWriter<'w> {
        held
    }
}

impl<'a, 'w> Outgoing for &'a mut StateWriter<'w> {
    type Held = &'a mut StateWriter<'w>;
    type Abi = (WriteState, ShareFd, *mut c_void);
    fn hold(self) -> Result<Self> {
        Ok(self)
    }
    fn abi(held: &mut Self) -> (WriteState, ShareFd, *mut c_void) {
        (held.write, held.share, held.buf)
    }
}

/// A descriptor named in a saved state ([`StateWriter::share_fd`]); the importing instance
/// takes its own duplicate with [`SavedState::fd`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SharedFd(u32);

/// What an `import_state` gets: the bytes the previous generation wrote (it derefs to
/// them) and the descriptors it shared.
pub struct SavedState<'a> {
    bytes: &'a [u8],
    take: TakeFd,
    fds: *mut c_void,
}

/// A [`TakeFd`] over a `&[OwnedFd]`.
///
/// # Safety
/// `fds` points to a `&[OwnedFd]` valid for the whole import call.
unsafe extern "C" fn take_from_slice(fds: *mut c_void, index: u32) -> c_int {
    use std::os::fd::IntoRawFd;
    // SAFETY: the caller guarantees what `fds` points to.
    let fds = unsafe { &*fds.cast::<&[OwnedFd]>() };
    match fds.get(index as usize).map(OwnedFd::try_clone) {
        Some(Ok(copy)) => copy.into_raw_fd(),
        Some(Err(e)) => -e.raw_os_error().unwrap_or(libc::EBADF),
        None => -libc::EBADF,
    }
}

impl<'a> SavedState<'a> {
    /// Runs `import` with the state `bytes` and the descriptors `fds` it names (as
    /// [`StateWriter::over`] collected them): for hosts, and for tests.
    pub fn over<R>(bytes: &[u8], fds: &[OwnedFd], import: impl FnOnce(&SavedState<'_>) -> R) -> R {
        let mut fds = fds;
        let state = SavedState {
            bytes,
            take: take_from_slice,
            fds: (&mut fds as *mut &[OwnedFd]).cast(),
        };
        import(&state)
    }

    /// The instance's own duplicate of a descriptor the state names.
    pub fn fd(&self, shared: SharedFd) -> std::io::Result<OwnedFd> {
        // SAFETY: `take` and `fds` come from the host's import_state call, still running.
        match unsafe { (self.take)(self.fds, shared.0) } {
            // SAFETY: the host made this descriptor for us alone and gave it up.
            fd if fd >= 0 => Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
            e => Err(std::io::Error::from_raw_os_error(-e)),
        }
    }
}

impl std::ops::Deref for SavedState<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.bytes
    }
}

impl<'h, 'a: 'h> Incoming<'h> for &'h SavedState<'a> {
    type Abi = (*const u8, usize, TakeFd, *mut c_void);
    type Held = SavedState<'a>;
    unsafe fn receive(
        (p, len, take, fds): (*const u8, usize, TakeFd, *mut c_void),
    ) -> SavedState<'a> {
        let bytes = if len == 0 {
            &[][..]
        } else {
            // SAFETY: per the function contract, `p` is valid for `len` bytes.
            unsafe { std::slice::from_raw_parts(p, len) }
        };
        SavedState { bytes, take, fds }
    }
    fn lend(held: &'h mut SavedState<'a>) -> &'h SavedState<'a> {
        held
    }
}

impl<'s, 'a> Outgoing for &'s SavedState<'a> {
    type Held = &'s SavedState<'a>;
    type Abi = (*const u8, usize, TakeFd, *mut c_void);
    fn hold(self) -> Result<Self> {
        Ok(self)
    }
    fn abi(held: &mut Self) -> (*const u8, usize, TakeFd, *mut c_void) {
        (held.bytes.as_ptr(), held.bytes.len(), held.take, held.fds)
    }
}

/// The plugin's side of an argument: how it arrives through the C ABI (`Abi`, a tuple of
/// the C parameters), what the wrapper holds during the call, and what the plugin's method
/// gets (`lend`).
pub trait Incoming<'h>: Sized {
    type Abi;
    type Held: 'h;
    /// # Safety
    /// The C parameters are valid for this call as the ABI describes them.
    unsafe fn receive(abi: Self::Abi) -> Self::Held;
    fn lend(held: &'h mut Self::Held) -> Self;
}

/// The host's side of an argument: what must live through the call (`hold`; a name with a
/// NUL byte is `EINVAL`) and the C parameters it passes (`abi`).
pub trait Outgoing: Sized {
    type Held;
    type Abi;
    fn hold(self) -> Result<Self::Held>;
    fn abi(held: &mut Self::Held) -> Self::Abi;
}

/// A plain value crosses as itself.
macro_rules! plain {
    ($($t:ty),*) => {$(
        impl<'h> Incoming<'h> for $t {
            type Abi = ($t,);
            type Held = $t;
            unsafe fn receive((v,): ($t,)) -> $t {
                v
            }
            fn lend(held: &'h mut $t) -> $t {
                *held
            }
        }
        impl Outgoing for $t {
            type Held = $t;
            type Abi = ($t,);
            fn hold(self) -> Result<$t> {
                Ok(self)
            }
            fn abi(held: &mut $t) -> ($t,) {
                (*held,)
            }
        }
    )*};
}
plain!(u64, u32, i32);

impl<'h> Incoming<'h> for bool {
    type Abi = (c_int,);
    type Held = bool;
    unsafe fn receive((v,): (c_int,)) -> bool {
        v != 0
    }
    fn lend(held: &'h mut bool) -> bool {
        *held
    }
}

impl Outgoing for bool {
    type Held = bool;
    type Abi = (c_int,);
    fn hold(self) -> Result<bool> {
        Ok(self)
    }
    fn abi(held: &mut bool) -> (c_int,) {
        (c_int::from(*held),)
    }
}

/// A reference to one C struct (`Context`, `Setattr`) crosses as a pointer.
macro_rules! by_pointer {
    ($($t:ty),*) => {$(
        impl<'h, 'a: 'h> Incoming<'h> for &'a $t {
            type Abi = (*const $t,);
            type Held = &'a $t;
            unsafe fn receive((p,): (*const $t,)) -> &'a $t {
                // SAFETY: per the function contract, `p` points to a valid value.
                unsafe { &*p }
            }
            fn lend(held: &'h mut &'a $t) -> &'a $t {
                held
            }
        }
        impl<'a> Outgoing for &'a $t {
            type Held = &'a $t;
            type Abi = (*const $t,);
            fn hold(self) -> Result<&'a $t> {
                Ok(self)
            }
            fn abi(held: &mut &'a $t) -> (*const $t,) {
                (*held,)
            }
        }
    )*};
}
by_pointer!(Context, Setattr);

impl<'h, 'a: 'h> Incoming<'h> for &'a OsStr {
    type Abi = (*const c_char,);
    type Held = &'a OsStr;
    unsafe fn receive((p,): (*const c_char,)) -> &'a OsStr {
        // SAFETY: per the function contract, a NUL-terminated string valid for the call.
        unsafe { os(p) }
    }
    fn lend(held: &'h mut &'a OsStr) -> &'a OsStr {
        held
    }
}

impl Outgoing for &OsStr {
    type Held = CString;
    type Abi = (*const c_char,);
    fn hold(self) -> Result<CString> {
        CString::new(self.as_bytes()).map_err(|_| Errno::EINVAL)
    }
    fn abi(held: &mut CString) -> (*const c_char,) {
        (held.as_ptr(),)
    }
}

impl<'h, 'a: 'h> Incoming<'h> for &'a [u8] {
    type Abi = (*const u8, usize);
    type Held = &'a [u8];
    unsafe fn receive((p, len): (*const u8, usize)) -> &'a [u8] {
        if len == 0 {
            return &[];
        }
        // SAFETY: per the function contract, `p` is valid for `len` bytes.
        unsafe { std::slice::from_raw_parts(p, len) }
    }
    fn lend(held: &'h mut &'a [u8]) -> &'a [u8] {
        held
    }
}

impl<'a> Outgoing for &'a [u8] {
    type Held = &'a [u8];
    type Abi = (*const u8, usize);
    fn hold(self) -> Result<&'a [u8]> {
        Ok(self)
    }
    fn abi(held: &mut &'a [u8]) -> (*const u8, usize) {
        (held.as_ptr(), held.len())
    }
}

impl<'h> Incoming<'h> for &'h mut [u8] {
    type Abi = (*mut u8, usize);
    type Held = &'h mut [u8];
    unsafe fn receive((p, len): (*mut u8, usize)) -> &'h mut [u8] {
        if len == 0 {
            return &mut [];
        }
        // SAFETY: per the function contract, `p` is initialized memory valid for `len`
        // bytes that nothing else uses during the call.
        unsafe { std::slice::from_raw_parts_mut(p, len) }
    }
    fn lend(held: &'h mut &'h mut [u8]) -> &'h mut [u8] {
        held
    }
}

impl<'a> Outgoing for &'a mut [u8] {
    type Held = &'a mut [u8];
    type Abi = (*mut u8, usize);
    fn hold(self) -> Result<&'a mut [u8]> {
        Ok(self)
    }
    fn abi(held: &mut &'a mut [u8]) -> (*mut u8, usize) {
        (held.as_mut_ptr(), held.len())
    }
}

impl<'h, 'd: 'h> Incoming<'h> for &'h mut DirFiller<'d> {
    type Abi = (FillDir, *mut c_void);
    type Held = DirFiller<'d>;
    unsafe fn receive((fill, buf): (FillDir, *mut c_void)) -> DirFiller<'d> {
        DirFiller {
            fill,
            buf,
            listing: PhantomData,
        }
    }
    fn lend(held: &'h mut DirFiller<'d>) -> &'h mut DirFiller<'d> {
        held
    }
}

impl<'a, 'd> Outgoing for &'a mut DirFiller<'d> {
    type Held = &'a mut DirFiller<'d>;
    type Abi = (FillDir, *mut c_void);
    fn hold(self) -> Result<Self> {
        Ok(self)
    }
    fn abi(held: &mut Self) -> (FillDir, *mut c_void) {
        (held.fill, held.buf)
    }
}

/// A result, both ways: the plugin's side writes it to the host's out-parameters (`put`),
/// the host's side provides them and reads it back (`receive`).
pub trait Output: Sized {
    /// The out-parameters, as a tuple.
    type Ptrs;
    /// # Safety
    /// Every out-parameter is valid for a write.
    unsafe fn put(self, ptrs: Self::Ptrs) -> Result<()>;
    /// Runs `call` (the plugin call) with out-parameters and reads them back; `Err` holds
    /// the plugin's nonzero return code.
    fn receive(call: &mut dyn FnMut(Self::Ptrs) -> c_int) -> std::result::Result<Self, c_int>;
}

/// One out-parameter of a result.
pub trait OutPart: Sized {
    type Ptr;
    type Slot;
    fn slot() -> Self::Slot;
    fn ptr(slot: &mut Self::Slot) -> Self::Ptr;
    fn take(slot: Self::Slot) -> Self;
    /// # Safety
    /// `ptr` is valid for a write.
    unsafe fn put(self, ptr: Self::Ptr);
}

macro_rules! value_part {
    ($($t:ty),*) => {$(
        impl OutPart for $t {
            type Ptr = *mut $t;
            type Slot = $t;
            fn slot() -> $t {
                <$t>::default()
            }
            fn ptr(slot: &mut $t) -> *mut $t {
                slot
            }
            fn take(slot: $t) -> $t {
                slot
            }
            unsafe fn put(self, ptr: *mut $t) {
                // SAFETY: per the function contract.
                unsafe { ptr.write(self) }
            }
        }
    )*};
}
value_part!(Attr, Statfs, Timespec, u32, u64, usize);

/// A backing file handed to the host: a descriptor it owns from then on, or -1.
impl OutPart for Option<OwnedFd> {
    type Ptr = *mut c_int;
    type Slot = c_int;
    fn slot() -> c_int {
        -1
    }
    fn ptr(slot: &mut c_int) -> *mut c_int {
        slot
    }
    fn take(fd: c_int) -> Option<OwnedFd> {
        // SAFETY: the ABI transfers ownership of a non-negative `backing_fd` to the host;
        // the plugin no longer uses or closes it, so this is its only owner.
        (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
    }
    unsafe fn put(self, ptr: *mut c_int) {
        // SAFETY: per the function contract; the fd's ownership passes to the host.
        unsafe { ptr.write(self.map_or(-1, IntoRawFd::into_raw_fd)) }
    }
}

impl Output for () {
    type Ptrs = ();
    unsafe fn put(self, (): ()) -> Result<()> {
        Ok(())
    }
    fn receive(call: &mut dyn FnMut(()) -> c_int) -> std::result::Result<(), c_int> {
        match call(()) {
            0 => Ok(()),
            rc => Err(rc),
        }
    }
}

impl<A: OutPart> Output for A {
    type Ptrs = (A::Ptr,);
    unsafe fn put(self, (a,): Self::Ptrs) -> Result<()> {
        // SAFETY: per the function contract.
        unsafe { OutPart::put(self, a) };
        Ok(())
    }
    fn receive(call: &mut dyn FnMut(Self::Ptrs) -> c_int) -> std::result::Result<Self, c_int> {
        let mut a = A::slot();
        match call((A::ptr(&mut a),)) {
            0 => Ok(A::take(a)),
            rc => Err(rc),
        }
    }
}

impl<A: OutPart, B: OutPart> Output for (A, B) {
    type Ptrs = (A::Ptr, B::Ptr);
    unsafe fn put(self, (a, b): Self::Ptrs) -> Result<()> {
        // SAFETY: per the function contract.
        unsafe {
            self.0.put(a);
            self.1.put(b);
        }
        Ok(())
    }
    fn receive(call: &mut dyn FnMut(Self::Ptrs) -> c_int) -> std::result::Result<Self, c_int> {
        let (mut a, mut b) = (A::slot(), B::slot());
        match call((A::ptr(&mut a), B::ptr(&mut b))) {
            0 => Ok((A::take(a), B::take(b))),
            rc => Err(rc),
        }
    }
}

impl<A: OutPart, B: OutPart, C: OutPart> Output for (A, B, C) {
    type Ptrs = (A::Ptr, B::Ptr, C::Ptr);
    unsafe fn put(self, (a, b, c): Self::Ptrs) -> Result<()> {
        // SAFETY: per the function contract.
        unsafe {
            self.0.put(a);
            self.1.put(b);
            self.2.put(c);
        }
        Ok(())
    }
    fn receive(call: &mut dyn FnMut(Self::Ptrs) -> c_int) -> std::result::Result<Self, c_int> {
        let (mut a, mut b, mut c) = (A::slot(), B::slot(), C::slot());
        match call((A::ptr(&mut a), B::ptr(&mut b), C::ptr(&mut c))) {
            0 => Ok((A::take(a), B::take(b), C::take(c))),
            rc => Err(rc),
        }
    }
}

/// The most a variable-length answer may hold: the kernel's limit for an xattr value or
/// list (`XATTR_SIZE_MAX`); link targets are shorter still.
pub const MAX_SIZED: usize = 64 << 10;

/// A variable-length answer (`buf`, `cap`, `len`): `cap == 0` asks for the size only, a
/// too-small `cap` gives `ERANGE`. The host first offers a small buffer, which holds the
/// usual answer in one call; a larger answer takes a size query and one more call.
impl Output for Vec<u8> {
    type Ptrs = (*mut u8, usize, *mut usize);
    unsafe fn put(self, (buf, cap, len): Self::Ptrs) -> Result<()> {
        // SAFETY: per the function contract: `buf` valid for `cap` bytes, `len` writable.
        unsafe { copy_out(&self, buf, cap, len) }
    }
    fn receive(call: &mut dyn FnMut(Self::Ptrs) -> c_int) -> std::result::Result<Self, c_int> {
        let mut buf = vec![0u8; 256];
        // An answer that keeps growing between the size query and the call gets ERANGE
        // after a few tries.
        for _ in 0..4 {
            let mut len = 0usize;
            match call((buf.as_mut_ptr(), buf.len(), &mut len)) {
                0 => {
                    buf.truncate(len.min(buf.len()));
                    return Ok(buf);
                }
                libc::ERANGE => {
                    let mut len = 0usize;
                    match call((buf.as_mut_ptr(), 0, &mut len)) {
                        0 if len <= MAX_SIZED => buf = vec![0u8; len.max(1)],
                        0 => return Err(libc::E2BIG),
                        rc => return Err(rc),
                    }
                }
                rc => return Err(rc),
            }
        }
        Err(libc::ERANGE)
    }
}

/// `CLOCK_REALTIME_COARSE`, the clock behind the kernel's file times.
pub(crate) fn coarse_now() -> crate::Timespec {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; this clock id exists on every Linux the
    // host supports (2.6.32+), so the call cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
    crate::Timespec {
        sec: ts.tv_sec,
        nsec: ts.tv_nsec as u32,
        reserved: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `Vec<u8>`'s host side against its plugin side answering `value(call number)`;
    /// returns the answer and the number of calls.
    fn sized(value: impl Fn(usize) -> Vec<u8>) -> (std::result::Result<Vec<u8>, c_int>, usize) {
        let mut calls = 0;
        let answer = Vec::<u8>::receive(&mut |ptrs| {
            calls += 1;
            // SAFETY: `receive` passes a buffer valid for `cap` bytes and a writable `len`.
            match unsafe { value(calls).put(ptrs) } {
                Ok(()) => 0,
                Err(Errno(e)) => e,
            }
        });
        (answer, calls)
    }

    #[test]
    fn a_sized_answer_takes_one_call_or_a_size_query_and_one_more() {
        for size in [0, 1, 255, 256, 257, 4096, MAX_SIZED] {
            let value: Vec<u8> = (0..size).map(|i| i as u8).collect();
            let (answer, calls) = sized(|_| value.clone());
            assert_eq!(answer.as_deref(), Ok(&value[..]), "size {size}");
            assert_eq!(calls, if size <= 256 { 1 } else { 3 }, "size {size}");
        }
        assert_eq!(sized(|_| vec![0; MAX_SIZED + 1]).0, Err(libc::E2BIG));
        // An answer that grows between the size query and the call is asked for again,
        // a few times, then refused.
        let (answer, calls) = sized(|call| vec![1; 300 * call]);
        assert_eq!(answer, Err(libc::ERANGE));
        assert_eq!(calls, 8);
        let (answer, _) = sized(|call| vec![1; if call < 4 { 300 * call } else { 900 }]);
        assert_eq!(answer.map(|v| v.len()), Ok(900));
    }
}
