//! memfs against tmpfs: the same seeded sequence of operations (fsops, a few thousand,
//! error cases included) runs on both, as root and as an unprivileged user, and every
//! result, errno, mtime change and the final trees must match line by line.
//!
//! Replay a failure with FSHOST_DIFF_SEED=<seed printed in the failure>; FSHOST_DIFF_OPS
//! sets the operations per seed (default 2000).

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sys::stat::Mode;

use fshost_tests::{acl_value, artifact, fuse_available, run, tool_available, Env};

use crate::path_str;

/// A tmpfs mounted for the test, detached when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: PathBuf) -> Tmpfs {
        Tmpfs::mount_with(path, "mode=1777")
    }

    /// Mounted `nodev,nosuid` as fshost mounts are (a device node on either cannot be
    /// opened: EACCES).
    fn mount_with(path: PathBuf, options: &str) -> Tmpfs {
        fs::create_dir_all(&path).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &path,
            Some("tmpfs"),
            nix::mount::MsFlags::MS_NODEV | nix::mount::MsFlags::MS_NOSUID,
            Some(options),
        )
        .expect("mount tmpfs");
        Tmpfs(path)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn fsops(program: &Path, dir: &Path, seed: u64, ops: u64, unprivileged: bool) -> String {
    let mut command = if unprivileged {
        fshost_tests::as_nobody(program)
    } else {
        Command::new(program)
    };
    command.arg(dir).arg(seed.to_string()).arg(ops.to_string());
    let out = run(command);
    assert!(
        out.status.success(),
        "fsops failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn memfs_matches_tmpfs_operation_by_operation() {
    if !fuse_available() || !tool_available("setpriv") {
        return;
    }
    let env_number = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let base = env_number(
        "FSHOST_DIFF_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    );
    let ops = env_number("FSHOST_DIFF_OPS", 2000);
    let env = Env::start();
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    env.ctl(&["load", "memfs"]).ok();
    // No attribute caching: the comparison is of memfs, not of the kernel's cache. memfs
    // is mounted twice, the second time with the kernel's writeback cache.
    // FSHOST_DIFF_MOUNT_OPTIONS adds mount options to both for a manual run.
    let extra = std::env::var("FSHOST_DIFF_MOUNT_OPTIONS")
        .map(|o| format!(",{o}"))
        .unwrap_or_default();
    let mounts: Vec<(&str, PathBuf)> = [
        "allow_other,attr_timeout=0",
        "allow_other,attr_timeout=0,writeback",
    ]
    .into_iter()
    .map(|options| {
        let mnt = env.mountpoint(if options.ends_with("writeback") {
            "memfs-wb"
        } else {
            "memfs"
        });
        env.ctl(&[
            "mount",
            "memfs",
            path_str(&mnt),
            "-o",
            &format!("{options}{extra}"),
        ])
        .ok();
        (options, mnt)
    })
    .collect();
    let tmpfs = Tmpfs::mount(env.path("tmpfs"));
    // A copy the unprivileged user can run (the build directory may not be reachable).
    let program = env.path("fsops");
    fshost_tests::copy_program(&artifact("fsops"), &program);
    let fresh_dir = |dir: &Path| {
        fs::create_dir(dir).unwrap();
        fs::set_permissions(dir, fs::Permissions::from_mode(0o1777)).unwrap();
    };

    let mut total = 0;
    for (run_index, unprivileged) in [false, false, false, true, true, true]
        .into_iter()
        .enumerate()
    {
        let seed = base + run_index as u64;
        let tag = format!("run{run_index}");
        fresh_dir(&tmpfs.0.join(&tag));
        let expected = fsops(&program, &tmpfs.0.join(&tag), seed, ops, unprivileged);
        let expected: Vec<&str> = expected.lines().collect();
        for (options, mnt) in &mounts {
            // Two processes at once on the same mount, each in its own directory: each
            // must see exactly what the one on tmpfs saw alone.
            let dirs = [mnt.join(format!("{tag}a")), mnt.join(format!("{tag}b"))];
            dirs.iter().for_each(|dir| fresh_dir(dir));
            let outputs: Vec<String> = std::thread::scope(|scope| {
                let running: Vec<_> = dirs
                    .iter()
                    .map(|dir| scope.spawn(|| fsops(&program, dir, seed, ops, unprivileged)))
                    .collect();
                running.into_iter().map(|t| t.join().unwrap()).collect()
            });
            for actual in &outputs {
                let actual: Vec<&str> = actual.lines().collect();
                if let Some(at) = (0..expected.len().max(actual.len()))
                    .find(|i| expected.get(*i) != actual.get(*i))
                {
                    let context = |lines: &[&str]| {
                        lines[at.saturating_sub(3)..(at + 1).min(lines.len())].join("\n  ")
                    };
                    panic!(
                        "memfs -o {options} differs from tmpfs (seed {seed}, {}; replay: FSHOST_DIFF_SEED={} cargo test ... differential):\n\
                         tmpfs:\n  {}\nmemfs:\n  {}",
                        if unprivileged { "as uid 65534" } else { "as root" },
                        base,
                        context(&expected),
                        context(&actual),
                    );
                }
            }
        }
        total += ops;
    }
    eprintln!(
        "memfs (plain and writeback, two processes each) matched tmpfs on {total} operations (seeds {base}..{}), as root and as uid 65534",
        base + 5
    );
    drop(tmpfs);
    for (_, mnt) in &mounts {
        env.ctl(&["unmount", path_str(mnt)]).ok();
    }
}

#[test]
fn memfs_size_limit_statfs_and_readdir_under_concurrent_unlinks() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    env.ctl(&["load", "memfs"]).ok();
    let mnt = env.mountpoint("small");
    env.ctl(&["mount", "memfs", path_str(&mnt), "-o", "size=64K"])
        .ok();

    // statfs reports the limit; writing past it is ENOSPC, not unbounded growth.
    let st = nix::sys::statvfs::statvfs(&mnt).unwrap();
    assert_eq!((st.blocks(), st.fragment_size()), (16, 4096));
    let err = fs::write(mnt.join("big"), vec![1u8; 100 << 10]).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
    fs::remove_file(mnt.join("big")).unwrap();
    // The kernel tells a FUSE file system of the last close asynchronously (RELEASE), so
    // the space of a file removed right after it was closed comes back a moment later
    // (README's table); one closed earlier is free when rm returns.
    let free = || nix::sys::statvfs::statvfs(&mnt).unwrap().blocks_free();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while free() != 16 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(free(), 16, "space comes back when the file goes");
    fs::write(mnt.join("closed"), vec![1u8; 32 << 10]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_eq!(free(), 8);
    fs::remove_file(mnt.join("closed")).unwrap();
    assert_eq!(
        free(),
        16,
        "the space of a file closed earlier is free when rm returns"
    );
    env.ctl(&["unmount", path_str(&mnt)]).ok();

    // A listing resumed at its offset sees every surviving entry exactly once, even while
    // other entries are unlinked between the reads (several getdents calls: 3000 names).
    env.ctl(&["mount", "memfs", path_str(&mnt)]).ok();
    let names: Vec<String> = (0..3000)
        .map(|i| format!("entry-with-a-long-name-{i:05}"))
        .collect();
    for name in &names {
        fs::File::create(mnt.join(name)).unwrap();
    }
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    let mut removed = std::collections::BTreeSet::new();
    for (i, entry) in fs::read_dir(&mnt).unwrap().enumerate() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        *seen.entry(name).or_default() += 1;
        // Unlink some entries further along as we go.
        let victim = &names[(i * 7 + 1500) % names.len()];
        if i % 3 == 0 && !seen.contains_key(victim) && fs::remove_file(mnt.join(victim)).is_ok() {
            removed.insert(victim.clone());
        }
    }
    assert!(seen.values().all(|n| *n == 1), "an entry was listed twice");
    for name in &names {
        assert!(
            removed.contains(name) || seen.contains_key(name),
            "{name} survived but was not listed"
        );
    }
    assert!(!removed.is_empty());
    env.ctl(&["unmount", path_str(&mnt)]).ok();
}

/// What a scripted run of writes, fallocate modes and truncates leaves in `dir`, step by
/// step: the result, size and blocks, and where SEEK_DATA and SEEK_HOLE land from a grid
/// of offsets. memfs must print exactly what tmpfs prints.
fn space_probe(dir: &Path) -> Vec<String> {
    use nix::fcntl::FallocateFlags as F;
    use std::os::unix::fs::FileExt;
    enum Step {
        Write(u64, usize),
        Allocate(F, u64, u64),
        Truncate(u64),
    }
    let keep = F::FALLOC_FL_KEEP_SIZE;
    let punch = F::FALLOC_FL_PUNCH_HOLE | F::FALLOC_FL_KEEP_SIZE;
    let cases: Vec<Vec<Step>> = vec![
        vec![
            Step::Write(0, 3),
            Step::Allocate(keep, 20_000, 5000),
            Step::Write(8192, 5000),
        ],
        vec![Step::Allocate(F::empty(), 0, 10_000), Step::Write(4096, 1)],
        vec![Step::Write(0, 20_000), Step::Allocate(punch, 100, 9000)],
        vec![Step::Write(0, 20_000), Step::Allocate(punch, 4096, 4096)],
        vec![Step::Write(0, 8192), Step::Allocate(punch, 0, 100_000)],
        vec![Step::Write(0, 8192), Step::Allocate(punch, 100, 10)],
        vec![Step::Write(0, 8192), Step::Allocate(punch, 4000, 200)],
        vec![
            Step::Allocate(keep, 0, 16_384),
            Step::Truncate(6000),
            Step::Write(12_000, 10),
        ],
        vec![
            Step::Allocate(F::empty(), 1 << 20, 4096),
            Step::Truncate(100),
        ],
        vec![
            Step::Write(0, 100),
            Step::Allocate(F::FALLOC_FL_PUNCH_HOLE, 0, 10),
        ],
        vec![
            Step::Write(0, 100),
            Step::Allocate(F::FALLOC_FL_ZERO_RANGE, 0, 10),
        ],
        vec![Step::Write(0, 100), Step::Allocate(F::empty(), 0, 0)],
        vec![Step::Allocate(F::empty(), 0, 1 << 20)],
        // A page left unwritten by one fallocate becomes data when another meets it
        // (found by the random test, seed 1796177268).
        vec![
            Step::Allocate(F::empty(), 1, 756),
            Step::Allocate(keep, 0, 8395),
            Step::Allocate(keep, 4096, 100),
        ],
    ];
    let offsets = [
        0i64,
        1,
        99,
        4095,
        4096,
        4097,
        8191,
        8192,
        12_288,
        16_384,
        20_000,
        1 << 20,
    ];
    let mut lines = Vec::new();
    for (i, steps) in cases.iter().enumerate() {
        let path = dir.join(format!("f{i}"));
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        for (j, step) in steps.iter().enumerate() {
            let result = match step {
                Step::Write(at, len) => file
                    .write_all_at(&vec![b'x'; *len], *at)
                    .map_err(|e| e.to_string()),
                Step::Allocate(mode, at, len) => {
                    nix::fcntl::fallocate(&file, *mode, *at as i64, *len as i64)
                        .map_err(|e| e.to_string())
                }
                Step::Truncate(size) => file.set_len(*size).map_err(|e| e.to_string()),
            };
            let meta = file.metadata().unwrap();
            let mut seeks = Vec::new();
            for at in offsets {
                for whence in [nix::unistd::Whence::SeekData, nix::unistd::Whence::SeekHole] {
                    seeks.push(match nix::unistd::lseek(&file, at, whence) {
                        Ok(found) => found.to_string(),
                        Err(e) => format!("{e}"),
                    });
                }
            }
            lines.push(format!(
                "case {i} step {j}: {result:?} size={} blocks={} seeks={}",
                meta.len(),
                meta.blocks(),
                seeks.join(",")
            ));
        }
    }
    // And ENOSPC: both are 1 MiB file systems here.
    let full = fs::File::create(dir.join("full")).unwrap();
    let result = nix::fcntl::fallocate(&full, F::empty(), 0, 4 << 20).map_err(|e| e.to_string());
    lines.push(format!(
        "full: {result:?} size={}",
        full.metadata().unwrap().len()
    ));
    lines
}

#[test]
fn fallocate_and_seek_data_hole_answer_as_on_tmpfs() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    let tmpfs = Tmpfs::mount_with(env.path("space-tmpfs"), "size=2M");
    env.ctl(&["load", "memfs"]).ok();
    let mnt = env.mountpoint("space-memfs");
    env.ctl(&["mount", "memfs", path_str(&mnt), "-o", "size=2M"])
        .ok();
    let (expected, got) = (space_probe(&tmpfs.0), space_probe(&mnt));
    for (e, g) in expected.iter().zip(&got) {
        assert_eq!(g, e, "memfs (left) differs from tmpfs (right)");
    }
    assert_eq!(expected.len(), got.len());
    env.ctl(&["unmount", path_str(&mnt)]).ok();
    // passthroughfs over a tmpfs forwards both, so it answers as that tmpfs does.
    let source = Tmpfs::mount_with(env.path("space-source"), "size=2M");
    env.ctl(&["load", "passthroughfs"]).ok();
    let option = format!("source={},attr_timeout=0", path_str(&source.0));
    env.ctl(&["mount", "passthroughfs", path_str(&mnt), "-o", &option])
        .ok();
    let got = space_probe(&mnt);
    for (e, g) in expected.iter().zip(&got) {
        assert_eq!(g, e, "passthroughfs (left) differs from tmpfs (right)");
    }
    env.ctl(&["unmount", path_str(&mnt)]).ok();
}

/// `renameat2(RENAME_WHITEOUT)` leaves what overlayfs expects at the old name, a 0:0
/// character device, and directories count their entries in `st_size`, as on tmpfs.
#[test]
fn whiteouts_and_directory_sizes_are_as_on_tmpfs() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    let tmpfs = Tmpfs::mount_with(env.path("wh-tmpfs"), "mode=1777");
    env.ctl(&["load", "memfs"]).ok();
    let mnt = env.mountpoint("wh-memfs");
    env.ctl(&["mount", "memfs", path_str(&mnt)]).ok();
    let probe = |dir: &Path| {
        fs::create_dir(dir.join("d")).unwrap();
        fs::write(dir.join("d/a"), b"x").unwrap();
        nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            &dir.join("d/a"),
            nix::fcntl::AT_FDCWD,
            &dir.join("d/b"),
            nix::fcntl::RenameFlags::RENAME_WHITEOUT,
        )
        .unwrap();
        ["d", "d/a", "d/b"]
            .iter()
            .map(|name| {
                let meta = fs::symlink_metadata(dir.join(name)).unwrap();
                format!(
                    "{name}: mode={:o} rdev={} size={} nlink={} uid={}",
                    meta.mode(),
                    meta.rdev(),
                    meta.size(),
                    meta.nlink(),
                    meta.uid()
                )
            })
            .collect::<Vec<_>>()
    };
    let expected = probe(&tmpfs.0);
    assert_eq!(expected[1], "d/a: mode=20000 rdev=0 size=0 nlink=1 uid=0");
    assert_eq!(probe(&mnt), expected);
    env.ctl(&["unmount", path_str(&mnt)]).ok();
}

/// What a file system shows of nodes that lost their names but not their users: a removed
/// directory through its descriptor, an unlinked file through an `O_PATH` handle or an open
/// descriptor (reopened through /proc), an unlinked file whose pages were still being
/// written back, and `O_TMPFILE` files given a name with `linkat` (or refused one with
/// `O_EXCL`). tmpfs answers all of them; memfs must answer as it does. (Every descriptor is
/// close-on-exec: other tests start processes meanwhile, which must not keep our mounts
/// busy.)
fn lifetime_probe(dir: &Path) -> Vec<String> {
    use rustix::fs::{AtFlags, Mode as M, OFlags as O};
    let mut lines = Vec::new();
    let mut note = |what: &str, result: std::io::Result<String>| {
        lines.push(format!(
            "{what}: {}",
            result.unwrap_or_else(|e| format!("error {e}"))
        ));
    };
    let show = |st: rustix::fs::Stat| {
        format!(
            "mode={:o} nlink={} size={} blocks={}",
            st.st_mode, st.st_nlink, st.st_size, st.st_blocks
        )
    };
    let reopen = |fd: &std::os::fd::OwnedFd| -> std::io::Result<String> {
        let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(fd));
        Ok(String::from_utf8_lossy(&fs::read(path)?).into_owned())
    };

    let removed = dir.join("removed");
    fs::create_dir(&removed).unwrap();
    let fd = rustix::fs::open(&removed, O::RDONLY | O::DIRECTORY | O::CLOEXEC, M::empty()).unwrap();
    fs::remove_dir(&removed).unwrap();
    note(
        "fstat of a removed directory",
        rustix::fs::fstat(&fd).map(show).map_err(Into::into),
    );
    note(
        "'.' in a removed directory",
        rustix::fs::statat(&fd, ".", AtFlags::empty())
            .map(show)
            .map_err(Into::into),
    );
    note(
        "listing a removed directory",
        rustix::fs::Dir::read_from(&fd)
            .map(|d| d.filter_map(|e| e.ok()).count().to_string())
            .map_err(Into::into),
    );

    let path = dir.join("opath");
    fs::write(&path, b"kept by O_PATH").unwrap();
    let fd = rustix::fs::open(&path, O::PATH | O::CLOEXEC, M::empty()).unwrap();
    fs::remove_file(&path).unwrap();
    note(
        "fstat through O_PATH after unlink",
        rustix::fs::fstat(&fd).map(show).map_err(Into::into),
    );
    note("reopen through O_PATH after unlink", reopen(&fd));

    let path = dir.join("open");
    fs::write(&path, b"kept open").unwrap();
    let fd = rustix::fs::open(&path, O::RDONLY | O::CLOEXEC, M::empty()).unwrap();
    fs::remove_file(&path).unwrap();
    note("reopen an open file after unlink", reopen(&fd));
    drop(fd);

    let path = dir.join("written");
    fs::write(&path, vec![7u8; 100_000]).unwrap();
    fs::remove_file(&path).unwrap();
    let dir_fd = rustix::fs::open(dir, O::RDONLY | O::DIRECTORY | O::CLOEXEC, M::empty()).unwrap();
    note(
        "syncfs after write, close, unlink",
        rustix::fs::syncfs(&dir_fd)
            .map(|()| "ok".into())
            .map_err(Into::into),
    );

    for (what, exclusive) in [("O_TMPFILE", false), ("O_TMPFILE|O_EXCL", true)] {
        let flags =
            O::TMPFILE | O::RDWR | O::CLOEXEC | if exclusive { O::EXCL } else { O::empty() };
        let fd = match rustix::fs::open(dir, flags, M::from_raw_mode(0o640)) {
            Ok(fd) => fd,
            Err(e) => {
                note(what, Err(e.into()));
                continue;
            }
        };
        rustix::io::write(&fd, b"unnamed").unwrap();
        // Written back first: under -o writeback, blocks count once pages reach memfs.
        note(
            &format!("{what} fsync, fstat"),
            rustix::fs::fsync(&fd)
                .and_then(|()| rustix::fs::fstat(&fd))
                .map(show)
                .map_err(Into::into),
        );
        let name = dir.join(format!("named{}", u8::from(exclusive)));
        let proc_path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
        let linked = rustix::fs::linkat(
            rustix::fs::CWD,
            proc_path.as_str(),
            rustix::fs::CWD,
            &name,
            AtFlags::SYMLINK_FOLLOW,
        );
        note(
            &format!("{what} linkat"),
            linked.map_err(std::io::Error::from).and_then(|()| {
                let meta = fs::symlink_metadata(&name)?;
                Ok(format!(
                    "mode={:o} nlink={} {:?}",
                    meta.mode(),
                    meta.nlink(),
                    String::from_utf8_lossy(&fs::read(&name)?)
                ))
            }),
        );
    }
    lines
}

#[test]
fn unlinked_nodes_and_tmpfiles_live_as_on_tmpfs() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    let tmpfs = Tmpfs::mount_with(env.path("life-tmpfs"), "mode=1777");
    let expected = lifetime_probe(&tmpfs.0);
    // On tmpfs everything works but naming an O_EXCL tmpfile.
    let refused: Vec<&String> = expected.iter().filter(|l| l.contains("error")).collect();
    assert_eq!(
        refused,
        ["O_TMPFILE|O_EXCL linkat: error No such file or directory (os error 2)"],
        "tmpfs itself: {expected:#?}"
    );
    env.ctl(&["load", "memfs"]).ok();
    for options in ["attr_timeout=0", "writeback,attr_timeout=0"] {
        let mnt = env.mountpoint(&format!("life-{options}"));
        env.ctl(&["mount", "memfs", path_str(&mnt), "-o", options])
            .ok();
        let got = lifetime_probe(&mnt);
        env.ctl(&["unmount", path_str(&mnt)]).ok();
        assert_eq!(
            got, expected,
            "memfs -o {options} (left) differs from tmpfs"
        );
    }
}

/// Whether reading a file, listing a directory and following a link move atime as
/// `relatime` does on tmpfs (when atime is not later than the last change; not when it
/// is), and whether a write right after a create ever stamps a time before the creation's.
fn times_probe(dir: &Path) -> Vec<String> {
    use nix::sys::stat::{utimensat, UtimensatFlags};
    use nix::sys::time::TimeSpec;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let set = |path: &Path, atime: i64, mtime: i64| {
        utimensat(
            nix::fcntl::AT_FDCWD,
            path,
            &TimeSpec::new(atime, 0),
            &TimeSpec::new(mtime, 0),
            UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
    };
    let atime_moved = |path: &Path, before: i64| {
        let meta = fs::symlink_metadata(path).unwrap();
        if meta.atime() == before {
            "kept"
        } else {
            "moved"
        }
    };
    let mut lines = Vec::new();
    let (file, sub, link) = (dir.join("f"), dir.join("d"), dir.join("l"));
    fs::write(&file, b"data").unwrap();
    fs::create_dir(&sub).unwrap();
    std::os::unix::fs::symlink("f", &link).unwrap();
    for (what, atime, mtime) in [
        ("atime before mtime", 1000, 2000),
        ("atime after every change", now + 3600, 500),
    ] {
        set(&file, atime, mtime);
        fs::read(&file).unwrap();
        lines.push(format!("read, {what}: {}", atime_moved(&file, atime)));
        set(&sub, atime, mtime);
        fs::read_dir(&sub).unwrap().for_each(drop);
        lines.push(format!("listing, {what}: {}", atime_moved(&sub, atime)));
        set(&link, atime, mtime);
        fs::read_link(&link).unwrap();
        lines.push(format!("readlink, {what}: {}", atime_moved(&link, atime)));
    }
    let mut backwards = 0;
    for i in 0..200 {
        let path = dir.join(format!("new{i}"));
        let file = fs::File::create(&path).unwrap();
        let created = file.metadata().unwrap();
        std::io::Write::write_all(&mut &file, b"x").unwrap();
        file.sync_all().unwrap();
        let written = fs::metadata(&path).unwrap();
        let stamp = |secs: i64, nsec: i64| (secs, nsec);
        let born = stamp(created.ctime(), created.ctime_nsec());
        if stamp(written.mtime(), written.mtime_nsec()) < born
            || stamp(written.ctime(), written.ctime_nsec()) < born
        {
            backwards += 1;
        }
    }
    lines.push(format!(
        "writes stamped before their file's creation: {backwards}"
    ));

    // The birth time: there, at the creation, and kept through changes; statx's other
    // fields as stat's (a device number too).
    use rustix::fs::{AtFlags, StatxFlags};
    let statx = |path: &Path| {
        rustix::fs::statx(
            rustix::fs::CWD,
            path,
            AtFlags::SYMLINK_NOFOLLOW,
            StatxFlags::ALL,
        )
        .unwrap()
    };
    let born = dir.join("born");
    fs::File::create(&born).unwrap();
    let first = statx(&born);
    std::thread::sleep(std::time::Duration::from_millis(20));
    fs::write(&born, b"changed").unwrap();
    fs::set_permissions(&born, fs::Permissions::from_mode(0o600)).unwrap();
    fs::rename(&born, dir.join("reborn")).unwrap();
    let later = statx(&dir.join("reborn"));
    let has_btime = first.stx_mask & StatxFlags::BTIME.bits() != 0;
    let at = |t: rustix::fs::StatxTimestamp| (t.tv_sec, t.tv_nsec);
    lines.push(format!(
        "birth time reported {has_btime}, at the creation {}, kept {}, before the change {}",
        at(first.stx_btime) == at(first.stx_ctime),
        at(later.stx_btime) == at(first.stx_btime),
        at(later.stx_btime) < at(later.stx_mtime)
    ));
    let device = dir.join("null");
    nix::sys::stat::mknod(
        &device,
        nix::sys::stat::SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o644),
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    let sx = statx(&device);
    lines.push(format!(
        "device through statx: {}:{} mode {:o}",
        sx.stx_rdev_major, sx.stx_rdev_minor, sx.stx_mode
    ));
    lines
}

#[test]
fn atime_follows_relatime_and_times_never_go_backwards() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    let tmpfs = Tmpfs::mount_with(env.path("times-tmpfs"), "mode=1777");
    let expected = times_probe(&tmpfs.0);
    assert_eq!(expected[0], "read, atime before mtime: moved");
    assert!(
        expected.contains(
            &"birth time reported true, at the creation true, kept true, before the change true"
                .to_string()
        ),
        "tmpfs itself: {expected:#?}"
    );
    env.ctl(&["load", "memfs"]).ok();
    for options in ["attr_timeout=0", "writeback,attr_timeout=0", "writeback"] {
        let mnt = env.mountpoint(&format!("times-{options}"));
        env.ctl(&["mount", "memfs", path_str(&mnt), "-o", options])
            .ok();
        let got = times_probe(&mnt);
        env.ctl(&["unmount", path_str(&mnt)]).ok();
        assert_eq!(
            got, expected,
            "memfs -o {options} (left) differs from tmpfs"
        );
    }
}

/// POSIX ACLs end to end: an access ACL grants a user what the mode denies and sets the
/// mode, chmod narrows it, a default ACL replaces the umask for new nodes and is inherited
/// by subdirectories, an ACL the mode says all of is not kept. The unprivileged user (65534) is let in or kept out by the ACL alone.
fn acl_probe(dir: &Path) -> Vec<String> {
    const USER_OBJ: u16 = 1;
    const USER: u16 = 2;
    const GROUP_OBJ: u16 = 4;
    const MASK: u16 = 0x10;
    const OTHER: u16 = 0x20;
    const NOBODY: u32 = 65534;
    let (access, default) = ("system.posix_acl_access", "system.posix_acl_default");
    let mut lines = Vec::new();
    let get = |path: &Path, name: &str| -> String {
        let mut buf = vec![0u8; 256];
        match rustix::fs::getxattr(path, name, &mut buf) {
            Ok(len) => format!("{:?}", &buf[..len]),
            Err(e) => format!("none ({e})"),
        }
    };
    let mode = |path: &Path| format!("{:o}", fs::metadata(path).unwrap().mode());
    let as_nobody = |script: &str| -> String {
        let out = run({
            let mut c = fshost_tests::as_nobody("sh");
            c.args(["-c", script]).current_dir(dir);
            c
        });
        format!(
            "{} {}",
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).trim()
        )
    };
    let as_root = |script: &str| {
        let out = run({
            let mut c = Command::new("sh");
            c.args(["-c", script]).current_dir(dir);
            c
        });
        assert!(out.status.success(), "{script}: {out:?}");
    };
    let set = |path: &Path, name: &str, value: &[u8]| {
        rustix::fs::setxattr(path, name, value, rustix::fs::XattrFlags::empty())
            .map(|()| "set".to_string())
            .unwrap_or_else(|e| format!("refused ({e})"))
    };

    let (a, f) = (dir.join("a"), dir.join("a/f"));
    fs::create_dir(&a).unwrap();
    fs::set_permissions(&a, fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(&f, b"secret").unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap();
    lines.push(format!("nobody reads a 600 file: {}", as_nobody("cat a/f")));
    let grant = acl_value(&[
        (USER_OBJ, 6, 0),
        (USER, 4, NOBODY),
        (GROUP_OBJ, 0, 0),
        (MASK, 4, 0),
        (OTHER, 0, 0),
    ]);
    lines.push(format!("grant nobody read: {}", set(&f, access, &grant)));
    lines.push(format!("mode {} acl {}", mode(&f), get(&f, access)));
    lines.push(format!("nobody reads: {}", as_nobody("cat a/f")));
    lines.push(format!("nobody writes: {}", as_nobody("echo x >> a/f")));
    fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap();
    lines.push(format!("after chmod 600: acl {}", get(&f, access)));
    lines.push(format!("nobody reads: {}", as_nobody("cat a/f")));
    fs::set_permissions(&f, fs::Permissions::from_mode(0o640)).unwrap();
    lines.push(format!(
        "remove: {} mode {} acl {}",
        rustix::fs::removexattr(&f, access).map_or_else(|e| e.to_string(), |()| "ok".into()),
        mode(&f),
        get(&f, access)
    ));
    lines.push(format!("nobody reads: {}", as_nobody("cat a/f")));

    let inherited = acl_value(&[
        (USER_OBJ, 7, 0),
        (USER, 7, NOBODY),
        (GROUP_OBJ, 5, 0),
        (MASK, 7, 0),
        (OTHER, 0, 0),
    ]);
    lines.push(format!("default on a: {}", set(&a, default, &inherited)));
    lines.push(format!(
        "default on a file: {}",
        set(&f, default, &inherited)
    ));
    as_root("umask 022; echo new > a/new; mkdir a/sub; mkdir a/sub/deeper; mkfifo a/fifo; ln -s new a/link");
    for name in ["new", "sub", "sub/deeper", "fifo"] {
        let path = a.join(name);
        lines.push(format!(
            "{name}: mode {} access {} default {}",
            mode(&path),
            get(&path, access),
            get(&path, default)
        ));
    }
    lines.push(format!(
        "nobody writes new: {}",
        as_nobody("echo more >> a/new; cat a/new")
    ));
    lines.push(format!(
        "nobody creates in a: {}",
        as_nobody("echo mine > a/mine && cat a/mine")
    ));
    let minimal = acl_value(&[(USER_OBJ, 7, 0), (GROUP_OBJ, 4, 0), (OTHER, 0, 0)]);
    let new = a.join("new");
    lines.push(format!(
        "minimal ACL: {} mode {} acl {}",
        set(&new, access, &minimal),
        mode(&new),
        get(&new, access)
    ));
    lines.push(format!("nobody reads new: {}", as_nobody("cat a/new")));
    rustix::fs::removexattr(&a, default).unwrap();
    as_root("umask 027; echo plain > a/plain; mkdir a/plaindir");
    lines.push(format!(
        "without a default: {} {}",
        mode(&a.join("plain")),
        mode(&a.join("plaindir"))
    ));
    lines
}

#[test]
fn posix_acls_work_as_on_tmpfs() {
    if !fuse_available() || !tool_available("setpriv") {
        return;
    }
    let env = Env::start();
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let tmpfs = Tmpfs::mount_with(env.path("acl-tmpfs"), "mode=1777");
    let expected = acl_probe(&tmpfs.0);
    eprintln!("on tmpfs: {expected:#?}");
    assert!(
        expected.contains(&"nobody reads: 0 secret".to_string()),
        "tmpfs itself: {expected:#?}"
    );
    env.ctl(&["load", "memfs"]).ok();
    for options in ["allow_other", "allow_other,attr_timeout=0"] {
        let mnt = env.mountpoint(&format!("acl-{options}"));
        env.ctl(&["mount", "memfs", path_str(&mnt), "-o", options])
            .ok();
        fs::set_permissions(&mnt, fs::Permissions::from_mode(0o1777)).unwrap();
        let got = acl_probe(&mnt);
        env.ctl(&["unmount", path_str(&mnt)]).ok();
        for (g, e) in got.iter().zip(&expected) {
            assert_eq!(g, e, "memfs -o {options} (left) differs from tmpfs");
        }
        assert_eq!(got.len(), expected.len());
    }
}

/// Where setuid, setgid and file capabilities (`security.capability`) go, case by case:
/// writes, truncations and changes of owner by an unprivileged user and by root (memfs
/// clears the bits itself, `WANT_KILL_PRIV`; the kernel removes the capabilities).
fn setid_probe(dir: &Path) -> Vec<String> {
    let as_user = |script: &str, file: &Path| {
        let done = run(fshost_tests::nobody_sh(script, file));
        assert!(done.status.success(), "{script} on {}", file.display());
    };
    let as_root = |script: &str, file: &Path| {
        let mut sh = Command::new("sh");
        sh.arg("-c").arg(script).arg("sh").arg(file);
        assert!(run(sh).status.success(), "{script} on {}", file.display());
    };
    let mode = |file: &Path| format!("{:o}", fs::metadata(file).unwrap().mode() & 0o7777);
    // CAP_NET_RAW permitted and effective, revision 2 (VFS_CAP_REVISION_2 | effective).
    let capability: Vec<u8> = [0x0200_0001u32, 1 << 13, 0, 0, 0]
        .iter()
        .flat_map(|word| word.to_le_bytes())
        .collect();
    let has_capability = |file: &Path| {
        let mut value = [0u8; 64];
        match rustix::fs::getxattr(file, "security.capability", &mut value[..]) {
            Ok(n) if value[..n] == capability[..] => "kept",
            Ok(_) => "changed",
            Err(rustix::io::Errno::NODATA) => "removed",
            Err(e) => panic!("security.capability of {}: {e}", file.display()),
        }
    };
    // What, on a file with which bits (and group, if not root's), done how.
    type Case<'a> = (&'a str, u32, &'a dyn Fn(&Path));
    const IN_THE_USERS_GROUP: &str = ", in the file's group";
    let cases: [Case; 12] = [
        ("user appends", 0o4777, &|f| as_user("echo x >> \"$1\"", f)),
        ("user appends, setgid and group x", 0o2777, &|f| {
            as_user("echo x >> \"$1\"", f)
        }),
        ("user appends, setgid without group x", 0o2767, &|f| {
            as_user("echo x >> \"$1\"", f)
        }),
        (
            "user appends, setgid without group x, in the file's group",
            0o2767,
            &|f| as_user("echo x >> \"$1\"", f),
        ),
        ("user appends, both", 0o6777, &|f| {
            as_user("echo x >> \"$1\"", f)
        }),
        ("user truncates", 0o4777, &|f| {
            as_user("truncate -s 0 \"$1\"", f)
        }),
        ("user opens with O_TRUNC", 0o4777, &|f| {
            as_user(": > \"$1\"", f)
        }),
        ("root appends", 0o6777, &|f| as_root("echo x >> \"$1\"", f)),
        ("root truncates", 0o6777, &|f| {
            as_root("truncate -s 1 \"$1\"", f)
        }),
        ("root chowns", 0o6755, &|f| as_root("chown 65534 \"$1\"", f)),
        ("root chgrps", 0o6755, &|f| as_root("chgrp 65534 \"$1\"", f)),
        (
            "user appends through a handle opened before the bits were set",
            0o777,
            &|f| {
                let mut sh =
                    fshost_tests::nobody_sh("exec 3>>\"$1\"; echo opened; read _; echo x >&3", f);
                sh.stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped());
                let mut child = sh.spawn().unwrap();
                let mut line = String::new();
                std::io::BufRead::read_line(
                    &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
                    &mut line,
                )
                .unwrap();
                fs::set_permissions(f, fs::Permissions::from_mode(0o4777)).unwrap();
                drop(child.stdin.take());
                assert!(child.wait().unwrap().success());
            },
        ),
    ];
    let mut lines = Vec::new();
    for (i, (what, bits, act)) in cases.iter().enumerate() {
        let file = dir.join(format!("setid{i}"));
        fs::write(&file, b"data\n").unwrap();
        if what.ends_with(IN_THE_USERS_GROUP) {
            nix::unistd::chown(&file, None, Some(65534.into())).unwrap();
        }
        fs::set_permissions(&file, fs::Permissions::from_mode(*bits)).unwrap();
        rustix::fs::setxattr(
            &file,
            "security.capability",
            &capability,
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
        act(&file);
        lines.push(format!(
            "{what}: {:o} -> {}, capabilities {}",
            bits,
            mode(&file),
            has_capability(&file)
        ));
    }
    // A directory keeps its setgid bit through a change of owner.
    let sub = dir.join("setid-dir");
    fs::create_dir(&sub).unwrap();
    fs::set_permissions(&sub, fs::Permissions::from_mode(0o2775)).unwrap();
    nix::unistd::chown(&sub, Some(65534.into()), None).unwrap();
    lines.push(format!(
        "root chowns a setgid directory: 2775 -> {}",
        mode(&sub)
    ));
    lines
}

#[test]
fn setuid_and_setgid_are_cleared_as_on_tmpfs() {
    if !fuse_available() || !tool_available("setpriv") || !tool_available("truncate") {
        return;
    }
    let env = Env::start();
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let tmpfs = Tmpfs::mount_with(env.path("setid-tmpfs"), "mode=1777");
    let expected = setid_probe(&tmpfs.0);
    eprintln!("on tmpfs: {expected:#?}");
    assert!(
        expected.contains(&"user appends: 4777 -> 777, capabilities removed".to_string())
            && expected.contains(&"root appends: 6777 -> 6777, capabilities removed".to_string()),
        "tmpfs itself: {expected:#?}"
    );
    env.ctl(&["load", "memfs"]).ok();
    for options in [
        "allow_other",
        "allow_other,keep_cache,attr_timeout=60",
        "allow_other,nopassthrough",
        "allow_other,writeback",
    ] {
        let mnt = env.mountpoint(&format!("setid-{options}"));
        env.ctl(&["mount", "memfs", path_str(&mnt), "-o", options])
            .ok();
        fs::set_permissions(&mnt, fs::Permissions::from_mode(0o1777)).unwrap();
        let got = setid_probe(&mnt);
        env.ctl(&["unmount", path_str(&mnt)]).ok();
        assert_eq!(
            got, expected,
            "memfs -o {options} (left) differs from tmpfs"
        );
    }
}

/// What statfs shows, step by step, as files come and go: sizes, free blocks and inodes,
/// and where the inode limit stops creation.
fn statfs_probe(dir: &Path) -> Vec<String> {
    let show = |what: &str| {
        let st = nix::sys::statvfs::statvfs(dir).unwrap();
        format!(
            "{what}: bsize={} blocks={} bfree={} bavail={} files={} ffree={} namemax={}",
            st.block_size(),
            st.blocks(),
            st.blocks_free(),
            st.blocks_available(),
            st.files(),
            st.files_free(),
            st.name_max()
        )
    };
    let mut lines = vec![show("empty")];
    fs::write(dir.join("a"), vec![1u8; 10_000]).unwrap();
    fs::create_dir(dir.join("d")).unwrap();
    lines.push(show("a file of 10000 bytes and a directory"));
    let mut made = 0;
    let refused = loop {
        match fs::File::create(dir.join(format!("n{made}"))) {
            Ok(_) => made += 1,
            Err(e) => break e.raw_os_error(),
        }
        if made == 100 {
            break None;
        }
    };
    lines.push(format!("created {made} more, then {refused:?}"));
    lines.push(show("full of inodes"));
    fs::remove_file(dir.join("a")).unwrap();
    lines.push(show("the file removed"));
    lines
}

#[test]
fn statfs_reports_limits_and_use_as_on_tmpfs() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    env.ctl(&["load", "memfs"]).ok();
    for options in ["size=2M,nr_inodes=20", "nr_inodes=50"] {
        let tmpfs = Tmpfs::mount_with(env.path("statfs-tmpfs"), options);
        let expected = statfs_probe(&tmpfs.0);
        drop(tmpfs);
        let mnt = env.mountpoint("statfs-memfs");
        env.ctl(&[
            "mount",
            "memfs",
            path_str(&mnt),
            "-o",
            &format!("{options},attr_timeout=0"),
        ])
        .ok();
        let got = statfs_probe(&mnt);
        env.ctl(&["unmount", path_str(&mnt)]).ok();
        assert_eq!(
            got, expected,
            "memfs -o {options} (left) differs from tmpfs"
        );
    }
}

/// chattr's flags: what append-only, immutable and noatime allow and refuse on files and
/// directories, set and read through the FS_IOC_GETFLAGS/SETFLAGS ioctls, step by step.
fn flags_probe(dir: &Path) -> Vec<String> {
    use rustix::fs::{IFlags, OFlags as O};
    let mut lines = Vec::new();
    let outcome = |what: &str, result: std::io::Result<()>| {
        format!(
            "{what}: {}",
            result.map_or_else(|e| format!("error {e}"), |()| "ok".into())
        )
    };
    let open = |path: &Path, flags: O| {
        rustix::fs::open(
            path,
            flags | O::CLOEXEC,
            rustix::fs::Mode::from_raw_mode(0o644),
        )
        .map_err(std::io::Error::from)
    };
    let set_flags = |path: &Path, flags: IFlags| -> std::io::Result<()> {
        let fd = open(path, O::RDONLY | O::NONBLOCK)?;
        rustix::fs::ioctl_setflags(&fd, flags)?;
        Ok(())
    };
    let get_flags = |path: &Path| -> String {
        open(path, O::RDONLY | O::NONBLOCK)
            .and_then(|fd| Ok(rustix::fs::ioctl_getflags(&fd)?))
            .map_or_else(|e| format!("error {e}"), |f| format!("{:#x}", f.bits()))
    };
    let touch_now = |path: &Path| -> std::io::Result<()> {
        let now = rustix::fs::Timestamps {
            last_access: rustix::fs::Timespec {
                tv_sec: 0,
                tv_nsec: rustix::fs::UTIME_NOW,
            },
            last_modification: rustix::fs::Timespec {
                tv_sec: 0,
                tv_nsec: rustix::fs::UTIME_NOW,
            },
        };
        Ok(rustix::fs::utimensat(
            rustix::fs::CWD,
            path,
            &now,
            rustix::fs::AtFlags::empty(),
        )?)
    };
    let times = |path: &Path| -> std::io::Result<()> {
        let set = rustix::fs::Timestamps {
            last_access: rustix::fs::Timespec {
                tv_sec: 5,
                tv_nsec: 0,
            },
            last_modification: rustix::fs::Timespec {
                tv_sec: 5,
                tv_nsec: 0,
            },
        };
        Ok(rustix::fs::utimensat(
            rustix::fs::CWD,
            path,
            &set,
            rustix::fs::AtFlags::empty(),
        )?)
    };
    let xattr = |path: &Path| -> std::io::Result<()> {
        Ok(rustix::fs::setxattr(
            path,
            "user.k",
            b"v",
            rustix::fs::XattrFlags::empty(),
        )?)
    };
    let write_at = |path: &Path, flags: O| -> std::io::Result<()> {
        let fd = open(path, flags)?;
        rustix::io::write(&fd, b"more")?;
        Ok(())
    };
    let allocate = |path: &Path, mode: rustix::fs::FallocateFlags| -> std::io::Result<()> {
        let fd = open(path, O::WRONLY | O::APPEND)?;
        Ok(rustix::fs::fallocate(&fd, mode, 0, 8192)?)
    };

    for (name, flags) in [("append", IFlags::APPEND), ("immutable", IFlags::IMMUTABLE)] {
        let path = dir.join(name);
        fs::write(&path, b"data").unwrap();
        lines.push(outcome(&format!("{name}: set"), set_flags(&path, flags)));
        lines.push(format!("{name}: flags {}", get_flags(&path)));
        lines.push(outcome(&format!("{name}: read"), fs::read(&path).map(drop)));
        lines.push(outcome(
            &format!("{name}: write"),
            write_at(&path, O::WRONLY),
        ));
        lines.push(outcome(
            &format!("{name}: append"),
            write_at(&path, O::WRONLY | O::APPEND),
        ));
        lines.push(outcome(
            &format!("{name}: O_TRUNC"),
            open(&path, O::WRONLY | O::APPEND | O::TRUNC).map(drop),
        ));
        lines.push(outcome(
            &format!("{name}: truncate"),
            nix::unistd::truncate(&path, 1).map_err(Into::into),
        ));
        lines.push(outcome(
            &format!("{name}: fallocate keep"),
            allocate(&path, rustix::fs::FallocateFlags::KEEP_SIZE),
        ));
        lines.push(outcome(
            &format!("{name}: fallocate grow"),
            allocate(&path, rustix::fs::FallocateFlags::empty()),
        ));
        lines.push(outcome(
            &format!("{name}: chmod"),
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)),
        ));
        lines.push(outcome(
            &format!("{name}: chown"),
            std::os::unix::fs::chown(&path, Some(0), Some(0)),
        ));
        lines.push(outcome(&format!("{name}: set times"), times(&path)));
        lines.push(outcome(&format!("{name}: touch now"), touch_now(&path)));
        lines.push(outcome(&format!("{name}: setxattr"), xattr(&path)));
        lines.push(outcome(
            &format!("{name}: link"),
            fs::hard_link(&path, dir.join(format!("{name}-link"))),
        ));
        lines.push(outcome(
            &format!("{name}: rename"),
            fs::rename(&path, dir.join(format!("{name}-moved"))),
        ));
        lines.push(outcome(&format!("{name}: unlink"), fs::remove_file(&path)));
        lines.push(outcome(
            &format!("{name}: clear"),
            set_flags(&path, IFlags::empty()),
        ));
        lines.push(format!(
            "{name}: size {}",
            fs::metadata(&path).unwrap().len()
        ));
        lines.push(outcome(
            &format!("{name}: unlink after clearing"),
            fs::remove_file(&path),
        ));
    }
    for (name, flags) in [
        ("append-dir", IFlags::APPEND),
        ("immutable-dir", IFlags::IMMUTABLE),
    ] {
        let path = dir.join(name);
        fs::create_dir(&path).unwrap();
        fs::write(path.join("old"), b"x").unwrap();
        lines.push(outcome(&format!("{name}: set"), set_flags(&path, flags)));
        lines.push(format!("{name}: flags {}", get_flags(&path)));
        lines.push(outcome(
            &format!("{name}: create"),
            fs::write(path.join("new"), b"x"),
        ));
        lines.push(outcome(
            &format!("{name}: mkdir"),
            fs::create_dir(path.join("sub")),
        ));
        lines.push(outcome(
            &format!("{name}: symlink"),
            std::os::unix::fs::symlink("old", path.join("sym")),
        ));
        lines.push(outcome(
            &format!("{name}: O_TMPFILE"),
            open(&path, O::TMPFILE | O::RDWR).map(drop),
        ));
        lines.push(outcome(
            &format!("{name}: write old"),
            write_at(&path.join("old"), O::WRONLY | O::TRUNC),
        ));
        lines.push(outcome(
            &format!("{name}: unlink old"),
            fs::remove_file(path.join("old")),
        ));
        lines.push(outcome(
            &format!("{name}: rename old out"),
            fs::rename(path.join("old"), dir.join(format!("{name}-out"))),
        ));
        lines.push(outcome(&format!("{name}: rename in"), {
            fs::write(dir.join("incoming"), b"x").unwrap();
            fs::rename(dir.join("incoming"), path.join("incoming"))
        }));
        lines.push(outcome(&format!("{name}: rmdir"), fs::remove_dir(&path)));
        lines.push(outcome(
            &format!("{name}: clear"),
            set_flags(&path, IFlags::empty()),
        ));
        lines.push(format!(
            "{name}: entries {}",
            fs::read_dir(&path).unwrap().count()
        ));
    }
    let quiet = dir.join("noatime");
    fs::write(&quiet, b"data").unwrap();
    lines.push(outcome(
        "noatime: set",
        set_flags(&quiet, IFlags::NOATIME | IFlags::NODUMP),
    ));
    lines.push(format!("noatime: flags {}", get_flags(&quiet)));
    times(&quiet).unwrap();
    fs::read(&quiet).unwrap();
    lines.push(format!(
        "noatime: atime after a read {}",
        fs::metadata(&quiet).unwrap().atime()
    ));
    lines.push(outcome("sync flag", set_flags(&quiet, IFlags::SYNC)));
    lines
}

#[test]
fn chattr_flags_work_as_on_tmpfs() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    let tmpfs = Tmpfs::mount_with(env.path("flags-tmpfs"), "mode=1777");
    let expected = flags_probe(&tmpfs.0);
    eprintln!("on tmpfs: {expected:#?}");
    assert!(expected
        .contains(&"immutable: unlink: error Operation not permitted (os error 1)".to_string()));
    env.ctl(&["load", "memfs"]).ok();
    for options in ["attr_timeout=0", "writeback"] {
        let mnt = env.mountpoint(&format!("flags-{options}"));
        env.ctl(&["mount", "memfs", path_str(&mnt), "-o", options])
            .ok();
        let got = flags_probe(&mnt);
        env.ctl(&["unmount", path_str(&mnt)]).ok();
        for (g, e) in got.iter().zip(&expected) {
            assert_eq!(g, e, "memfs -o {options} (left) differs from tmpfs");
        }
        assert_eq!(got.len(), expected.len());
    }
}
