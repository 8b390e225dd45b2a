//! faultfs: a read-only filesystem with one file, `data`, that misbehaves on request.
//! It exists for fshost's tests of fault isolation; never mount it for real. The plugin
//! itself is `plugin.rs`; `fs-plugins/faultfs-next` builds the same code again as its
//! generation 2, a second library that the upgrade tests move mounts to.
//!
//! Mount options (`-o`):
//! - `panic_in=OP`: panic in `lookup`, `getattr`, `read`, `readdir`, `export_state` or
//!   `import_state`;
//! - `fail_create=1`: refuse to create the mount's instance (EIO);
//! - `panic_in_destroy=1`: panic when the mount's instance is destroyed;
//! - `slow_ms=N`: every `read` takes N milliseconds;
//! - `fail_import=1`: refuse the state an upgrade hands over (EIO);
//! - `kill_priv_unless=PATH`: say it clears setuid/setgid itself (`WANT_KILL_PRIV`, which
//!   the kernel then leaves to it) unless PATH exists when the instance is made (an upgrade
//!   or a new process makes one that says otherwise).
//!
//! Environment of the daemon (plugin-wide hooks take no options):
//! - `FAULTFS_FAIL_LOAD=1`: `on_load` fails (EIO);
//! - `FAULTFS_FAIL_LOAD_GENERATION=N`: `on_load` of generation N fails (EIO);
//! - `FAULTFS_FAIL_LOAD_IF=PATH`: `on_load` fails (EIO) while PATH exists (a later load,
//!   in a daemon upgrade's new process say, fails where the first succeeded);
//! - `FAULTFS_LEAK_THREAD=1`: `on_load` starts a thread that never ends, which keeps the
//!   library mapped after `dlclose` (what plugins must not do).

/// Which build this is; `data` says it, so that a test sees which code serves.
const GENERATION: u32 = 1;

mod plugin;
