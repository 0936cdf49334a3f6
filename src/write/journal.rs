//! The journal of a staged file: enough to finish its upload after the
//! daemon was killed. It lives beside the staging file
//! (`stage-<pid>-<n>.journal`) from the moment the file has data not in S3
//! until that data is uploaded, and is removed then.
//!
//! Format: a header of `name value` lines (values percent-encoded) up to a
//! `--` line, then one line per change: `W <offset> <len>` for a write,
//! `T <size>` for a truncation. Lines are appended without fsync: a crash
//! of the daemon (not of the machine) loses none of them.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use percent_encoding::{NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

use super::RangeSet;
use crate::store::Metadata;

const MAGIC: &str = "bucketfs-journal 1";

/// What the journal knows at its start.
#[derive(Clone, Debug, PartialEq)]
pub struct Header {
    pub key: String,
    /// The object the staged data started from, if any.
    pub base_etag: Option<String>,
    pub base_version: Option<String>,
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
}

fn enc(s: &str) -> String {
    utf8_percent_encode(s, NON_ALPHANUMERIC).to_string()
}

fn dec(s: &str) -> String {
    percent_decode_str(s).decode_utf8_lossy().into_owned()
}

impl Journal {
    pub fn create(path: PathBuf, h: &Header) -> io::Result<Journal> {
        let mut text = format!("{MAGIC}\nkey {}\n", enc(&h.key));
        if let Some(e) = &h.base_etag {
            text += &format!("etag {}\n", enc(e));
        }
        if let Some(v) = &h.base_version {
            text += &format!("version {}\n", enc(v));
        }
        text += &format!("base_valid {}\nsize {}\n", h.base_valid, h.size);
        let mut meta: Vec<_> = h.meta.iter().collect();
        meta.sort();
        for (k, v) in meta {
            text += &format!("meta {} {}\n", enc(k), enc(v));
        }
        text += "--\n";
        let mut file = crate::private::private_file()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)?;
        file.write_all(text.as_bytes())?;
        Ok(Journal { path, file })
    }

    pub fn wrote(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.file
            .write_all(format!("W {offset} {len}\n").as_bytes())
    }

    pub fn truncated(&mut self, size: u64) -> io::Result<()> {
        self.file.write_all(format!("T {size}\n").as_bytes())
    }

    /// A multipart upload was started for this data (to abort on recovery).
    pub fn streaming(&mut self, upload_id: &str) -> io::Result<()> {
        self.file
            .write_all(format!("U {}\n", enc(upload_id)).as_bytes())
    }

    /// The data is in S3: nothing left to recover.
    pub fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A journal read back: the header and the state the changes lead to.
#[derive(Debug)]
pub struct Replayed {
    pub header: Header,
    /// Multipart uploads started for the data, to abort.
    pub uploads: Vec<String>,
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
        base_valid: 0,
        size: 0,
        meta: Metadata::new(),
    };
    for line in lines.by_ref() {
        if line == "--" {
            break;
        }
        let (name, value) = line.split_once(' ').ok_or_else(bad)?;
        match name {
            "key" => h.key = dec(value),
            "etag" => h.base_etag = Some(dec(value)),
            "version" => h.base_version = Some(dec(value)),
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
    let mut uploads = Vec::new();
    for line in lines {
        let f: Vec<&str> = line.split(' ').collect();
        match f.as_slice() {
            ["W", off, len] => {
                // A torn last line (killed mid-append) is ignored.
                let (Ok(off), Ok(len)) = (off.parse::<u64>(), len.parse::<u64>()) else {
                    continue;
                };
                loaded.insert(off..off + len);
                size = size.max(off + len);
            }
            ["U", id] => uploads.push(dec(id)),
            ["T", s] => {
                let Ok(s) = s.parse::<u64>() else { continue };
                loaded.truncate(s);
                base_valid = base_valid.min(s);
                size = s;
            }
            _ => {}
        }
    }
    Ok(Replayed {
        header: h,
        uploads,
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
            base_valid: 100,
            size: 100,
            meta,
        };
        let mut j = Journal::create(p.clone(), &h).unwrap();
        j.wrote(10, 5).unwrap();
        j.truncated(50).unwrap();
        j.wrote(60, 10).unwrap();
        let r = replay(&p).unwrap();
        assert_eq!(r.header, h);
        assert_eq!((r.size, r.base_valid), (70, 50));
        assert_eq!(r.loaded.missing(0..70), vec![0..10, 15..60]);
        j.remove();
        assert!(!p.exists());
    }

    #[test]
    fn a_torn_last_line_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        std::fs::write(
            &p,
            format!("{MAGIC}\nkey k\nbase_valid 0\nsize 0\n--\nW 0 10\nW 10"),
        )
        .unwrap();
        let r = replay(&p).unwrap();
        assert_eq!(r.size, 10);
        assert!(replay(&dir.path().join("missing")).is_err());
        std::fs::write(&p, "garbage").unwrap();
        assert!(replay(&p).is_err());
    }
}
