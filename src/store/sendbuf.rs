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
//! The budget bounds the buffers in use across every file; a body that
//! does not fit is not waited for (`take` says None) and is sent from its
//! file.

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
    /// What is left of the budget, in KiB.
    budget: Arc<Semaphore>,
    /// The budget, in bytes: the most kept idle too.
    bytes: u64,
    idle: Mutex<Idle>,
}

#[derive(Debug, Default)]
struct Idle {
    bufs: Vec<Box<[u8]>>,
    /// Buffers taken since the trimming task last looked.
    taken: u64,
    /// A trimming task is waiting (one at a time).
    trimming: bool,
}

/// A buffer of the budget, holding its share until dropped.
pub struct SendBuf {
    buf: Option<Box<[u8]>>,
    len: usize,
    _share: OwnedSemaphorePermit,
    home: Arc<Inner>,
}

impl SendMemory {
    pub fn new(bytes: u64) -> SendMemory {
        let kib = (bytes >> 10).min(Semaphore::MAX_PERMITS as u64) as usize;
        SendMemory {
            inner: Arc::new(Inner {
                budget: Arc::new(Semaphore::new(kib)),
                bytes,
                idle: Mutex::default(),
            }),
        }
    }

    /// A buffer of `len` bytes (their content unspecified), if what is
    /// left of the budget holds it: the smallest idle buffer that fits,
    /// else a new one.
    pub fn take(&self, len: usize) -> Option<SendBuf> {
        if len == 0 {
            return None;
        }
        let mut idle = self.inner.idle.lock();
        let fit = (idle.bufs.iter().enumerate())
            .filter(|(_, b)| b.len() >= len)
            .min_by_key(|(_, b)| b.len())
            .map(|(i, b)| (i, b.len()));
        // The share of the buffer really held, not of `len`.
        let size = fit.map_or(len, |(_, size)| size);
        let kib = u32::try_from(size.div_ceil(1024)).ok()?;
        let share = self.inner.budget.clone().try_acquire_many_owned(kib).ok()?;
        idle.taken += 1;
        let buf = match fit {
            Some((i, _)) => idle.bufs.swap_remove(i),
            None => {
                drop(idle);
                vec![0u8; len].into_boxed_slice()
            }
        };
        Some(SendBuf {
            buf: Some(buf),
            len,
            _share: share,
            home: self.inner.clone(),
        })
    }

    /// Bytes of buffers kept idle.
    #[cfg(test)]
    fn idle_bytes(&self) -> usize {
        self.inner.idle.lock().bufs.iter().map(|b| b.len()).sum()
    }
}

impl SendBuf {
    pub fn as_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut self.buf.as_mut().expect("held until dropped")[..len]
    }

    /// The bytes, sent from this buffer; it goes back when the last
    /// clone of them is dropped.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for SendBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf.as_ref().expect("held until dropped")[..self.len]
    }
}

impl Drop for SendBuf {
    fn drop(&mut self) {
        let Some(buf) = self.buf.take() else { return };
        let home = &self.home;
        let mut idle = home.idle.lock();
        // When as many are kept as may be, the smallest makes room for a
        // larger one (a part after a burst of small files).
        if idle.bufs.len() >= MAX_IDLE {
            let smallest = (idle.bufs.iter().enumerate()).min_by_key(|(_, b)| b.len());
            match smallest.map(|(i, b)| (i, b.len())) {
                Some((i, len)) if len < buf.len() => drop(idle.bufs.swap_remove(i)),
                _ => return,
            }
        }
        let kept: usize = idle.bufs.iter().map(|b| b.len()).sum();
        if (kept + buf.len()) as u64 > home.bytes {
            return;
        }
        idle.bufs.push(buf);
        if idle.trimming {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            // No runtime to wait on: nothing is kept.
            idle.bufs.clear();
            return;
        };
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
        // A smaller body takes the idle buffer: no new memory.
        let b = m.take(MIB).expect("in the budget");
        assert_eq!((b.as_ref().as_ptr(), b.as_ref().len()), (at, MIB));
        assert_eq!(m.idle_bytes(), 0);
        drop(b);
        tokio::time::sleep(KEEP_IDLE / 2).await;
        assert_eq!(m.idle_bytes(), 8 * MIB, "kept while parts are sent");
        tokio::time::sleep(KEEP_IDLE * 2).await;
        assert_eq!(m.idle_bytes(), 0, "freed once none is taken");
    }

    #[tokio::test]
    async fn what_the_budget_does_not_hold_is_refused_not_waited_for() {
        let m = SendMemory::new(16 * MIB as u64);
        let a = m.take(8 * MIB).expect("half");
        let b = m.take(8 * MIB).expect("the other half");
        assert!(m.take(1).is_none(), "the budget is spent");
        drop(a);
        // The idle 8 MiB buffer counts whole for a 1-byte body.
        let c = m.take(1).expect("back in the budget");
        assert!(m.take(1).is_none(), "the idle buffer took the rest");
        drop((b, c));
        assert!(m.take(17 * MIB).is_none(), "larger than the budget");
        assert!(SendMemory::new(0).take(1).is_none(), "no budget: none");
        assert!(m.take(0).is_none(), "nothing to hold");
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
    }
}
