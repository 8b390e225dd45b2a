//! `/proc/self/mountinfo`, parsed: the fields fshostd needs, with mount points unescaped.
//! (procfs 0.18 parses the same file but leaves `\040` and friends escaped in mount points,
//! which would break every mount point with a space in it.)

use std::io;
use std::path::PathBuf;

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
/// `major:minor` (`/sys/fs/fuse/connections/<dev>/waiting`; needs the fusectl file system
/// mounted there, as systemd does).
pub fn fuse_waiting(device: &str) -> Option<u64> {
    std::fs::read_to_string(connection_dir(device)?.join("waiting"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Aborts the FUSE connection of the device `major:minor` (fusectl's `abort`): every
/// request fails with ENOTCONN from then on, whoever still holds the connection.
pub fn abort_connection(device: &str) -> std::io::Result<()> {
    let dir = connection_dir(device)
        .ok_or_else(|| std::io::Error::other(format!("bad device {device:?}")))?;
    std::fs::write(dir.join("abort"), b"1")
}

/// fusectl's directory of the connection of device `major:minor`.
fn connection_dir(device: &str) -> Option<PathBuf> {
    let (major, minor) = device.split_once(':')?;
    let (major, minor): (u64, u64) = (major.parse().ok()?, minor.parse().ok()?);
    // The kernel's own dev_t, which names the directory: MKDEV(major, minor).
    let dev = (major << 20) | minor;
    Some(PathBuf::from(format!("/sys/fs/fuse/connections/{dev}")))
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
