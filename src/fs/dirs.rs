//! Directory handles and where each entry sits in a directory's stream.
//!
//! A directory's entries are handed out in *position* order, and the
//! position of a name (the `d_off` the kernel hands back to resume after
//! it) is a keyed hash of the name, the same in every listing of that
//! directory for the life of the mount: `.`, `..` and `.versions` first
//! (1, 2, 3), then every other name by its hash. So a reader resumes at
//! the same name whatever listing it reads next: a handle can take a newer
//! listing between two reads, and the kernel, which keeps one listing per
//! directory filled and read by every handle *by position*
//! (`FOPEN_CACHE_DIR`, `kdirs`), never resumes a handle at another name
//! than the one it stopped at. Positions that were indexes into each
//! handle's own snapshot did: a loop removing names as it read them beside
//! an `ls` skipped live names and returned removed ones.
//!
//! A name present all along is returned once by a pass over the directory
//! whatever happens meanwhile: names join and leave at their own
//! position, never shifting the others. Two names of one directory with
//! the same hash (62 bits, keyed per mount: about one chance in 10^7 for a
//! million names) share a position; a reader resuming there gets both
//! again rather than missing one.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use super::DirEntry;
use super::meta::PaceGuard;

/// Position of the first hashed name: below it, `.`, `..`, `.versions`.
const FIRST_HASHED: u64 = 16;

/// Where names sit in directory streams, for one mount.
#[derive(Debug, Default)]
pub struct Positions {
    key: RandomState,
}

impl Positions {
    /// The position of `name` (not one of the leading entries).
    pub fn of(&self, name: &str) -> u64 {
        let h = self.key.hash_one(name) >> 2;
        FIRST_HASHED + h % ((1u64 << 62) - FIRST_HASHED)
    }

    /// `entries` in position order, with their positions (names sharing
    /// one by name).
    pub fn order(&self, entries: Vec<DirEntry>) -> (Vec<DirEntry>, Vec<u64>) {
        let mut keyed: Vec<(u64, DirEntry)> =
            entries.into_iter().map(|e| (self.of(&e.name), e)).collect();
        keyed.sort_unstable_by(|a, b| (a.0, &a.1.name).cmp(&(b.0, &b.1.name)));
        keyed.into_iter().map(|(p, e)| (e, p)).unzip()
    }
}

/// A directory's entries as one listing found them, in position order.
#[derive(Debug)]
pub struct Listing {
    pub entries: Vec<DirEntry>,
    /// The position of each entry, ascending.
    pub pos: Vec<u64>,
    /// How many entries lead (`.`, `..`, `.versions`).
    pub lead: usize,
    /// Until when its names are this mount's view of the directory
    /// (`None`: one the kernel never keeps: the `.versions` tree).
    pub names_until: Option<Instant>,
    /// Taken from the listing the table held, without a LIST.
    pub held: bool,
    /// The directory's `entries_gen` it shows (`None`: it never follows
    /// changes: the `.versions` tree, a point-in-time mount).
    pub version: Option<u64>,
}

impl Listing {
    /// `lead` (`.`, `..`, maybe `.versions`: positions 1, 2, 3) followed by
    /// `rest` with its positions, ascending (`Positions::order`).
    pub fn new(
        lead: Vec<DirEntry>,
        rest: (Vec<DirEntry>, Vec<u64>),
        names_until: Option<Instant>,
        held: bool,
        version: Option<u64>,
    ) -> Self {
        let lead_n = lead.len();
        let mut pos: Vec<u64> = (1..=lead_n as u64).collect();
        let mut entries = lead;
        entries.extend(rest.0);
        pos.extend(rest.1);
        Listing {
            entries,
            pos,
            lead: lead_n,
            names_until,
            held,
            version,
        }
    }

    /// The index of the entry a reader resumes at after position `offset`
    /// (0: from the start). Names sharing a position are all returned
    /// again rather than one of them missed.
    pub fn resume_at(&self, offset: u64) -> usize {
        if offset == 0 {
            return 0;
        }
        let i = self.pos.partition_point(|&p| p < offset);
        let shared = self.pos.get(i + 1) == Some(&offset);
        if self.pos.get(i) == Some(&offset) && !shared {
            i + 1
        } else {
            i
        }
    }

    /// The index of the first entry after every name at position
    /// `offset`: where a reply that sent them all goes on.
    pub fn resume_past(&self, offset: u64) -> usize {
        self.pos.partition_point(|&p| p <= offset)
    }
}

/// An open directory: a listing, replaced by the directory's current one
/// when this mount changed the directory or listed it again since.
#[derive(Debug)]
pub struct DirHandle {
    /// The directory's inode.
    pub dir: u64,
    pub listing: Arc<Listing>,
    /// Paces the listing's metadata pass (`meta`) by this reader; kept
    /// across a newer listing (positions move little between listings).
    pub pace: Option<Arc<PaceGuard>>,
    /// Opened with the kernel keeping what it reads (`kdirs`).
    pub kernel_keeps: AtomicBool,
    /// Read from at least once: a read from offset 0 again is a rewind.
    pub read: AtomicBool,
}

impl DirHandle {
    pub fn new(dir: u64, listing: Arc<Listing>, pace: Option<PaceGuard>) -> Self {
        DirHandle {
            dir,
            listing,
            pace: pace.map(Arc::new),
            kernel_keeps: false.into(),
            read: false.into(),
        }
    }

    /// This handle over `listing` instead, as far as it had read;
    /// `pace`: the new listing's, if it has one.
    pub fn with_listing(&self, listing: Arc<Listing>, pace: Option<PaceGuard>) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        DirHandle {
            dir: self.dir,
            listing,
            pace: pace.map(Arc::new).or_else(|| self.pace.clone()),
            kernel_keeps: self.kernel_keeps.load(Relaxed).into(),
            read: self.read.load(Relaxed).into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::FileKind;

    fn entry(name: &str) -> DirEntry {
        DirEntry {
            ino: 0,
            name: name.into(),
            kind: FileKind::File,
        }
    }

    fn listing(p: &Positions, names: &[&str]) -> Listing {
        let lead = vec![entry("."), entry("..")];
        let rest = p.order(names.iter().map(|n| entry(n)).collect());
        Listing::new(lead, rest, None, false, None)
    }

    /// Reads `l` from `offset` as a reader would, `n` entries: (names, the
    /// offset to resume from).
    fn read(l: &Listing, offset: u64, n: usize) -> (Vec<String>, u64) {
        let from = l.resume_at(offset);
        let got: Vec<_> = (from..l.entries.len()).take(n).collect();
        let next = got.last().map_or(offset, |&i| l.pos[i]);
        (
            got.iter().map(|&i| l.entries[i].name.clone()).collect(),
            next,
        )
    }

    #[test]
    fn a_pass_across_changing_listings_returns_every_lasting_name_once() {
        let p = Positions::default();
        let mut present: Vec<String> = (0..500).map(|i| format!("f{i}")).collect();
        let mut removed = Vec::new();
        let (mut seen, mut offset) = (Vec::new(), 0);
        // Between two reads of 7 entries, a name leaves and one comes, and
        // the reader takes the newer listing.
        for round in 0..10_000 {
            let names: Vec<&str> = present.iter().map(String::as_str).collect();
            let (got, next) = read(&listing(&p, &names), offset, 7);
            if got.is_empty() {
                break;
            }
            seen.extend(got);
            offset = next;
            removed.push(present.remove((round * 37) % present.len()));
            present.push(format!("new{round}"));
        }
        for n in present.iter().filter(|n| n.starts_with('f')) {
            assert_eq!(seen.iter().filter(|s| *s == n).count(), 1, "{n} once");
        }
        let mut uniq = seen.clone();
        uniq.sort();
        uniq.dedup();
        assert_eq!(uniq.len(), seen.len(), "no name twice");
        assert!(!removed.is_empty() && present.len() == 500);
    }

    #[test]
    fn names_sharing_a_position_are_returned_again_not_missed() {
        let l = Listing {
            entries: ["a", "b", "c", "d"].iter().map(|n| entry(n)).collect(),
            pos: vec![1, 20, 20, 30],
            lead: 1,
            names_until: None,
            held: false,
            version: None,
        };
        assert_eq!(l.resume_at(0), 0);
        assert_eq!(l.resume_at(1), 1);
        // After b or c: both again.
        assert_eq!(l.resume_at(20), 1);
        assert_eq!(l.resume_at(30), 4);
        // A position whose name left: the next one.
        assert_eq!(l.resume_at(25), 3);
        assert_eq!(l.resume_at(u64::MAX), 4);
        // Within one reply that sent b and c: on past both, once.
        assert_eq!(l.resume_past(20), 3);
        assert_eq!(l.resume_past(1), 1);
        assert_eq!(l.resume_past(25), 3);
        assert_eq!(l.resume_past(30), 4);
    }

    #[test]
    fn positions_are_the_same_in_every_listing_and_past_the_leading_ones() {
        let p = Positions::default();
        let a = listing(&p, &["x", "y", "z"]);
        let b = listing(&p, &["z", "w", "x"]);
        let at = |l: &Listing, n: &str| l.pos[l.entries.iter().position(|e| e.name == n).unwrap()];
        assert_eq!(at(&a, "x"), at(&b, "x"));
        assert_eq!(at(&a, "z"), at(&b, "z"));
        assert_eq!(&a.pos[..2], &[1, 2]);
        assert!(
            a.pos[2..]
                .iter()
                .all(|&q| (FIRST_HASHED..1 << 62).contains(&q))
        );
        assert!(a.pos.windows(2).all(|w| w[0] <= w[1]));
    }
}
