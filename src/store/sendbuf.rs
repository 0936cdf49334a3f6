//! Memory for staged bytes on their way to S3 (`SendMemory`): a budget,
//! and the buffers it paid for, kept for the next part while parts keep
//! coming.
//!
//! A part read from its staged file into memory is read once and hashed
//! there, and the SDK sends it (and sends it again on a retry) from that
//! buffer; read from the file as it is sent, it is read twice (the hash
//! first), the second time in 64 KiB steps, each a hand-off to a blocking
//! thread. A fresh buffer costs a page fault and a cleared page per 4 KiB
//! (jemalloc unmaps a freed 8 MiB allocation at once): 1 GiB written here
//! faulted 265,000 times, about a sixth of the daemon's CPU. So buffers
//! given back are kept, up to the budget, until no part has been sent for
//! `KEEP_IDLE`.
//!
//! The budget bounds the buffers in use and kept, across every file (and
//! every bucket of an `s3://` mount); a body that does not fit is not
//! waited for (`take` says None) and is sent from its file.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How long buffers given back are kept once no part is being sent.
pub const KEEP_IDLE: Duration = Duration::from_secs(5);

/// The most buffers kept idle (each `take` looks at every one): more than
/// a stream's parts in flight, or small files sent at once, usually are.
const MAX_IDLE: usize = 32;

#[derive(Clone, Debug)]
pub struct SendMemory {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// What is left of the budget, in KiB: buffers in use and buffers
    /// kept idle each hold their share.
    budget: Arc<Semaphore>,
    idle: Mutex<Idle>,
}

#[derive(Debug, Default)]
struct Idle {
    bufs: Vec<Kept>,
    /// Buffers taken since the trimming task last looked.
    taken: u64,
    /// A trimming task is waiting (one at a time).
    trimming: bool,
}

impl Idle {
    /// The smallest buffer kept: its index and length.
    fn smallest(&self) -> Option<(usize, usize)> {
        (self.bufs.iter().enumerate())
            .map(|(i, k)| (i, k.buf.len()))
            .min_by_key(|&(_, len)| len)
    }
}

/// A buffer with its share of the budget.
#[derive(Debug)]
struct Kept {
    buf: Box<[u8]>,
    _share: OwnedSemaphorePermit,
}

/// A buffer of the budget, holding its share until dropped.
pub struct SendBuf {
    kept: Option<Kept>,
    len: usize,
    home: Arc<Inner>,
}

impl SendMemory {
    pub fn new(bytes: u64) -> SendMemory {
        let kib = (bytes >> 10).min(Semaphore::MAX_PERMITS as u64) as usize;
        SendMemory {
            inner: Arc::new(Inner {
                budget: Arc::new(Semaphore::new(kib)),
                idle: Mutex::default(),
            }),
        }
    }

    /// A buffer of `len` bytes (their content unspecified), if the budget
    /// holds it: the smallest idle buffer that fits and is at most twice
    /// `len` (a small file does not hold a part's share), else a new one,
    /// for which idle buffers are freed, smallest first, when what is left
    /// of the budget is short.
    pub fn take(&self, len: usize) -> Option<SendBuf> {
        let kib = u32::try_from(len.div_ceil(1024)).ok().filter(|&k| k > 0)?;
        let mut idle = self.inner.idle.lock();
        let fit = (idle.bufs.iter().enumerate())
            .filter(|(_, k)| k.buf.len() >= len && k.buf.len() / 2 <= len)
            .min_by_key(|(_, k)| k.buf.len())
            .map(|(i, _)| i);
        if let Some(i) = fit {
            idle.taken += 1;
            return Some(SendBuf {
                kept: Some(idle.bufs.swap_remove(i)),
                len,
                home: self.inner.clone(),
            });
        }
        let share = loop {
            match self.inner.budget.clone().try_acquire_many_owned(kib) {
                Ok(share) => break share,
                Err(_) => match idle.smallest() {
                    Some((i, _)) => drop(idle.bufs.swap_remove(i)),
                    None => return None,
                },
            }
        };
        idle.taken += 1;
        drop(idle);
        let mut buf = Vec::new();
        buf.try_reserve_exact(len).ok()?;
        buf.resize(len, 0);
        Some(SendBuf {
            kept: Some(Kept {
                buf: buf.into_boxed_slice(),
                _share: share,
            }),
            len,
            home: self.inner.clone(),
        })
    }

    /// Bytes of buffers kept idle.
    #[cfg(test)]
    fn idle_bytes(&self) -> usize {
        self.inner
            .idle
            .lock()
            .bufs
            .iter()
            .map(|k| k.buf.len())
            .sum()
    }

    /// KiB of the budget held by no buffer.
    #[cfg(test)]
    fn free_kib(&self) -> usize {
        self.inner.budget.available_permits()
    }
}

impl SendBuf {
    pub fn as_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut self.kept.as_mut().expect("held until dropped").buf[..len]
    }

    /// The bytes, sent from this buffer; it goes back when the last
    /// clone of them is dropped.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for SendBuf {
    fn as_ref(&self) -> &[u8] {
        &self.kept.as_ref().expect("held until dropped").buf[..self.len]
    }
}

impl Drop for SendBuf {
    fn drop(&mut self) {
        let Some(kept) = self.kept.take() else { return };
        let home = &self.home;
        let mut idle = home.idle.lock();
        // When as many are kept as may be, the smallest makes room for a
        // larger one (a part after a burst of small files).
        if idle.bufs.len() >= MAX_IDLE {
            match idle.smallest() {
                Some((i, len)) if len < kept.buf.len() => drop(idle.bufs.swap_remove(i)),
                _ => return,
            }
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            // No runtime to wait on: nothing is kept.
            return;
        };
        idle.bufs.push(kept);
        if idle.trimming {
            return;
        }
        idle.trimming = true;
        idle.taken = 0;
        let home = home.clone();
        // Ends at the first look that finds no buffer taken since the
        // last: within 2 × KEEP_IDLE of the last part.
        rt.spawn(async move {
            loop {
                tokio::time::sleep(KEEP_IDLE).await;
                let mut idle = home.idle.lock();
                if std::mem::take(&mut idle.taken) == 0 {
                    idle.bufs = Vec::new();
                    idle.trimming = false;
                    return;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    #[tokio::test(start_paused = true)]
    async fn a_buffer_given_back_is_taken_again_then_freed_when_idle() {
        let m = SendMemory::new(16 * MIB as u64);
        let mut a = m.take(8 * MIB).expect("in the budget");
        a.as_mut()[0] = 7;
        let at = a.as_ref().as_ptr();
        let bytes = a.freeze();
        let again = bytes.clone();
        drop(bytes);
        assert_eq!(m.idle_bytes(), 0, "held while a clone of its bytes is");
        drop(again);
        assert_eq!(m.idle_bytes(), 8 * MIB);
        assert_eq!(m.free_kib(), 8 * 1024, "an idle buffer holds its share");
        // Parts keep coming, one every 4 s: the buffer is taken each time.
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_secs(4)).await;
            let b = m.take(5 * MIB).expect("in the budget");
            assert_eq!((b.as_ref().as_ptr(), b.as_ref().len()), (at, 5 * MIB));
            assert_eq!(m.idle_bytes(), 0);
        }
        // t = 16 s; the trimming task looked at 5, 10 and 15 s, and looks
        // again at 20 s (a part since 15 s) and 25 s (none since 20 s).
        tokio::time::sleep(KEEP_IDLE - Duration::from_millis(1500)).await;
        assert_eq!(m.idle_bytes(), 8 * MIB, "kept while parts are sent");
        tokio::time::sleep(KEEP_IDLE * 2).await;
        assert_eq!(m.idle_bytes(), 0, "freed once none is taken");
        assert_eq!(m.free_kib(), 16 * 1024, "the whole budget");
    }

    #[tokio::test]
    async fn what_the_budget_does_not_hold_is_refused_not_waited_for() {
        let m = SendMemory::new(16 * MIB as u64);
        let a = m.take(8 * MIB).expect("half");
        let b = m.take(8 * MIB).expect("the other half");
        assert!(m.take(1).is_none(), "the budget is spent");
        drop((a, b));
        assert_eq!(m.idle_bytes(), 16 * MIB);
        // Idle buffers make room for one that none of them fits.
        let c = m.take(12 * MIB).expect("idle buffers freed for it");
        assert_eq!(m.idle_bytes(), 0, "both freed: one was not enough");
        let d = m.take(4 * MIB).expect("the rest");
        assert!(m.take(1).is_none(), "the budget is spent");
        drop((c, d));
        assert!(m.take(17 * MIB).is_none(), "larger than the budget");
        assert_eq!(m.idle_bytes(), 0, "all freed trying");
        assert!(SendMemory::new(0).take(1).is_none(), "no budget: none");
        assert!(m.take(0).is_none(), "nothing to hold");
    }

    #[tokio::test]
    async fn a_small_body_does_not_take_a_parts_buffer() {
        let m = SendMemory::new(64 * MIB as u64);
        drop(m.take(8 * MIB).unwrap());
        let small = m.take(4096).unwrap();
        assert_eq!(m.idle_bytes(), 8 * MIB, "the part's buffer stays idle");
        assert_eq!(m.free_kib(), 56 * 1024 - 4);
        drop(small);
    }

    #[tokio::test]
    async fn a_part_after_many_small_files_is_kept_in_place_of_one() {
        let m = SendMemory::new(64 * MIB as u64);
        let small: Vec<_> = (0..MAX_IDLE + 3).map(|_| m.take(4096).unwrap()).collect();
        drop(small);
        assert_eq!(m.idle_bytes(), MAX_IDLE * 4096, "at most MAX_IDLE kept");
        drop(m.take(8 * MIB).unwrap());
        assert_eq!(m.idle_bytes(), (MAX_IDLE - 1) * 4096 + 8 * MIB);
        let part = m.take(8 * MIB).unwrap();
        assert_eq!(
            m.idle_bytes(),
            (MAX_IDLE - 1) * 4096,
            "the part's buffer, again"
        );
        drop(part);
        assert_eq!(m.free_kib(), 64 * 1024 - (MAX_IDLE - 1) * 4 - 8 * 1024);
    }
}
