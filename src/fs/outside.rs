//! Files the kernel writes to itself (`-o passthrough`): a handle that
//! created or emptied a file may be given its staged copy to write to
//! (`open_outside`), and the daemon then sees no WRITE at all. The write
//! state stays the owner: it keeps the file all of the data (no base),
//! its journal on disk until the kernel let go, and learns what changed
//! from the file's stamp (`outside_sync`) at each close, fsync, upload
//! and attribute request.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::files::{Handle, StateGuard};
use super::{Attr, Fs, FsResult};
use crate::write::state::WriteState;

/// How soon a staged file still mapped for writing after its last close
/// is looked at again.
const OUTSIDE_RECHECK: Duration = Duration::from_secs(1);

impl Fs {
    pub(super) fn is_outside(&self, ino: u64) -> bool {
        self.outside.lock().contains_key(&ino)
    }

    /// Offers the staged file of handle `fh` to the kernel (`grant`, which
    /// says whether it took it): only for a handle that created or emptied
    /// the file, whose staged copy is then all of its data. Decided under
    /// the write state's lock, journaled first: from the moment the kernel
    /// has it, writes may come that this mount never sees.
    pub async fn open_outside(&self, fh: u64, grant: impl FnOnce(&std::fs::File) -> bool) -> bool {
        let Ok(h) = self.file_handle(fh) else {
            return false;
        };
        let Handle::File(fhd) = &*h else {
            return false;
        };
        let ino = fhd.ino;
        if !fhd.writable || !fhd.made.load(Ordering::Relaxed) {
            return false;
        }
        // The kernel would not have this mount clear set-user-ID or
        // set-group-ID bits at a write it does not see.
        if self
            .table
            .lock()
            .get(ino)
            .is_none_or(|n| n.attr.perm & 0o6000 != 0)
        {
            return false;
        }
        let Some(mut st) = self.live(ino).await else {
            return false;
        };
        if !st.staged.may_go_outside() || self.set_dirty(ino, &mut st).is_err() {
            return false;
        }
        if st.staged.is_unlinked() {
            return false;
        }
        let was = st.staged.outside().is_some();
        let o = match st.staged.go_outside() {
            Ok(o) => o,
            Err(e) => {
                debug!(ino, error = %e, "no passthrough: the staged file cannot be looked at");
                return false;
            }
        };
        if !grant(o.file()) {
            if !was {
                st.staged.end_outside();
            }
            return false;
        }
        st.outside_released = false;
        self.outside.lock().insert(ino, o);
        true
    }

    /// Takes account of what the kernel wrote to a passthrough file since
    /// last asked: the state is dirty (journaled), and the file's size and
    /// times are the staged file's. Whether it had changed.
    pub(super) fn outside_sync(&self, ino: u64, st: &mut WriteState) -> FsResult<bool> {
        let Some(stamp) = st.staged.sync_outside()? else {
            return Ok(false);
        };
        if let Some(n) = self.table.lock().get_mut(ino) {
            n.attr.size = stamp.size;
            n.attr.mtime = stamp.mtime();
            n.attr.ctime = stamp.ctime();
        }
        // An unlinked file's writes go nowhere.
        if st.staged.is_unlinked() {
            return Ok(true);
        }
        // Dirty before anything that can fail: the change is taken account
        // of now, and only an upload may clear it.
        st.dirty = true;
        self.set_dirty(ino, st)?;
        Ok(true)
    }

    /// The size of a passthrough file is its staged file's, and so are
    /// its times once the kernel wrote since this mount last looked.
    pub(super) fn outside_attr(&self, a: &mut Attr) {
        let o = {
            let m = self.outside.lock();
            if m.is_empty() {
                return;
            }
            m.get(&a.ino).cloned()
        };
        if let Some(o) = o
            && let Ok((stamp, moved)) = o.look()
        {
            a.size = stamp.size;
            if moved {
                a.mtime = stamp.mtime();
                a.ctime = stamp.ctime();
            }
        }
    }

    /// The kernel closed the last passthrough handle of `ino`.
    /// `still_open` says (asked under the write state's lock, which every
    /// grant holds) whether another was opened since.
    pub async fn end_outside(&self, ino: u64, still_open: impl Fn() -> bool) {
        let Some(mut st) = self.live(ino).await else {
            // Ended already (an unlinked file's last close).
            self.outside.lock().remove(&ino);
            return;
        };
        if st.staged.outside().is_none() || still_open() {
            return;
        }
        st.outside_released = true;
        self.finish_outside(ino, &mut st).await;
    }

    /// Ends passthrough for a state the kernel let go of: its last writes
    /// are taken account of, and it becomes an ordinary write state (its
    /// last writer gone, it uploads and ends). A shared mapping kept after
    /// the last close still writes to the file: then what it wrote so far
    /// is uploaded and the state looked at again shortly. When that is.
    pub(super) async fn finish_outside(&self, ino: u64, st: &mut StateGuard) -> Option<Instant> {
        if let Err(e) = self.outside_sync(ino, st) {
            warn!(ino, error = %e, "cannot look at a passthrough file's staged copy");
        }
        let o = st.staged.outside().cloned()?;
        if o.written_elsewhere() {
            debug!(ino, "the staged file is still mapped for writing");
            if let Err(e) = self.upload_if_dirty(ino, st).await {
                debug!(ino, error = %e, "upload of a mapped file failed; tried again");
            }
            let t = Instant::now() + OUTSIDE_RECHECK;
            st.next_try = Some(t);
            self.retry_wake.notify_one();
            return Some(t);
        }
        // Nothing changed by the stamp: the bytes must still be what the
        // last upload sent (see `Outside::holds_last_upload`); else they
        // are sent again, now that nothing can write to them any more.
        // The file is read on a blocking thread; the state stays locked,
        // so no new handle gets the file meanwhile.
        if !st.dirty && !st.staged.is_unlinked() {
            let file = o.clone();
            let holds = tokio::task::spawn_blocking(move || file.holds_last_upload())
                .await
                .is_ok_and(|r| r.unwrap_or(false));
            if !holds {
                debug!(
                    ino,
                    "the staged file differs from its last upload; sending it again"
                );
                st.staged.changed_outside();
                st.dirty = true;
                if let Err(e) = self.set_dirty(ino, st) {
                    warn!(ino, error = %e, "cannot journal a passthrough file's change");
                }
            }
        }
        st.staged.end_outside();
        self.outside.lock().remove(&ino);
        st.outside_released = false;
        if !st.dirty {
            // Its last upload holds every byte the kernel wrote.
            st.staged.end_journal();
        }
        if st.handles == 0 && self.last_writer_gone(ino, st).await.is_err() {
            return st.next_try;
        }
        None
    }
}
