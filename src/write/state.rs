//! The write state of one inode: its one owner. Everything that changes a
//! file open for writing (or whose upload failed and is pending) goes
//! through this state, under its async lock (`fs::files::OpenFile`): the
//! staged copy and its journal, whether it differs from S3, how many
//! writers hold it, and the retry bookkeeping of a failed upload. The
//! namespace code (rename, unlink, chmod) uses only the methods below;
//! the upload itself is driven from `fs::files`, which knows the key.
//!
//! Life: created by the first open for writing (or a create), shared by
//! every writer; ended (`closed`) by the last release once its data is in
//! S3. A failed upload keeps it, pending, with `handles == 0`; the retrier
//! uploads it later. Never dropped with dirty data: `Staged` keeps its
//! files then, for recovery.

use std::time::{Duration, Instant};

use super::Staged;
use crate::store::{Metadata, PutResult};

/// First wait before a failed upload is tried again; it doubles each time.
pub const RETRY_FIRST_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct WriteState {
    pub(crate) staged: Staged,
    /// The staged data differs from S3.
    pub(crate) dirty: bool,
    /// Open writers.
    pub(crate) handles: usize,
    /// The last writer left and the state was removed from the map (under
    /// this lock): whoever waited for the lock must not use it.
    pub(crate) closed: bool,
    /// The last upload failed: its error, and when it is tried again.
    pub(crate) last_error: Option<String>,
    pub(crate) next_try: Option<Instant>,
    pub(crate) backoff: Duration,
    /// The inode's generation (changes this mount made to its object)
    /// this state last built on.
    pub(crate) generation: u64,
    /// The kernel let go of the staged file (its last passthrough handle
    /// closed) while it may still be written to through a mapping: the
    /// retrier looks again.
    pub(crate) outside_released: bool,
}

impl WriteState {
    pub(crate) fn new(staged: Staged, dirty: bool) -> Self {
        WriteState {
            staged,
            dirty,
            handles: 1,
            closed: false,
            last_error: None,
            next_try: None,
            backoff: RETRY_FIRST_WAIT,
            generation: 0,
            outside_released: false,
        }
    }

    /// The file was unlinked or replaced: its data is never uploaded.
    pub fn discard(&mut self) -> Option<super::Leftover> {
        let left = self.staged.discard();
        self.dirty = false;
        self.last_error = None;
        self.next_try = None;
        left
    }

    /// This mount moved the object, or copied it onto itself with new
    /// metadata: same bytes, a new key or ETag, which the next upload
    /// builds on.
    pub fn object_moved(&mut self, key: &str, put: &PutResult, meta: Option<&Metadata>) {
        self.staged.base_moved(key, put);
        self.staged.rejournal_outside(key, meta);
    }

    /// The data is in S3 now (as `put`, at `key`).
    pub(crate) fn landed(&mut self, key: &str, put: &PutResult) {
        self.dirty = false;
        self.last_error = None;
        self.next_try = None;
        self.backoff = RETRY_FIRST_WAIT;
        // While the kernel may write to the staged file (passthrough), the
        // journal stays: a kill then has the next mount send it again.
        if self.staged.outside().is_none() {
            self.staged.end_journal();
        }
        self.staged.rebase(key, put);
        self.staged.rejournal_outside(key, None);
    }

    /// An upload failed again: wait twice as long (at most `max`).
    pub(crate) fn failed_again(&mut self, max: Duration) -> Instant {
        self.backoff = (self.backoff * 2).min(max);
        let t = Instant::now() + self.backoff;
        self.next_try = Some(t);
        t
    }
}
