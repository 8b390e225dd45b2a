//! fsops: runs a seeded random sequence of file system operations in a directory and prints
//! one line per operation (its result or errno, and which timestamps it changed), then the
//! final tree. The differential test runs it on tmpfs and on a memfs mount, as root and as
//! an unprivileged user, and compares the two outputs line by line.
//!
//! Usage: fsops DIR SEED OPS

use std::fs::{self, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use fshost_tests::acl_value;
use nix::fcntl::RenameFlags;
use nix::sys::stat::{Mode, UtimensatFlags};
use nix::sys::time::TimeSpec;

const DIRS: [&str; 4] = ["", "d1", "d1/d2", "d3"];
const NAMES: [&str; 7] = ["a", "b", "c", "d1", "d2", "d3", "f"];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

fn errno_name(e: i32) -> String {
    nix::Error::from_raw(e)
        .to_string()
        .split(':')
        .next()
        .unwrap_or("?")
        .to_string()
}

fn io(result: std::io::Result<String>) -> String {
    match result {
        Ok(s) => format!("ok {s}"),
        Err(e) => format!("err {}", errno_name(e.raw_os_error().unwrap_or(0))),
    }
}

fn rx(result: rustix::io::Result<String>) -> String {
    match result {
        Ok(s) => format!("ok {s}"),
        Err(e) => format!("err {}", errno_name(e.raw_os_error())),
    }
}

fn nx(result: nix::Result<String>) -> String {
    match result {
        Ok(s) => format!("ok {s}"),
        Err(e) => format!("err {}", errno_name(e as i32)),
    }
}

/// A cheap content fingerprint (FNV-1a) plus the length.
fn digest(data: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{}:{h:016x}", data.len())
}

/// Digest of the parts of a file that operations write (the first 2 MiB and the last
/// 64 KiB): a sparse 5 GiB file is not read whole.
fn content_digest(path: &Path) -> String {
    let read = || -> std::io::Result<String> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)?;
        let size = file.metadata()?.len();
        let mut head = vec![0u8; size.min(2 << 20) as usize];
        file.read_exact_at(&mut head, 0)?;
        let tail_start = size.saturating_sub(64 << 10).max(head.len() as u64);
        let mut tail = vec![0u8; (size - tail_start) as usize];
        file.read_exact_at(&mut tail, tail_start)?;
        Ok(format!("{size} {} {}", digest(&head), digest(&tail)))
    };
    read().unwrap_or_else(|e| format!("unreadable {}", e.raw_os_error().unwrap_or(0)))
}

fn kind(meta: &fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        "dir"
    } else if t.is_symlink() {
        "link"
    } else if t.is_file() {
        "file"
    } else {
        "other"
    }
}

/// What a stat shows that must match between tmpfs and memfs (no inode numbers, no times;
/// a directory's size counts its entries on both).
fn describe(meta: &fs::Metadata) -> String {
    format!(
        "{} mode={:o} nlink={} uid={} gid={} size={} blocks={}",
        kind(meta),
        meta.mode(),
        meta.nlink(),
        meta.uid(),
        meta.gid(),
        meta.size(),
        meta.blocks()
    )
}

/// The mtime every watched path gets before an operation, so that "changed" is exact
/// (a coarse clock cannot hide a change). ctime cannot be set, so it is not compared.
const SENTINEL: i64 = 1;

/// Sets the sentinel mtime; returns whether the path is watched (it exists and we may).
fn arm(path: &Path) -> bool {
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &TimeSpec::UTIME_OMIT,
        &TimeSpec::new(SENTINEL, 0),
        UtimensatFlags::NoFollowSymlink,
    )
    .is_ok()
}

/// "m" if an armed path's mtime changed, "-" if not, "." if it was not armed or is gone.
fn changes(armed: &[(PathBuf, bool)]) -> String {
    armed
        .iter()
        .map(|(path, armed)| match (armed, fs::symlink_metadata(path)) {
            (true, Ok(m)) if (m.mtime(), m.mtime_nsec()) != (SENTINEL, 0) => "m",
            (true, Ok(_)) => "-",
            _ => ".",
        })
        .collect::<Vec<_>>()
        .join("")
}

fn parent(p: &Path) -> PathBuf {
    p.parent().map(Path::to_path_buf).unwrap_or_default()
}

fn snapshot(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let full = root.join(&rel);
        let Ok(meta) = fs::symlink_metadata(&full) else {
            continue;
        };
        let extra = if meta.file_type().is_symlink() {
            format!(
                "-> {}",
                fs::read_link(&full)
                    .map(|t| t.display().to_string())
                    .unwrap_or_default()
            )
        } else if meta.is_file() {
            content_digest(&full)
        } else {
            String::new()
        };
        out.push(format!("{} {} {extra}", rel.display(), describe(&meta)));
        if meta.is_dir() {
            let mut names: Vec<_> = fs::read_dir(&full)
                .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
                .unwrap_or_default();
            names.sort();
            for name in names.into_iter().rev() {
                stack.push(rel.join(name));
            }
        }
    }
    out
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, seed, ops] = args.as_slice() else {
        eprintln!("usage: fsops DIR SEED OPS");
        std::process::exit(2);
    };
    let root = PathBuf::from(dir);
    let mut rng = Rng(seed.parse::<u64>().expect("seed") | 1);
    let ops: u64 = ops.parse().expect("ops");
    let uid = nix::unistd::geteuid().as_raw();
    let gid = nix::unistd::getegid().as_raw();
    for i in 0..ops {
        let rel = |rng: &mut Rng| PathBuf::from(rng.pick(&DIRS)).join(rng.pick(&NAMES));
        let a = rel(&mut rng);
        let b = rel(&mut rng);
        let (pa, pb) = (root.join(&a), root.join(&b));
        let watch: Vec<PathBuf> = vec![
            pa.clone(),
            root.join(parent(&a)),
            pb.clone(),
            root.join(parent(&b)),
        ];
        let before: Vec<_> = watch.iter().map(|p| (p.clone(), arm(p))).collect();
        let choice = rng.below(42);
        let mode =
            [0o644u32, 0o600, 0o755, 0o4755, 0o2775, 0o1777, 0o000, 0o444][rng.below(8) as usize];
        let n = rng.below(9000) as usize;
        let off = [0u64, 1, 4095, 4096, 10_000, 5 * (1 << 30)][rng.below(6) as usize];
        let (desc, result) = match choice {
            0 | 1 => (
                "create",
                io(OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode)
                    .open(&pa)
                    .map(|_| String::new())),
            ),
            2..=4 => (
                "write",
                io(OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&pa)
                    .and_then(|f| {
                        let data: Vec<u8> = (0..n).map(|k| (k as u64 * 31 + i) as u8).collect();
                        f.write_all_at(&data, off % (1 << 20))
                            .map(|()| String::new())
                    })),
            ),
            5 => (
                "append",
                io(OpenOptions::new()
                    .append(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&pa)
                    .and_then(|f| {
                        use std::io::Write;
                        (&f).write_all(&vec![b'x'; n % 100 + 1])
                            .map(|()| String::new())
                    })),
            ),
            6 | 7 => (
                "read",
                io(OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&pa)
                    .and_then(|f| {
                        let mut buf = vec![0u8; n];
                        let got = f.read_at(&mut buf, off % 20_000)?;
                        Ok(digest(&buf[..got]))
                    })),
            ),
            8 => (
                "truncate",
                io(OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&pa)
                    .and_then(|f| {
                        f.set_len(off % 12_000 + n as u64 % 3)
                            .map(|()| String::new())
                    })),
            ),
            9 | 10 => (
                "mkdir",
                io(fs::create_dir(&pa)
                    .and_then(|()| {
                        fs::set_permissions(&pa, fs::Permissions::from_mode(mode | 0o700))
                    })
                    .map(|()| String::new())),
            ),
            11 => ("rmdir", io(fs::remove_dir(&pa).map(|()| String::new()))),
            12 | 13 => ("unlink", io(fs::remove_file(&pa).map(|()| String::new()))),
            14..=16 => {
                let flags = [
                    RenameFlags::empty(),
                    RenameFlags::RENAME_NOREPLACE,
                    RenameFlags::RENAME_EXCHANGE,
                    RenameFlags::RENAME_WHITEOUT,
                ][rng.below(4) as usize];
                (
                    "rename",
                    nx(nix::fcntl::renameat2(
                        nix::fcntl::AT_FDCWD,
                        &pa,
                        nix::fcntl::AT_FDCWD,
                        &pb,
                        flags,
                    )
                    .map(|()| format!("{flags:?}"))),
                )
            }
            17 => ("link", io(fs::hard_link(&pa, &pb).map(|()| String::new()))),
            18 => (
                "symlink",
                io(std::os::unix::fs::symlink(&a, &pb).map(|()| String::new())),
            ),
            19 => (
                "readlink",
                io(fs::read_link(&pa).map(|t| t.display().to_string())),
            ),
            20 => (
                "chmod",
                io(fs::set_permissions(&pa, fs::Permissions::from_mode(mode))
                    .map(|()| String::new())),
            ),
            21 => {
                let (u, g) = [(uid, gid), (0, 0), (65534, 65534), (uid, 0)][rng.below(4) as usize];
                (
                    "chown",
                    nx(nix::unistd::chown(&pa, Some(u.into()), Some(g.into()))
                        .map(|()| format!("{u}:{g}"))),
                )
            }
            22 => {
                let t = |rng: &mut Rng| match rng.below(3) {
                    0 => TimeSpec::UTIME_NOW,
                    1 => TimeSpec::UTIME_OMIT,
                    _ => TimeSpec::new(1_000_000_000 + rng.below(1000) as i64, 5),
                };
                let (at, mt) = (t(&mut rng), t(&mut rng));
                let r = nix::sys::stat::utimensat(
                    nix::fcntl::AT_FDCWD,
                    &pa,
                    &at,
                    &mt,
                    UtimensatFlags::NoFollowSymlink,
                );
                let shown = match (r, fs::symlink_metadata(&pa)) {
                    (Ok(()), Ok(m)) if mt != TimeSpec::UTIME_NOW && mt != TimeSpec::UTIME_OMIT => {
                        Ok(format!("mtime={}", m.mtime()))
                    }
                    (Ok(()), _) => Ok(String::new()),
                    (Err(e), _) => Err(e),
                };
                ("utimens", nx(shown))
            }
            23 | 24 => ("stat", io(fs::symlink_metadata(&pa).map(|m| describe(&m)))),
            25 => (
                "readdir",
                io(fs::read_dir(&pa).and_then(|d| {
                    let mut names = d
                        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                        .collect::<std::io::Result<Vec<_>>>()?;
                    names.sort();
                    Ok(names.join(" "))
                })),
            ),
            26 => (
                "mkfifo",
                nx(nix::unistd::mkfifo(&pa, Mode::from_bits_truncate(mode))
                    .map(|()| String::new())),
            ),
            27 => (
                "open-unlink-read",
                io(OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&pa)
                    .and_then(|mut f| {
                        fs::remove_file(&pa)?;
                        let mut data = Vec::new();
                        // The first 64 KiB: a sparse 5 GiB file is not read whole.
                        (&mut f).take(64 << 10).read_to_end(&mut data)?;
                        Ok(digest(&data))
                    })),
            ),
            30 => {
                let name = ["user.a", "user.b", "trusted.t", "security.x"][rng.below(4) as usize];
                let flags = [
                    rustix::fs::XattrFlags::empty(),
                    rustix::fs::XattrFlags::CREATE,
                    rustix::fs::XattrFlags::REPLACE,
                ][rng.below(3) as usize];
                let value = vec![b'v'; n % 300];
                (
                    "setxattr",
                    rx(rustix::fs::lsetxattr(&pa, name, &value, flags)
                        .map(|()| format!("{name} {flags:?}"))),
                )
            }
            31 => {
                let name = ["user.a", "user.b", "trusted.t"][rng.below(3) as usize];
                let mut buf = vec![0u8; 512];
                (
                    "getxattr",
                    rx(rustix::fs::lgetxattr(&pa, name, &mut buf).map(|len| digest(&buf[..len]))),
                )
            }
            32 => {
                let mut buf = vec![0u8; 512];
                (
                    "listxattr",
                    rx(rustix::fs::llistxattr(&pa, &mut buf).map(|len| {
                        let mut names: Vec<String> = buf[..len]
                            .split(|b| *b == 0)
                            .filter(|n| !n.is_empty())
                            .map(|n| String::from_utf8_lossy(n).into_owned())
                            .collect();
                        names.sort();
                        names.join(",")
                    })),
                )
            }
            33 => {
                let name = ["user.a", "user.b"][rng.below(2) as usize];
                (
                    "removexattr",
                    rx(rustix::fs::lremovexattr(&pa, name).map(|()| name.to_string())),
                )
            }
            34 => {
                use nix::fcntl::FallocateFlags as F;
                let (name, flags) = [
                    ("0", F::empty()),
                    ("keep", F::FALLOC_FL_KEEP_SIZE),
                    ("punch", F::FALLOC_FL_PUNCH_HOLE | F::FALLOC_FL_KEEP_SIZE),
                    ("punch-alone", F::FALLOC_FL_PUNCH_HOLE),
                    // Not FALLOC_FL_ZERO_RANGE: on any FUSE mount the kernel clears
                    // setuid/setgid before it asks the file system, which then refuses
                    // (EOPNOTSUPP, as tmpfs); tmpfs refuses first and keeps the bits.
                ][rng.below(4) as usize];
                (
                    "fallocate",
                    io(OpenOptions::new()
                        .write(true)
                        .custom_flags(libc::O_NONBLOCK)
                        .open(&pa)
                        .and_then(|f| {
                            nix::fcntl::fallocate(&f, flags, off as i64, n as i64)
                                .map_err(std::io::Error::from)?;
                            Ok(format!("{name} {}", describe(&f.metadata()?)))
                        })),
                )
            }
            35 => {
                let (name, whence) = [
                    ("data", nix::unistd::Whence::SeekData),
                    ("hole", nix::unistd::Whence::SeekHole),
                ][rng.below(2) as usize];
                let at = [0i64, 1, 4095, 4096, 8192, 10_000, 12_288][rng.below(7) as usize];
                (
                    "lseek",
                    io(OpenOptions::new()
                        .read(true)
                        .custom_flags(libc::O_NONBLOCK)
                        .open(&pa)
                        .and_then(|f| {
                            // On a directory FUSE answers as the VFS does (ENXIO), tmpfs
                            // EINVAL: the kernel's difference, not memfs's.
                            if f.metadata()?.is_dir() {
                                return Ok("a directory".to_string());
                            }
                            let found =
                                nix::unistd::lseek(&f, at, whence).map_err(std::io::Error::from)?;
                            Ok(format!("{name} {at} -> {found}"))
                        })),
                )
            }
            36 => (
                "tmpfile-linkat",
                io((|| {
                    use std::os::fd::AsRawFd;
                    let file = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .custom_flags(libc::O_TMPFILE)
                        .mode(mode)
                        .open(root.join(parent(&a)))?;
                    file.write_all_at(&vec![b't'; n % 5000], 0)?;
                    // Under -o writeback blocks count once written back (README's table).
                    file.sync_all()?;
                    let unnamed = describe(&file.metadata()?);
                    let proc_path = format!("/proc/self/fd/{}", file.as_raw_fd());
                    rustix::fs::linkat(
                        rustix::fs::CWD,
                        proc_path.as_str(),
                        rustix::fs::CWD,
                        &pb,
                        rustix::fs::AtFlags::SYMLINK_FOLLOW,
                    )?;
                    Ok(format!(
                        "{unnamed} -> {}",
                        describe(&fs::symlink_metadata(&pb)?)
                    ))
                })()),
            ),
            37 => (
                "remove-then-fstat",
                io((|| {
                    let fd = rustix::fs::open(
                        &pa,
                        rustix::fs::OFlags::PATH
                            | rustix::fs::OFlags::NOFOLLOW
                            | rustix::fs::OFlags::CLOEXEC,
                        rustix::fs::Mode::empty(),
                    )?;
                    let was_dir = fs::symlink_metadata(&pa)?.is_dir();
                    if was_dir {
                        fs::remove_dir(&pa)?;
                    } else {
                        fs::remove_file(&pa)?;
                    }
                    Ok(describe(&fs::File::from(fd).metadata()?))
                })()),
            ),
            38 | 39 => {
                let name = if choice == 38 {
                    "system.posix_acl_access"
                } else {
                    "system.posix_acl_default"
                };
                let value = acl_value(&[
                    (0x01, (n % 8) as u16, 0),
                    (0x02, ((n / 8) % 8) as u16, 65534),
                    (0x04, ((n / 64) % 8) as u16, 0),
                    (0x10, ((n / 512) % 8) as u16, 0),
                    (0x20, (i % 8) as u16, 0),
                ]);
                let minimal = n.is_multiple_of(3);
                let value = if minimal {
                    acl_value(&[(0x01, 7, 0), (0x04, (n % 8) as u16, 0), (0x20, 5, 0)])
                } else {
                    value
                };
                (
                    "setacl",
                    rx(
                        rustix::fs::lsetxattr(&pa, name, &value, rustix::fs::XattrFlags::empty())
                            .map(|()| {
                                let shown = fs::symlink_metadata(&pa)
                                    .map(|m| describe(&m))
                                    .unwrap_or_default();
                                format!("{name} minimal={minimal} {shown}")
                            }),
                    ),
                )
            }
            40 => {
                let name =
                    ["system.posix_acl_access", "system.posix_acl_default"][rng.below(2) as usize];
                let mut buf = vec![0u8; 512];
                (
                    "getacl",
                    rx(rustix::fs::lgetxattr(&pa, name, &mut buf)
                        .map(|len| format!("{name} {}", digest(&buf[..len])))),
                )
            }
            41 => {
                // relatime: a read moves atime when it is not later than the last change.
                let atime = if rng.below(2) == 0 { 2 } else { 4_000_000_000 };
                (
                    "read-atime",
                    io((|| {
                        nix::sys::stat::utimensat(
                            nix::fcntl::AT_FDCWD,
                            &pa,
                            &TimeSpec::new(atime, 0),
                            &TimeSpec::UTIME_OMIT,
                            UtimensatFlags::NoFollowSymlink,
                        )
                        .map_err(std::io::Error::from)?;
                        let mut f = OpenOptions::new()
                            .read(true)
                            .custom_flags(libc::O_NONBLOCK)
                            .open(&pa)?;
                        let meta = f.metadata()?;
                        if meta.is_dir() {
                            fs::read_dir(&pa)?.for_each(drop);
                        } else if meta.len() == 0 {
                            // The kernel answers a read of an empty FUSE file itself, so
                            // memfs cannot move atime (README's table).
                            return Ok("empty".to_string());
                        } else {
                            let mut buf = [0u8; 100];
                            let _ = f.read(&mut buf)?;
                        }
                        let moved = fs::symlink_metadata(&pa)?.atime() != atime;
                        Ok(format!("atime {atime} moved={moved}"))
                    })()),
                )
            }
            28 => (
                "write-far",
                io(OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&pa)
                    .and_then(|f| f.write_all_at(b"far", off).map(|()| String::new()))),
            ),
            _ => (
                "longname",
                io(fs::create_dir(root.join(parent(&a)).join("n".repeat(256)))
                    .map(|()| String::new())),
            ),
        };
        let shown = if result.starts_with("ok")
            && !matches!(desc, "read" | "stat" | "readdir" | "readlink")
        {
            format!("{result} [{}]", changes(&before))
        } else {
            result
        };
        println!(
            "{i} {desc} {} {} {mode:o} {n} {off} => {shown}",
            a.display(),
            b.display()
        );
    }
    for line in snapshot(&root) {
        println!("tree {line}");
    }
}
