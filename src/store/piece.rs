//! Buffers the bytes of a read are put in (`PieceBuf`): aligned for
//! `O_DIRECT`, never grown, and taken from an allocator arena of their
//! own whose memory the kernel backs with huge pages where it allows
//! (`madvise(MADV_HUGEPAGE)`; transparent huge pages set to `madvise` or
//! `always`).
//!
//! A cold read streams every byte through such buffers: with 4 KiB pages
//! each new MiB costs 256 page faults, and each block written to the cache
//! disk pins 256 pages; with 2 MiB pages a fault maps 512 of them at once.
//! A 1 GiB cold read here (`/tmp` scripts, Garage, 3 runs each, alternated):
//! page faults 37–41 thousand → 6–7 thousand; with Garage's data on tmpfs,
//! 616–714 → 672–723 MiB/s, the daemon's CPU 0.69–0.84 → 0.62–0.74 s.
//!
//! Only these buffers: the rest of the daemon's memory (the inode table,
//! listings) stays in 4 KiB pages, so it is given back page by page. Freed
//! buffers are purged with the rest (`arena.<all>.purge`), which splits a
//! huge page that is only partly free.

use std::ptr::NonNull;
use std::sync::OnceLock;

use bytes::Bytes;
use tikv_jemalloc_sys as jem;

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
        // mallocx takes no 0.
        let p = unsafe { jem::mallocx(len.max(1), flags()) };
        let Some(ptr) = NonNull::new(p.cast::<u8>()) else {
            std::alloc::handle_alloc_error(
                std::alloc::Layout::from_size_align(len.max(1), PIECE_ALIGN).expect("layout"),
            )
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
        unsafe { jem::sdallocx(self.ptr.as_ptr().cast(), self.len.max(1), flags()) }
    }
}

/// mallocx flags for pieces: aligned, from the huge-page arena when there
/// is one, past the thread caches (a piece is freed by another thread than
/// the one that made it, mostly).
fn flags() -> i32 {
    static FLAGS: OnceLock<i32> = OnceLock::new();
    *FLAGS.get_or_init(|| {
        let base = jem::MALLOCX_ALIGN(PIECE_ALIGN) | jem::MALLOCX_TCACHE_NONE;
        match huge_arena() {
            Some(a) => base | jem::MALLOCX_ARENA(a as usize),
            None => base,
        }
    })
}

/// jemalloc's own extent hooks, which the arena's wrap.
static DEFAULT_HOOKS: OnceLock<usize> = OnceLock::new();

/// Maps memory as jemalloc does, then asks for huge pages for it. Not for
/// the arena's own metadata (asked aligned to a huge page): a few KiB of
/// it would take a whole huge page.
unsafe extern "C" fn alloc_huge(
    hooks: *mut jem::extent_hooks_t,
    new_addr: *mut libc::c_void,
    size: usize,
    alignment: usize,
    zero: *mut bool,
    commit: *mut bool,
    arena: libc::c_uint,
) -> *mut libc::c_void {
    const HUGE: usize = 2 << 20;
    let default = *DEFAULT_HOOKS.get().expect("set before the arena") as *const jem::extent_hooks_t;
    let Some(alloc) = (unsafe { (*default).alloc }) else {
        return std::ptr::null_mut();
    };
    let p = unsafe { alloc(hooks, new_addr, size, alignment, zero, commit, arena) };
    if !p.is_null() && alignment < HUGE {
        // Advice only: without it the pages are 4 KiB ones, as before.
        unsafe { libc::madvise(p, size, libc::MADV_HUGEPAGE) };
    }
    p
}

/// A jemalloc arena for pieces whose memory is in huge pages; None if
/// jemalloc refused one (pieces then come from the usual arenas).
fn huge_arena() -> Option<u32> {
    unsafe {
        let mut default: *mut jem::extent_hooks_t = std::ptr::null_mut();
        let mut sz = std::mem::size_of_val(&default);
        if jem::mallctl(
            c"arena.0.extent_hooks".as_ptr(),
            (&raw mut default).cast(),
            &mut sz,
            std::ptr::null_mut(),
            0,
        ) != 0
            || default.is_null()
        {
            return None;
        }
        DEFAULT_HOOKS.get_or_init(|| default as usize);
        let mut hooks: jem::extent_hooks_t = std::ptr::read(default);
        hooks.alloc = Some(alloc_huge);
        // jemalloc keeps the pointer for the arena's life: the process's.
        let mut hooks: *mut jem::extent_hooks_t = Box::leak(Box::new(hooks));
        let mut arena: libc::c_uint = 0;
        let mut sz = std::mem::size_of_val(&arena);
        if jem::mallctl(
            c"arenas.create".as_ptr(),
            (&raw mut arena).cast(),
            &mut sz,
            (&raw mut hooks).cast(),
            std::mem::size_of_val(&hooks),
        ) != 0
        {
            return None;
        }
        Some(arena)
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
}
