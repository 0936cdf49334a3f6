//! Writes that reach a staged file without this mount: with
//! `-o passthrough`, the kernel sends the reads and writes of a new (or
//! emptied) file straight to its staged copy (FUSE passthrough), and the
//! daemon sees only the opens, closes and attribute calls. The staged
//! file is then the whole truth, and this module is how the write state
//! notices that it changed: a stamp of the file (size, change and
//! modification times, to the nanosecond) taken before each upload, and
//! compared at each close. That needs a file system that gives a fresh
//! change time to every write after the time was looked at (multi-grain
//! timestamps, Linux 6.13 on ext4, xfs and btrfs; not tmpfs, which moves
//! no time at a store through a shared mapping):
//! `fine_grained_times` checks the cache directory's before a mount
//! turns passthrough on.

use std::fs::File;
use std::io::{self, Write};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

/// What a write or a truncation of the staged file changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    pub fn of(file: &File) -> io::Result<Stamp> {
        let m = file.metadata()?;
        Ok(Stamp {
            size: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }

    pub fn mtime(&self) -> SystemTime {
        time_of(self.mtime)
    }

    pub fn ctime(&self) -> SystemTime {
        time_of(self.ctime)
    }
}

fn time_of((s, ns): (i64, i64)) -> SystemTime {
    let ns = Duration::from_nanos(ns.clamp(0, 999_999_999) as u64);
    if s >= 0 {
        UNIX_EPOCH + Duration::from_secs(s as u64) + ns
    } else {
        UNIX_EPOCH - Duration::from_secs(s.unsigned_abs()) + ns
    }
}

/// The CRC32C of each range of a staged file as an upload sent it (and
/// the store checked it); `None` for a range sent without one.
pub type Sent = Vec<(Range<u64>, Option<u32>)>;

/// A staged file the kernel writes to: the file, the stamp this mount
/// last took account of, and what its last upload sent.
#[derive(Debug)]
pub struct Outside {
    file: Arc<File>,
    seen: Mutex<Stamp>,
    sent: Mutex<Option<Sent>>,
}

impl Outside {
    pub fn new(file: Arc<File>) -> io::Result<Outside> {
        let seen = Stamp::of(&file)?;
        Ok(Outside {
            file,
            seen: Mutex::new(seen),
            sent: Mutex::new(None),
        })
    }

    /// An upload of the file landed, made of these ranges.
    pub(super) fn uploaded(&self, sent: Sent) {
        *self.sent.lock() = Some(sent);
    }

    /// Whether the file holds exactly what its last upload sent, range by
    /// range (it reads the whole file). A stamp cannot tell one case: a
    /// store through a shared mapping whose page fault moved the times
    /// just before a stamp was taken, but whose bytes reached the page
    /// only after the upload that stamp began had read it; no time moves
    /// again for it. So once the kernel let go of the file, the bytes
    /// themselves are compared. No upload known, or a range sent without
    /// a checksum: not known to hold it.
    pub fn holds_last_upload(&self) -> io::Result<bool> {
        let Some(sent) = self.sent.lock().clone() else {
            return Ok(false);
        };
        let size = self.file.metadata()?.len();
        if sent.last().map_or(0, |(r, _)| r.end) != size {
            return Ok(false);
        }
        for (r, crc) in sent {
            let Some(crc) = crc else { return Ok(false) };
            let body = crate::store::PutBody::File {
                file: self.file.clone(),
                offset: r.start,
                len: r.end - r.start,
            };
            if body.checksums(false)?.1 != crc {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The staged file, for the kernel to write to.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The stamp now, and whether the file changed since it was last
    /// taken account of (`take`).
    pub fn look(&self) -> io::Result<(Stamp, bool)> {
        let now = Stamp::of(&self.file)?;
        Ok((now, now != *self.seen.lock()))
    }

    /// Takes account of the file as it is now: the stamp, if it changed.
    /// Its dirty pages are sent to the disk first (not waited for): that
    /// write-protects them, so a store through a shared mapping after this
    /// faults and moves the change time, as a write(2) does; a page left
    /// dirty and writable would take later stores without a trace. After
    /// the stamp, it waits for the write(2)s under way: one moves the
    /// times before it copies its bytes, both under the inode's lock,
    /// which an `lseek(SEEK_DATA)` takes too (ext4, xfs, btrfs). Without
    /// that wait, an upload could read the old bytes under the new stamp,
    /// and the writer's close would then see nothing new.
    pub(super) fn take(&self) -> io::Result<Option<Stamp>> {
        let fd = self.file.as_raw_fd();
        // SAFETY: sync_file_range on a descriptor this struct owns, over
        // the whole file (0, 0), with its documented flags.
        unsafe {
            libc::sync_file_range(
                fd,
                0,
                0,
                libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        let now = Stamp::of(&self.file)?;
        // SAFETY: lseek on an owned descriptor, whose offset nothing uses
        // (the staged file is read and written at explicit offsets). Its
        // answer (ENXIO on an empty file) does not matter, only its lock.
        unsafe { libc::lseek(fd, 0, libc::SEEK_DATA) };
        let mut seen = self.seen.lock();
        if now == *seen {
            return Ok(None);
        }
        *seen = now;
        Ok(Some(now))
    }

    /// Whether something besides this mount's own descriptor has the file
    /// open for writing: a shared writable mapping of it kept after its
    /// last close, whose writes still reach the file. Asked by taking a
    /// write lease, which the kernel grants only to a file nobody else has
    /// open for writing, and giving it back at once. Where leases are not
    /// to be had (`fs.leases-enable=0`), none is assumed.
    pub fn written_elsewhere(&self) -> bool {
        let fd = self.file.as_raw_fd();
        // SAFETY: fcntl on a descriptor this struct owns (through its
        // Arc<File>), with integer arguments.
        if unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_WRLCK) } == 0 {
            // SAFETY: as above.
            unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_UNLCK) };
            return false;
        }
        let e = io::Error::last_os_error();
        matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EBUSY))
    }
}

/// Whether files in `dir` get a new change time from each write after it
/// was looked at, however close together (multi-grain timestamps): what
/// telling a write through passthrough by its stamp needs. Three pairs of
/// writes a few microseconds apart must each show two times.
pub fn fine_grained_times(dir: &Path) -> io::Result<bool> {
    // tmpfs moves no time at a store through a shared mapping.
    if is_tmpfs(dir)? {
        return Ok(false);
    }
    let path = dir.join(format!(".timecheck-{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)?;
    let _ = std::fs::remove_file(&path);
    for _ in 0..3 {
        f.write_all(b"x")?;
        let a = Stamp::of(&f)?;
        f.write_all(b"x")?;
        let b = Stamp::of(&f)?;
        if a.ctime == b.ctime || a.mtime == b.mtime {
            return Ok(false);
        }
    }
    Ok(true)
}

fn is_tmpfs(dir: &Path) -> io::Result<bool> {
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: statfs fills the zeroed struct; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type == libc::TMPFS_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn a_write_or_truncation_moves_the_stamp_once() {
        let dir = tempfile::tempdir().unwrap();
        if !fine_grained_times(dir.path()).unwrap() {
            eprintln!("no fine-grained change times here: skipped");
            return;
        }
        let f = Arc::new(tempfile::tempfile_in(dir.path()).unwrap());
        let o = Outside::new(f.clone()).unwrap();
        assert_eq!(o.take().unwrap(), None);
        f.write_at(b"abc", 0).unwrap();
        assert!(o.look().unwrap().1);
        let s = o.take().unwrap().expect("the write is seen");
        assert_eq!(s.size, 3);
        assert_eq!(o.take().unwrap(), None);
        // Same size, new bytes: still seen.
        f.write_at(b"xyz", 0).unwrap();
        assert!(o.take().unwrap().is_some());
        f.set_len(1).unwrap();
        assert_eq!(o.take().unwrap().map(|s| s.size), Some(1));
    }

    #[test]
    fn a_tmpfs_cache_dir_is_refused() {
        let shm = Path::new("/dev/shm");
        if is_tmpfs(shm).unwrap_or(false) {
            assert!(!fine_grained_times(shm).unwrap());
        }
    }

    #[test]
    fn another_writer_of_the_file_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = Arc::new(
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .read(true)
                .write(true)
                .open(&path)
                .unwrap(),
        );
        let o = Outside::new(f).unwrap();
        assert!(!o.written_elsewhere());
        let other = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        assert!(o.written_elsewhere());
        drop(other);
        assert!(!o.written_elsewhere());
    }
}
