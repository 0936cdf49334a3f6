//! Buffers the bytes of a read are put in (`PieceBuf`): aligned for
//! `O_DIRECT`, never grown. Pieces of 1 MiB (a block, by default) or
//! 2 MiB are slots of whole 2 MiB huge pages (`madvise(MADV_HUGEPAGE)`,
//! where transparent huge pages are `madvise` or `always`), which are
//! unmapped whole; others come from the program's allocator.
//!
//! A cold read streams every byte through such buffers: with 4 KiB pages
//! each new MiB costs 256 page faults, and each block written to the cache
//! disk pins 256 pages; with 2 MiB pages a fault maps 512 of them at once.
//! A 1 GiB cold read here (`/tmp` scripts, Garage's data on tmpfs, runs
//! alternated): page faults 34–43 thousand → 4–5 thousand, the daemon's
//! CPU 0.70–0.75 → 0.58–0.67 s, peak RSS 124–131 → 105–109 MB. Throughput
//! 841–843 → 896–923 MiB/s in one set of 3 runs, and within noise in a
//! later set of 5 (medians 748 → 755).
//!
//! Why a pool of whole pages and not an allocator arena marked for huge
//! pages: memory an allocator gives back in pieces leaves huge pages
//! partly mapped, and the kernel's khugepaged fills them up again (an
//! idle daemon's RSS grew back 11 of 13 MiB given back, in 90 s). A page
//! here is either in use or unmapped whole; a few empty ones are kept for
//! the next read (`KEEP_EMPTY`), and given back with the rest of the freed
//! memory (`release`).

use std::collections::BTreeMap;
use std::ptr::NonNull;

use bytes::Bytes;
use parking_lot::Mutex;

/// What a piece of an object's bytes is aligned to in memory when a store
/// reads it into a `PieceBuf`: enough for any `O_DIRECT` write, so the
/// cache disk takes the piece without a copy.
pub const PIECE_ALIGN: usize = 4096;

/// A buffer a piece of `len` bytes is read into, starting on a
/// `PIECE_ALIGN` boundary, that never grows (no copy on the way).
pub struct PieceBuf {
    ptr: NonNull<u8>,
    len: usize,
    filled: usize,
}

// The buffer is owned and plain bytes.
unsafe impl Send for PieceBuf {}
unsafe impl Sync for PieceBuf {}

impl PieceBuf {
    pub fn new(len: usize) -> PieceBuf {
        let ptr = match pool_for(len) {
            Some(pool) => pool.take(),
            None => NonNull::new(unsafe { std::alloc::alloc(layout(len)) }),
        };
        let Some(ptr) = ptr else {
            std::alloc::handle_alloc_error(layout(len))
        };
        PieceBuf {
            ptr,
            len,
            filled: 0,
        }
    }

    /// A piece of `len` bytes read from `file` at `at`, not zeroed first
    /// (the kernel writes every byte of it, or it is dropped).
    pub fn read_at(file: &std::fs::File, at: u64, len: usize) -> std::io::Result<Bytes> {
        use std::os::fd::AsRawFd;
        let mut b = Self::new(len);
        while b.filled < len {
            let off = libc::off_t::try_from(at + b.filled as u64)
                .map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))?;
            // Into the part not yet filled, which is this buffer's own.
            let n = unsafe {
                libc::pread(
                    file.as_raw_fd(),
                    b.ptr.as_ptr().add(b.filled).cast(),
                    len - b.filled,
                    off,
                )
            };
            match n {
                0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                n if n < 0 => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
                n => b.filled += n as usize,
            }
        }
        Ok(b.freeze())
    }

    /// Bytes still missing.
    pub fn room(&self) -> usize {
        self.len - self.filled
    }

    /// Appends at most `room()` bytes of `b`; returns how many it took.
    pub fn fill(&mut self, b: &[u8]) -> usize {
        let n = self.room().min(b.len());
        // In bounds (n <= room), and `b` is not this buffer (it is
        // borrowed mutably).
        unsafe {
            std::ptr::copy_nonoverlapping(b.as_ptr(), self.ptr.as_ptr().add(self.filled), n);
        }
        self.filled += n;
        n
    }

    /// The bytes filled so far.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for PieceBuf {
    fn as_ref(&self) -> &[u8] {
        // The first `filled` bytes were written by `fill` or `read_at`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.filled) }
    }
}

impl Drop for PieceBuf {
    fn drop(&mut self) {
        match pool_for(self.len) {
            Some(pool) => pool.give(self.ptr),
            None => unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout(self.len)) },
        }
    }
}

fn layout(len: usize) -> std::alloc::Layout {
    // alloc takes no 0.
    std::alloc::Layout::from_size_align(len.max(1), PIECE_ALIGN)
        .expect("a piece's length fits in isize")
}

const HUGE: usize = 2 << 20;

/// Empty huge pages each pool keeps mapped for the next pieces: a read
/// streaming blocks gives one back as it takes another.
const KEEP_EMPTY: usize = 2;

static POOLS: [Pool; 2] = [Pool::new(HUGE / 2), Pool::new(HUGE)];

/// The pool whose slots are `len` bytes: a block of the default size or of
/// 2 MiB. Only exact fits: the memory cache counts a block's length, and a
/// shorter piece in a slot (an object's last block, a `block_size` of
/// 768K) would hold up to twice what it counts.
fn pool_for(len: usize) -> Option<&'static Pool> {
    POOLS.iter().find(|p| len == p.slot)
}

/// Unmaps the empty huge pages the pools keep (memory handed back to the
/// system after a large listing or sweep).
pub fn release() {
    for p in &POOLS {
        p.release();
    }
}

/// Huge pages cut into slots of `slot` bytes.
struct Pool {
    slot: usize,
    pages: Mutex<Pages>,
}

struct Pages {
    /// Pages with some slots in use, by address: which slots are free.
    partial: BTreeMap<usize, u32>,
    /// Pages with none in use, kept mapped.
    empty: Vec<usize>,
}

impl Pool {
    const fn new(slot: usize) -> Pool {
        Pool {
            slot,
            pages: Mutex::new(Pages {
                partial: BTreeMap::new(),
                empty: Vec::new(),
            }),
        }
    }

    /// Every slot of a page free.
    fn all(&self) -> u32 {
        (1u32 << (HUGE / self.slot)) - 1
    }

    /// A free slot: in a page partly in use first (so pages fill up
    /// rather than many being partly used), else in an empty page, else
    /// in a new one.
    fn take(&self) -> Option<NonNull<u8>> {
        let mut pages = self.pages.lock();
        let (page, free) = match pages.partial.pop_first() {
            Some(p) => p,
            None => match pages.empty.pop() {
                Some(page) => (page, self.all()),
                None => {
                    drop(pages);
                    let page = map_huge()?;
                    pages = self.pages.lock();
                    (page, self.all())
                }
            },
        };
        let i = free.trailing_zeros();
        let rest = free & !(1 << i);
        if rest != 0 {
            pages.partial.insert(page, rest);
        }
        NonNull::new((page + i as usize * self.slot) as *mut u8)
    }

    fn give(&self, ptr: NonNull<u8>) {
        let at = ptr.as_ptr() as usize;
        let page = at & !(HUGE - 1);
        let i = (at - page) / self.slot;
        let unmap = {
            let mut pages = self.pages.lock();
            let free = pages.partial.entry(page).or_insert(0);
            *free |= 1 << i;
            if *free != self.all() {
                return;
            }
            pages.partial.remove(&page);
            if pages.empty.len() < KEEP_EMPTY {
                pages.empty.push(page);
                return;
            }
            page
        };
        unsafe { libc::munmap(unmap as *mut libc::c_void, HUGE) };
    }

    fn release(&self) {
        let empty = std::mem::take(&mut self.pages.lock().empty);
        for page in empty {
            unsafe { libc::munmap(page as *mut libc::c_void, HUGE) };
        }
    }
}

/// A new 2 MiB page aligned on 2 MiB, marked for a huge page.
fn map_huge() -> Option<usize> {
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            2 * HUGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            return None;
        }
        let start = p as usize;
        let page = (start + HUGE - 1) & !(HUGE - 1);
        // What lies outside the aligned page goes back at once.
        if page > start {
            libc::munmap(p, page - start);
        }
        if start + 2 * HUGE > page + HUGE {
            libc::munmap(
                (page + HUGE) as *mut libc::c_void,
                start + 2 * HUGE - page - HUGE,
            );
        }
        // Advice only: refused, the page is 512 small ones, as elsewhere.
        libc::madvise(page as *mut libc::c_void, HUGE, libc::MADV_HUGEPAGE);
        Some(page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_piece_is_aligned_holds_what_was_filled_and_outlives_its_slices() {
        for len in [0usize, 1, 4095, 4096, 1 << 20, (1 << 20) + 7] {
            let mut b = PieceBuf::new(len);
            assert_eq!(b.ptr.as_ptr().align_offset(PIECE_ALIGN), 0, "len {len}");
            let data: Vec<u8> = (0..len + 10).map(|i| (i * 7 % 251) as u8).collect();
            let half = len / 2;
            assert_eq!(b.fill(&data[..half]), half);
            assert_eq!(b.room(), len - half);
            // More than it has room for: it takes what fits.
            assert_eq!(b.fill(&data[half..]), len - half);
            assert_eq!(b.room(), 0);
            let bytes = b.freeze();
            let tail = bytes.slice(len / 3..);
            drop(bytes);
            assert_eq!(&tail[..], &data[len / 3..len], "len {len}");
        }
    }

    #[test]
    fn a_piece_read_at_holds_the_files_bytes_or_fails() {
        let data: Vec<u8> = (0..(3 << 20) + 5).map(|i| (i * 13 % 255) as u8).collect();
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, &data).unwrap();
        let b = PieceBuf::read_at(&f, 4096, 2 << 20).unwrap();
        assert_eq!(&b[..], &data[4096..4096 + (2 << 20)]);
        assert_eq!(b.as_ptr().align_offset(PIECE_ALIGN), 0);
        // Past the end of the file: the read fails, nothing is made up.
        let e = PieceBuf::read_at(&f, 3 << 20, 10).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    fn mapped(page: usize) -> bool {
        // mincore fails with ENOMEM on an address that is not mapped.
        let mut v = [0u8; 512];
        unsafe { libc::mincore(page as *mut libc::c_void, HUGE, v.as_mut_ptr()) == 0 }
    }

    #[test]
    fn a_pool_fills_a_page_before_the_next_and_unmaps_whole_pages_beyond_those_it_keeps() {
        let pool = Pool::new(HUGE / 2);
        let n = 2 * (KEEP_EMPTY + 3);
        let slots: Vec<NonNull<u8>> = (0..n).map(|_| pool.take().unwrap()).collect();
        let pages: Vec<usize> = slots
            .iter()
            .map(|p| p.as_ptr() as usize & !(HUGE - 1))
            .collect();
        for (i, (p, page)) in slots.iter().zip(&pages).enumerate() {
            // Two slots a page, the second one filled before a new page.
            assert_eq!(p.as_ptr() as usize - page, (i % 2) * HUGE / 2);
            assert_eq!(*page, pages[i - i % 2]);
            // Writable, to its last byte.
            unsafe { p.as_ptr().add(HUGE / 2 - 1).write(i as u8) };
        }
        // One slot of each page given back: no page is empty yet.
        for p in slots.iter().step_by(2) {
            pool.give(*p);
        }
        assert!(pages.iter().all(|&p| mapped(p)));
        assert_eq!(pool.pages.lock().partial.len(), n / 2);
        // A slot taken now is in a page partly in use, not a new one.
        let again = pool.take().unwrap();
        assert!(pages.contains(&(again.as_ptr() as usize & !(HUGE - 1))));
        pool.give(again);
        for p in slots.iter().skip(1).step_by(2) {
            pool.give(*p);
        }
        let p = pool.pages.lock();
        assert!(p.partial.is_empty());
        assert_eq!(p.empty.len(), KEEP_EMPTY);
        let kept = p.empty.clone();
        drop(p);
        let mut distinct = pages.clone();
        distinct.dedup();
        for page in &distinct {
            assert_eq!(mapped(*page), kept.contains(page), "page {page:x}");
        }
        pool.release();
        assert!(pool.pages.lock().empty.is_empty());
        assert!(distinct.iter().all(|&p| !mapped(p)));
    }

    #[test]
    fn only_pieces_that_fill_a_slot_come_from_the_pools_others_from_the_allocator() {
        assert_eq!(pool_for(1 << 20).map(|p| p.slot), Some(1 << 20));
        assert_eq!(pool_for(2 << 20).map(|p| p.slot), Some(2 << 20));
        // A shorter piece would hold a whole slot while counted as less.
        for len in [
            0,
            1,
            512 << 10,
            (512 << 10) + 1,
            (1 << 20) - 1,
            (1 << 20) + 1,
        ] {
            assert!(pool_for(len).is_none(), "{len}");
        }
        assert!(pool_for((1536) << 10).is_none());
        assert!(pool_for((2 << 20) + 1).is_none());
    }
}
