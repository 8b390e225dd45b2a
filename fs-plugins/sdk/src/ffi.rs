//! The plugin side of the C ABI: `extern "C"` wrappers that turn host calls into safe
//! [`Plugin`] calls. All `unsafe` of the SDK lives here.
//!
//! Host contract (see `abi.rs` and `include/fshost_plugin.h`): the instance pointer is the one
//! this plugin's `create` returned and is not yet destroyed; `ctx`, names and output pointers
//! are valid, aligned and exclusively ours for the duration of the call; buffers are
//! initialized memory of the given length.

use std::ffi::{c_char, c_int, c_void, CStr, CString, OsStr};
use std::marker::PhantomData;
use std::os::fd::IntoRawFd;
use std::os::unix::ffi::OsStrExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Mutex;

use crate::abi::{
    self, Attr, Context, FillDir, Instance, MountOption, PluginDescriptor, Setattr, Statfs,
};
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
        lookup: Some(lookup::<T>),
        forget: Some(forget::<T>),
        getattr: Some(getattr::<T>),
        setattr: Some(setattr::<T>),
        readlink: Some(readlink::<T>),
        mknod: Some(mknod::<T>),
        mkdir: Some(mkdir::<T>),
        unlink: Some(unlink::<T>),
        rmdir: Some(rmdir::<T>),
        symlink: Some(symlink::<T>),
        rename: Some(rename::<T>),
        link: Some(link::<T>),
        open: Some(open::<T>),
        read: Some(read::<T>),
        write: Some(write::<T>),
        flush: Some(flush::<T>),
        release: Some(release::<T>),
        fsync: Some(fsync::<T>),
        opendir: Some(opendir::<T>),
        readdir: Some(readdir::<T>),
        releasedir: Some(releasedir::<T>),
        statfs: Some(statfs::<T>),
        setxattr: Some(setxattr::<T>),
        getxattr: Some(getxattr::<T>),
        listxattr: Some(listxattr::<T>),
        removexattr: Some(removexattr::<T>),
        create_file: Some(create_file::<T>),
        open_backing: if T::PASSTHROUGH {
            Some(open_backing::<T>)
        } else {
            None
        },
        create_backing: if T::PASSTHROUGH {
            Some(create_backing::<T>)
        } else {
            None
        },
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

/// Declares one wrapper: `$args` are converted by the body, which runs inside `guard`.
macro_rules! wrapper {
    ($name:ident ($($arg:ident : $ty:ty),*) $body:block) => {
        unsafe extern "C" fn $name<T: Plugin>(inst: Instance, ctx: *const Context, $($arg: $ty),*) -> c_int {
            guard(stringify!($name), || {
                // SAFETY: host contract (module docs): `inst` and `ctx` are valid for this call.
                let (fs, ctx) = unsafe { (fs::<T>(inst), &*ctx) };
                let result: Result<()> = ($body)(fs, ctx);
                result
            })
        }
    };
}

wrapper!(lookup(parent: u64, name: *const c_char, out: *mut Attr) {
    |fs: &T, ctx| {
        // SAFETY: host contract: `name` is a valid C string, `out` writable.
        unsafe { out.write(fs.lookup(ctx, parent, os(name))?) };
        Ok(())
    }
});

unsafe extern "C" fn forget<T: Plugin>(inst: Instance, ino: u64, nlookup: u64) -> c_int {
    guard("forget", || {
        // SAFETY: host contract: `inst` is valid for this call.
        unsafe { fs::<T>(inst) }.forget(ino, nlookup);
        Ok(())
    })
}

wrapper!(getattr(ino: u64, out: *mut Attr) {
    |fs: &T, ctx| {
        let attr = fs.getattr(ctx, ino)?;
        // SAFETY: host contract: `out` is writable.
        unsafe { out.write(attr) };
        Ok(())
    }
});

wrapper!(setattr(ino: u64, set: *const Setattr, out: *mut Attr) {
    |fs: &T, ctx| {
        // SAFETY: host contract: `set` is readable, `out` writable.
        unsafe { out.write(fs.setattr(ctx, ino, &*set)?) };
        Ok(())
    }
});

wrapper!(readlink(ino: u64, buf: *mut u8, cap: usize, len: *mut usize) {
    |fs: &T, ctx| {
        let target = fs.readlink(ctx, ino)?;
        // SAFETY: host contract: `buf` valid for `cap` bytes, `len` writable.
        unsafe { copy_out(&target, buf, cap, len) }
    }
});

wrapper!(mknod(parent: u64, name: *const c_char, mode: u32, rdev: u32, out: *mut Attr) {
    |fs: &T, ctx| {
        // SAFETY: host contract: `name` is a valid C string, `out` writable.
        unsafe { out.write(fs.mknod(ctx, parent, os(name), mode, rdev)?) };
        Ok(())
    }
});

wrapper!(mkdir(parent: u64, name: *const c_char, mode: u32, out: *mut Attr) {
    |fs: &T, ctx| {
        // SAFETY: host contract: `name` is a valid C string, `out` writable.
        unsafe { out.write(fs.mkdir(ctx, parent, os(name), mode)?) };
        Ok(())
    }
});

wrapper!(unlink(parent: u64, name: *const c_char) {
    |fs: &T, ctx| {
        // SAFETY: host contract: `name` is a valid C string.
        fs.unlink(ctx, parent, unsafe { os(name) })
    }
});

wrapper!(rmdir(parent: u64, name: *const c_char) {
    |fs: &T, ctx| {
        // SAFETY: host contract: `name` is a valid C string.
        fs.rmdir(ctx, parent, unsafe { os(name) })
    }
});

wrapper!(symlink(parent: u64, name: *const c_char, target: *const c_char, out: *mut Attr) {
    |fs: &T, ctx| {
        // SAFETY: host contract: `name`, `target` are valid C strings, `out` writable.
        unsafe { out.write(fs.symlink(ctx, parent, os(name), os(target))?) };
        Ok(())
    }
});

wrapper!(rename(parent: u64, name: *const c_char, newparent: u64, newname: *const c_char, flags: u32) {
    |fs: &T, ctx| {
        // SAFETY: host contract: both names are valid C strings.
        let (name, newname) = unsafe { (os(name), os(newname)) };
        fs.rename(ctx, parent, name, newparent, newname, flags)
    }
});

wrapper!(link(ino: u64, newparent: u64, newname: *const c_char, out: *mut Attr) {
    |fs: &T, ctx| {
        // SAFETY: host contract: `newname` is a valid C string, `out` writable.
        unsafe { out.write(fs.link(ctx, ino, newparent, os(newname))?) };
        Ok(())
    }
});

wrapper!(open(ino: u64, flags: i32, fh: *mut u64) {
    |fs: &T, ctx| {
        let handle = fs.open(ctx, ino, flags)?;
        // SAFETY: host contract: `fh` is writable.
        unsafe { fh.write(handle) };
        Ok(())
    }
});

wrapper!(read(ino: u64, fh: u64, offset: u64, buf: *mut u8, size: usize, len: *mut usize) {
    |fs: &T, ctx| {
        // SAFETY: host contract: `buf` is initialized memory valid for `size` bytes.
        let buf = unsafe { std::slice::from_raw_parts_mut(buf, size) };
        let n = fs.read(ctx, ino, fh, offset, buf)?.min(size);
        // SAFETY: host contract: `len` is writable.
        unsafe { len.write(n) };
        Ok(())
    }
});

wrapper!(write(ino: u64, fh: u64, offset: u64, data: *const u8, size: usize, flags: i32, written: *mut usize) {
    |fs: &T, ctx| {
        let data = if size == 0 {
            &[][..]
        } else {
            // SAFETY: host contract: `data` is valid for `size` bytes.
            unsafe { std::slice::from_raw_parts(data, size) }
        };
        let n = fs.write(ctx, ino, fh, offset, data, flags)?.min(size);
        // SAFETY: host contract: `written` is writable.
        unsafe { written.write(n) };
        Ok(())
    }
});

wrapper!(flush(ino: u64, fh: u64) {
    |fs: &T, ctx| fs.flush(ctx, ino, fh)
});

wrapper!(release(ino: u64, fh: u64, flags: i32) {
    |fs: &T, ctx| fs.release(ctx, ino, fh, flags)
});

wrapper!(fsync(ino: u64, fh: u64, datasync: c_int) {
    |fs: &T, ctx| fs.fsync(ctx, ino, fh, datasync != 0)
});

wrapper!(opendir(ino: u64, flags: i32, fh: *mut u64) {
    |fs: &T, ctx| {
        let handle = fs.opendir(ctx, ino, flags)?;
        // SAFETY: host contract: `fh` is writable.
        unsafe { fh.write(handle) };
        Ok(())
    }
});

wrapper!(readdir(ino: u64, fh: u64, offset: u64, fill: FillDir, fill_buf: *mut c_void) {
    |fs: &T, ctx| fs.readdir(ctx, ino, fh, offset, &mut DirFiller { fill, buf: fill_buf, listing: PhantomData })
});

wrapper!(releasedir(ino: u64, fh: u64) {
    |fs: &T, ctx| fs.releasedir(ctx, ino, fh)
});

wrapper!(statfs(ino: u64, out: *mut Statfs) {
    |fs: &T, ctx| {
        let st = fs.statfs(ctx, ino)?;
        // SAFETY: host contract: `out` is writable.
        unsafe { out.write(st) };
        Ok(())
    }
});

wrapper!(setxattr(ino: u64, name: *const c_char, value: *const u8, size: usize, flags: i32) {
    |fs: &T, ctx| {
        let value = if size == 0 {
            &[][..]
        } else {
            // SAFETY: host contract: `value` is valid for `size` bytes.
            unsafe { std::slice::from_raw_parts(value, size) }
        };
        // SAFETY: host contract: `name` is a valid C string.
        fs.setxattr(ctx, ino, unsafe { os(name) }, value, flags)
    }
});

wrapper!(getxattr(ino: u64, name: *const c_char, buf: *mut u8, cap: usize, len: *mut usize) {
    |fs: &T, ctx| {
        // SAFETY: host contract: `name` is a valid C string.
        let value = fs.getxattr(ctx, ino, unsafe { os(name) })?;
        // SAFETY: host contract: `buf` valid for `cap` bytes, `len` writable.
        unsafe { copy_out(&value, buf, cap, len) }
    }
});

wrapper!(listxattr(ino: u64, buf: *mut u8, cap: usize, len: *mut usize) {
    |fs: &T, ctx| {
        let names = fs.listxattr(ctx, ino)?;
        // SAFETY: host contract: `buf` valid for `cap` bytes, `len` writable.
        unsafe { copy_out(&names, buf, cap, len) }
    }
});

wrapper!(removexattr(ino: u64, name: *const c_char) {
    |fs: &T, ctx| {
        // SAFETY: host contract: `name` is a valid C string.
        fs.removexattr(ctx, ino, unsafe { os(name) })
    }
});

wrapper!(create_file(parent: u64, name: *const c_char, mode: u32, flags: i32, out: *mut Attr, fh: *mut u64) {
    |fs: &T, ctx| {
        // SAFETY: host contract: `name` is a valid C string.
        let (attr, handle) = fs.create_file(ctx, parent, unsafe { os(name) }, mode, flags)?;
        // SAFETY: host contract: `out` and `fh` are writable.
        unsafe {
            out.write(attr);
            fh.write(handle);
        }
        Ok(())
    }
});

wrapper!(open_backing(ino: u64, flags: i32, fh: *mut u64, backing_fd: *mut c_int) {
    |fs: &T, ctx| {
        let (handle, fd) = fs.open_backing(ctx, ino, flags)?;
        // SAFETY: host contract: `fh` and `backing_fd` are writable; the fd's ownership
        // passes to the host.
        unsafe {
            fh.write(handle);
            backing_fd.write(fd.map_or(-1, IntoRawFd::into_raw_fd));
        }
        Ok(())
    }
});

wrapper!(create_backing(parent: u64, name: *const c_char, mode: u32, flags: i32, out: *mut Attr, fh: *mut u64, backing_fd: *mut c_int) {
    |fs: &T, ctx| {
        // SAFETY: host contract: `name` is a valid C string.
        let (attr, handle, fd) = fs.create_backing(ctx, parent, unsafe { os(name) }, mode, flags)?;
        // SAFETY: host contract: the outputs are writable; the fd's ownership passes to the host.
        unsafe {
            out.write(attr);
            fh.write(handle);
            backing_fd.write(fd.map_or(-1, IntoRawFd::into_raw_fd));
        }
        Ok(())
    }
});
