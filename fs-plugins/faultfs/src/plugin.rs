//! faultfs's code, built as generation 1 (`fs-plugins/faultfs`) and as generation 2
//! (`fs-plugins/faultfs-next`): see the crate docs for what it does on request.

use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use fshost_sdk::{
    export_plugin, Attr, Context, DirFiller, Errno, Options, Plugin, Result, SavedState,
    StateWriter, StaticFiles,
};

use super::GENERATION;

const FILES: StaticFiles = StaticFiles(&[(
    "data",
    if GENERATION == 1 {
        b"faultfs data\n"
    } else {
        b"faultfs DATA\n" // as long as generation 1's: the kernel may cache the size
    },
)]);

pub struct FaultFs {
    panic_in: Option<String>,
    panic_in_destroy: bool,
    fail_import: bool,
    slow: Duration,
    /// Says it clears setuid/setgid itself (`WANT_KILL_PRIV`; faultfs has nothing to
    /// clear), by `-o kill_priv_unless=PATH` while PATH did not exist at its creation.
    kill_priv: bool,
    /// Reads served, by this instance and the generations before it: the state an
    /// upgrade hands over.
    reads: AtomicU64,
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
            fail_import: options.get("fail_import").is_some(),
            slow: Duration::from_millis(slow_ms),
            kill_priv: options
                .get("kill_priv_unless")
                .is_some_and(|path| !Path::new(path).exists()),
            reads: AtomicU64::new(0),
        })
    }

    fn wants(&self) -> Result<u64> {
        Ok(if self.kill_priv {
            fshost_sdk::abi::WANT_KILL_PRIV
        } else {
            0
        })
    }

    const UPGRADABLE: bool = true;
    /// Fixed files: a new instance serves on after a crash (its read count starts over).
    const RESUMABLE: bool = true;

    fn export_state(&self, out: &mut StateWriter) -> Result<()> {
        self.maybe_panic("export_state");
        out.write_all(&self.reads.load(Ordering::Relaxed).to_le_bytes())
            .map_err(|_| Errno::EIO)
    }

    fn import_state(&self, state: &SavedState) -> Result<()> {
        self.maybe_panic("import_state");
        if self.fail_import {
            return Err(Errno::EIO);
        }
        let reads = <[u8; 8]>::try_from(&state[..]).map_err(|_| Errno::EINVAL)?;
        self.reads
            .store(u64::from_le_bytes(reads), Ordering::Relaxed);
        Ok(())
    }

    fn on_load() -> Result<()> {
        if std::env::var_os("FAULTFS_FAIL_LOAD").is_some() {
            return Err(Errno::EIO);
        }
        let failing = std::env::var("FAULTFS_FAIL_LOAD_GENERATION");
        if failing.is_ok_and(|n| n == GENERATION.to_string()) {
            return Err(Errno::EIO);
        }
        if std::env::var_os("FAULTFS_FAIL_LOAD_IF").is_some_and(|path| Path::new(&path).exists()) {
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
        self.reads.fetch_add(1, Ordering::Relaxed);
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
