//! What the kernel keeps of directory listings (`FOPEN_CACHE_DIR`).
//!
//! The kernel can keep the entries of a directory read to its end and
//! serve the next `opendir` and `readdir` from them, with no request at
//! all: an `ls -l` again then sends no readdirplus, whose every entry
//! would have the kernel drop that entry's cached ACL and ask for it
//! again. The kernel drops what it keeps when this mount changes the
//! directory (a create, unlink or rename through it: its version moves);
//! it cannot know when another client's change must show. So it keeps a
//! listing no longer than the names it was given are this mount's view
//! (the table's `listed_until`, `metadata_ttl` after the LIST):
//! - an open lets the kernel keep what it holds (`FOPEN_KEEP_CACHE`) only
//!   when everything served to it since it last dropped the listing came
//!   from snapshots still current, and this open found the listing held
//!   (no LIST since); otherwise the kernel drops it at this open;
//! - at the earliest expiry among what was served, the kernel is told to
//!   drop it (`Expiry`): a handle open across the expiry and rewound
//!   would otherwise be served the old names again (rewinddir).
//!
//! Directories of the `.versions` tree are never kept: a version uploaded
//! by this mount changes them without any change to them through the
//! kernel.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// What the kernel is told when it opens a directory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelDir {
    /// It may keep the entries this handle reads (`FOPEN_CACHE_DIR`).
    pub cache: bool,
    /// It may serve this handle from the entries it kept
    /// (`FOPEN_KEEP_CACHE`); otherwise it drops them at this open.
    pub keep: bool,
}

/// An expiry is set at least this far after a reply it follows, so the
/// kernel is told to drop a listing only after it took in the reply
/// (a snapshot served after its own expiry, by a handle read slowly).
const AFTER_REPLY: Duration = Duration::from_secs(1);

/// Until when the kernel may keep each directory's listing, by inode:
/// the earliest expiry among the snapshots served to it since it last
/// dropped that listing.
#[derive(Debug, Default)]
pub struct KernelDirs {
    until: Mutex<HashMap<u64, Instant>>,
}

impl KernelDirs {
    /// An open of directory `dir` over a snapshot whose names are this
    /// mount's view until `names_until` (`None`: not kept at all), taken
    /// from the listing held (`held`) or by a new LIST.
    pub fn opened(&self, dir: u64, names_until: Option<Instant>, held: bool) -> KernelDir {
        let now = Instant::now();
        let cache = names_until.is_some_and(|u| u > now);
        let mut until = self.until.lock();
        let keep = cache && held && until.get(&dir).is_some_and(|&u| u > now);
        if !keep {
            // The kernel drops what it held at this open.
            until.remove(&dir);
        }
        KernelDir { cache, keep }
    }

    /// Entries of `dir` served to the kernel from a snapshot current until
    /// `names_until`, by a handle opened with `cache`. Returns when the
    /// kernel must drop the listing if that is earlier than any expiry set
    /// before (the caller sets a timer for it, then calls `expired`).
    pub fn served(&self, dir: u64, names_until: Option<Instant>) -> Option<Instant> {
        let floor = Instant::now() + AFTER_REPLY;
        let deadline = names_until.map_or(floor, |u| u.max(floor));
        match self.until.lock().entry(dir) {
            Entry::Occupied(e) if *e.get() <= deadline => None,
            Entry::Occupied(mut e) => {
                e.insert(deadline);
                Some(deadline)
            }
            Entry::Vacant(v) => {
                v.insert(deadline);
                Some(deadline)
            }
        }
    }

    /// A timer set by `served` fired: whether the kernel must drop the
    /// listing of `dir` now (not when it dropped it already, nor when a
    /// later serve set another expiry).
    pub fn expired(&self, dir: u64) -> bool {
        let mut until = self.until.lock();
        match until.get(&dir) {
            Some(&u) if u <= Instant::now() => {
                until.remove(&dir);
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(3600);

    #[test]
    fn a_listing_is_kept_only_while_everything_served_is_current() {
        let k = KernelDirs::default();
        let fresh = Some(Instant::now() + LONG);
        // Nothing served yet: cached from here on, nothing to keep.
        assert_eq!(
            k.opened(7, fresh, true),
            KernelDir {
                cache: true,
                keep: false
            }
        );
        assert!(k.served(7, fresh).is_some());
        // A second serve of the same expiry sets no second timer.
        assert_eq!(k.served(7, fresh), None);
        assert!(k.opened(7, fresh, true).keep);
        // A new LIST (not held): the kernel must take the new names.
        assert!(!k.opened(7, fresh, false).keep);
        // ... and what it held is gone with it.
        assert!(!k.opened(7, fresh, true).keep);
    }

    #[test]
    fn an_expired_or_absent_view_is_never_kept() {
        let k = KernelDirs::default();
        let past = Some(Instant::now() - Duration::from_millis(1));
        assert_eq!(k.opened(3, past, true), KernelDir::default());
        assert_eq!(k.opened(3, None, true), KernelDir::default());
    }

    #[test]
    fn an_earlier_expiry_wins_and_fires_once() {
        let k = KernelDirs::default();
        let now = Instant::now();
        assert!(k.served(9, Some(now + LONG)).is_some());
        // A snapshot served after its own expiry: dropped shortly after
        // its reply, earlier than the first.
        let soon = k.served(9, Some(now - LONG)).expect("earlier");
        assert!(soon < now + LONG && soon >= now + AFTER_REPLY);
        assert!(!k.expired(9), "not yet");
        // The timer fires once its time has come; a stale timer does not.
        k.until.lock().insert(9, Instant::now());
        assert!(k.expired(9));
        assert!(!k.expired(9));
        assert!(!k.opened(9, Some(now + LONG), true).keep);
    }
}
