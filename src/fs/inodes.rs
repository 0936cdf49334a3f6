//! The inode table: inode numbers ⇄ nodes (a path below the mount root, or
//! a node of the `.versions/` tree), with the attributes last seen, how long
//! they stay fresh, and the kernel's lookup count.
//!
//! Inode numbers are never reused within a mount. An entry is dropped when
//! the kernel forgets it (lookup count 0) or when its object is removed.
//! Callers hold the table's lock only for short sections, never across an
//! `.await`.

use std::collections::HashMap;
use std::time::Instant;

use super::attr::Attr;
use crate::store::ObjectInfo;

pub const ROOT_INO: u64 = 1;

/// What a node is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum NodeKey {
    /// A file or directory at this path below the mount root ("" = root).
    Path(String),
    /// `DIR/.versions`.
    Versions(String),
    /// `DIR/.versions/NAME`: the versions of the key `DIR/NAME`.
    VersionsOf(String),
    /// One version (or delete marker) of a key.
    Version { path: String, version_id: String },
    /// A file unlinked (or replaced by a rename) while something still
    /// refers to it: it answers to no path and is never listed or uploaded.
    Detached(String),
}

#[derive(Clone, Debug)]
pub struct Inode {
    pub key: NodeKey,
    pub parent: u64,
    pub attr: Attr,
    /// The object behind a file (None for directories without a marker).
    pub object: Option<ObjectInfo>,
    /// Whether a `dir/` marker object exists for a directory.
    pub dir_marker: bool,
    /// When the attributes must be checked again; `None` = never (versions).
    pub fresh_until: Option<Instant>,
    pub lookups: u64,
    /// Target of a symlink, once read.
    pub symlink_target: Option<String>,
    /// Counts the changes this mount made to the object (uploads,
    /// renames, metadata copies), so open readers follow them.
    pub generation: u64,
    /// For a directory: until when the table holds its complete listing
    /// (set by a listing, or by mkdir), so a name not in the table does
    /// not exist and needs no request.
    pub listed_until: Option<Instant>,
    /// Whether `attr` was read from this object's own metadata (or made
    /// by this mount). A listing only tells size and ETag: until the
    /// metadata is read, the kernel must not be given these attributes.
    pub meta_known: bool,
    /// For a directory: when this mount last added or removed one of its
    /// entries. Its mtime and ctime then win over older ones read from S3
    /// (a directory without a marker keeps them only here; one with a
    /// marker until they are stored on it).
    pub entries_changed: Option<std::time::SystemTime>,
}

impl Inode {
    pub fn is_fresh(&self, now: Instant) -> bool {
        self.fresh_until.is_none_or(|t| now < t)
    }

    pub fn path(&self) -> Option<&str> {
        match &self.key {
            NodeKey::Path(p) => Some(p),
            _ => None,
        }
    }
}

#[derive(Debug)]
pub struct InodeTable {
    next: u64,
    by_ino: HashMap<u64, Inode>,
    by_key: HashMap<NodeKey, u64>,
    /// Paths known not to exist, until the instant given.
    negative: HashMap<String, Instant>,
    /// Directories (at a path) in each directory, by parent inode: the
    /// link count of a listed directory without a walk of the table. Kept
    /// by every method that changes a node's key, parent or kind.
    subdirs: HashMap<u64, u32>,
}

impl InodeTable {
    pub fn new(root: Attr) -> Self {
        let mut t = InodeTable {
            next: ROOT_INO + 1,
            by_ino: HashMap::new(),
            by_key: HashMap::new(),
            negative: HashMap::new(),
            subdirs: HashMap::new(),
        };
        let key = NodeKey::Path(String::new());
        t.by_key.insert(key.clone(), ROOT_INO);
        t.by_ino.insert(
            ROOT_INO,
            Inode {
                key,
                parent: ROOT_INO,
                attr: root,
                object: None,
                dir_marker: false,
                fresh_until: None,
                lookups: 1,
                symlink_target: None,
                generation: 0,
                listed_until: None,
                meta_known: true,
                entries_changed: None,
            },
        );
        t
    }

    pub fn get(&self, ino: u64) -> Option<&Inode> {
        self.by_ino.get(&ino)
    }

    pub fn get_mut(&mut self, ino: u64) -> Option<&mut Inode> {
        self.by_ino.get_mut(&ino)
    }

    pub fn find(&self, key: &NodeKey) -> Option<u64> {
        self.by_key.get(key).copied()
    }

    /// The parent `ino` counts in `subdirs`: a directory at a path.
    fn counted_in(&self, ino: u64) -> Option<u64> {
        let n = self.by_ino.get(&ino)?;
        match &n.key {
            NodeKey::Path(p)
                if !p.is_empty()
                    && n.attr.kind == super::attr::FileKind::Dir
                    && self.by_key.get(&n.key) == Some(&ino) =>
            {
                Some(n.parent)
            }
            _ => None,
        }
    }

    fn uncount(&mut self, ino: u64) {
        if let Some(p) = self.counted_in(ino)
            && let Some(c) = self.subdirs.get_mut(&p)
        {
            *c = c.saturating_sub(1);
        }
    }

    fn count(&mut self, ino: u64) {
        if let Some(p) = self.counted_in(ino) {
            *self.subdirs.entry(p).or_default() += 1;
        }
    }

    /// How many directories the table holds directly in `dir_ino`.
    pub fn subdirs(&self, dir_ino: u64) -> u32 {
        self.subdirs.get(&dir_ino).copied().unwrap_or(0)
    }

    /// Inserts or refreshes the node at `key`, keeping its inode number if it
    /// has one. Returns the inode number.
    pub fn upsert(
        &mut self,
        key: NodeKey,
        parent: u64,
        mut attr: Attr,
        object: Option<ObjectInfo>,
        fresh_until: Option<Instant>,
    ) -> u64 {
        if let NodeKey::Path(p) = &key {
            self.negative.remove(p);
        }
        if let Some(&ino) = self.by_key.get(&key) {
            self.uncount(ino);
            let node = self.by_ino.get_mut(&ino).expect("by_key and by_ino agree");
            attr.ino = ino;
            if node.attr.kind != attr.kind {
                node.symlink_target = None;
                node.entries_changed = None;
            }
            if let Some(at) = node.entries_changed
                && attr.mtime < at
            {
                attr.mtime = node.attr.mtime;
                attr.ctime = attr.ctime.max(node.attr.ctime);
            }
            node.attr = attr;
            node.object = object;
            node.fresh_until = fresh_until;
            node.parent = parent;
            node.meta_known = true;
            self.count(ino);
            return ino;
        }
        let ino = self.next;
        self.next += 1;
        attr.ino = ino;
        self.by_key.insert(key.clone(), ino);
        self.by_ino.insert(
            ino,
            Inode {
                key,
                parent,
                attr,
                object,
                dir_marker: false,
                fresh_until,
                lookups: 0,
                symlink_target: None,
                generation: 0,
                listed_until: None,
                meta_known: true,
                entries_changed: None,
            },
        );
        self.count(ino);
        ino
    }

    /// Unlinks a path: the inode stays (open handles and the kernel may
    /// still refer to it) but no longer answers to its path.
    pub fn remove_path(&mut self, path: &str, negative_until: Instant) {
        self.detach(path);
        self.negative.insert(path.to_string(), negative_until);
    }

    /// The node at `path` answers to it no more (unlinked, or replaced).
    fn detach(&mut self, path: &str) {
        if let Some(&ino) = self.by_key.get(&NodeKey::Path(path.to_string())) {
            self.uncount(ino);
        }
        if let Some(ino) = self.by_key.remove(&NodeKey::Path(path.to_string()))
            && let Some(n) = self.by_ino.get_mut(&ino)
        {
            n.key = NodeKey::Detached(path.to_string());
        }
    }

    pub fn is_negative(&self, path: &str, now: Instant) -> bool {
        self.negative.get(path).is_some_and(|&t| now < t)
    }

    /// Moves a node and everything below it from `from` to `to`.
    pub fn rename(&mut self, from: &str, to: &str, new_parent: u64) {
        // Whatever was at the destination is replaced.
        self.detach(to);
        let below = format!("{from}/");
        let moved: Vec<(NodeKey, u64)> = self
            .by_key
            .iter()
            .filter(|(k, _)| matches!(k, NodeKey::Path(p) if p == from || p.starts_with(&below)))
            .map(|(k, &i)| (k.clone(), i))
            .collect();
        for (k, ino) in moved {
            self.uncount(ino);
            self.by_key.remove(&k);
            let NodeKey::Path(p) = k else { continue };
            let new_path = format!("{to}{}", &p[from.len()..]);
            self.by_key.insert(NodeKey::Path(new_path.clone()), ino);
            if let Some(node) = self.by_ino.get_mut(&ino) {
                node.key = NodeKey::Path(new_path);
                node.listed_until = None;
                if p == from {
                    node.parent = new_parent;
                }
            }
            self.count(ino);
        }
        self.negative.remove(to);
    }

    /// Marks everything below `dir` stale, so it is looked up again.
    pub fn expire_below(&mut self, dir: &str) {
        let below = format!("{dir}/");
        let now = Instant::now();
        for n in self.by_ino.values_mut() {
            if matches!(&n.key, NodeKey::Path(p) if p.starts_with(&below)) {
                n.fresh_until = Some(now);
                n.listed_until = None;
            }
        }
    }

    /// Adds kernel references (a lookup reply).
    pub fn add_lookup(&mut self, ino: u64) {
        if let Some(n) = self.by_ino.get_mut(&ino) {
            n.lookups += 1;
        }
    }

    /// Drops kernel references; forgets the inode at zero unless `pinned`.
    pub fn forget(&mut self, ino: u64, n: u64, pinned: bool) {
        if ino == ROOT_INO {
            return;
        }
        let Some(node) = self.by_ino.get_mut(&ino) else {
            return;
        };
        node.lookups = node.lookups.saturating_sub(n);
        if node.lookups == 0 && !pinned {
            // An entry of a listing still fresh stays (with its inode
            // number): dropping it would make the listing incomplete, and
            // every later lookup in that directory would go to S3. The
            // kernel forgets such entries at will (readdirplus entries
            // whose attributes it may not cache, memory pressure).
            let parent = node.parent;
            let listed = matches!(node.key, NodeKey::Path(_))
                && self
                    .by_ino
                    .get(&parent)
                    .and_then(|p| p.listed_until)
                    .is_some_and(|u| Instant::now() < u);
            if listed {
                return;
            }
            self.uncount(ino);
            self.subdirs.remove(&ino);
            let node = self.by_ino.remove(&ino).expect("present");
            if self.by_key.get(&node.key) == Some(&ino) {
                self.by_key.remove(&node.key);
                // The parent's listing is no longer all in the table: a
                // name missing from it must be asked for again. (A node
                // unlinked or replaced was in no listing any more.)
                if let Some(p) = self.by_ino.get_mut(&node.parent) {
                    p.listed_until = None;
                }
            }
        }
    }

    /// Paths of the nodes directly in directory `dir`.
    pub fn children_of(&self, dir_ino: u64) -> impl Iterator<Item = (&str, &Inode)> {
        self.by_ino.values().filter_map(move |n| match &n.key {
            NodeKey::Path(p) if n.parent == dir_ino && !p.is_empty() => Some((p.as_str(), n)),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::super::attr::{Defaults, FileKind};
    use super::*;

    const D: Defaults = Defaults {
        uid: 0,
        gid: 0,
        file_perm: 0o644,
        dir_perm: 0o755,
        dir_mtime: SystemTime::UNIX_EPOCH,
    };

    fn attr(kind: FileKind) -> Attr {
        let mut a = Attr::implicit_dir(0, &D);
        a.kind = kind;
        a
    }

    /// The subdirectory counts, by walking the table.
    fn walked(t: &InodeTable, dir: u64) -> u32 {
        t.children_of(dir)
            .filter(|(p, n)| {
                n.attr.kind == FileKind::Dir
                    && t.find(&NodeKey::Path(p.to_string())) == Some(n.attr.ino)
            })
            .count() as u32
    }

    /// The counts kept as nodes come, move, change kind, are unlinked or
    /// forgotten match a walk of the table at every step.
    #[test]
    fn subdirectory_counts_follow_every_change() {
        let mut t = InodeTable::new(attr(FileKind::Dir));
        let p = |s: &str| NodeKey::Path(s.to_string());
        let check = |t: &InodeTable| {
            let dirs: Vec<u64> = t.by_ino.keys().copied().collect();
            for d in dirs {
                assert_eq!(t.subdirs(d), walked(t, d), "inode {d}");
            }
        };
        let a = t.upsert(p("a"), ROOT_INO, attr(FileKind::Dir), None, None);
        let b = t.upsert(p("b"), ROOT_INO, attr(FileKind::Dir), None, None);
        t.upsert(p("a/x"), a, attr(FileKind::Dir), None, None);
        t.upsert(p("a/f"), a, attr(FileKind::File), None, None);
        check(&t);
        assert_eq!((t.subdirs(ROOT_INO), t.subdirs(a)), (2, 1));
        // A file that becomes a directory, and back.
        t.upsert(p("a/f"), a, attr(FileKind::Dir), None, None);
        assert_eq!(t.subdirs(a), 2);
        t.upsert(p("a/f"), a, attr(FileKind::File), None, None);
        check(&t);
        t.rename("a/x", "b/y", b);
        check(&t);
        assert_eq!((t.subdirs(a), t.subdirs(b)), (0, 1));
        // A rename over a directory replaces it.
        t.upsert(p("a/z"), a, attr(FileKind::Dir), None, None);
        t.rename("a/z", "b/y", b);
        check(&t);
        assert_eq!((t.subdirs(a), t.subdirs(b)), (0, 1));
        t.remove_path("b/y", Instant::now() + Duration::from_secs(1));
        check(&t);
        assert_eq!(t.subdirs(b), 0);
        t.add_lookup(a);
        t.forget(a, 1, false);
        check(&t);
        assert_eq!(t.subdirs(ROOT_INO), 1);
    }
}
