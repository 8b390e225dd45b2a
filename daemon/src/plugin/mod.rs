//! Plugin loading: file checks, a private copy, `dlopen` and the ABI gate (in `ffi`), name
//! checks, and the unmap proof after an unload. The only module that touches `libloading`.

#[allow(unsafe_code)]
mod ffi;

use std::fs;
use std::io::{Read, Seek};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{MemfdFlags, SealFlags};

use crate::registry::join_paths;
pub use ffi::{fix_malloc_mmap_threshold, GateError, Instance, Library};

/// A loaded plugin: its library plus what we know about it.
pub struct Plugin {
    pub name: String,
    /// The name its descriptor gives (`name` may be another, from `load --name`): an
    /// upgrade only replaces a plugin with another generation of the same kind.
    pub kind: String,
    pub version: String,
    pub abi_version: u32,
    /// The file the admin asked to load.
    pub source: PathBuf,
    /// How the private copy shows in /proc/self/maps (`/memfd:fshost-<n>-<file>`; see
    /// [`load`]): what the unmap proof looks for.
    pub mapped_path: PathBuf,
    pub library: Library,
    /// The sealed in-memory copy the library was opened from. Closed after the library
    /// (field order): while it is open no other copy can be opened under the same
    /// `/proc/self/fd/N` name, which glibc would take for the library already loaded.
    image: OwnedFd,
}

/// Why a plugin could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("plugin file {} does not exist", .0.display())]
    NotFound(PathBuf),
    #[error("cannot read plugin file {}: {source}", .path.display())]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a regular file", .0.display())]
    NotAFile(PathBuf),
    #[error("{} is not a shared object (no ELF header); build the plugin as a cdylib", .0.display())]
    NotSharedObject(PathBuf),
    #[error("cannot make a private in-memory copy of {}: {source}", .path.display())]
    Copy {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} kept changing while it was read (is it being written right now?); try again when it is complete", .0.display())]
    Changing(PathBuf),
    #[error("{} is not a complete shared object ({reason}); was it copied only in part?", .path.display())]
    Incomplete { path: PathBuf, reason: String },
    #[error("{} is not a loadable fshost plugin: {source}", .path.display())]
    Gate { path: PathBuf, source: GateError },
    #[error("no plugin {name:?} in the plugin directories ({}); give a path, or pass --plugin-dir", if .dirs.is_empty() { "none configured".to_string() } else { join_paths(.dirs) })]
    NotInPluginDirs { name: String, dirs: Vec<PathBuf> },
    #[error("{} is not trusted: {reason}", .path.display())]
    Untrusted { path: PathBuf, reason: String },
    #[error("plugin name {0:?} is not a safe identifier: use 1-64 of a-z, A-Z, 0-9, '_' or '-', starting with a letter or digit")]
    BadName(String),
}

/// Where plugins may be loaded from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trust {
    /// Plugins load only from these directories.
    pub plugin_dirs: Vec<PathBuf>,
    /// Development mode: no checks at all.
    pub dev: bool,
}

/// Refuses a plugin that an unprivileged user could have put there or changed: the file
/// (as opened, `file`: the very descriptor that is then copied, so nothing can be swapped
/// in between) must lie inside a plugin directory, be owned by root and writable by no one
/// else, and so must the directory it is in and the plugin directory itself.
fn check_trust(path: &Path, file: &fs::File, trust: &Trust) -> Result<(), LoadError> {
    if trust.dev {
        return Ok(());
    }
    let untrusted = |reason: String| LoadError::Untrusted {
        path: path.to_path_buf(),
        reason,
    };
    let unreadable = |source| LoadError::Unreadable {
        path: path.to_path_buf(),
        source,
    };
    // Where the opened file really is, as the kernel knows it (symlinks resolved).
    let real = fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).map_err(unreadable)?;
    let dir = trust
        .plugin_dirs
        .iter()
        .filter_map(|dir| dir.canonicalize().ok())
        .find(|dir| real.starts_with(dir));
    let Some(dir) = dir else {
        let dirs = if trust.plugin_dirs.is_empty() {
            "none configured".to_string()
        } else {
            join_paths(&trust.plugin_dirs)
        };
        return Err(untrusted(format!(
            "it is outside the plugin directories ({dirs}); install it there, or start fshostd with --dev"
        )));
    };
    let meta = file.metadata().map_err(unreadable)?;
    if meta.uid() != 0 {
        return Err(untrusted(format!(
            "it is owned by uid {}, not root; `chown root:root` it",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(untrusted(format!(
            "it is writable by group or others (mode {:o}); `chmod go-w` it",
            meta.mode() & 0o7777
        )));
    }
    let private = |dir: &Path| {
        crate::check_private_dir(dir, 0).map_err(|why| {
            let dir = dir.display();
            untrusted(format!("{why}; `chown root {dir}` and `chmod go-w {dir}`"))
        })
    };
    private(&dir)?;
    match real.parent() {
        Some(parent) if parent != dir => private(parent),
        _ => Ok(()),
    }
}

/// True for names that are safe in paths, mount sources and fstype strings.
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && name.len() <= 64
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Numbers the private copies of this process (their memfd names).
static NEXT_COPY: AtomicU64 = AtomicU64::new(1);

/// Opens a plugin: opens the file once, checks it (trust, ELF) on that descriptor, copies it
/// into a sealed memfd, maps that copy and runs the ABI gate.
///
/// The private copy means the file on disk can be rebuilt or overwritten while the plugin
/// is loaded without changing the code under a live mount, and two loads of the same file
/// are two independent libraries. In memory it has no name in any directory that anyone
/// could race, and sealed it cannot change after the checks.
pub fn load(path: &Path, name_override: Option<&str>, trust: &Trust) -> Result<Plugin, LoadError> {
    let unreadable = |source| LoadError::Unreadable {
        path: path.to_path_buf(),
        source,
    };
    let mut file = fs::File::open(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => LoadError::NotFound(path.to_path_buf()),
        _ => unreadable(source),
    })?;
    if !file.metadata().map_err(unreadable)?.is_file() {
        return Err(LoadError::NotAFile(path.to_path_buf()));
    }
    check_trust(path, &file, trust)?;
    let mut magic = [0u8; 4];
    if file.read_exact(&mut magic).is_err() || magic != *b"\x7fELF" {
        return Err(LoadError::NotSharedObject(path.to_path_buf()));
    }
    file.rewind().map_err(unreadable)?;

    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "plugin.so".into());
    let copy_name = format!(
        "fshost-{}-{file_name}",
        NEXT_COPY.fetch_add(1, Ordering::Relaxed)
    );
    let copy_error = |source| LoadError::Copy {
        path: path.to_path_buf(),
        source,
    };
    // A file being rewritten (`cp new.so over/old.so` at the same moment) must not give a
    // copy that mixes two versions or stops midway: the copy is retried while the file
    // changes under it, and must hold every segment dlopen will map (a segment past the
    // end of the copy would be a SIGBUS in the daemon).
    let mut attempts = 0;
    let copy = loop {
        let before = identity(&file).map_err(unreadable)?;
        let copy = private_copy(&mut file, &copy_name).map_err(copy_error)?;
        if identity(&file).map_err(unreadable)? == before {
            break copy;
        }
        attempts += 1;
        if attempts == 3 {
            return Err(LoadError::Changing(path.to_path_buf()));
        }
        file.rewind().map_err(unreadable)?;
    };
    open_copy(copy, copy_name, path, name_override)
}

/// Opens a plugin from the private copy a previous fshostd process loaded it from (daemon
/// upgrade): the same code, whatever the file at `source` holds now. It was checked when
/// it was first loaded; it is copied again, under a name of this process.
pub fn load_handed(image: fs::File, source: &Path, name: &str) -> Result<Plugin, LoadError> {
    let copy_name = format!(
        "fshost-{}-{}",
        NEXT_COPY.fetch_add(1, Ordering::Relaxed),
        source
            .file_name()
            .map_or_else(|| "plugin.so".into(), |n| n.to_string_lossy())
    );
    let mut image = image;
    image.rewind().map_err(|source_err| LoadError::Copy {
        path: source.to_path_buf(),
        source: source_err,
    })?;
    // Through a buffer: a memfd-to-memfd copy goes by splice, whose page references can
    // still be pending when the copy is sealed (EBUSY, seen once in CI).
    let mut bytes = Vec::new();
    image.read_to_end(&mut bytes).map_err(|e| LoadError::Copy {
        path: source.to_path_buf(),
        source: e,
    })?;
    let copy = private_copy(&mut bytes.as_slice(), &copy_name).map_err(|e| LoadError::Copy {
        path: source.to_path_buf(),
        source: e,
    })?;
    open_copy(copy, copy_name, source, Some(name))
}

/// The loaded library's private copy, to hand to the next fshostd process.
impl Plugin {
    pub fn image(&self) -> std::io::Result<OwnedFd> {
        self.image.try_clone()
    }
}

/// Checks a private copy, maps it and runs the ABI gate.
fn open_copy(
    copy: fs::File,
    copy_name: String,
    path: &Path,
    name_override: Option<&str>,
) -> Result<Plugin, LoadError> {
    check_segments(&copy).map_err(|reason| LoadError::Incomplete {
        path: path.to_path_buf(),
        reason,
    })?;
    let image = OwnedFd::from(copy);
    let (library, info) =
        Library::dlopen(Path::new(&format!("/proc/self/fd/{}", image.as_raw_fd()))).map_err(
            |source| LoadError::Gate {
                path: path.to_path_buf(),
                source,
            },
        )?;
    let name = name_override.map_or_else(|| info.name.clone(), str::to_owned);
    if !valid_name(&name) {
        return Err(LoadError::BadName(name));
    }
    Ok(Plugin {
        name,
        kind: info.name,
        version: info.version,
        abi_version: info.abi_version,
        source: path.to_path_buf(),
        mapped_path: PathBuf::from(format!("/memfd:{copy_name}")),
        library,
        image,
    })
}

/// What changes when a file is rewritten: size, modification and change times.
fn identity(file: &fs::File) -> std::io::Result<(u64, i64, i64, i64, i64)> {
    let meta = file.metadata()?;
    Ok((
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec(),
    ))
}

/// Copies `file` from its current offset into a new sealed memfd named `name`.
fn private_copy(file: &mut impl Read, name: &str) -> std::io::Result<fs::File> {
    let image = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
    let mut copy = fs::File::from(image);
    std::io::copy(file, &mut copy)?;
    let seals = SealFlags::SEAL | SealFlags::SHRINK | SealFlags::GROW | SealFlags::WRITE;
    rustix::fs::fcntl_add_seals(&copy, seals)?;
    Ok(copy)
}

/// Checks that the ELF image in `copy` holds every loadable segment it declares.
fn check_segments(copy: &fs::File) -> Result<(), String> {
    use object::read::elf::{FileHeader, ProgramHeader};
    let size = copy.metadata().map_err(|e| e.to_string())?.len();
    let data = object::ReadCache::new(copy);
    let header = object::elf::FileHeader64::<object::Endianness>::parse(&data)
        .map_err(|e| format!("ELF header: {e}"))?;
    let endian = header.endian().map_err(|e| e.to_string())?;
    let segments = header
        .program_headers(endian, &data)
        .map_err(|e| format!("program headers: {e}"))?;
    for segment in segments {
        let end = segment
            .p_offset(endian)
            .checked_add(segment.p_filesz(endian));
        if end.is_none_or(|end| end > size) {
            return Err(format!("a segment ends past its {size} bytes"));
        }
    }
    Ok(())
}

/// Closes a plugin's library and reports whether it is still mapped afterwards
/// (a plugin that left a thread or a TLS destructor behind stays mapped: see the SDK docs).
pub fn close(plugin: Plugin) -> bool {
    let Plugin {
        mapped_path,
        library,
        image,
        ..
    } = plugin;
    drop(library);
    let still_mapped = is_mapped(&mapped_path);
    if still_mapped {
        // glibc still holds the library under its `/proc/self/fd/N` name: keep that name
        // from being reused by a later copy, which glibc would take for this one.
        std::mem::forget(image);
    }
    still_mapped
}

/// True if `/proc/self/maps` still has a mapping of `path` (as `<path> (deleted)`).
pub fn is_mapped(path: &Path) -> bool {
    let Ok(maps) = fs::read_to_string("/proc/self/maps") else {
        return false;
    };
    let needle = format!("{} (deleted)", path.display());
    maps.lines().any(|line| line.ends_with(&needle))
}

/// Runs `f` on a fresh thread that ends before this returns. Plugin-wide hooks run this
/// way so that nothing a plugin leaves in thread-local storage outlives the call (a TLS
/// destructor on a long-lived daemon thread would keep the library mapped forever).
pub fn on_fresh_thread<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    std::thread::scope(|scope| match scope.spawn(f).join() {
        Ok(value) => value,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_names() {
        for good in ["memfs", "hello-c", "fs_2", "A1"] {
            assert!(valid_name(good), "{good}");
        }
        for bad in ["", "-x", "a/b", "a b", "ä", "../x", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    fn trusted(path: &Path, trust: &Trust) -> Result<(), LoadError> {
        check_trust(path, &fs::File::open(path).unwrap(), trust)
    }

    #[test]
    fn only_root_owned_unwritable_files_in_private_plugin_dirs_are_trusted() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let inside = dir.path().join("libx.so");
        fs::write(&inside, b"\x7fELF").unwrap();
        fs::set_permissions(&inside, fs::Permissions::from_mode(0o755)).unwrap();
        let trust = Trust {
            plugin_dirs: vec![dir.path().to_path_buf()],
            dev: false,
        };
        let root = nix::unistd::geteuid().is_root();
        if root {
            trusted(&inside, &trust).unwrap();
            // A plugin directory others may write to is refused, with the fix.
            fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o1777)).unwrap();
            let err = trusted(&inside, &trust).unwrap_err().to_string();
            assert!(
                err.contains("others could replace its files; `chown root"),
                "{err}"
            );
            assert!(err.contains("`chmod go-w"), "{err}");
            fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        }
        fs::set_permissions(&inside, fs::Permissions::from_mode(0o775)).unwrap();
        let err = trusted(&inside, &trust).unwrap_err().to_string();
        assert!(
            err.contains(if root {
                "writable by group or others"
            } else {
                "not root"
            }),
            "{err}"
        );
        let elsewhere = tempfile::tempdir().unwrap();
        let outside = elsewhere.path().join("liby.so");
        fs::write(&outside, b"\x7fELF").unwrap();
        let err = trusted(&outside, &trust).unwrap_err().to_string();
        assert!(err.contains("outside the plugin directories"), "{err}");
        // A symlink inside pointing outside is judged by where the file really is.
        let link = dir.path().join("liblink.so");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        let err = trusted(&link, &trust).unwrap_err().to_string();
        assert!(err.contains("outside the plugin directories"), "{err}");
        let dev = Trust {
            plugin_dirs: vec![],
            dev: true,
        };
        trusted(&outside, &dev).unwrap();
    }

    #[test]
    fn missing_and_non_elf_files_are_refused_before_dlopen() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Trust {
            plugin_dirs: vec![],
            dev: true,
        };
        let missing = dir.path().join("nope.so");
        assert!(matches!(
            load(&missing, None, &dev),
            Err(LoadError::NotFound(_))
        ));
        let text = dir.path().join("text.so");
        fs::write(&text, "not a library").unwrap();
        assert!(matches!(
            load(&text, None, &dev),
            Err(LoadError::NotSharedObject(_))
        ));
        assert!(matches!(
            load(dir.path(), None, &dev),
            Err(LoadError::NotAFile(_))
        ));
    }
}
