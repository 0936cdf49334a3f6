//! What the kernel keeps of directory listings (`FOPEN_CACHE_DIR`).
//!
//! The kernel can keep the entries of a directory read to its end and
//! serve the next `opendir` and `readdir` from them, with no request at
//! all: an `ls -l` again then sends no readdirplus, whose every entry
//! would have the kernel drop that entry's cached ACL and ask for it
//! again. It keeps *one* listing per directory, filled by whichever handle
//! reads where it ends and read by every handle, by position: positions
//! mean the same name in every listing (`dirs`), and every handle reads
//! its directory's current listing (`Fs::dir_handle_now`).
//!
//! The kernel drops what it keeps at an open without `FOPEN_KEEP_CACHE`,
//! when told to (`FUSE_NOTIFY_INVAL_INODE`), and at a read from the start
//! after this mount changed the directory through it. It cannot know when
//! another client's change must show, nor that a reply it took in came
//! from a listing this mount has since moved past. So:
//! - an open lets the kernel keep what it holds only when this open found
//!   the listing held (no LIST), everything served to the kernel since it
//!   last dropped the listing came from the directory's current listing
//!   (its `entries_gen`) and is still this mount's view (`metadata_ttl`
//!   after its LIST), and that drop came after every reply sent before it
//!   was taken in (a reply is recorded before it is sent; one sent less
//!   than `AFTER_REPLY` before a drop may reach the kernel after it);
//! - at the earliest expiry among what was served, the kernel is told to
//!   drop it: a handle open across the expiry and rewound would otherwise
//!   be served the old names again;
//! - one handle of a directory at a time is opened with `FOPEN_CACHE_DIR`
//!   (reads and fills the kept listing). A handle resuming at a position
//!   the kept listing lacks (its last name was removed since, and another
//!   handle filled the listing again) is asked about, unless the listing
//!   ends on a page boundary: then the kernel reads the position's absence
//!   as the end of the directory, and the pass ends early. With one such
//!   handle, nothing fills the listing while it is partway through.
//!
//! Directories of the `.versions` tree are never kept: a version uploaded
//! by this mount changes them without any change to them through the
//! kernel.

use std::collections::HashMap;
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

/// How long a reply may take to reach the kernel's listing after it is
/// sent (the kernel takes it in on the reading thread, once that runs).
const AFTER_REPLY: Duration = Duration::from_secs(1);

/// What the kernel may hold of one directory's listing.
#[derive(Debug)]
struct Kept {
    /// Served since the kernel last dropped it: the oldest `entries_gen`
    /// and the earliest expiry among the listings served.
    served: Option<(u64, Instant)>,
    /// When it must be dropped (a timer is set for it).
    drop_at: Option<Instant>,
    /// When a reply was last about to be sent.
    last_sent: Instant,
    /// The last drop may have come before a reply sent earlier reached
    /// the kernel: what it holds is not known.
    overtaken: bool,
}

/// What the kernel may hold of each directory's listing, by inode.
#[derive(Debug, Default)]
pub struct KernelDirs {
    dirs: Mutex<HashMap<u64, Kept>>,
    /// The handle of each directory opened with `FOPEN_CACHE_DIR` and not
    /// released yet.
    caching: Mutex<HashMap<u64, u64>>,
}

impl KernelDirs {
    /// An open of directory `dir` as handle `fh` over a listing of
    /// `entries_gen` `version` whose names are this mount's view until
    /// `names_until` (`None` either: never kept), taken from the listing
    /// held (`held`) or by a new LIST.
    pub fn opened(
        &self,
        dir: u64,
        fh: u64,
        version: Option<u64>,
        names_until: Option<Instant>,
        held: bool,
    ) -> KernelDir {
        let now = Instant::now();
        let current = version.is_some() && names_until.is_some_and(|u| u > now);
        let mut dirs = self.dirs.lock();
        let keep = current
            && held
            && dirs.get(&dir).is_some_and(|k| {
                !k.overtaken && k.served.is_some_and(|(g, u)| Some(g) == version && u > now)
            });
        if !keep {
            // The kernel drops what it held at this open.
            Self::dropped(&mut dirs, dir, now);
        }
        drop(dirs);
        let cache = current
            && match self.caching.lock().entry(dir) {
                std::collections::hash_map::Entry::Occupied(_) => false,
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(fh);
                    true
                }
            };
        KernelDir { cache, keep }
    }

    /// Handle `fh` of directory `dir` was released.
    pub fn released(&self, dir: u64, fh: u64) {
        let mut caching = self.caching.lock();
        if caching.get(&dir) == Some(&fh) {
            caching.remove(&dir);
        }
    }

    /// The kernel drops the listing of `dir` now.
    fn dropped(dirs: &mut HashMap<u64, Kept>, dir: u64, now: Instant) {
        let overtaken = dirs
            .get(&dir)
            .is_some_and(|k| now < k.last_sent + AFTER_REPLY);
        match dirs.get_mut(&dir) {
            Some(k) if overtaken => {
                k.served = None;
                k.drop_at = None;
                k.overtaken = true;
            }
            _ => {
                dirs.remove(&dir);
            }
        }
    }

    /// Entries of `dir` from a listing of `entries_gen` `version`, current
    /// until `names_until`, are about to be sent to the kernel through a
    /// handle it keeps entries of. Returns when the kernel must drop the
    /// listing if that is earlier than any drop set before (the caller
    /// sets a timer for it, then calls `expired`).
    pub fn served(
        &self,
        dir: u64,
        version: Option<u64>,
        names_until: Option<Instant>,
    ) -> Option<Instant> {
        let now = Instant::now();
        let floor = now + AFTER_REPLY;
        let deadline = names_until.map_or(floor, |u| u.max(floor));
        // A listing that never follows changes is never kept: as if it
        // were older than any.
        let version = version.unwrap_or(0);
        let mut dirs = self.dirs.lock();
        let k = dirs.entry(dir).or_insert(Kept {
            served: None,
            drop_at: None,
            last_sent: now,
            overtaken: false,
        });
        k.last_sent = now;
        k.served = Some(match k.served {
            None => (version, deadline),
            Some((g, u)) => (g.min(version), u.min(deadline)),
        });
        if k.drop_at.is_some_and(|d| d <= deadline) {
            return None;
        }
        k.drop_at = Some(deadline);
        Some(deadline)
    }

    /// A timer set by `served` fired: whether the kernel must drop the
    /// listing of `dir` now (not when it dropped it already, nor when a
    /// later serve moved the drop).
    pub fn expired(&self, dir: u64) -> bool {
        let now = Instant::now();
        let mut dirs = self.dirs.lock();
        match dirs.get(&dir).and_then(|k| k.drop_at) {
            Some(d) if d <= now => {
                Self::dropped(&mut dirs, dir, now);
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

    /// Has the last reply to `dir` sent long enough ago to have arrived.
    fn arrived(k: &KernelDirs, dir: u64) {
        if let Some(x) = k.dirs.lock().get_mut(&dir) {
            x.last_sent -= 2 * AFTER_REPLY;
        }
    }

    #[test]
    fn a_listing_is_kept_only_while_everything_served_is_current() {
        let k = KernelDirs::default();
        let fresh = Some(Instant::now() + LONG);
        // Nothing served yet: cached from here on, nothing to keep.
        assert_eq!(
            k.opened(7, 1, Some(1), fresh, true),
            KernelDir {
                cache: true,
                keep: false
            }
        );
        assert!(k.served(7, Some(1), fresh).is_some());
        // A second serve of the same expiry sets no second timer.
        assert_eq!(k.served(7, Some(1), fresh), None);
        assert!(k.opened(7, 1, Some(1), fresh, true).keep);
        // A new LIST (not held): the kernel must take the new names.
        assert!(!k.opened(7, 1, Some(1), fresh, false).keep);
        // ... and what it held is gone with it.
        assert!(!k.opened(7, 1, Some(1), fresh, true).keep);
    }

    #[test]
    fn what_an_older_listing_served_is_never_kept() {
        let k = KernelDirs::default();
        let fresh = Some(Instant::now() + LONG);
        k.opened(5, 1, Some(3), fresh, true);
        k.served(5, Some(3), fresh);
        // A handle over the listing before this mount's create read on.
        k.served(5, Some(2), fresh);
        arrived(&k, 5);
        assert!(!k.opened(5, 1, Some(3), fresh, true).keep);
        // Dropped at that open; served from the current one since: kept.
        k.served(5, Some(3), fresh);
        assert!(k.opened(5, 1, Some(3), fresh, true).keep);
        // The directory moved on (this mount changed it): not kept.
        assert!(!k.opened(5, 1, Some(4), fresh, true).keep);
    }

    #[test]
    fn a_drop_a_reply_may_overtake_is_not_trusted() {
        let k = KernelDirs::default();
        let fresh = Some(Instant::now() + LONG);
        k.opened(6, 1, Some(1), fresh, true);
        k.served(6, Some(1), fresh);
        // Dropped right after a reply: it may land after the drop.
        assert!(!k.opened(6, 1, Some(2), fresh, true).keep);
        k.served(6, Some(2), fresh);
        assert!(!k.opened(6, 1, Some(2), fresh, true).keep, "overtaken");
        // A drop once every reply arrived is trusted again.
        arrived(&k, 6);
        assert!(!k.opened(6, 1, Some(2), fresh, true).keep);
        k.served(6, Some(2), fresh);
        assert!(k.opened(6, 1, Some(2), fresh, true).keep);
    }

    #[test]
    fn one_handle_of_a_directory_at_a_time_reads_and_fills_the_kept_listing() {
        let k = KernelDirs::default();
        let fresh = Some(Instant::now() + LONG);
        assert!(k.opened(4, 10, Some(1), fresh, false).cache);
        k.served(4, Some(1), fresh);
        // A second handle while the first is open: served by the mount,
        // and what the kernel keeps stays.
        let second = k.opened(4, 11, Some(1), fresh, true);
        assert_eq!(
            second,
            KernelDir {
                cache: false,
                keep: true
            }
        );
        k.released(4, 11);
        assert!(!k.opened(4, 12, Some(1), fresh, true).cache, "still open");
        k.released(4, 10);
        assert!(k.opened(4, 13, Some(1), fresh, true).cache);
        // Another directory is its own.
        assert!(k.opened(8, 14, Some(1), fresh, true).cache);
    }

    #[test]
    fn an_expired_or_absent_view_is_never_kept() {
        let k = KernelDirs::default();
        let past = Some(Instant::now() - Duration::from_millis(1));
        assert_eq!(k.opened(3, 1, Some(1), past, true), KernelDir::default());
        assert_eq!(k.opened(3, 1, Some(1), None, true), KernelDir::default());
        assert_eq!(
            k.opened(3, 1, None, Some(Instant::now() + LONG), true),
            KernelDir::default()
        );
    }

    #[test]
    fn an_earlier_expiry_wins_and_fires_once() {
        let k = KernelDirs::default();
        let now = Instant::now();
        assert!(k.served(9, Some(1), Some(now + LONG)).is_some());
        // A listing served after its own expiry: dropped shortly after
        // its reply, earlier than the first.
        let soon = k.served(9, Some(1), Some(now - LONG)).expect("earlier");
        assert!(soon < now + LONG && soon >= now + AFTER_REPLY);
        assert!(!k.expired(9), "not yet");
        // The timer fires once its time has come; a stale timer does not.
        k.dirs.lock().get_mut(&9).unwrap().drop_at = Some(Instant::now());
        assert!(k.expired(9));
        assert!(!k.expired(9));
        assert!(!k.opened(9, 1, Some(1), Some(now + LONG), true).keep);
    }
}
