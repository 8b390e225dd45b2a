//! Plugin loading: file checks, a private copy, `dlopen` and the ABI gate (in `ffi`), name
//! checks, and the unmap proof after an unload. The only module that touches `libloading`.

#[allow(unsafe_code)]
mod ffi;

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::registry::join_paths;
pub use ffi::{fix_malloc_mmap_threshold, Answer, GateError, Instance, Library};

/// A loaded plugin: its library plus what we know about it.
pub struct Plugin {
    pub name: String,
    pub version: String,
    pub abi_version: u32,
    /// The file the admin asked to load.
    pub source: PathBuf,
    /// The private copy that is actually mapped (already unlinked; see [`load`]).
    pub mapped_path: PathBuf,
    pub library: Library,
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
    #[error("cannot make a private copy of {} in {}: {source}", .path.display(), .dir.display())]
    Copy {
        path: PathBuf,
        dir: PathBuf,
        source: std::io::Error,
    },
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

/// Refuses a plugin file that an unprivileged user could have put there or changed:
/// outside the plugin directories, not owned by root, or writable by group or others.
pub fn check_trust(path: &Path, trust: &Trust) -> Result<(), LoadError> {
    use std::os::unix::fs::MetadataExt;
    if trust.dev {
        return Ok(());
    }
    let untrusted = |reason: String| LoadError::Untrusted {
        path: path.to_path_buf(),
        reason,
    };
    let canonical = path.canonicalize().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => LoadError::NotFound(path.to_path_buf()),
        _ => LoadError::Unreadable {
            path: path.to_path_buf(),
            source: e,
        },
    })?;
    let inside = trust
        .plugin_dirs
        .iter()
        .filter_map(|dir| dir.canonicalize().ok())
        .any(|dir| canonical.starts_with(dir));
    if !inside {
        let dirs = if trust.plugin_dirs.is_empty() {
            "none configured".to_string()
        } else {
            join_paths(&trust.plugin_dirs)
        };
        return Err(untrusted(format!(
            "it is outside the plugin directories ({dirs}); install it there, or start fshostd with --dev"
        )));
    }
    let meta = fs::metadata(&canonical).map_err(|source| LoadError::Unreadable {
        path: path.to_path_buf(),
        source,
    })?;
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
    Ok(())
}

/// True for names that are safe in paths, mount sources and fstype strings.
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && name.len() <= 64
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Opens a plugin: checks the file, maps a private copy of it, runs the ABI gate.
///
/// The private copy (in `copy_dir`, unlinked right after `dlopen`) means the file on disk can
/// be rebuilt or overwritten while the plugin is loaded without changing the code under a
/// live mount, and two loads of the same file are two independent libraries.
pub fn load(
    path: &Path,
    name_override: Option<&str>,
    copy_dir: &Path,
) -> Result<Plugin, LoadError> {
    static NEXT_COPY: AtomicU64 = AtomicU64::new(1);

    let meta = fs::metadata(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => LoadError::NotFound(path.to_path_buf()),
        _ => LoadError::Unreadable {
            path: path.to_path_buf(),
            source,
        },
    })?;
    if !meta.is_file() {
        return Err(LoadError::NotAFile(path.to_path_buf()));
    }
    let mut magic = [0u8; 4];
    let unreadable = |source| LoadError::Unreadable {
        path: path.to_path_buf(),
        source,
    };
    let mut file = fs::File::open(path).map_err(unreadable)?;
    if file.read_exact(&mut magic).is_err() || magic != *b"\x7fELF" {
        return Err(LoadError::NotSharedObject(path.to_path_buf()));
    }
    drop(file);

    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "plugin.so".into());
    let copy = copy_dir.join(format!(
        ".fshostd-{}-{}-{file_name}",
        std::process::id(),
        NEXT_COPY.fetch_add(1, Ordering::Relaxed)
    ));
    let copy_error = |source| LoadError::Copy {
        path: path.to_path_buf(),
        dir: copy_dir.to_path_buf(),
        source,
    };
    fs::copy(path, &copy).map_err(copy_error)?;
    let opened = Library::dlopen(&copy);
    // The mapping keeps the copy alive; unlinking now means nothing is left behind, even on
    // a crash. /proc/self/maps then shows it as "<copy> (deleted)".
    let _ = fs::remove_file(&copy);
    let (library, info) = opened.map_err(|source| LoadError::Gate {
        path: path.to_path_buf(),
        source,
    })?;
    let name = name_override.map_or(info.name, str::to_owned);
    if !valid_name(&name) {
        return Err(LoadError::BadName(name));
    }
    Ok(Plugin {
        name,
        version: info.version,
        abi_version: info.abi_version,
        source: path.to_path_buf(),
        mapped_path: copy,
        library,
    })
}

/// Closes a plugin's library and reports whether it is still mapped afterwards
/// (a plugin that left a thread or a TLS destructor behind stays mapped: see the SDK docs).
pub fn close(plugin: Plugin) -> bool {
    let mapped = plugin.mapped_path.clone();
    drop(plugin);
    is_mapped(&mapped)
}

/// True if `/proc/self/maps` still has a mapping of `path`.
pub fn is_mapped(path: &Path) -> bool {
    let Ok(maps) = fs::read_to_string("/proc/self/maps") else {
        return false;
    };
    let needle = path.to_string_lossy();
    maps.lines().any(|line| line.contains(needle.as_ref()))
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

    #[test]
    fn only_root_owned_unwritable_files_inside_plugin_dirs_are_trusted() {
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
            check_trust(&inside, &trust).unwrap();
        }
        fs::set_permissions(&inside, fs::Permissions::from_mode(0o775)).unwrap();
        let err = check_trust(&inside, &trust).unwrap_err().to_string();
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
        let err = check_trust(&outside, &trust).unwrap_err().to_string();
        assert!(err.contains("outside the plugin directories"), "{err}");
        let dev = Trust {
            plugin_dirs: vec![],
            dev: true,
        };
        check_trust(&outside, &dev).unwrap();
    }

    #[test]
    fn missing_and_non_elf_files_are_refused_before_dlopen() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.so");
        assert!(matches!(
            load(&missing, None, dir.path()),
            Err(LoadError::NotFound(_))
        ));
        let text = dir.path().join("text.so");
        fs::write(&text, "not a library").unwrap();
        assert!(matches!(
            load(&text, None, dir.path()),
            Err(LoadError::NotSharedObject(_))
        ));
        assert!(matches!(
            load(dir.path(), None, dir.path()),
            Err(LoadError::NotAFile(_))
        ));
    }
}
