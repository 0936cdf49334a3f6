//! What the kernel was told about each open file (FUSE passthrough, part
//! of the fuser adapter). The kernel keeps an inode's opens in one io
//! mode: through its page cache ("cached"), or straight to a backing
//! file ("passthrough"), never both, and every passthrough open of an
//! inode must name the same backing file; an open that breaks that
//! fails with EIO. So the adapter counts, per inode, the opens it
//! answered each way, and answers every open of an inode in passthrough
//! mode with its backing, and no open with passthrough while cached ones
//! are open. Counts drop at RELEASE, which the kernel sends after it let
//! go of the file: the counts are never below the kernel's.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;

use fuser::BackingId;
use parking_lot::Mutex;

struct Inode<B> {
    cached: usize,
    passthrough: usize,
    backing: Option<Arc<B>>,
}

impl<B> Default for Inode<B> {
    fn default() -> Self {
        Inode {
            cached: 0,
            passthrough: 0,
            backing: None,
        }
    }
}

struct Inner<B> {
    inodes: HashMap<u64, Inode<B>>,
    /// Each open handle's inode, and whether it was answered passthrough.
    handles: HashMap<u64, (u64, bool)>,
}

/// The kernel's io modes as answered; `B` is the backing file's id
/// (fuser's `BackingId`).
pub struct IoModes<B = BackingId> {
    inner: Mutex<Inner<B>>,
}

impl<B> Default for IoModes<B> {
    fn default() -> Self {
        IoModes {
            inner: Mutex::new(Inner {
                inodes: HashMap::new(),
                handles: HashMap::new(),
            }),
        }
    }
}

impl<B> IoModes<B> {
    /// An open of `ino` that offers no backing file: passthrough (with the
    /// inode's backing) while the inode is in passthrough mode, else
    /// cached.
    pub fn open(&self, ino: u64, fh: u64) -> Option<Arc<B>> {
        let mut g = self.inner.lock();
        let e = g.inodes.entry(ino).or_default();
        let id = if e.passthrough > 0 {
            e.passthrough += 1;
            e.backing.clone()
        } else {
            e.cached += 1;
            None
        };
        g.handles.insert(fh, (ino, id.is_some()));
        id
    }

    /// An open that offers a backing file: passthrough unless cached opens
    /// of the inode are open (`None`: the caller answers it with `open`).
    /// `register` hands the file to the kernel, for the inode's first.
    pub fn offer(
        &self,
        ino: u64,
        fh: u64,
        register: impl FnOnce() -> io::Result<B>,
    ) -> io::Result<Option<Arc<B>>> {
        let mut g = self.inner.lock();
        let e = g.inodes.entry(ino).or_default();
        let id = if e.passthrough > 0 {
            e.passthrough += 1;
            e.backing.clone()
        } else if e.cached > 0 {
            return Ok(None);
        } else {
            let id = Arc::new(register()?);
            e.passthrough = 1;
            e.backing = Some(id.clone());
            Some(id)
        };
        g.handles.insert(fh, (ino, true));
        Ok(id)
    }

    /// Handle `fh` was released: the inode whose last passthrough handle
    /// it was (its backing file is let go).
    pub fn release(&self, fh: u64) -> Option<u64> {
        let mut g = self.inner.lock();
        let (ino, passthrough) = g.handles.remove(&fh)?;
        let e = g.inodes.get_mut(&ino)?;
        let mut last = None;
        if passthrough {
            e.passthrough = e.passthrough.saturating_sub(1);
            if e.passthrough == 0 {
                e.backing = None;
                last = Some(ino);
            }
        } else {
            e.cached = e.cached.saturating_sub(1);
        }
        if e.cached == 0 && e.passthrough == 0 {
            g.inodes.remove(&ino);
        }
        last
    }

    /// Whether some handle of `ino` is open in passthrough mode.
    pub fn passthrough_open(&self, ino: u64) -> bool {
        self.inner
            .lock()
            .inodes
            .get(&ino)
            .is_some_and(|e| e.passthrough > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_register() -> io::Result<u32> {
        panic!("registered again")
    }

    #[test]
    fn an_inode_is_in_one_mode_and_shares_one_backing() {
        let io = IoModes::<u32>::default();
        // A cached open first: no passthrough for the inode then.
        assert!(io.open(1, 10).is_none());
        assert!(io.offer(1, 11, no_register).unwrap().is_none());
        assert!(io.open(1, 11).is_none());
        assert_eq!(io.release(10), None);
        assert_eq!(io.release(11), None);
        // Now free: the offer registers once, every later open shares it.
        let a = io.offer(1, 12, || Ok(7)).unwrap().unwrap();
        let b = io.offer(1, 13, no_register).unwrap().unwrap();
        let c = io.open(1, 14).unwrap();
        assert!(Arc::ptr_eq(&a, &b) && Arc::ptr_eq(&a, &c));
        assert!(io.passthrough_open(1));
        // Another inode is its own.
        assert!(io.open(2, 20).is_none());
        assert_eq!(io.release(12), None);
        assert_eq!(io.release(14), None);
        assert_eq!(io.release(13), Some(1), "the last passthrough handle");
        assert!(!io.passthrough_open(1));
        assert_eq!(io.release(13), None, "released once");
        // Cached again once all are gone.
        assert!(io.open(1, 15).is_none());
        assert!(io.offer(1, 16, no_register).unwrap().is_none());
    }

    #[test]
    fn a_refused_registration_leaves_the_inode_free() {
        let io = IoModes::<u32>::default();
        assert!(
            io.offer(1, 10, || Err(io::Error::from_raw_os_error(1)))
                .is_err()
        );
        assert!(!io.passthrough_open(1));
        assert!(io.open(1, 11).is_none());
        assert_eq!(io.release(11), None);
        assert!(io.offer(1, 12, || Ok(3)).unwrap().is_some());
    }
}
