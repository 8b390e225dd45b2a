//! POSIX ACLs as the kernel hands them to a FUSE file system that asked for them
//! ([`crate::abi::WANT_POSIX_ACL`]): the values of the `system.posix_acl_access` and
//! `system.posix_acl_default` extended attributes, which the kernel enforces. The file system
//! stores them and keeps them and the mode in step, as the kernel's own file systems do
//! (`fs/posix_acl.c`): setting an access ACL sets the mode, `chmod` sets the ACL, and a new
//! node inherits its directory's default ACL (in place of the umask).

use crate::{Errno, Result};

/// The attribute that holds a node's access ACL.
pub const ACCESS: &str = "system.posix_acl_access";
/// The attribute that holds a directory's default ACL (what new nodes in it inherit).
pub const DEFAULT: &str = "system.posix_acl_default";

const VERSION: u32 = 2;
const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;

/// One ACL: entries in the kernel's order (by tag, then id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl(Vec<(u16, u16, u32)>);

impl Acl {
    /// Reads the attribute value (little-endian: a version word, then tag, perm, id per
    /// entry). The kernel has checked it; a malformed one is EINVAL all the same.
    pub fn parse(value: &[u8]) -> Result<Acl> {
        let (header, body) = value.split_first_chunk::<4>().ok_or(Errno::EINVAL)?;
        if u32::from_le_bytes(*header) != VERSION || body.len() % 8 != 0 {
            return Err(Errno::EINVAL);
        }
        let entries = body
            .chunks_exact(8)
            .map(|e| {
                let tag = u16::from_le_bytes([e[0], e[1]]);
                let perm = u16::from_le_bytes([e[2], e[3]]);
                let id = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
                (tag, perm, id)
            })
            .collect::<Vec<_>>();
        let has = |tag| entries.iter().any(|e| e.0 == tag);
        if !has(USER_OBJ) || !has(GROUP_OBJ) || !has(OTHER) {
            return Err(Errno::EINVAL);
        }
        Ok(Acl(entries))
    }

    /// The attribute value.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = VERSION.to_le_bytes().to_vec();
        for (tag, perm, id) in &self.0 {
            out.extend_from_slice(&tag.to_le_bytes());
            out.extend_from_slice(&perm.to_le_bytes());
            out.extend_from_slice(&id.to_le_bytes());
        }
        out
    }

    /// The permission bits the ACL implies for `mode` (owner, group class, other), and
    /// whether the mode says all of it (the ACL then need not be kept): the kernel's
    /// `posix_acl_equiv_mode`.
    pub fn equiv_mode(&self, mode: u32) -> (u32, bool) {
        let mut bits = 0;
        let mut equivalent = true;
        for &(tag, perm, _) in &self.0 {
            let perm = u32::from(perm & 7);
            match tag {
                USER_OBJ => bits |= perm << 6,
                GROUP_OBJ => bits |= perm << 3,
                OTHER => bits |= perm,
                MASK => {
                    bits = (bits & !0o070) | (perm << 3);
                    equivalent = false;
                }
                _ => equivalent = false,
            }
        }
        ((mode & !0o777) | bits, equivalent)
    }

    /// Follows a `chmod` to `mode`: the owner, group class (the mask if there is one) and
    /// other entries take its bits (`posix_acl_chmod`).
    pub fn chmod(&mut self, mode: u32) {
        let has_mask = self.0.iter().any(|e| e.0 == MASK);
        for (tag, perm, _) in &mut self.0 {
            let bits = match *tag {
                USER_OBJ => mode >> 6,
                OTHER => mode,
                MASK => mode >> 3,
                GROUP_OBJ if !has_mask => mode >> 3,
                _ => continue,
            };
            *perm = (bits & 7) as u16;
        }
    }

    /// A new node's access ACL from its directory's default ACL and the mode it was asked
    /// for (no umask), with that mode narrowed to what the ACL allows; `None` when the
    /// mode says it all (`posix_acl_create`).
    pub fn inherit(&self, mode: &mut u32) -> Option<Acl> {
        let mut acl = self.clone();
        let mut equivalent = true;
        let mut class = None;
        for (i, (tag, perm, _)) in acl.0.iter_mut().enumerate() {
            match *tag {
                USER_OBJ => {
                    *perm &= ((*mode >> 6) & 7) as u16;
                    *mode &= (u32::from(*perm) << 6) | !0o700;
                }
                OTHER => {
                    *perm &= (*mode & 7) as u16;
                    *mode &= u32::from(*perm) | !0o007;
                }
                GROUP_OBJ if class.is_none() => class = Some(i),
                MASK => {
                    class = Some(i);
                    equivalent = false;
                }
                USER | GROUP => equivalent = false,
                _ => {}
            }
        }
        if let Some(i) = class {
            let perm = &mut acl.0[i].1;
            *perm &= ((*mode >> 3) & 7) as u16;
            *mode &= (u32::from(*perm) << 3) | !0o070;
        }
        (!equivalent).then_some(acl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(entries: &[(u16, u16, u32)]) -> Acl {
        Acl(entries.to_vec())
    }

    #[test]
    fn bytes_round_trip_and_bad_values_are_refused() {
        let a = acl(&[
            (USER_OBJ, 6, 0),
            (USER, 4, 1000),
            (GROUP_OBJ, 4, 0),
            (MASK, 4, 0),
            (OTHER, 0, 0),
        ]);
        assert_eq!(Acl::parse(&a.to_bytes()), Ok(a.clone()));
        assert_eq!(Acl::parse(&a.to_bytes()[..7]), Err(Errno::EINVAL));
        assert_eq!(Acl::parse(b"\x01\0\0\0"), Err(Errno::EINVAL));
        assert_eq!(
            Acl::parse(&acl(&[(USER_OBJ, 6, 0)]).to_bytes()),
            Err(Errno::EINVAL)
        );
    }

    #[test]
    fn the_mask_is_the_group_class() {
        let minimal = acl(&[(USER_OBJ, 7, 0), (GROUP_OBJ, 5, 0), (OTHER, 1, 0)]);
        assert_eq!(minimal.equiv_mode(0o100000), (0o100751, true));
        let mut extended = acl(&[
            (USER_OBJ, 6, 0),
            (USER, 7, 1000),
            (GROUP_OBJ, 4, 0),
            (MASK, 2, 0),
            (OTHER, 0, 0),
        ]);
        assert_eq!(extended.equiv_mode(0o2000), (0o2620, false));
        extended.chmod(0o750);
        assert_eq!(
            extended.0,
            [
                (USER_OBJ, 7, 0),
                (USER, 7, 1000),
                (GROUP_OBJ, 4, 0),
                (MASK, 5, 0),
                (OTHER, 0, 0)
            ]
        );
    }

    #[test]
    fn a_default_acl_narrows_the_new_mode() {
        let default = acl(&[
            (USER_OBJ, 7, 0),
            (USER, 7, 1000),
            (GROUP_OBJ, 5, 0),
            (MASK, 7, 0),
            (OTHER, 0, 0),
        ]);
        let mut mode = 0o666;
        let access = default.inherit(&mut mode).unwrap();
        assert_eq!(mode, 0o660);
        assert_eq!(
            access.0,
            [
                (USER_OBJ, 6, 0),
                (USER, 7, 1000),
                (GROUP_OBJ, 5, 0),
                (MASK, 6, 0),
                (OTHER, 0, 0)
            ]
        );
        let minimal = acl(&[(USER_OBJ, 7, 0), (GROUP_OBJ, 0, 0), (OTHER, 5, 0)]);
        let mut mode = 0o777;
        assert_eq!(minimal.inherit(&mut mode), None);
        assert_eq!(mode, 0o705);
    }
}
