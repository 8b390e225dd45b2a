//! `/proc/self/mountinfo`, parsed: the fields fshostd needs, with mount points unescaped.
//! (procfs 0.18 parses the same file but leaves `\040` and friends escaped in mount points,
//! which would break every mount point with a space in it.)

use std::io;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::OnceLock;

use rustix::fs::{Mode, OFlags};

/// One line of /proc/self/mountinfo that matters here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelMount {
    /// The kernel's mount id (stable for the mount's life, unique while it exists).
    pub id: u64,
    /// `major:minor` of the mount's device (its backing device info in sysfs).
    pub device: String,
    pub mountpoint: PathBuf,
    pub fstype: String,
    pub source: String,
    /// The filesystem's own options (`user_id=0,group_id=0,default_permissions,...`).
    pub super_options: String,
}

/// The kernel's count of requests waiting on the FUSE connection of the device
/// `major:minor` (fusectl's `<dev>/waiting`).
pub fn fuse_waiting(device: &str) -> Option<u64> {
    let mut text = String::new();
    std::fs::File::from(connection_file(device, "waiting", OFlags::RDONLY).ok()?)
        .read_to_string(&mut text)
        .ok()?;
    text.trim().parse().ok()
}

/// Aborts the FUSE connection of the device `major:minor` (fusectl's `abort`): every
/// request fails with ENOTCONN from then on, whoever still holds the connection.
pub fn abort_connection(device: &str) -> io::Result<()> {
    std::fs::File::from(connection_file(device, "abort", OFlags::WRONLY)?).write_all(b"1")
}

/// File `name` of fusectl's directory of the connection of device `major:minor`.
fn connection_file(device: &str, name: &str, access: OFlags) -> io::Result<OwnedFd> {
    let bad = || io::Error::other(format!("bad device {device:?}"));
    let (major, minor) = device.split_once(':').ok_or_else(bad)?;
    let (major, minor): (u64, u64) = (
        major.parse().map_err(|_| bad())?,
        minor.parse().map_err(|_| bad())?,
    );
    // The kernel's own dev_t, which names the directory: MKDEV(major, minor).
    let dev = (major << 20) | minor;
    let root =
        fusectl().ok_or_else(|| io::Error::other("the fusectl file system is not available"))?;
    let path = format!("{dev}/{name}");
    Ok(rustix::fs::openat(
        root,
        path,
        access | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Where systemd mounts fusectl.
const FUSECTL: &str = "/sys/fs/fuse/connections";
/// fusectl's `f_type`.
const FUSECTL_MAGIC: u64 = 0x6573_5543;

/// The root of the fusectl file system: the one mounted at `/sys/fs/fuse/connections`
/// if there is one (systemd mounts it), else one of our own, attached nowhere (`fsopen` +
/// `fsmount`; fusectl has one superblock, so it shows the same connections), made the first
/// time it is needed. None if neither can be had (no fuse module, no CAP_SYS_ADMIN).
fn fusectl() -> Option<&'static OwnedFd> {
    static ROOT: OnceLock<Option<OwnedFd>> = OnceLock::new();
    ROOT.get_or_init(|| {
        let dir = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let mounted = rustix::fs::open(FUSECTL, dir, Mode::empty())
            .ok()
            .filter(|fd| rustix::fs::fstatfs(fd).is_ok_and(|s| s.f_type as u64 == FUSECTL_MAGIC));
        mounted.or_else(|| {
            use rustix::mount::{fsconfig_create, fsmount, fsopen, FsMountFlags, FsOpenFlags};
            let made = fsopen("fusectl", FsOpenFlags::FSOPEN_CLOEXEC).and_then(|fs| {
                fsconfig_create(&fs)?;
                fsmount(
                    &fs,
                    FsMountFlags::FSMOUNT_CLOEXEC,
                    rustix::mount::MountAttrFlags::empty(),
                )
            });
            made.map_err(|e| tracing::debug!(error = %e, "no fusectl file system of our own"))
                .ok()
        })
    })
    .as_ref()
}

impl KernelMount {
    /// A FUSE mount's owner (`user_id=`, `group_id=`) and whether others may use it.
    pub(super) fn fuse_access(&self) -> (Option<u32>, Option<u32>, bool) {
        let option = |key: &str| {
            self.super_options
                .split(',')
                .find_map(|o| o.strip_prefix(key)?.parse().ok())
        };
        let allow_other = self.super_options.split(',').any(|o| o == "allow_other");
        (option("user_id="), option("group_id="), allow_other)
    }
}

/// The kernel's mounts as this process sees them (`/proc/self/mountinfo`).
pub fn kernel_mounts() -> io::Result<Vec<KernelMount>> {
    Ok(parse_mountinfo(&std::fs::read_to_string(
        "/proc/self/mountinfo",
    )?))
}

/// Parses /proc/self/mountinfo text; mount points are unescaped (`\040` is a space).
pub fn parse_mountinfo(text: &str) -> Vec<KernelMount> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let dash = fields.iter().position(|f| *f == "-")?;
            Some(KernelMount {
                id: fields.first()?.parse().ok()?,
                device: fields.get(2)?.to_string(),
                mountpoint: PathBuf::from(unescape_mountinfo(fields.get(4)?)),
                fstype: fields.get(dash + 1)?.to_string(),
                source: unescape_mountinfo(fields.get(dash + 2)?),
                super_options: fields.get(dash + 3).unwrap_or(&"").to_string(),
            })
        })
        .collect()
}

fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_are_parsed_and_unescaped() {
        let text =
            "42 27 0:39 / /tmp/a\\040b rw,nosuid - fuse.fshost-memfs fshost:memfs rw,user_id=0\n\
                    43 27 0:40 / /srv rw shared:1 - ext4 /dev/vda rw\n";
        let mounts = parse_mountinfo(text);
        assert_eq!(
            mounts[0],
            KernelMount {
                id: 42,
                device: "0:39".into(),
                mountpoint: PathBuf::from("/tmp/a b"),
                fstype: "fuse.fshost-memfs".into(),
                source: "fshost:memfs".into(),
                super_options: "rw,user_id=0".into(),
            }
        );
        assert_eq!(mounts[1].fstype, "ext4");
        assert_eq!(mounts[1].mountpoint, PathBuf::from("/srv"));
    }
}
