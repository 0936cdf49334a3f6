//! The journal of a staged file: enough to finish its upload after the
//! daemon was killed. It lives beside the staging file
//! (`stage-<id>.journal`) from the moment the file has data not in S3
//! until that data is uploaded, and is removed then.
//!
//! Format: a header of `name value` lines (values percent-encoded) up to a
//! `--` line, then one line per change: `W <offset> <len>` for a write,
//! `T <size>` for a truncation, `U <upload id> [crc32c]` for a multipart
//! upload started for the data (before its first part is sent; `crc32c`
//! when it declared CRC32C), `P <part> <etag> [<crc32c>]` for a part sent
//! (with the CRC32C it was sent with, which CompleteMultipartUpload must
//! repeat), `C <parts> <bytes>` after the last part of a set that holds
//! all the data (written with the `P` lines in one append: only a set so
//! sealed is ever completed by a recovering mount), `X` when the file was
//! unlinked (final: nothing is to be
//! uploaded), `D` before this mount removes the file's object (an unlink's
//! DeleteObject, a rename's copy over it) and `K` when that failed and the
//! file stays (as does any change journaled after `D`). Journals written before part checksums have neither
//! optional field, and replay the same: their uploads are completed
//! without checksums. Every line ends in ` *<checksum>` (FNV-1a of the
//! rest): replay stops at the first line that does not check, which can
//! only be a torn last line; a line that checks after one that does not
//! makes the journal bad (kept, never uploaded from). Each append writes
//! at the end of what is whole, and one that fails (a full disk) is cut
//! off before anything else is appended, so a later line is never glued
//! to the fragment of a failed one. Lines are appended without fsync: a
//! crash of the daemon (not of the machine) loses none of them. A journal that
//! grows past `COMPACT_LINES` is rewritten from the in-memory state (to a
//! new file renamed over the old one).

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use percent_encoding::{NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

use super::RangeSet;
use crate::store::{Metadata, Part, Upload};

const MAGIC: &str = "bucketfs-journal 2";
/// A journal with more change lines than this is rewritten compactly.
pub const COMPACT_LINES: u64 = 4096;
/// The longest `W` line: `W <u64> <u64> *<8 hex>` and its newline.
pub const LINE_MAX: u64 = 64;
/// A write of nothing: the data may have changed since the uploads
/// before it (writes this mount does not see), which recovery therefore
/// does not take for the data.
pub const OUTSIDE_LINE: &str = "W 0 0";
/// Journal room is taken on the disk this much at a time.
const RESERVE: u64 = 4096;

/// What the journal knows at its start.
#[derive(Clone, Debug, PartialEq)]
pub struct Header {
    pub key: String,
    /// The object the staged data started from, if any.
    pub base_etag: Option<String>,
    pub base_version: Option<String>,
    /// The ETag of the object the data replaces when it is uploaded (the
    /// base's, or the object an O_TRUNC open emptied; none for a new key):
    /// recovery uploads to the key only if that is still what is there.
    pub replaces: Option<String>,
    /// A new file renamed over another one (`mv new old`) before any of
    /// its bytes were sent: the ETags the key may hold of the file it
    /// replaces (none known: an empty list). Recovery puts the data at
    /// the key when it holds one of those, nothing, or what the replaced
    /// file's own journal says it may have put there: the rename was
    /// under way, and its source wins.
    pub over: Option<Vec<String>>,
    /// The encryption and storage class its uploads are sent with.
    pub written_with: super::WrittenWith,
    /// Bytes below this offset not written since are the base's.
    pub base_valid: u64,
    pub size: u64,
    pub meta: Metadata,
}

/// A journal being written.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    /// Change lines appended since the header.
    lines: u64,
    /// Bytes of whole lines: where the next append goes.
    len: u64,
    /// An append failed and what it left past `len` is not cut off yet.
    torn: bool,
    /// Bytes below this are taken on the disk (`fallocate`, the size
    /// unchanged); `None` where the filesystem cannot.
    reserved: Option<u64>,
}

/// FNV-1a, 32 bits: enough to tell a torn line from a whole one.
pub(crate) fn checksum(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

fn sealed(line: &str) -> String {
    format!("{line} *{:08x}\n", checksum(line))
}

/// The content of a line whose checksum holds.
fn unseal(line: &str) -> Option<&str> {
    let (body, sum) = line.rsplit_once(" *")?;
    (u32::from_str_radix(sum, 16).ok()? == checksum(body)).then_some(body)
}

pub(crate) fn enc(s: &str) -> String {
    utf8_percent_encode(s, NON_ALPHANUMERIC).to_string()
}

fn dec(s: &str) -> String {
    percent_decode_str(s).decode_utf8_lossy().into_owned()
}

impl Journal {
    pub fn create(path: PathBuf, h: &Header) -> io::Result<Journal> {
        Self::create_with(path, h, &[])
    }

    /// A journal of `h` and `changes`, in place of any at `path` in one
    /// rename: a reader (a recovering mount) finds the old journal or all
    /// of this one, never its header without its changes.
    pub fn create_with(path: PathBuf, h: &Header, changes: &[String]) -> io::Result<Journal> {
        let (file, len, reserved) = Self::write_new(&path, h, changes)?;
        Ok(Journal {
            path,
            file,
            lines: changes.len() as u64,
            len,
            torn: false,
            reserved,
        })
    }

    /// Writes a journal file with `h` and `changes` under a temporary name
    /// and renames it to `path`, so a reader sees the old or the new one.
    /// A journal of a rename over another file (`Header::over`) takes
    /// room for more lines first: the `K` saying the rename failed must
    /// not fail for want of space (the data would go over the key).
    /// Returns the file, its length, and how far room is taken.
    fn write_new(
        path: &Path,
        h: &Header,
        changes: &[String],
    ) -> io::Result<(File, u64, Option<u64>)> {
        let mut text = format!("{MAGIC}\n");
        text += &sealed(&format!("key {}", enc(&h.key)));
        if let Some(e) = &h.base_etag {
            text += &sealed(&format!("etag {}", enc(e)));
        }
        if let Some(v) = &h.base_version {
            text += &sealed(&format!("version {}", enc(v)));
        }
        if let Some(e) = &h.replaces {
            text += &sealed(&format!("replaces {}", enc(e)));
        }
        if let Some(over) = &h.over {
            // `-` is never an encoded ETag (encoding escapes it).
            let list: Vec<String> = over.iter().map(|e| enc(e)).collect();
            let list = if list.is_empty() {
                "-".to_string()
            } else {
                list.join(",")
            };
            text += &sealed(&format!("over {list}"));
        }
        let w = &h.written_with;
        for (name, v) in [
            ("sse", &w.sse),
            ("sse_kms", &w.sse_kms_key_id),
            ("class", &w.storage_class),
        ] {
            if let Some(v) = v {
                text += &sealed(&format!("{name} {}", enc(v)));
            }
        }
        text += &sealed(&format!("base_valid {}", h.base_valid));
        text += &sealed(&format!("size {}", h.size));
        let mut meta: Vec<_> = h.meta.iter().collect();
        meta.sort();
        for (k, v) in meta {
            text += &sealed(&format!("meta {} {}", enc(k), enc(v)));
        }
        text += "--\n";
        for c in changes {
            text += &sealed(c);
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".new");
        let tmp = PathBuf::from(tmp);
        // Left by a daemon killed while compacting: the journal itself is
        // whole (the rename had not happened).
        let _ = std::fs::remove_file(&tmp);
        let mut file = crate::write::private_file(&tmp)?;
        let len = text.len() as u64;
        let reserved = file.write_all(text.as_bytes()).and_then(|()| match h.over {
            Some(_) => take_room(&file, len, len + RESERVE),
            None => Ok(Some(len)),
        });
        let reserved = match reserved {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        std::fs::rename(&tmp, path)?;
        Ok((file, len, reserved))
    }

    fn append(&mut self, line: &str) -> io::Result<()> {
        self.append_lines(&sealed(line), 1)
    }

    /// Appends whole sealed lines, all or (as far as a reader can tell)
    /// none: what a failed write left is cut off, now or before the next
    /// append, which fails while it cannot be.
    fn append_lines(&mut self, text: &str, lines: u64) -> io::Result<()> {
        if self.torn {
            self.file.set_len(self.len)?;
            self.torn = false;
        }
        if let Err(e) = self.file.write_all_at(text.as_bytes(), self.len) {
            self.torn = self.file.set_len(self.len).is_err();
            // Cutting the file gave back the room taken past its end.
            self.reserved = self.reserved.map(|_| self.len);
            return Err(e);
        }
        self.len += text.len() as u64;
        self.lines += lines;
        Ok(())
    }

    /// Takes room on the disk for `n` more bytes of lines, so an append
    /// of that much cannot fail for want of space: a data write checks
    /// this before it changes a byte. Where the filesystem cannot take
    /// room ahead (no `fallocate`), appends go on as before.
    pub fn reserve(&mut self, n: u64) -> io::Result<()> {
        let Some(reserved) = self.reserved else {
            return Ok(());
        };
        if self.len + n <= reserved {
            return Ok(());
        }
        let upto = (self.len + n).div_ceil(RESERVE) * RESERVE;
        self.reserved = take_room(&self.file, self.len, upto)?;
        Ok(())
    }

    /// Whether the journal has grown enough to be rewritten.
    pub fn wants_compaction(&self) -> bool {
        self.lines > COMPACT_LINES
    }

    /// Rewrites the journal as `h` plus `changes` (the state it replays to).
    pub fn compact(&mut self, h: &Header, changes: &[String]) -> io::Result<()> {
        *self = Self::create_with(self.path.clone(), h, changes)?;
        Ok(())
    }

    pub fn wrote(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.append(&format!("W {offset} {len}"))
    }

    pub fn truncated(&mut self, size: u64) -> io::Result<()> {
        self.append(&format!("T {size}"))
    }

    /// A multipart upload was started for this data: recovery completes
    /// or aborts it. Recorded before its first part is sent.
    pub fn upload_started(&mut self, upload: &Upload) -> io::Result<()> {
        self.append(&upload_line(upload))
    }

    /// A single PUT of the data is about to be sent; `etag` is the one it
    /// gives the object. `outside`: the data may change without this
    /// mount seeing it (passthrough), so the PUT is marked as one of
    /// earlier data at once (an empty `W` in the same append): recovery
    /// then sends the staged file again rather than take the PUT for it.
    pub fn put_sent(&mut self, etag: &str, outside: bool) -> io::Result<()> {
        let mut text = sealed(&format!("S {}", enc(etag)));
        if outside {
            text += &sealed(OUTSIDE_LINE);
        }
        self.append_lines(&text, 1 + u64::from(outside))
    }

    /// Every part of the current multipart upload was sent: `size` bytes
    /// in all. One append, ending in the `C` line that seals the set (and
    /// with `outside`, the empty `W` of `put_sent`).
    pub fn parts_sent(&mut self, parts: &[Part], size: u64, outside: bool) -> io::Result<()> {
        let mut text = String::new();
        for p in parts {
            text += &sealed(&part_line(p));
        }
        text += &sealed(&complete_line(parts.len(), size));
        if outside {
            text += &sealed(OUTSIDE_LINE);
        }
        self.append_lines(&text, parts.len() as u64 + 1 + u64::from(outside))
    }

    /// The file's metadata changed (chmod, chown, touch) while dirty: the
    /// upload carries the new one.
    pub fn meta_changed(&mut self, meta: &Metadata) -> io::Result<()> {
        let mut pairs: Vec<_> = meta.iter().collect();
        pairs.sort();
        let mut line = String::from("M");
        for (k, v) in pairs {
            line += &format!(" {} {}", enc(k), enc(v));
        }
        self.append(&line)
    }

    /// The file was unlinked: its data must never be uploaded.
    pub fn unlinked(&mut self) -> io::Result<()> {
        self.append("X")
    }

    /// This mount is about to remove the file's object (an unlink) or
    /// put another over it (a rename).
    pub fn removing(&mut self) -> io::Result<()> {
        self.append("D")
    }

    /// The removal failed: the file stays. In the journal of a file
    /// renamed over another (`Header::over`): that rename failed, and
    /// recovery no longer puts the data over the key.
    pub fn kept(&mut self) -> io::Result<()> {
        self.append("K")
    }

    /// The data is in S3: nothing left to recover.
    pub fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Takes room on the disk up to `upto` past `len` (`fallocate`, the
/// size kept): how far room is taken, or None where the filesystem cannot
/// take it ahead (appends then go on as before).
fn take_room(file: &File, len: u64, upto: u64) -> io::Result<Option<u64>> {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on a descriptor the caller owns.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_KEEP_SIZE,
            len as libc::off_t,
            (upto - len) as libc::off_t,
        )
    };
    if r == 0 {
        return Ok(Some(upto));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP | libc::ENOSYS) => Ok(None),
        _ => Err(e),
    }
}

fn upload_line(u: &Upload) -> String {
    format!("U {}{}", enc(&u.id), if u.crc32c { " crc32c" } else { "" })
}

fn complete_line(parts: usize, size: u64) -> String {
    format!("C {parts} {size}")
}

fn part_line(p: &Part) -> String {
    match &p.crc32c {
        Some(c) => format!("P {} {} {}", p.number, enc(&p.etag), enc(c)),
        None => format!("P {} {}", p.number, enc(&p.etag)),
    }
}

/// The change lines that replay to `loaded` and open `uploads` (for
/// compaction), and `sent`: every part of the last of them, holding all
/// `size` bytes.
pub fn changes_for(
    loaded: &RangeSet,
    uploads: &[Upload],
    sent: Option<(&[Part], u64)>,
) -> Vec<String> {
    let mut out: Vec<String> = loaded
        .ranges()
        .map(|r| format!("W {} {}", r.start, r.end - r.start))
        .collect();
    out.extend(uploads.iter().map(upload_line));
    if let Some((parts, size)) = sent {
        out.extend(parts.iter().map(part_line));
        out.push(complete_line(parts.len(), size));
    }
    out
}

/// A journal read back: the header and the state the changes lead to.
#[derive(Debug)]
pub struct Replayed {
    pub header: Header,
    /// Multipart uploads started for the data, to complete or abort.
    pub uploads: Vec<Upload>,
    /// Parts sent (of the last upload started), with their checksums.
    pub parts: Vec<Part>,
    /// `parts` are sealed as all the data's (a `C` line), when it was this
    /// many bytes: if the staged data is still that size, the last upload
    /// can be completed with them. (The size is checked against the
    /// staged file: a new file's writes are not journaled.)
    pub parts_sealed: Option<u64>,
    /// ETags of the single PUTs sent (each the whole data then).
    pub puts: Vec<String>,
    /// Uploads of the data as it was before a later change: single PUTs'
    /// ETags and sealed part sets. One may have landed after its error
    /// (a timed-out request the server still carried out): then the key
    /// holds this file's own older bytes, which the data replaces.
    pub earlier_puts: Vec<String>,
    pub earlier_parts: Vec<Vec<Part>>,
    /// The file was unlinked: nothing to upload.
    pub unlinked: bool,
    /// This mount was removing the file's object, or putting another over
    /// it, when it stopped: if the key no longer holds what the data
    /// replaces, that was this mount's own doing, and the data goes
    /// (rather than beside the key).
    pub removing: bool,
    pub loaded: RangeSet,
    pub base_valid: u64,
    pub size: u64,
}

pub fn replay(path: &Path) -> io::Result<Replayed> {
    let text = std::fs::read_to_string(path)?;
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad journal {}", path.display()),
        )
    };
    let mut lines = text.lines();
    if lines.next() != Some(MAGIC) {
        return Err(bad());
    }
    let mut h = Header {
        key: String::new(),
        base_etag: None,
        base_version: None,
        replaces: None,
        over: None,
        written_with: Default::default(),
        base_valid: 0,
        size: 0,
        meta: Metadata::new(),
    };
    for line in lines.by_ref() {
        if line == "--" {
            break;
        }
        let line = unseal(line).ok_or_else(bad)?;
        let (name, value) = line.split_once(' ').ok_or_else(bad)?;
        match name {
            "key" => h.key = dec(value),
            "etag" => h.base_etag = Some(dec(value)),
            "version" => h.base_version = Some(dec(value)),
            "replaces" => h.replaces = Some(dec(value)),
            "over" if value == "-" => h.over = Some(Vec::new()),
            "over" => h.over = Some(value.split(',').map(dec).collect()),
            "sse" => h.written_with.sse = Some(dec(value)),
            "sse_kms" => h.written_with.sse_kms_key_id = Some(dec(value)),
            "class" => h.written_with.storage_class = Some(dec(value)),
            "base_valid" => h.base_valid = value.parse().map_err(|_| bad())?,
            "size" => h.size = value.parse().map_err(|_| bad())?,
            "meta" => {
                let (k, v) = value.split_once(' ').ok_or_else(bad)?;
                h.meta.insert(dec(k), dec(v));
            }
            _ => {}
        }
    }
    if h.key.is_empty() {
        return Err(bad());
    }
    let (mut loaded, mut base_valid, mut size) = (RangeSet::default(), h.base_valid, h.size);
    let (mut uploads, mut parts, mut unlinked) = (Vec::new(), Vec::new(), false);
    let mut removing = false;
    let mut kept = false;
    let mut parts_sealed = None;
    let mut puts = Vec::new();
    let (mut earlier_puts, mut earlier_parts) = (Vec::new(), Vec::new());
    // Uploads sent before a change are not of this data, but may be at
    // the key.
    let mut retire = |puts: &mut Vec<String>, parts: &mut Vec<Part>, sealed: &mut Option<u64>| {
        earlier_puts.append(puts);
        if sealed.take().is_some() {
            earlier_parts.push(std::mem::take(parts));
        }
        parts.clear();
    };
    while let Some(line) = lines.next() {
        // A torn last line (killed mid-append) does not check: stop there.
        // One that checks after it means lines were lost between: the
        // journal cannot say what the staged data holds.
        let Some(line) = unseal(line) else {
            if lines.any(|l| unseal(l).is_some()) {
                return Err(bad());
            }
            break;
        };
        let f: Vec<&str> = line.split(' ').collect();
        // Any change after a removal began says the file stayed.
        removing = f.as_slice() == ["D"];
        match f.as_slice() {
            ["W", off, len] => {
                let (Ok(off), Ok(len)) = (off.parse::<u64>(), len.parse::<u64>()) else {
                    return Err(bad());
                };
                loaded.insert(off..off + len);
                size = size.max(off + len);
                retire(&mut puts, &mut parts, &mut parts_sealed);
            }
            ["U", id, rest @ ..] => {
                let crc32c = match rest {
                    [] => false,
                    ["crc32c"] => true,
                    _ => return Err(bad()),
                };
                uploads.push(Upload {
                    id: dec(id),
                    crc32c,
                });
                parts.clear();
                parts_sealed = None;
            }
            ["P", n, etag, rest @ ..] if rest.len() <= 1 => {
                let Ok(n) = n.parse::<i32>() else {
                    return Err(bad());
                };
                parts.push(Part {
                    number: n,
                    etag: dec(etag),
                    crc32c: rest.first().map(|c| dec(c)),
                    sent_crc32c: None,
                });
                parts_sealed = None;
            }
            ["C", n, bytes] => {
                let (Ok(n), Ok(bytes)) = (n.parse::<usize>(), bytes.parse::<u64>()) else {
                    return Err(bad());
                };
                parts_sealed = (n == parts.len()).then_some(bytes);
            }
            ["X"] => unlinked = true,
            ["D"] => {}
            ["K"] => kept = true,
            ["S", etag] => puts.push(dec(etag)),
            ["M", pairs @ ..] if pairs.len() % 2 == 0 => {
                retire(&mut puts, &mut parts, &mut parts_sealed);
                h.meta = pairs.chunks(2).map(|kv| (dec(kv[0]), dec(kv[1]))).collect();
            }
            ["T", s] => {
                let Ok(s) = s.parse::<u64>() else {
                    return Err(bad());
                };
                loaded.truncate(s);
                base_valid = base_valid.min(s);
                size = s;
                retire(&mut puts, &mut parts, &mut parts_sealed);
            }
            _ => return Err(bad()),
        }
    }
    // A rename over another file that failed (`K`, its journal not given
    // the old name back: a full disk): the data goes over nothing (beside
    // the key if that holds an object).
    if kept {
        h.over = None;
    }
    Ok(Replayed {
        header: h,
        uploads,
        parts,
        parts_sealed,
        puts,
        earlier_puts,
        earlier_parts,
        unlinked,
        removing,
        loaded,
        base_valid,
        size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_journal_replays_to_the_same_state() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let mut meta = Metadata::new();
        meta.insert("mode".into(), "33188".into());
        let h = Header {
            key: "dir/odd name\n%".into(),
            base_etag: Some("\"abc\"".into()),
            base_version: None,
            replaces: Some("\"abc\"".into()),
            over: Some(vec!["\"a,b\"".into(), "-".into(), "\"c\"".into()]),
            written_with: super::super::WrittenWith {
                sse: Some("aws:kms".into()),
                sse_kms_key_id: Some("arn:aws:kms:eu-west-1:1:key/k 1".into()),
                storage_class: Some("STANDARD_IA".into()),
            },
            base_valid: 100,
            size: 100,
            meta,
        };
        let mut j = Journal::create(p.clone(), &h).unwrap();
        j.wrote(10, 5).unwrap();
        j.truncated(50).unwrap();
        j.wrote(60, 10).unwrap();
        j.upload_started(&Upload {
            id: "up/1".into(),
            crc32c: true,
        })
        .unwrap();
        let mut chmod = Metadata::new();
        chmod.insert("mode".into(), "33152".into());
        j.meta_changed(&chmod).unwrap();
        j.parts_sent(
            &[Part {
                number: 1,
                etag: "\"e1\"".into(),
                crc32c: Some("4waSgw==".into()),
                sent_crc32c: None,
            }],
            70,
            false,
        )
        .unwrap();
        let r = replay(&p).unwrap();
        assert_eq!(r.header.meta, chmod, "the last metadata wins");
        assert_eq!(
            Header {
                meta: h.meta.clone(),
                ..r.header.clone()
            },
            h
        );
        assert_eq!((r.size, r.base_valid), (70, 50));
        assert_eq!(r.loaded.missing(0..70), vec![0..10, 15..60]);
        assert_eq!(
            r.uploads,
            vec![Upload {
                id: "up/1".into(),
                crc32c: true
            }]
        );
        assert_eq!(
            r.parts,
            vec![Part {
                number: 1,
                etag: "\"e1\"".into(),
                crc32c: Some("4waSgw==".into()),
                sent_crc32c: None
            }]
        );
        assert_eq!(r.parts_sealed, Some(70), "sealed by its C line");
        assert!(!r.unlinked);
        // Compaction replays to the same state.
        let h2 = Header {
            size: r.size,
            base_valid: r.base_valid,
            ..h.clone()
        };
        j.compact(
            &h2,
            &changes_for(&r.loaded, &r.uploads, Some((&r.parts, r.size))),
        )
        .unwrap();
        j.unlinked().unwrap();
        let c = replay(&p).unwrap();
        assert_eq!((c.size, c.base_valid), (70, 50));
        assert_eq!(c.loaded.missing(0..70), vec![0..10, 15..60]);
        assert_eq!(c.uploads, r.uploads);
        assert_eq!(c.parts, r.parts);
        assert_eq!(c.parts_sealed, Some(70));
        assert!(c.unlinked);
        j.remove();
        assert!(!p.exists());
    }

    /// A removal under way (`D`) is what replay says until a `K` (it
    /// failed) or any change after it (the file stayed).
    #[test]
    fn a_removal_under_way_is_replayed_until_it_failed_or_the_file_changed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let mut j = Journal::create(p.clone(), &header()).unwrap();
        j.wrote(0, 5).unwrap();
        assert!(!replay(&p).unwrap().removing);
        j.removing().unwrap();
        assert!(replay(&p).unwrap().removing);
        j.kept().unwrap();
        assert!(!replay(&p).unwrap().removing);
        j.removing().unwrap();
        j.wrote(5, 1).unwrap();
        assert!(!replay(&p).unwrap().removing);
        j.removing().unwrap();
        j.unlinked().unwrap();
        let r = replay(&p).unwrap();
        assert!(r.unlinked && !r.removing);
    }

    /// A journal written before part checksums (no `crc32c` on its `U`
    /// lines, no checksum on its `P` lines) replays as uploads without
    /// checksums.
    #[test]
    fn a_journal_from_before_part_checksums_replays() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let line = |s: &str| format!("{s} *{:08x}\n", checksum(s));
        let text = format!(
            "{MAGIC}\n{}{}{}--\n{}{}{}{}",
            line("key big.bin"),
            line("base_valid 0"),
            line("size 12"),
            line("W 0 12"),
            line("U old%2Did"),
            line("P 1 %22e1%22"),
            line("P 2 %22e2%22"),
        );
        std::fs::write(&p, text).unwrap();
        let r = replay(&p).unwrap();
        assert_eq!(
            r.uploads,
            vec![Upload {
                id: "old-id".into(),
                crc32c: false
            }]
        );
        assert_eq!(
            r.parts,
            vec![
                Part {
                    number: 1,
                    etag: "\"e1\"".into(),
                    crc32c: None,
                    sent_crc32c: None
                },
                Part {
                    number: 2,
                    etag: "\"e2\"".into(),
                    crc32c: None,
                    sent_crc32c: None
                }
            ]
        );
        assert_eq!(r.size, 12);
        assert_eq!(r.parts_sealed, None, "never sealed: never completed as is");
    }

    /// A set of parts cut short by a kill (some `P` lines, no `C`) is not
    /// sealed; a change after the seal unseals it.
    #[test]
    fn only_a_sealed_set_of_parts_is_complete() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let line = |s: &str| format!("{s} *{:08x}\n", checksum(s));
        let head = format!(
            "{MAGIC}\n{}{}{}--\n{}{}",
            line("key k"),
            line("base_valid 0"),
            line("size 20"),
            line("W 0 20"),
            line("U id crc32c"),
        );
        for (tail, sealed) in [
            (
                line("P 1 e1 c1") + &line("P 2 e2 c2") + &line("C 2 20"),
                Some(20),
            ),
            (line("P 1 e1 c1") + &line("C 2 20"), None),
            (line("P 1 e1 c1") + &line("P 2 e2 c2"), None),
            (
                line("P 1 e1 c1") + &line("P 2 e2 c2") + &line("C 2 20") + &line("T 5"),
                None,
            ),
            (
                line("P 1 e1 c1") + &line("P 2 e2 c2") + &line("C 2 20") + &line("U id2"),
                None,
            ),
        ] {
            std::fs::write(&p, format!("{head}{tail}")).unwrap();
            assert_eq!(replay(&p).unwrap().parts_sealed, sealed, "{tail}");
        }
    }

    /// A journal renamed over another file takes room ahead (its `K` must
    /// not fail on a full disk); a `K` in it says that rename failed, and
    /// replays without `over`.
    #[test]
    fn a_failed_rename_over_is_replayed_as_no_rename_over() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let mut h = header();
        h.over = Some(vec!["\"e\"".into()]);
        let mut j = Journal::create(p.clone(), &h).unwrap();
        if let Some(r) = j.reserved {
            assert!(r >= j.len + LINE_MAX, "room taken ahead: {r} for {}", j.len);
        }
        assert_eq!(replay(&p).unwrap().header.over, h.over);
        j.kept().unwrap();
        assert_eq!(replay(&p).unwrap().header.over, None);
        let plain = Journal::create(dir.path().join("k"), &header()).unwrap();
        assert_eq!(plain.reserved, Some(plain.len), "no room taken for others");
    }

    /// An upload of a file the kernel writes to (passthrough) is of
    /// earlier data as soon as it is journaled: a recovering mount sends
    /// the staged file again instead of dropping it as landed.
    #[test]
    fn an_upload_journaled_as_outside_is_of_earlier_data() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let h = Header {
            base_etag: None,
            replaces: None,
            base_valid: 0,
            size: 0,
            ..header()
        };
        let mut j = Journal::create(p.clone(), &h).unwrap();
        j.put_sent("\"m1\"", true).unwrap();
        let part = Part {
            number: 1,
            etag: "\"e1\"".into(),
            crc32c: None,
            sent_crc32c: None,
        };
        j.upload_started(&Upload {
            id: "u".into(),
            crc32c: false,
        })
        .unwrap();
        j.parts_sent(std::slice::from_ref(&part), 9, true).unwrap();
        let r = replay(&p).unwrap();
        assert!(r.puts.is_empty() && r.parts_sealed.is_none());
        assert_eq!(r.earlier_puts, vec!["\"m1\"".to_string()]);
        assert_eq!(r.earlier_parts, vec![vec![part.clone()]]);
        assert_eq!((r.size, r.loaded.ranges().count()), (0, 0));
        // Without it, the same lines are the data's.
        let mut j = Journal::create(p.clone(), &h).unwrap();
        j.put_sent("\"m1\"", false).unwrap();
        j.parts_sent(std::slice::from_ref(&part), 9, false).unwrap();
        let r = replay(&p).unwrap();
        assert_eq!((r.puts.len(), r.parts_sealed), (1, Some(9)));
    }

    #[test]
    fn a_torn_last_line_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let h = Header {
            key: "k".into(),
            base_etag: None,
            base_version: None,
            replaces: None,
            over: Some(Vec::new()),
            written_with: Default::default(),
            base_valid: 0,
            size: 0,
            meta: Metadata::new(),
        };
        let mut j = Journal::create(p.clone(), &h).unwrap();
        j.wrote(0, 10).unwrap();
        j.wrote(10, 20).unwrap();
        drop(j);
        // Killed in the middle of appending the last line.
        let text = std::fs::read_to_string(&p).unwrap();
        std::fs::write(&p, &text[..text.len() - 4]).unwrap();
        let r = replay(&p).unwrap();
        assert_eq!(r.size, 10);
        assert_eq!(r.header.over, Some(Vec::new()), "an empty list is not none");
        assert!(replay(&dir.path().join("missing")).is_err());
        std::fs::write(&p, "garbage").unwrap();
        assert!(replay(&p).is_err());
    }

    fn header() -> Header {
        Header {
            key: "k".into(),
            base_etag: Some("\"e\"".into()),
            base_version: None,
            replaces: Some("\"e\"".into()),
            over: None,
            written_with: Default::default(),
            base_valid: 100,
            size: 100,
            meta: Metadata::new(),
        }
    }

    /// A line that checks after one that does not: lines were lost in
    /// between, and replay says the journal is bad rather than replay
    /// what came before as if it were all.
    #[test]
    fn a_whole_line_after_a_broken_one_makes_the_journal_bad() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let mut j = Journal::create(p.clone(), &header()).unwrap();
        j.wrote(0, 10).unwrap();
        drop(j);
        let mut text = std::fs::read_to_string(&p).unwrap();
        // What an append cut short by a full disk left, with the next
        // append glued to it.
        text += "W 0 4096 *db1";
        text += &sealed("W 50 10");
        text += &sealed("W 70 10");
        std::fs::write(&p, &text).unwrap();
        assert!(replay(&p).is_err());
    }

    /// What a failed append left past the whole lines is cut off before
    /// the next append: the lines after it replay.
    #[test]
    fn an_append_after_a_failed_one_starts_at_the_last_whole_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let mut j = Journal::create(p.clone(), &header()).unwrap();
        j.wrote(0, 10).unwrap();
        // A failed append's fragment, not cut off then (set_len failed).
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"W 0 4096 *db1").unwrap();
        j.torn = true;
        j.wrote(50, 10).unwrap();
        j.truncated(55).unwrap();
        let r = replay(&p).unwrap();
        assert_eq!(r.size, 55);
        assert!(r.loaded.missing(0..10).is_empty() && r.loaded.missing(50..55).is_empty());
        // A fragment longer than the next line (left past the end while
        // not known as torn): what the line does not overwrite of it stays
        // after it as a torn last line, which replay ignores.
        f.write_all(b"W 12345678 87654321 *0000").unwrap();
        j.wrote(1, 1).unwrap();
        let r = replay(&p).unwrap();
        assert!(
            r.loaded.missing(1..2).is_empty(),
            "the line after the fragment replays"
        );
    }

    /// Room taken ahead leaves the size (what replay reads) alone, and
    /// the lines appended into it replay.
    #[test]
    fn room_is_taken_ahead_without_changing_the_size() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let mut j = Journal::create(p.clone(), &header()).unwrap();
        let len = std::fs::metadata(&p).unwrap().len();
        j.reserve(LINE_MAX).unwrap();
        let md = std::fs::metadata(&p).unwrap();
        assert_eq!(md.len(), len);
        if j.reserved.is_some() {
            assert!(
                md.blocks() * 512 >= len + LINE_MAX,
                "{} blocks",
                md.blocks()
            );
        }
        j.wrote(0, 10).unwrap();
        assert!(replay(&p).unwrap().loaded.missing(0..10).is_empty());
    }

    /// Compaction and a recovering mount's adoption replace the journal in
    /// one rename, with its changes: never a header alone.
    #[test]
    fn a_journal_created_with_changes_replays_them() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let mut j = Journal::create(p.clone(), &header()).unwrap();
        j.wrote(0, 10).unwrap();
        let changes = vec!["W 0 10".to_string(), "W 40 5".to_string()];
        let mut j2 = Journal::create_with(p.clone(), &header(), &changes).unwrap();
        assert!(!dir.path().join("j.new").exists());
        j2.wrote(60, 1).unwrap();
        let r = replay(&p).unwrap();
        assert!(
            r.loaded.missing(0..10).is_empty()
                && r.loaded.missing(40..45).is_empty()
                && r.loaded.missing(60..61).is_empty()
        );
        drop(j);
    }
}
