//! The inode table: inode numbers ⇄ nodes (a path below the mount root, or
//! a node of the `.versions/` tree), with the attributes last seen, how long
//! they stay fresh, and the kernel's lookup count.
//!
//! Inode numbers are never reused within a mount. A node that still
//! answers to its path keeps its number when the kernel forgets it (the
//! kernel forgets inodes at will: a dcache shrunk under memory pressure,
//! `drop_caches`), so the same file looked up again has the same `st_ino`;
//! the sweep drops it once nothing refers to it. A node unlinked or
//! replaced goes when the kernel forgets it.
//! Callers hold the table's lock only for short sections, never across an
//! `.await`.

use std::collections::{BTreeMap, HashMap};
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
    /// When a listing, a lookup or the kernel last handed it out (a sweep
    /// leaves recent nodes alone: a reply naming them may be on its way).
    pub seen: Instant,
    /// For a directory: when this mount last added or removed one of its
    /// entries. Its mtime and ctime then win over older ones read from S3
    /// (a directory without a marker keeps them only here; one with a
    /// marker until they are stored on it).
    pub entries_changed: Option<std::time::SystemTime>,
    /// When an upload of this mount last landed on the object: a chmod,
    /// chown or utimes soon after is deferred and merged (`ATTR_BATCH`).
    pub landed: Option<Instant>,
    /// For a directory: moves each time a name joins or leaves it in the
    /// table, or a LIST reads it (`touch_dir`): an open directory handle
    /// over an older listing takes the current one before it is read
    /// again (`dirs`).
    pub entries_gen: u64,
}

impl Inode {
    pub fn is_fresh(&self, now: Instant) -> bool {
        self.fresh_until.is_none_or(|t| now < t)
    }

    /// Whether this node holds metadata read for `listed` (same ETag)
    /// that has not expired, so a listing may keep it. A chmod by another
    /// client copies the object onto itself (same ETag, new metadata):
    /// it is seen within `metadata_ttl` like any change.
    pub fn holds_metadata_of(&self, listed: &ObjectInfo, now: Instant) -> bool {
        self.meta_known
            && self.is_fresh(now)
            && self
                .object
                .as_ref()
                .is_some_and(|k| k.etag == listed.etag && k.metadata.is_some())
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
    by_ino: HashMap<u64, Box<Inode>>,
    /// The nodes at a path, in path order, so a directory's children and a
    /// subtree are found by a range, not by a scan of the whole table.
    paths: BTreeMap<String, u64>,
    /// The nodes of every other key (the `.versions` tree, detached).
    others: HashMap<NodeKey, u64>,
    /// Paths known not to exist, until the instant given.
    negative: HashMap<String, Instant>,
    /// Size of `negative` after its last pruning of expired entries.
    negative_pruned: usize,
    /// Size of the table after its last sweep, and when that was.
    swept_at: usize,
    swept: Instant,
    /// Directories (at a path) in each directory, by parent inode: the
    /// link count of a listed directory without a walk of the table. Kept
    /// by every method that changes a node's key, parent or kind.
    subdirs: HashMap<u64, u32>,
}

/// Nodes the table holds before it is swept at all.
const SWEEP_MIN: usize = 4096;

/// Negative entries kept before expired ones are pruned.
const NEGATIVE_PRUNE_MIN: usize = 1024;

/// The prefix of the paths below directory `dir` ("" = the root).
fn below(dir: &str) -> String {
    if dir.is_empty() {
        String::new()
    } else {
        format!("{dir}/")
    }
}

impl InodeTable {
    pub fn new(root: Attr) -> Self {
        let mut t = InodeTable {
            next: ROOT_INO + 1,
            by_ino: HashMap::new(),
            others: HashMap::new(),
            paths: BTreeMap::new(),
            negative: HashMap::new(),
            negative_pruned: 0,
            swept_at: 0,
            swept: Instant::now(),
            subdirs: HashMap::new(),
        };
        let key = NodeKey::Path(String::new());
        t.index(key.clone(), ROOT_INO);
        t.by_ino.insert(
            ROOT_INO,
            Box::new(Inode {
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
                seen: Instant::now(),
                entries_changed: None,
                landed: None,
                entries_gen: 0,
            }),
        );
        t
    }

    pub fn get(&self, ino: u64) -> Option<&Inode> {
        self.by_ino.get(&ino).map(|n| &**n)
    }

    pub fn get_mut(&mut self, ino: u64) -> Option<&mut Inode> {
        self.by_ino.get_mut(&ino).map(|n| &mut **n)
    }

    pub fn find(&self, key: &NodeKey) -> Option<u64> {
        match key {
            NodeKey::Path(p) => self.paths.get(p.as_str()).copied(),
            other => self.others.get(other).copied(),
        }
    }

    /// The parent `ino` counts in `subdirs`: a directory at a path.
    fn counted_in(&self, ino: u64) -> Option<u64> {
        let n = self.by_ino.get(&ino)?;
        match &n.key {
            NodeKey::Path(p)
                if !p.is_empty()
                    && n.attr.kind == super::attr::FileKind::Dir
                    && self.paths.get(p.as_str()) == Some(&ino) =>
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

    /// `key` answers to `ino`.
    fn index(&mut self, key: NodeKey, ino: u64) {
        match key {
            NodeKey::Path(p) => self.paths.insert(p, ino),
            other => self.others.insert(other, ino),
        };
    }

    /// `key` answers to nothing any more.
    fn unindex(&mut self, key: &NodeKey) -> Option<u64> {
        match key {
            NodeKey::Path(p) => self.paths.remove(p.as_str()),
            other => self.others.remove(other),
        }
    }

    /// The paths at or below `prefix` (as strings: `"d/"` for a subtree).
    fn paths_from<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a String, &'a u64)> {
        self.paths
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(move |(p, _)| p.starts_with(prefix))
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
        if let Some(ino) = self.find(&key) {
            self.uncount(ino);
            let node = self
                .by_ino
                .get_mut(&ino)
                .expect("the indexes and by_ino agree");
            attr.ino = ino;
            let kind_changed = node.attr.kind != attr.kind;
            if kind_changed {
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
            node.seen = Instant::now();
            self.count(ino);
            if kind_changed {
                self.touch_dir(parent);
            }
            return ino;
        }
        let ino = self.next;
        self.next += 1;
        attr.ino = ino;
        if matches!(key, NodeKey::Path(_)) {
            self.touch_dir(parent);
        }
        self.index(key.clone(), ino);
        self.by_ino.insert(
            ino,
            Box::new(Inode {
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
                seen: Instant::now(),
                entries_changed: None,
                landed: None,
                entries_gen: 0,
            }),
        );
        self.count(ino);
        ino
    }

    /// Unlinks a path: the inode stays (open handles and the kernel may
    /// still refer to it) but no longer answers to its path.
    /// Removes `path` (remembered as missing until `negative_until`);
    /// returns the node that was there.
    pub fn remove_path(&mut self, path: &str, negative_until: Instant) -> Option<u64> {
        let gone = self.detach(path);
        self.negative.insert(path.to_string(), negative_until);
        // Expired entries go once the map has doubled since the last
        // pruning: bounded by what is negative within one TTL, at O(1)
        // amortized per insert.
        if self.negative.len() >= NEGATIVE_PRUNE_MIN.max(2 * self.negative_pruned) {
            let now = Instant::now();
            self.negative.retain(|_, &mut t| now < t);
            self.negative_pruned = self.negative.len();
        }
        gone
    }

    /// The node at `path` answers to it no more (unlinked, or replaced);
    /// returns it.
    fn detach(&mut self, path: &str) -> Option<u64> {
        if let Some(&ino) = self.paths.get(path) {
            self.uncount(ino);
        }
        let ino = self.paths.remove(path)?;
        if let Some(n) = self.by_ino.get_mut(&ino) {
            n.key = NodeKey::Detached(path.to_string());
            let parent = n.parent;
            self.touch_dir(parent);
        }
        Some(ino)
    }

    /// A name joined or left directory `dir` (or a LIST read it): see
    /// `Inode::entries_gen`.
    pub fn touch_dir(&mut self, dir: u64) {
        if let Some(d) = self.by_ino.get_mut(&dir) {
            d.entries_gen += 1;
        }
    }

    pub fn is_negative(&self, path: &str, now: Instant) -> bool {
        self.negative.get(path).is_some_and(|&t| now < t)
    }

    /// Until when the table knows that nothing is at `path` in directory
    /// `parent`, from a negative entry or the parent's whole listing;
    /// `None`: it does not (a lookup would ask S3).
    pub fn absent_until(&self, parent: u64, path: &str, now: Instant) -> Option<Instant> {
        let negative = self.negative.get(path).copied();
        let listed = self.by_ino.get(&parent).and_then(|p| p.listed_until);
        negative.max(listed).filter(|&t| now < t)
    }

    /// Moves a node and everything below it from `from` to `to`; returns
    /// the node it replaced at `to`.
    pub fn rename(&mut self, from: &str, to: &str, new_parent: u64) -> Option<u64> {
        // Whatever was at the destination is replaced.
        let replaced = self.detach(to);
        let sub = below(from);
        let mut moved: Vec<(String, u64)> = self
            .paths_from(&sub)
            .map(|(p, &i)| (p.clone(), i))
            .collect();
        if let Some(&i) = self.paths.get(from) {
            moved.push((from.to_string(), i));
        }
        for (p, ino) in moved {
            self.uncount(ino);
            self.unindex(&NodeKey::Path(p.clone()));
            let new_path = format!("{to}{}", &p[from.len()..]);
            self.index(NodeKey::Path(new_path.clone()), ino);
            let mut moved_from = None;
            if let Some(node) = self.by_ino.get_mut(&ino) {
                node.key = NodeKey::Path(new_path);
                node.listed_until = None;
                if p == from {
                    moved_from = Some(node.parent);
                    node.parent = new_parent;
                }
            }
            if let Some(old) = moved_from {
                self.touch_dir(old);
                self.touch_dir(new_parent);
            }
            self.count(ino);
        }
        self.negative.remove(to);
        replaced
    }

    /// Marks everything below `dir` stale, so it is looked up again.
    pub fn expire_below(&mut self, dir: &str) {
        let sub = below(dir);
        let now = Instant::now();
        let inos: Vec<u64> = self.paths_from(&sub).map(|(_, &i)| i).collect();
        for ino in inos {
            if let Some(n) = self.by_ino.get_mut(&ino) {
                n.fresh_until = Some(now);
                n.listed_until = None;
            }
        }
    }

    /// Adds kernel references (a lookup reply).
    pub fn add_lookup(&mut self, ino: u64) {
        if let Some(n) = self.by_ino.get_mut(&ino) {
            n.lookups += 1;
            n.seen = Instant::now();
        }
    }

    /// Drops, once the table has doubled since the last sweep, the nodes
    /// nothing refers to: no kernel reference, not `pinned` (write
    /// state), their directory's listing no longer fresh, and not handed
    /// out (nor forgotten by the kernel) within `grace`. A listing of a
    /// large directory then does not stay in memory for the life of the
    /// mount. A directory goes only with no node left at a path below it
    /// (they name it as parent). O(table) at most once per doubling: O(1)
    /// amortized per node.
    pub fn sweep_if_due(&mut self, grace: std::time::Duration, pinned: impl Fn(u64) -> bool) {
        if self.by_ino.len() >= SWEEP_MIN.max(2 * self.swept_at) {
            self.sweep(grace, pinned);
        }
    }

    /// The same, once `grace` has passed since the last sweep, however
    /// much the table grew: what the kernel forgot in one burst (memory
    /// pressure, `drop_caches`) goes within a grace period or two, not
    /// at the next doubling. Returns the nodes dropped.
    pub fn sweep_stale(
        &mut self,
        grace: std::time::Duration,
        pinned: impl Fn(u64) -> bool,
    ) -> usize {
        if self.by_ino.len() < SWEEP_MIN || self.swept.elapsed() < grace {
            return 0;
        }
        self.sweep(grace, pinned)
    }

    fn sweep(&mut self, grace: std::time::Duration, pinned: impl Fn(u64) -> bool) -> usize {
        let before = self.by_ino.len();
        let now = Instant::now();
        let fresh_dir = |t: &Self, d: u64| {
            t.by_ino
                .get(&d)
                .and_then(|p| p.listed_until)
                .is_some_and(|u| now < u)
        };
        let gone: Vec<u64> = self
            .by_ino
            .iter()
            .filter(|(ino, n)| {
                **ino != ROOT_INO
                    && n.lookups == 0
                    && match &n.key {
                        NodeKey::Path(p) if n.attr.kind == super::FileKind::Dir => {
                            self.paths_from(&below(p)).next().is_none()
                        }
                        NodeKey::Path(_) | NodeKey::Detached(_) => true,
                        _ => false,
                    }
                    && now.saturating_duration_since(n.seen) > grace
            })
            .map(|(ino, _)| *ino)
            .filter(|ino| !pinned(*ino))
            .collect();
        for ino in gone {
            let parent = self.by_ino.get(&ino).map(|n| n.parent);
            if parent.is_some_and(|p| fresh_dir(self, p)) {
                continue;
            }
            self.uncount(ino);
            self.subdirs.remove(&ino);
            if let Some(n) = self.by_ino.remove(&ino)
                && self.find(&n.key) == Some(ino)
            {
                self.unindex(&n.key);
            }
        }
        self.swept_at = self.by_ino.len();
        self.swept = now;
        // Give the room back once most of it is empty.
        if self.by_ino.capacity() > 4 * self.by_ino.len() {
            self.by_ino.shrink_to_fit();
            self.others.shrink_to_fit();
            self.subdirs.shrink_to_fit();
        }
        before - self.by_ino.len()
    }

    /// Drops kernel references. At zero, unless `pinned`: a node that
    /// still answers to its path stays, with its inode number, for the
    /// sweep to drop later; any other (unlinked, replaced, a node of the
    /// versions tree) goes now.
    pub fn forget(&mut self, ino: u64, n: u64, pinned: bool) {
        if ino == ROOT_INO {
            return;
        }
        let Some(node) = self.by_ino.get(&ino) else {
            return;
        };
        let at_its_path = matches!(node.key, NodeKey::Path(_)) && self.find(&node.key) == Some(ino);
        let node = self.by_ino.get_mut(&ino).expect("present");
        node.lookups = node.lookups.saturating_sub(n);
        if node.lookups == 0 && !pinned {
            // The kernel forgets inodes at will (a dcache shrunk under
            // memory pressure, drop_caches, readdirplus entries whose
            // attributes it may not cache), and looks the same file up
            // again: were the node dropped, that lookup would make a new
            // one, and the file would show a new inode number (pjdfstest
            // rename/10.t). It also keeps a fresh listing whole, so later
            // lookups in that directory need no request. The sweep drops
            // it once the grace has passed since now.
            if at_its_path {
                node.seen = Instant::now();
                return;
            }
            self.uncount(ino);
            self.subdirs.remove(&ino);
            let node = self.by_ino.remove(&ino).expect("present");
            if self.find(&node.key) == Some(ino) {
                self.unindex(&node.key);
                // The parent's listing is no longer all in the table: a
                // name missing from it must be asked for again. (A node
                // unlinked or replaced was in no listing any more.)
                if let Some(p) = self.by_ino.get_mut(&node.parent) {
                    p.listed_until = None;
                }
            }
        }
    }

    /// Paths of the nodes directly in directory `dir_ino`: a walk of its
    /// part of the path index that skips each subdirectory's subtree, so
    /// it costs its own entries (times log n), not the table's size.
    pub fn children_of(&self, dir_ino: u64) -> Vec<(&str, &Inode)> {
        let Some(NodeKey::Path(dir)) = self.by_ino.get(&dir_ino).map(|n| &n.key) else {
            return Vec::new();
        };
        let sub = below(dir);
        let mut out = Vec::new();
        let mut from = sub.clone();
        while let Some((p, &ino)) = self
            .paths
            .range::<str, _>((
                std::ops::Bound::Included(from.as_str()),
                std::ops::Bound::Unbounded,
            ))
            .find(|(p, _)| p.len() > sub.len() || !p.starts_with(&sub))
            .filter(|(p, _)| p.starts_with(&sub))
        {
            let rest = &p[sub.len()..];
            match rest.find('/') {
                // Deeper: skip the rest of that subtree ('0' follows '/').
                Some(i) => from = format!("{sub}{}0", &rest[..i]),
                None => {
                    if let Some(n) = self.by_ino.get(&ino)
                        && n.parent == dir_ino
                    {
                        out.push((p.as_str(), &**n));
                    }
                    // The next path after this one.
                    from = format!("{p}\0");
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::attr::Defaults;

    fn dir() -> Attr {
        Attr::implicit_dir(
            0,
            &Defaults {
                uid: 0,
                gid: 0,
                file_perm: 0o644,
                dir_perm: 0o755,
                dir_mtime: std::time::UNIX_EPOCH,
            },
        )
    }

    /// Inserts `path` under its parent (which must be in the table).
    fn add(t: &mut InodeTable, path: &str) -> u64 {
        let parent = match path.rfind('/') {
            Some(i) => t.find(&NodeKey::Path(path[..i].to_string())).unwrap(),
            None => ROOT_INO,
        };
        t.upsert(NodeKey::Path(path.into()), parent, dir(), None, None)
    }

    fn children(t: &InodeTable, ino: u64) -> Vec<String> {
        let mut v: Vec<String> = t
            .children_of(ino)
            .into_iter()
            .map(|(p, _)| p.to_string())
            .collect();
        v.sort();
        v
    }

    /// Names that sort around '/' ('.', '-', '0', a NUL-free '\x01') make
    /// the subtree skipping go wrong if it is off by one.
    #[test]
    fn children_and_renames_follow_the_path_index() {
        let mut t = InodeTable::new(dir());
        for p in [
            "a",
            "a/x",
            "a/x/deep",
            "a.txt",
            "a-b",
            "a0",
            "a\u{1}",
            "b",
            "a/y",
            "a/x0",
            "a/x.1",
            "a/x/deeper",
            "a/x/deeper/still",
        ] {
            add(&mut t, p);
        }
        assert_eq!(
            children(&t, ROOT_INO),
            ["a", "a\u{1}", "a-b", "a.txt", "a0", "b"]
        );
        let a = t.find(&NodeKey::Path("a".into())).unwrap();
        assert_eq!(children(&t, a), ["a/x", "a/x.1", "a/x0", "a/y"]);
        let x = t.find(&NodeKey::Path("a/x".into())).unwrap();
        assert_eq!(children(&t, x), ["a/x/deep", "a/x/deeper"]);
        t.rename("a/x", "b/x", t.find(&NodeKey::Path("b".into())).unwrap());
        let b = t.find(&NodeKey::Path("b".into())).unwrap();
        assert_eq!(children(&t, b), ["b/x"]);
        assert_eq!(children(&t, x), ["b/x/deep", "b/x/deeper"]);
        assert_eq!(children(&t, a), ["a/x.1", "a/x0", "a/y"]);
        assert!(t.find(&NodeKey::Path("b/x/deeper/still".into())).is_some());
        assert!(t.find(&NodeKey::Path("a/x/deeper/still".into())).is_none());
        t.remove_path("a/y", Instant::now());
        assert_eq!(children(&t, a), ["a/x.1", "a/x0"]);
    }

    /// 50,000 listed files the kernel forgot: swept once the listing is
    /// stale and the grace passed; a pinned one (write state), one the
    /// kernel holds and directories stay.
    #[test]
    fn unreferenced_files_of_a_stale_listing_are_swept() {
        let (mut t, d, inos) = listed_dir(50_000);
        t.add_lookup(inos[7]);
        let fresh = Some(Instant::now() + std::time::Duration::from_secs(3600));
        t.get_mut(d).unwrap().listed_until = fresh;
        t.sweep_if_due(std::time::Duration::ZERO, |i| i == inos[9]);
        assert_eq!(
            t.children_of(d).len(),
            50_000,
            "a fresh listing stays whole"
        );
        t.get_mut(d).unwrap().listed_until = None;
        t.swept_at = 0;
        t.sweep_if_due(std::time::Duration::from_secs(3600), |i| i == inos[9]);
        assert_eq!(t.children_of(d).len(), 50_000, "recent nodes stay");
        t.swept_at = 0;
        t.sweep_if_due(std::time::Duration::ZERO, |i| i == inos[9]);
        let left: Vec<&str> = t.children_of(d).into_iter().map(|(p, _)| p).collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(t.get(inos[7]).is_some() && t.get(inos[9]).is_some() && t.get(d).is_some());
        assert!(t.find(&NodeKey::Path("d/f100".into())).is_none());
    }

    /// A listing the kernel forgot in one burst (`drop_caches`) goes at
    /// the next periodic sweep, though the table has not grown since the
    /// last one; before the grace period passes, nothing goes.
    #[test]
    fn a_forgotten_listing_goes_without_the_table_growing() {
        let (mut t, d, inos) = listed_dir(20_000);
        for &i in &inos {
            t.add_lookup(i);
        }
        let hour = std::time::Duration::from_secs(3600);
        t.sweep_if_due(hour, |_| false);
        assert_eq!(t.sweep_stale(hour, |_| false), 0, "within the grace period");
        for &i in &inos {
            t.forget(i, 1, false);
        }
        t.sweep_if_due(std::time::Duration::ZERO, |_| false);
        assert_eq!(t.children_of(d).len(), 20_000, "the table did not grow");
        assert_eq!(
            t.sweep_stale(std::time::Duration::ZERO, |i| i == inos[3]),
            19_999
        );
        assert_eq!(t.children_of(d).len(), 1, "the pinned one stays");
        assert!(t.by_ino.capacity() < 1000, "{}", t.by_ino.capacity());
    }

    /// A table with directory `d` (held by the kernel) and `n` files
    /// listed in it.
    fn listed_dir(n: usize) -> (InodeTable, u64, Vec<u64>) {
        let mut t = InodeTable::new(dir());
        let d = add(&mut t, "d");
        t.add_lookup(d);
        let file = attr_of(crate::fs::FileKind::File);
        let inos = (0..n)
            .map(|i| {
                t.upsert(
                    NodeKey::Path(format!("d/f{i}")),
                    d,
                    file.clone(),
                    None,
                    None,
                )
            })
            .collect();
        (t, d, inos)
    }

    fn attr_of(kind: crate::fs::FileKind) -> Attr {
        let mut a = dir();
        a.kind = kind;
        a
    }

    /// The subdirectory counts, by walking the table.
    fn walked(t: &InodeTable, d: u64) -> u32 {
        t.children_of(d)
            .into_iter()
            .filter(|(p, n)| {
                n.attr.kind == crate::fs::FileKind::Dir
                    && t.find(&NodeKey::Path(p.to_string())) == Some(n.attr.ino)
            })
            .count() as u32
    }

    /// The counts kept as nodes come, move, change kind, are unlinked or
    /// forgotten match a walk of the table at every step.
    #[test]
    fn subdirectory_counts_follow_every_change() {
        use crate::fs::FileKind;
        let mut t = InodeTable::new(attr_of(FileKind::Dir));
        let p = |s: &str| NodeKey::Path(s.to_string());
        let check = |t: &InodeTable| {
            let dirs: Vec<u64> = t.by_ino.keys().copied().collect();
            for d in dirs {
                assert_eq!(t.subdirs(d), walked(t, d), "inode {d}");
            }
        };
        let a = t.upsert(p("a"), ROOT_INO, attr_of(FileKind::Dir), None, None);
        let b = t.upsert(p("b"), ROOT_INO, attr_of(FileKind::Dir), None, None);
        t.upsert(p("a/x"), a, attr_of(FileKind::Dir), None, None);
        t.upsert(p("a/f"), a, attr_of(FileKind::File), None, None);
        check(&t);
        assert_eq!((t.subdirs(ROOT_INO), t.subdirs(a)), (2, 1));
        // A file that becomes a directory, and back.
        t.upsert(p("a/f"), a, attr_of(FileKind::Dir), None, None);
        assert_eq!(t.subdirs(a), 2);
        t.upsert(p("a/f"), a, attr_of(FileKind::File), None, None);
        check(&t);
        t.rename("a/x", "b/y", b);
        check(&t);
        assert_eq!((t.subdirs(a), t.subdirs(b)), (0, 1));
        // A rename over a directory replaces it.
        t.upsert(p("a/z"), a, attr_of(FileKind::Dir), None, None);
        t.rename("a/z", "b/y", b);
        check(&t);
        assert_eq!((t.subdirs(a), t.subdirs(b)), (0, 1));
        t.remove_path("b/y", Instant::now() + std::time::Duration::from_secs(1));
        check(&t);
        assert_eq!(t.subdirs(b), 0);
        t.add_lookup(a);
        t.forget(a, 1, false);
        check(&t);
        assert_eq!(t.subdirs(ROOT_INO), 2, "a forgotten directory stays");
    }

    /// The kernel may forget a file's inode between two of its uses (a
    /// dcache shrunk under memory pressure): looked up again, at the same
    /// path or after a rename, the file has the same inode number. An
    /// unlinked one goes at once.
    #[test]
    fn a_forgotten_file_keeps_its_inode_number() {
        use crate::fs::FileKind;
        let mut t = InodeTable::new(attr_of(FileKind::Dir));
        let p = |s: &str| NodeKey::Path(s.to_string());
        let d = t.upsert(p("d"), ROOT_INO, attr_of(FileKind::Dir), None, None);
        let f = t.upsert(p("d/f"), d, attr_of(FileKind::File), None, None);
        t.add_lookup(f);
        t.forget(f, 1, false);
        assert_eq!(
            t.upsert(p("d/f"), d, attr_of(FileKind::File), None, None),
            f
        );
        t.rename("d/f", "d/g", d);
        t.forget(f, 0, false);
        assert_eq!(
            t.upsert(p("d/g"), d, attr_of(FileKind::File), None, None),
            f
        );
        t.add_lookup(f);
        t.remove_path("d/g", Instant::now());
        t.forget(f, 1, false);
        assert!(t.get(f).is_none(), "an unlinked file goes when forgotten");
    }

    #[test]
    fn expired_negative_entries_do_not_pile_up() {
        let mut t = InodeTable::new(dir());
        let past = Instant::now();
        for i in 0..100_000 {
            t.remove_path(&format!("missing-{i}"), past);
        }
        assert!(
            t.negative.len() <= 2 * NEGATIVE_PRUNE_MIN,
            "{}",
            t.negative.len()
        );
    }
}
