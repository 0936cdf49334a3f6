//! POSIX ACLs: their binary form, its checks, and how they follow the mode.
//!
//! With FUSE's `FUSE_POSIX_ACL` the kernel checks ACLs itself (and caches
//! them for as long as it keeps the inode's attributes); the filesystem
//! stores them and keeps them and the mode in step, as a local filesystem
//! does (Linux `fs/posix_acl.c`):
//!
//! - setting an access ACL sets the mode's permission bits from it (owner
//!   from USER_OBJ, group from MASK if there is one else GROUP_OBJ, other
//!   from OTHER); an ACL that says no more than the mode is kept as the
//!   mode alone (`posix_acl_update_mode`);
//! - a chmod rewrites USER_OBJ, OTHER and MASK (GROUP_OBJ when there is
//!   no mask) of the access ACL (`posix_acl_chmod`);
//! - a node created in a directory with a default ACL gets that ACL,
//!   masked by the mode asked for (no umask then), as its access ACL, and
//!   a new directory also gets it as its own default (`posix_acl_create`).
//!
//! The value is the kernel's `posix_acl_xattr` form: a little-endian u32
//! version (2), then 8-byte entries {u16 tag, u16 perm, u32 id}. A value
//! is checked as Linux checks it before it reaches any filesystem
//! (`posix_acl_from_xattr`, `posix_acl_valid`): a length that is not
//! 4 + 8n, an unknown tag, a permission beyond rwx, a named entry without
//! an id, or entries out of order (USER_OBJ, USER..., GROUP_OBJ,
//! GROUP..., MASK, OTHER; a MASK wherever there is a named entry) is
//! EINVAL; another version is EOPNOTSUPP; no entry at all is a removal.
//!
//! Where they are stored: s3fs-fuse (`src/s3fs.cpp`, 46017f2) keeps
//! `system.posix_acl_access` and `system.posix_acl_default` as two more
//! names of its `use_xattr` JSON in `x-amz-meta-xattr`, the value base64
//! of these same bytes (`get_xattr_posix_key_value`), and copies a
//! parent's default ACL into a new file's `system.posix_acl_access`
//! (`build_inherited_xattr_value`). It does not ask the kernel to check
//! them. bucketfs stores them the same way (`attr.rs`), so either tool
//! reads the other's.

use super::attr::Xattrs;
use super::{FsError, FsResult};

/// The extended attribute of a node's access ACL.
pub const ACCESS: &str = "system.posix_acl_access";
/// The extended attribute of a directory's default ACL.
pub const DEFAULT: &str = "system.posix_acl_default";

const VERSION: u32 = 2;
const HEADER_BYTES: usize = 4;
const ENTRY_BYTES: usize = 8;

pub const USER_OBJ: u16 = 0x01;
pub const USER: u16 = 0x02;
pub const GROUP_OBJ: u16 = 0x04;
pub const GROUP: u16 = 0x08;
pub const MASK: u16 = 0x10;
pub const OTHER: u16 = 0x20;

/// The id of an entry that names no one (the kernel's ACL_UNDEFINED_ID).
pub const UNDEFINED_ID: u32 = u32::MAX;

/// rwx.
const PERM_BITS: u16 = 0o7;

/// Whether `name` is one of the two ACL attributes.
pub fn is_acl_name(name: &str) -> bool {
    name == ACCESS || name == DEFAULT
}

/// A chmod to `perm` of a node with these attributes: its access ACL, if
/// it has a valid one, follows the new mode.
pub fn chmod_xattrs(x: &mut Xattrs, perm: u16) {
    if let Some(v) = x.get_mut(ACCESS)
        && let Ok(Some(mut acl)) = Acl::parse(v)
    {
        acl.chmod(perm & 0o777);
        *v = acl.encode();
    }
}

/// The attributes of a node created with `perm` (the mode asked for, no
/// umask applied) in a directory with default ACL `default`
/// (`posix_acl_create`): its permission bits, and in `x` its access ACL
/// and, for a directory, the same default ACL.
pub fn inherit(default: &Acl, perm: u16, is_dir: bool, x: &mut Xattrs) -> u16 {
    let (perm, access) = default.create(perm);
    if let Some(a) = access {
        x.insert(ACCESS.to_string(), a.encode());
    }
    if is_dir {
        x.insert(DEFAULT.to_string(), default.encode());
    }
    perm
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub tag: u16,
    /// rwx, as in one octal digit of a mode.
    pub perm: u16,
    /// The uid or gid of a USER or GROUP entry, else `UNDEFINED_ID`.
    pub id: u32,
}

impl Entry {
    pub fn new(tag: u16, perm: u16, id: u32) -> Entry {
        Entry { tag, perm, id }
    }
}

/// A valid ACL, entries in the kernel's order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acl {
    entries: Vec<Entry>,
}

impl Acl {
    /// The three entries a mode is (what an ACL equivalent to it holds).
    pub fn from_mode(perm: u16) -> Acl {
        Acl {
            entries: vec![
                Entry::new(USER_OBJ, (perm >> 6) & PERM_BITS, UNDEFINED_ID),
                Entry::new(GROUP_OBJ, (perm >> 3) & PERM_BITS, UNDEFINED_ID),
                Entry::new(OTHER, perm & PERM_BITS, UNDEFINED_ID),
            ],
        }
    }

    /// Checked entries (`posix_acl_valid`).
    pub fn new(entries: Vec<Entry>) -> FsResult<Acl> {
        let acl = Acl { entries };
        acl.check()?;
        Ok(acl)
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The ACL in an xattr value; `None` for one with no entry (setting
    /// it removes the ACL, as in Linux).
    pub fn parse(value: &[u8]) -> FsResult<Option<Acl>> {
        if value.len() < HEADER_BYTES || !(value.len() - HEADER_BYTES).is_multiple_of(ENTRY_BYTES) {
            return Err(FsError::Invalid);
        }
        let version = u32::from_le_bytes(value[..4].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(FsError::NotSupported);
        }
        let entries: Vec<Entry> = value[HEADER_BYTES..]
            .chunks_exact(ENTRY_BYTES)
            .map(|e| {
                let tag = u16::from_le_bytes([e[0], e[1]]);
                let perm = u16::from_le_bytes([e[2], e[3]]);
                let id = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
                // Only named entries carry an id; the kernel ignores the others'.
                let id = if tag == USER || tag == GROUP {
                    id
                } else {
                    UNDEFINED_ID
                };
                Entry { tag, perm, id }
            })
            .collect();
        if entries.is_empty() {
            return Ok(None);
        }
        Acl::new(entries).map(Some)
    }

    /// The xattr value of this ACL.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(HEADER_BYTES + ENTRY_BYTES * self.entries.len());
        v.extend_from_slice(&VERSION.to_le_bytes());
        for e in &self.entries {
            v.extend_from_slice(&e.tag.to_le_bytes());
            v.extend_from_slice(&e.perm.to_le_bytes());
            v.extend_from_slice(&e.id.to_le_bytes());
        }
        v
    }

    /// Linux's `posix_acl_valid` (and the id check of
    /// `posix_acl_from_xattr`): every rule broken is EINVAL.
    fn check(&self) -> FsResult<()> {
        #[derive(PartialEq)]
        enum State {
            UserObj,
            User,
            Group,
            Other,
            Done,
        }
        let mut state = State::UserObj;
        let mut needs_mask = false;
        for e in &self.entries {
            if e.perm & !PERM_BITS != 0 {
                return Err(FsError::Invalid);
            }
            state = match (e.tag, state) {
                (USER_OBJ, State::UserObj) => State::User,
                (USER, State::User) if e.id != UNDEFINED_ID => {
                    needs_mask = true;
                    State::User
                }
                (GROUP_OBJ, State::User) => State::Group,
                (GROUP, State::Group) if e.id != UNDEFINED_ID => {
                    needs_mask = true;
                    State::Group
                }
                (MASK, State::Group) => State::Other,
                (OTHER, State::Other) => State::Done,
                (OTHER, State::Group) if !needs_mask => State::Done,
                _ => return Err(FsError::Invalid),
            };
        }
        if state == State::Done {
            Ok(())
        } else {
            Err(FsError::Invalid)
        }
    }

    fn find(&self, tag: u16) -> Option<usize> {
        self.entries.iter().position(|e| e.tag == tag)
    }

    /// The permission bits (0o777) this ACL gives a node, and whether the
    /// ACL says no more than them (`posix_acl_equiv_mode`): no named
    /// entry and no mask.
    pub fn mode(&self) -> (u16, bool) {
        let mut mode = 0u16;
        let mut equivalent = true;
        for e in &self.entries {
            match e.tag {
                USER_OBJ => mode |= e.perm << 6,
                GROUP_OBJ => mode |= e.perm << 3,
                OTHER => mode |= e.perm,
                _ => equivalent = false,
            }
        }
        if let Some(m) = self.find(MASK) {
            mode = (mode & !0o070) | (self.entries[m].perm << 3);
        }
        (mode, equivalent)
    }

    /// The same entries with no write bit: what a read-only view of a
    /// node with this ACL grants.
    pub fn read_only(&self) -> Acl {
        let entries = self
            .entries
            .iter()
            .map(|e| Entry::new(e.tag, e.perm & 0o5, e.id));
        Acl {
            entries: entries.collect(),
        }
    }

    /// The access ACL after a chmod to `perm` (`posix_acl_chmod`).
    pub fn chmod(&mut self, perm: u16) {
        let group = self.find(MASK).or_else(|| self.find(GROUP_OBJ));
        for (i, e) in self.entries.iter_mut().enumerate() {
            match e.tag {
                USER_OBJ => e.perm = (perm >> 6) & PERM_BITS,
                OTHER => e.perm = perm & PERM_BITS,
                _ if Some(i) == group => e.perm = (perm >> 3) & PERM_BITS,
                _ => {}
            }
        }
    }

    /// A default ACL made the access ACL of a node created with `perm`
    /// (`posix_acl_create_masq`): each of USER_OBJ, OTHER and MASK (or
    /// GROUP_OBJ) keeps only what the mode allows, and the mode only what
    /// they allow. Returns the node's permission bits (`perm`'s setuid,
    /// setgid and sticky bits kept), and the access ACL unless it is
    /// equivalent to them.
    pub fn create(&self, perm: u16) -> (u16, Option<Acl>) {
        let mut acl = self.clone();
        let mut mode = perm & 0o777;
        let group = acl.find(MASK).or_else(|| acl.find(GROUP_OBJ));
        for (i, e) in acl.entries.iter_mut().enumerate() {
            let shift = match e.tag {
                USER_OBJ => 6,
                OTHER => 0,
                _ if Some(i) == group => 3,
                _ => continue,
            };
            e.perm &= (mode >> shift) & PERM_BITS;
            mode &= !(PERM_BITS << shift) | (e.perm << shift);
        }
        let equivalent = acl.mode().1;
        (
            (perm & !0o777) | mode,
            if equivalent { None } else { Some(acl) },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut v = VERSION.to_le_bytes().to_vec();
        for (t, p, i) in entries {
            v.extend_from_slice(&t.to_le_bytes());
            v.extend_from_slice(&p.to_le_bytes());
            v.extend_from_slice(&i.to_le_bytes());
        }
        v
    }

    const U: u32 = UNDEFINED_ID;

    /// What `setfacl -m u:1234:rw f` sends for a 0640 file.
    fn named() -> Vec<(u16, u16, u32)> {
        vec![
            (USER_OBJ, 6, U),
            (USER, 6, 1234),
            (GROUP_OBJ, 4, U),
            (MASK, 6, U),
            (OTHER, 0, U),
        ]
    }

    #[test]
    fn the_kernel_form_parses_and_encodes_byte_for_byte() {
        let v = bytes(&named());
        let acl = Acl::parse(&v).unwrap().unwrap();
        assert_eq!(acl.entries()[1], Entry::new(USER, 6, 1234));
        assert_eq!(acl.encode(), v);
        // The exact bytes of the header and the first entry.
        assert_eq!(&v[..12], &[2, 0, 0, 0, 1, 0, 6, 0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(acl.mode(), (0o660, false));
    }

    #[test]
    fn malformed_values_are_refused_as_linux_refuses_them() {
        let einval = [
            vec![],
            vec![2, 0, 0],
            [bytes(&named()), vec![0]].concat(),
            // Unknown tag.
            bytes(&[(USER_OBJ, 6, U), (0x40, 4, U), (OTHER, 0, U)]),
            // A permission beyond rwx.
            bytes(&[(USER_OBJ, 8, U), (GROUP_OBJ, 4, U), (OTHER, 0, U)]),
            // No GROUP_OBJ, no OTHER, no USER_OBJ.
            bytes(&[(USER_OBJ, 6, U), (OTHER, 0, U)]),
            bytes(&[(USER_OBJ, 6, U), (GROUP_OBJ, 4, U)]),
            bytes(&[(GROUP_OBJ, 4, U), (OTHER, 0, U)]),
            // Named entries without a mask.
            bytes(&[
                (USER_OBJ, 6, U),
                (USER, 6, 5),
                (GROUP_OBJ, 4, U),
                (OTHER, 0, U),
            ]),
            // Out of order, twice the same.
            bytes(&[(GROUP_OBJ, 4, U), (USER_OBJ, 6, U), (OTHER, 0, U)]),
            bytes(&[
                (USER_OBJ, 6, U),
                (USER_OBJ, 6, U),
                (GROUP_OBJ, 4, U),
                (OTHER, 0, U),
            ]),
            bytes(&[
                (USER_OBJ, 6, U),
                (GROUP_OBJ, 4, U),
                (OTHER, 0, U),
                (OTHER, 0, U),
            ]),
            // A named entry with no one named.
            bytes(&[
                (USER_OBJ, 6, U),
                (USER, 6, U),
                (GROUP_OBJ, 4, U),
                (MASK, 6, U),
                (OTHER, 0, U),
            ]),
        ];
        for v in einval {
            assert_eq!(Acl::parse(&v), Err(FsError::Invalid), "{v:?}");
        }
        let mut v3 = bytes(&named());
        v3[0] = 3;
        assert_eq!(Acl::parse(&v3), Err(FsError::NotSupported));
        assert_eq!(Acl::parse(&bytes(&[])), Ok(None), "no entry: a removal");
    }

    #[test]
    fn an_acl_of_the_three_base_entries_is_just_a_mode() {
        let acl = Acl::parse(&bytes(&[
            (USER_OBJ, 7, U),
            (GROUP_OBJ, 5, U),
            (OTHER, 1, U),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(acl.mode(), (0o751, true));
        assert_eq!(acl, Acl::from_mode(0o751));
        // A mask alone is not equivalent: group bits come from it.
        let acl = Acl::parse(&bytes(&[
            (USER_OBJ, 7, U),
            (GROUP_OBJ, 5, U),
            (MASK, 1, U),
            (OTHER, 0, U),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(acl.mode(), (0o710, false));
    }

    #[test]
    fn chmod_moves_the_mask_not_the_owning_group() {
        let mut acl = Acl::parse(&bytes(&named())).unwrap().unwrap();
        acl.chmod(0o705);
        assert_eq!(acl.mode(), (0o705, false));
        assert_eq!(acl.entries()[2], Entry::new(GROUP_OBJ, 4, U));
        assert_eq!(acl.entries()[3], Entry::new(MASK, 0, U));
        assert_eq!(acl.entries()[1], Entry::new(USER, 6, 1234), "named kept");
        let mut plain = Acl::from_mode(0o644);
        plain.chmod(0o750);
        assert_eq!(plain, Acl::from_mode(0o750));
    }

    #[test]
    fn a_default_acl_is_masked_by_the_create_mode() {
        // setfacl -d -m u:1234:rwx d: default u::rwx,u:1234:rwx,g::r-x,m::rwx,o::r-x
        let d = Acl::parse(&bytes(&[
            (USER_OBJ, 7, U),
            (USER, 7, 1234),
            (GROUP_OBJ, 5, U),
            (MASK, 7, U),
            (OTHER, 5, U),
        ]))
        .unwrap()
        .unwrap();
        // open(O_CREAT, 0666): no umask.
        let (perm, acl) = d.create(0o666);
        assert_eq!(perm, 0o664);
        let acl = acl.unwrap();
        assert_eq!(acl.entries()[0], Entry::new(USER_OBJ, 6, U));
        assert_eq!(acl.entries()[1], Entry::new(USER, 7, 1234), "named kept");
        assert_eq!(acl.entries()[3], Entry::new(MASK, 6, U));
        assert_eq!(acl.entries()[4], Entry::new(OTHER, 4, U));
        assert_eq!(acl.mode(), (0o664, false));
        // mkdir 0777 with setgid: the special bits stay.
        let (perm, _) = d.create(0o2777);
        assert_eq!(perm, 0o2775);
        // A default of base entries only: no access ACL, just a mode.
        let (perm, acl) = Acl::from_mode(0o750).create(0o666);
        assert_eq!((perm, acl), (0o640, None));
    }

    fn arb_acl() -> impl proptest::strategy::Strategy<Value = Acl> {
        use proptest::prelude::*;
        (
            0u16..8,
            proptest::collection::btree_map(0u32..5000, 0u16..8, 0..4),
            0u16..8,
            proptest::collection::btree_map(0u32..5000, 0u16..8, 0..4),
            0u16..8,
            0u16..8,
            any::<bool>(),
        )
            .prop_map(|(uo, users, go, groups, mask, other, with_mask)| {
                let mut e = vec![Entry::new(USER_OBJ, uo, U)];
                e.extend(users.iter().map(|(id, p)| Entry::new(USER, *p, *id)));
                e.push(Entry::new(GROUP_OBJ, go, U));
                e.extend(groups.iter().map(|(id, p)| Entry::new(GROUP, *p, *id)));
                if with_mask || !users.is_empty() || !groups.is_empty() {
                    e.push(Entry::new(MASK, mask, U));
                }
                e.push(Entry::new(OTHER, other, U));
                Acl::new(e).expect("valid by construction")
            })
    }

    proptest::proptest! {
        /// Any valid ACL survives encode and parse; chmod then makes the
        /// ACL give exactly the new mode, and keeps every named entry.
        #[test]
        fn valid_acls_round_trip_and_follow_chmod(acl in arb_acl(), perm in 0u16..0o1000) {
            proptest::prop_assert_eq!(Acl::parse(&acl.encode()).unwrap().unwrap(), acl.clone());
            let mut c = acl.clone();
            c.chmod(perm);
            proptest::prop_assert_eq!(c.mode().0, perm);
            proptest::prop_assert_eq!(c.mode().1, acl.mode().1);
            let named = |a: &Acl| a.entries().iter().filter(|e| e.tag == USER || e.tag == GROUP).copied().collect::<Vec<_>>();
            proptest::prop_assert_eq!(named(&c), named(&acl));
        }

        /// Creation never gives more than both the mode asked for and the
        /// default ACL allow, and the access ACL it makes gives exactly the
        /// node's mode.
        #[test]
        fn creation_grants_no_more_than_mode_and_default(acl in arb_acl(), perm in 0u16..0o10000) {
            let (got, access) = acl.create(perm);
            proptest::prop_assert_eq!(got & !0o777, perm & !0o777);
            proptest::prop_assert_eq!(got & 0o777 & !perm, 0);
            proptest::prop_assert_eq!(got & 0o777 & !acl.mode().0, 0);
            match access {
                Some(a) => proptest::prop_assert_eq!(a.mode(), (got & 0o777, false)),
                None => proptest::prop_assert!(acl.mode().1),
            }
        }

        /// Any bytes at all: a parse error or a valid ACL, never a panic,
        /// and what parses encodes back to the same entries.
        #[test]
        fn any_bytes_parse_or_are_refused(
            header in proptest::prelude::any::<bool>(),
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
        ) {
            // Mostly a version-2 header, so the entries' checks are reached.
            let v = if header { [VERSION.to_le_bytes().to_vec(), body].concat() } else { body };
            if let Ok(Some(acl)) = Acl::parse(&v) {
                proptest::prop_assert_eq!(Acl::parse(&acl.encode()).unwrap().unwrap(), acl);
            }
        }
    }
}
