//! faultfs: a read-only filesystem with one file, `data`, that misbehaves on request.
//! It exists for fshost's tests of fault isolation; never mount it for real.
//!
//! Mount options (`-o`):
//! - `panic_in=OP`: panic in `lookup`, `getattr`, `read` or `readdir`;
//! - `fail_create=1`: refuse to create the mount's instance (EIO);
//! - `panic_in_destroy=1`: panic when the mount's instance is destroyed;
//! - `slow_ms=N`: every `read` takes N milliseconds.
//!
//! Environment of the daemon (plugin-wide hooks take no options):
//! - `FAULTFS_FAIL_LOAD=1`: `on_load` fails (EIO);
//! - `FAULTFS_LEAK_THREAD=1`: `on_load` starts a thread that never ends, which keeps the
//!   library mapped after `dlclose` (what plugins must not do).

use std::ffi::OsStr;
use std::time::Duration;

use fshost_sdk::{
    export_plugin, Attr, Context, DirFiller, Errno, Options, Plugin, Result, StaticFiles,
};

const FILES: StaticFiles = StaticFiles(&[("data", b"faultfs data\n")]);

pub struct FaultFs {
    panic_in: Option<String>,
    panic_in_destroy: bool,
    slow: Duration,
}

impl FaultFs {
    fn maybe_panic(&self, op: &str) {
        if self.panic_in.as_deref() == Some(op) {
            panic!("faultfs was asked to panic in {op}");
        }
    }
}

impl Drop for FaultFs {
    fn drop(&mut self) {
        if self.panic_in_destroy {
            panic!("faultfs was asked to panic in destroy");
        }
    }
}

impl Plugin for FaultFs {
    fn create(options: &Options) -> Result<Self> {
        if options.get("fail_create").is_some() {
            return Err(Errno::EIO);
        }
        let slow_ms = options
            .get("slow_ms")
            .map(|v| v.parse::<u64>().map_err(|_| Errno::EINVAL))
            .transpose()?
            .unwrap_or(0);
        Ok(FaultFs {
            panic_in: options.get("panic_in").map(str::to_owned),
            panic_in_destroy: options.get("panic_in_destroy").is_some(),
            slow: Duration::from_millis(slow_ms),
        })
    }

    fn on_load() -> Result<()> {
        if std::env::var_os("FAULTFS_FAIL_LOAD").is_some() {
            return Err(Errno::EIO);
        }
        if std::env::var_os("FAULTFS_LEAK_THREAD").is_some() {
            std::thread::spawn(|| loop {
                std::thread::sleep(Duration::from_secs(3600));
            });
        }
        Ok(())
    }

    fn lookup(&self, _ctx: &Context, parent: u64, name: &OsStr) -> Result<Attr> {
        self.maybe_panic("lookup");
        FILES.lookup(parent, name)
    }

    fn getattr(&self, _ctx: &Context, ino: u64) -> Result<Attr> {
        self.maybe_panic("getattr");
        FILES.getattr(ino)
    }

    fn read(
        &self,
        _ctx: &Context,
        ino: u64,
        _fh: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize> {
        self.maybe_panic("read");
        std::thread::sleep(self.slow);
        FILES.read(ino, offset, buf)
    }

    fn readdir(
        &self,
        _ctx: &Context,
        ino: u64,
        _fh: u64,
        offset: u64,
        out: &mut DirFiller,
    ) -> Result<()> {
        self.maybe_panic("readdir");
        FILES.readdir(ino, offset, out)
    }
}

export_plugin!(FaultFs, "faultfs");
