//! The fuser adapter: the only code (with mount.rs) that knows FUSE.
//!
//! Every callback opens a tracing span (`op`, `req`, `ino`, `fh`, `name`),
//! moves its reply into a task on the tokio runtime, calls one `async fn`
//! of the core there and replies from the task: the FUSE loop never waits
//! on the network. Errors become errno through `error::errno`, the one
//! table; expected ones (ENOENT...) are logged at debug, others at warn.

use std::ffi::{OsStr, OsString};
use std::future::Future;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, IoctlFlags, KernelConfig, LockOwner, Notifier, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyIoctl, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use tracing::{Instrument, debug, info_span, warn};

use crate::buckets::Buckets;
use crate::error;
use crate::fs::{
    Attr, Creator, DirAsk, DirEntry, DirPage, FileKind, FsError, FsResult, Placed, SetAttr,
};
use crate::fuse_modes::IoModes;

const MAX_WRITE_BYTES: u32 = 1024 * 1024;
const MAX_READAHEAD_BYTES: u32 = 1024 * 1024;

/// Asynchronous requests (read-ahead, background writes) the kernel keeps
/// in flight.
const MAX_BACKGROUND: u16 = 64;

pub struct FuseFs {
    fs: Arc<Buckets>,
    rt: tokio::runtime::Handle,
    /// Whether to ask the kernel to check POSIX ACLs (`FUSE_POSIX_ACL`):
    /// with `default_permissions` (the kernel checks modes; the ACL
    /// capability would turn that on anyway) and a place to keep them
    /// (object metadata). Off, their names answer ENOTSUP.
    posix_acl: bool,
    /// Tells the kernel to drop what it cached (set once the session is).
    kernel: Arc<OnceLock<Notifier>>,
    /// `-o passthrough`, while the kernel takes it: a new or emptied
    /// file's reads and writes go straight to its staged copy.
    passthrough: Arc<AtomicBool>,
    /// What each open was answered (cached or passthrough).
    io: Arc<IoModes>,
}

impl FuseFs {
    pub fn new(
        fs: Arc<Buckets>,
        rt: tokio::runtime::Handle,
        posix_acl: bool,
        passthrough: bool,
    ) -> Self {
        FuseFs {
            fs,
            rt,
            posix_acl,
            kernel: Default::default(),
            passthrough: Arc::new(passthrough.into()),
            io: Default::default(),
        }
    }

    /// Where the session's notifier goes once it exists.
    pub fn kernel_slot(&self) -> Arc<OnceLock<Notifier>> {
        self.kernel.clone()
    }

    /// Whether the extended attribute `name` is one this mount keeps.
    fn kept_xattr(&self, name: &str) -> bool {
        if crate::fs::acl::is_acl_name(name) {
            return self.posix_acl;
        }
        !crate::fs::UNSUPPORTED_XATTR_PREFIXES
            .iter()
            .any(|p| name.starts_with(p))
    }

    /// Runs `f` on the runtime inside `span`.
    fn spawn<Fut>(&self, span: tracing::Span, f: Fut)
    where
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.rt.spawn(f.instrument(span));
    }
}

/// Clears set-user-ID (a writer without CAP_FSETID), and has the kernel
/// forget the mode it holds: neither the reply to a write nor to an open
/// carries attributes, so it would show the old bits until they expire.
async fn kill_suid(fs: &Buckets, kernel: &OnceLock<Notifier>, ino: INodeNo) -> FsResult<()> {
    fs.setattr(ino.0, KILL_SUID).await?;
    if let Some(k) = kernel.get()
        && let Err(e) = k.inval_inode(ino, -1, 0)
    {
        debug!(error = %e, "could not invalidate the kernel's attributes");
    }
    Ok(())
}

/// Whether an open that created or emptied a file (open(2) `flags`) may
/// offer its staged copy for passthrough: one that writes, and not with
/// `O_DIRECT` (which the staged file's file system may refuse).
fn offers_backing(flags: i32) -> bool {
    flags & libc::O_ACCMODE != libc::O_RDONLY && flags & libc::O_DIRECT == 0
}

/// How the kernel is to do the reads and writes of a handle just opened:
/// through this mount (None), or straight to a backing file. A handle
/// that created or emptied a file offers its staged copy (`offer`), which
/// the core grants under the file's write state; any open of an inode
/// already in passthrough mode shares its backing. `register` hands a
/// file to the kernel (the reply's `open_backing`).
async fn io_mode(
    fs: &Buckets,
    io: &IoModes,
    on: &AtomicBool,
    ino: u64,
    fh: u64,
    offer: bool,
    register: impl Fn(&std::fs::File) -> io::Result<fuser::BackingId>,
) -> Option<Arc<fuser::BackingId>> {
    if offer && on.load(Ordering::Relaxed) {
        let mut got = None;
        let granted = fs
            .open_outside(fh, |f| match io.offer(ino, fh, || register(f)) {
                Ok(id) => {
                    got = id;
                    got.is_some()
                }
                Err(e) => {
                    if on.swap(false, Ordering::Relaxed) {
                        warn!(error = %e,
                            "passthrough is off: the kernel refused a staged file (it needs CAP_SYS_ADMIN, and a cache_dir not on overlayfs or FUSE)");
                    }
                    false
                }
            })
            .await;
        if granted {
            return got;
        }
    }
    io.open(ino, fh)
}

/// Has the kernel drop the attributes it holds of `DIR/.versions` once
/// DIR's mode, owner or ACL changed, or of `DIR/.versions/NAME` once
/// NAME's did: they follow them (who may list DIR may list its versions;
/// NAME's versions directory has NAME's owner), and would otherwise stay
/// as they were for what is left of their `metadata_ttl`.
fn drop_versions_attr(fs: &Buckets, kernel: &OnceLock<Notifier>, ino: u64) {
    if let Some(v) = fs.versions_changed(ino)
        && let Some(k) = kernel.get()
        && let Err(e) = k.inval_inode(INodeNo(v), -1, 0)
    {
        debug!(error = %e, ino = v, "could not invalidate the kernel's attributes");
    }
}

/// The kernel keeps entries of directory `dir` it was sent, until `at`
/// (`fs::kdirs`): a timer has it drop them then, unless they were dropped
/// or the drop moved meanwhile.
fn expire_kernel_dir(
    rt: &tokio::runtime::Handle,
    fs: &Arc<Buckets>,
    kernel: &Arc<OnceLock<Notifier>>,
    dir: INodeNo,
    at: Option<std::time::Instant>,
) {
    let Some(at) = at else {
        return;
    };
    let (fs, kernel) = (fs.clone(), kernel.clone());
    rt.spawn(async move {
        tokio::time::sleep_until(at.into()).await;
        if fs.kernel_dir_expired(dir.0)
            && let Some(k) = kernel.get()
            && let Err(e) = k.inval_inode(dir, 0, 0)
        {
            debug!(error = %e, ino = dir.0, "could not have the kernel drop a listing");
        }
    });
}

/// Entries the core works out per call for a readdir reply, which holds
/// 4 KiB to 32 KiB of names (about 128 to 1,000): filled by as many calls
/// as it takes (`DirAsk`).
const READDIR_CALL_ENTRIES: usize = 256;

/// The same for readdirplus, whose entries carry attributes (about 25 to
/// 200 per reply).
const READDIRPLUS_CALL_ENTRIES: usize = 64;

/// The earlier of two times the kernel must drop a listing.
fn earliest(
    a: Option<std::time::Instant>,
    b: Option<std::time::Instant>,
) -> Option<std::time::Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Sends a plain directory read: `page`, then as many pages after it as
/// fit (each asked of the core without waiting: what it has); then has
/// the kernel drop what it keeps of the directory when that expires.
#[allow(clippy::too_many_arguments)]
fn send_dir_page(
    rt: &tokio::runtime::Handle,
    fs: &Arc<Buckets>,
    kernel: &Arc<OnceLock<Notifier>>,
    dir: INodeNo,
    fh: u64,
    mut ask: DirAsk,
    mut page: DirPage<Placed>,
    mut reply: ReplyDirectory,
) {
    let (mut sent, mut expire_at) = (0, None);
    'reply: loop {
        expire_at = earliest(expire_at, page.expire_at);
        for (pos, e) in &page.entries {
            if reply.add(INodeNo(e.ino), *pos, file_type(e.kind), &e.name) {
                break 'reply;
            }
            sent += 1;
        }
        let Some(next) = page.more else { break };
        ask = ask.next(next, sent);
        // Changed since, or failed: the kernel asks again from here.
        match fs.readdir(dir.0, fh, ask) {
            Ok(Some(p)) => page = p,
            _ => break,
        }
    }
    reply.ok();
    expire_kernel_dir(rt, fs, kernel, dir, expire_at);
}

/// Adds readdirplus entries to `reply` until it is full: (entries added,
/// full). The kernel counts a lookup of each added entry but `.` and
/// `..`; entries the core looked up again (`counted`) that did not fit are
/// given back.
fn add_plus_entries(
    fs: &Buckets,
    reply: &mut ReplyDirectoryPlus,
    entries: &[(u64, DirEntry, Attr, bool, bool)],
) -> (usize, bool) {
    let mut sent = entries.len();
    for (k, (pos, e, a, counted, own)) in entries.iter().enumerate() {
        // Attributes not read from the object itself must not be kept
        // (nor permission-checked) by the kernel.
        let ttl = if *own {
            fs.kernel_ttl(e.ino)
        } else {
            Duration::ZERO
        };
        if reply.add(
            INodeNo(e.ino),
            *pos,
            &e.name,
            &ttl,
            &file_attr(a, fs),
            Generation(0),
        ) {
            sent = k;
            break;
        }
        if !counted && e.name != "." && e.name != ".." {
            fs.note_lookup(e.ino);
        }
    }
    for (_, e, _, counted, _) in &entries[sent..] {
        if *counted {
            fs.forget(e.ino, 1);
        }
    }
    (sent, sent < entries.len())
}

/// The errno of a failure, logged once.
fn fail(e: &FsError) -> Errno {
    let n = error::errno(e);
    if error::is_expected(e) {
        debug!(errno = n, error = %e, "failed");
    } else {
        warn!(errno = n, error = %e, "failed");
    }
    Errno::from_i32(n)
}

/// The thread group (process) of the thread that made a request.
fn tgid_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// A setattr that only clears set-user-ID and set-group-ID, if set.
const KILL_SUID: SetAttr = SetAttr {
    fh: None,
    mode: None,
    uid: None,
    gid: None,
    size: None,
    atime: None,
    mtime: None,
    kill_suid: true,
};

/// Whether the caller lacks CAP_FSETID, so a truncation by it clears
/// set-user-ID. The kernel knows, and says so in a flag fuser does not
/// pass on (FATTR_KILL_SUIDGID, FUSE_OPEN_KILL_SUIDGID); a process not
/// running as root is taken to lack it (root's processes have it unless
/// they dropped it, other users' do not unless granted it).
fn lacks_fsetid(req: &Request) -> bool {
    req.uid() != 0
}

/// One reply for an entry result.
/// The kernel keeps what it is given for what is left of its freshness
/// (`Buckets::kernel_ttl`): never longer than `metadata_ttl` after it was
/// read from S3.
fn reply_entry(reply: ReplyEntry, fs: &Buckets, r: FsResult<Attr>) {
    match r {
        Ok(a) => reply.entry(&fs.kernel_ttl(a.ino), &file_attr(&a, fs), Generation(0)),
        Err(e) => reply.error(fail(&e)),
    }
}

/// One reply for a result without data.
fn reply_empty(reply: ReplyEmpty, r: FsResult<()>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(fail(&e)),
    }
}

/// One reply for an attribute result.
fn reply_attr(reply: ReplyAttr, fs: &Buckets, r: FsResult<Attr>) {
    match r {
        Ok(a) => reply.attr(&fs.kernel_ttl(a.ino), &file_attr(&a, fs)),
        Err(e) => reply.error(fail(&e)),
    }
}

fn file_type(k: FileKind) -> FileType {
    match k {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
    }
}

/// The I/O size `stat` suggests (`st_blksize`), which `cp`, `cat` and
/// the rest of coreutils take as their buffer's size: a read block, but
/// no more than the kernel sends in one request. With 128 KiB (before),
/// `cp` wrote in 128 KiB requests, and `cat`'s reads, which the kernel's
/// read-ahead turns into 1 MiB requests from 768 KiB on, each straddled
/// two blocks (joined by a copy). `cp` of 1 GiB into the mount here
/// (Garage, runs alternated, /tmp scripts): 5.57–6.02 → 5.29–5.56 s,
/// the daemon's CPU 1.85–1.96 → 1.61–1.70 s.
fn io_size(fs: &Buckets) -> u32 {
    fs.block_size().min(u64::from(MAX_WRITE_BYTES)) as u32
}

fn file_attr(a: &Attr, fs: &Buckets) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.ctime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: io_size(fs),
        flags: 0,
    }
}

fn creator(req: &Request, mode: u32, umask: u32) -> Creator {
    Creator {
        uid: req.uid(),
        gid: req.gid(),
        mode,
        umask,
    }
}

macro_rules! span {
    ($op:expr, $req:expr $(, $($rest:tt)+)?) => {
        info_span!("fuse", op = $op, req = $req.unique().0 $(, $($rest)+)?)
    };
}

/// The span of an operation answered on the FUSE thread from memory or
/// the staged file, at debug: at info its fields are formatted for each
/// small write or cached read whether or not anything is logged in it (8%
/// of the daemon's CPU in `dd bs=4k`). `RUST_LOG=bucketfs=debug` or `-v`
/// shows it; what such an answer can go wrong with is its errno.
macro_rules! quick_span {
    ($op:expr, $req:expr $(, $($rest:tt)+)?) => {
        tracing::debug_span!("fuse", op = $op, req = $req.unique().0 $(, $($rest)+)?)
    };
}

impl Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_ATOMIC_O_TRUNC);
        // The filesystem clears set-user-ID itself (`SetAttr::kill_suid`):
        // the kernel then marks files without it as needing no check, and
        // a write(2) no longer makes a GETXATTR(security.capability) round
        // trip before its WRITE.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_HANDLE_KILLPRIV_V2);
        // ls -l gets attributes with the listing: no LOOKUP per entry.
        let _ = config.add_capabilities(
            fuser::InitFlags::FUSE_DO_READDIRPLUS | fuser::InitFlags::FUSE_READDIRPLUS_AUTO,
        );
        let _ = config.set_max_write(MAX_WRITE_BYTES);
        // The kernel caps read-ahead at what it offered (its bdi setting,
        // 128 KiB by default): take the most it allows, and say so.
        if let Err(most) = config.set_max_readahead(MAX_READAHEAD_BYTES) {
            debug!(
                asked = MAX_READAHEAD_BYTES,
                allowed = most,
                "kernel read-ahead capped"
            );
            let _ = config.set_max_readahead(most);
        }
        // Reads (and read-ahead) in flight from the kernel: 64, as
        // Mountpoint for Amazon S3 sets, not FUSE's default 12.
        let _ = config.set_max_background(MAX_BACKGROUND);
        // Passthrough: the staged files are on a local file system, not
        // stacked on another FUSE or overlay mount (depth 1).
        if self.passthrough.load(Ordering::Relaxed) {
            let ok = config
                .add_capabilities(fuser::InitFlags::FUSE_PASSTHROUGH)
                .is_ok()
                && config.set_max_stack_depth(1).is_ok();
            if !ok {
                warn!("passthrough is off: the kernel does not offer it");
                self.passthrough.store(false, Ordering::Relaxed);
            }
        }
        // POSIX ACLs checked by the kernel, kept by the core (`fs/acl.rs`),
        // which also applies the umask itself (FUSE_DONT_MASK): POSIX wants
        // none when the parent has a default ACL. The kernel then sends the
        // mode unmasked and the umask beside it (`Creator`).
        if self.posix_acl {
            let acl = fuser::InitFlags::FUSE_POSIX_ACL | fuser::InitFlags::FUSE_DONT_MASK;
            if let Err(missing) = config.add_capabilities(acl) {
                warn!(?missing, "the kernel does not offer POSIX ACLs: modes only");
                self.posix_acl = false;
            }
        }
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let (fs, name) = (self.fs.clone(), name.to_owned());
        self.spawn(
            span!("lookup", req, ino = parent.0, name = ?name),
            async move { reply_entry(reply, &fs, fs.lookup(parent.0, &name).await) },
        );
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        // Known attributes are answered here: a task costs more than the
        // answer (`ls -l` of a listed directory is one getattr per entry).
        if let Some(a) = self.fs.getattr_cached(ino.0) {
            let _span = quick_span!("getattr", req, ino = ino.0).entered();
            return reply_attr(reply, &self.fs, Ok(a));
        }
        let fs = self.fs.clone();
        self.spawn(span!("getattr", req, ino = ino.0), async move {
            reply_attr(reply, &fs, fs.getattr(ino.0).await)
        });
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let fs = self.fs.clone();
        // `touch`: both times are one "now".
        let now = SystemTime::now();
        let time_of = |t: TimeOrNow| match t {
            TimeOrNow::SpecificTime(t) => t,
            TimeOrNow::Now => now,
        };
        let s = SetAttr {
            fh: fh.map(|f| f.0),
            mode,
            uid,
            gid,
            size,
            atime: atime.map(time_of),
            mtime: mtime.map(time_of),
            // Every chown of a file, and a truncation by a process without
            // CAP_FSETID (FUSE_HANDLE_KILLPRIV_V2 says so in a flag fuser
            // does not pass on; see `lacks_fsetid`).
            kill_suid: uid.is_some() || gid.is_some() || (size.is_some() && lacks_fsetid(req)),
        };
        let (kernel, owner) = (self.kernel.clone(), s.mode.or(s.uid).or(s.gid).is_some());
        self.spawn(span!("setattr", req, ino = ino.0), async move {
            let r = fs.setattr(ino.0, s).await;
            let changed = r.is_ok();
            reply_attr(reply, &fs, r);
            if changed && owner {
                drop_versions_attr(&fs, &kernel, ino.0);
            }
        });
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        let fs = self.fs.clone();
        self.spawn(span!("readlink", req, ino = ino.0), async move {
            match fs.readlink(ino.0).await {
                Ok(t) => reply.data(t.as_bytes()),
                Err(e) => reply.error(fail(&e)),
            }
        });
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let (fs, name, c) = (self.fs.clone(), name.to_owned(), creator(req, mode, umask));
        self.spawn(
            span!("mknod", req, ino = parent.0, name = ?name),
            async move {
                let r = if FileKind::from_mode(mode) == FileKind::File {
                    fs.create(parent.0, &name, c, libc::O_EXCL | libc::O_WRONLY)
                        .await
                        .map(|(a, fh)| (a, Some(fh)))
                } else {
                    fs.mknod(parent.0, &name, c, rdev).await.map(|a| (a, None))
                };
                let r = match r {
                    Ok((a, Some(fh))) => fs.release(fh).await.map(|_| a),
                    Ok((a, None)) => Ok(a),
                    Err(e) => Err(e),
                };
                reply_entry(reply, &fs, r)
            },
        );
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let (fs, name, c) = (self.fs.clone(), name.to_owned(), creator(req, mode, umask));
        self.spawn(
            span!("mkdir", req, ino = parent.0, name = ?name),
            async move { reply_entry(reply, &fs, fs.mkdir(parent.0, &name, c).await) },
        );
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let (fs, name) = (self.fs.clone(), name.to_owned());
        self.spawn(
            span!("unlink", req, ino = parent.0, name = ?name),
            async move { reply_empty(reply, fs.unlink(parent.0, &name).await) },
        );
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let (fs, name) = (self.fs.clone(), name.to_owned());
        self.spawn(
            span!("rmdir", req, ino = parent.0, name = ?name),
            async move { reply_empty(reply, fs.rmdir(parent.0, &name).await) },
        );
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let (fs, name, c) = (
            self.fs.clone(),
            link_name.to_owned(),
            creator(req, 0o777, 0),
        );
        let target: OsString = target.as_os_str().to_owned();
        self.spawn(
            span!("symlink", req, ino = parent.0, name = ?name),
            async move {
                let Some(target) = target.to_str() else {
                    return reply.error(fail(&FsError::InvalidName));
                };
                reply_entry(reply, &fs, fs.symlink(parent.0, &name, target, c).await)
            },
        );
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let (fs, name, newname) = (self.fs.clone(), name.to_owned(), newname.to_owned());
        self.spawn(
            span!("rename", req, ino = parent.0, name = ?name),
            async move {
                if flags.contains(RenameFlags::RENAME_EXCHANGE)
                    || flags.contains(RenameFlags::RENAME_WHITEOUT)
                {
                    return reply.error(fail(&FsError::Invalid));
                }
                let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
                match fs
                    .rename(parent.0, &name, newparent.0, &newname, noreplace)
                    .await
                {
                    Ok(()) => reply.ok(),
                    Err(e) => reply.error(fail(&e)),
                }
            },
        );
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let (fs, pid, kernel) = (self.fs.clone(), req.pid(), self.kernel.clone());
        let (io, on) = (self.io.clone(), self.passthrough.clone());
        let kill = flags.0 & libc::O_TRUNC != 0 && lacks_fsetid(req);
        // An open that empties the file may write to its staged copy.
        let offer = flags.0 & libc::O_TRUNC != 0 && offers_backing(flags.0);
        self.spawn(span!("open", req, ino = ino.0), async move {
            match fs.open(ino.0, flags.0).await {
                Ok(fh) => {
                    if kill && let Err(e) = kill_suid(&fs, &kernel, ino).await {
                        let _ = fs.release(fh).await;
                        return reply.error(fail(&e));
                    }
                    if let Some(t) = tgid_of(pid) {
                        fs.set_opener(fh, t);
                    }
                    let register = |f: &std::fs::File| reply.open_backing(f);
                    match io_mode(&fs, &io, &on, ino.0, fh, offer, register).await {
                        Some(id) => {
                            reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id)
                        }
                        None => reply.opened(FileHandle(fh), FopenFlags::empty()),
                    }
                }
                Err(e) => reply.error(fail(&e)),
            }
        });
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // A read of blocks in memory (most of a sequential read, which
        // read-ahead keeps ahead of the kernel) is answered here.
        {
            let _span = quick_span!("read", req, ino = ino.0, fh = fh.0).entered();
            let _rt = self.rt.enter();
            match self.fs.read_now(fh.0, offset, size) {
                Some(Ok(d)) => return reply.data(&d),
                Some(Err(e)) => return reply.error(fail(&e)),
                None => {}
            }
        }
        let fs = self.fs.clone();
        self.spawn(span!("read", req, ino = ino.0, fh = fh.0), async move {
            match fs.read(fh.0, offset, size).await {
                Ok(d) => reply.data(&d),
                Err(e) => reply.error(fail(&e)),
            }
        });
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.fs.note_writer(fh.0, req.pid());
        // Set-user-ID to clear first (a writer without CAP_FSETID):
        // only where the attributes show some, or are not known.
        let kill = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID)
            && self
                .fs
                .getattr_cached(ino.0)
                .is_none_or(|a| crate::fs::killed_perm(a.perm) != a.perm);
        // A write that is only a write to the staged file is done here.
        if !kill {
            let _span = quick_span!("write", req, ino = ino.0, fh = fh.0).entered();
            match self.fs.write_now(fh.0, offset, data) {
                Some(Ok(n)) => return reply.written(n),
                Some(Err(e)) => return reply.error(fail(&e)),
                None => {}
            }
        }
        let (fs, data, kernel) = (self.fs.clone(), data.to_vec(), self.kernel.clone());
        self.spawn(span!("write", req, ino = ino.0, fh = fh.0), async move {
            if kill && let Err(e) = kill_suid(&fs, &kernel, ino).await {
                return reply.error(fail(&e));
            }
            match fs.write(fh.0, offset, &data).await {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(fail(&e)),
            }
        });
    }

    fn flush(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let (fs, pid) = (self.fs.clone(), req.pid());
        self.spawn(span!("flush", req, ino = ino.0, fh = fh.0), async move {
            let writer = fs.last_writer(fh.0).and_then(tgid_of);
            reply_empty(reply, fs.flush_from(fh.0, tgid_of(pid), writer).await)
        });
    }

    fn release(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let (fs, io) = (self.fs.clone(), self.io.clone());
        let last_passthrough = self.io.release(fh.0);
        self.spawn(span!("release", req, ino = ino.0, fh = fh.0), async move {
            let r = fs.release(fh.0).await;
            if let Some(ino) = last_passthrough {
                fs.end_outside(ino, || io.passthrough_open(ino)).await;
            }
            reply_empty(reply, r)
        });
    }

    fn fsync(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let fs = self.fs.clone();
        self.spawn(span!("fsync", req, ino = ino.0, fh = fh.0), async move {
            reply_empty(reply, fs.fsync(fh.0).await)
        });
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let fs = self.fs.clone();
        self.spawn(span!("opendir", req, ino = ino.0), async move {
            match fs.opendir(ino.0).await {
                Ok(fh) => {
                    let k = fs.kernel_dir(ino.0, fh);
                    let mut flags = FopenFlags::empty();
                    flags.set(FopenFlags::FOPEN_CACHE_DIR, k.cache);
                    flags.set(FopenFlags::FOPEN_KEEP_CACHE, k.keep);
                    reply.opened(FileHandle(fh), flags)
                }
                Err(e) => reply.error(fail(&e)),
            }
        });
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        // Served from the handle's listing, without a task, unless the
        // directory changed since and must be listed again.
        let span = span!("readdir", req, ino = ino.0, fh = fh.0);
        let ask = DirAsk::first(offset, READDIR_CALL_ENTRIES);
        let page = match span.in_scope(|| self.fs.readdir(ino.0, fh.0, ask)) {
            Ok(Some(page)) => page,
            Ok(None) => {
                let (fs, kernel, rt) = (self.fs.clone(), self.kernel.clone(), self.rt.clone());
                return self.spawn(span, async move {
                    match fs.readdir_listed(ino.0, fh.0, ask).await {
                        Ok(page) => send_dir_page(&rt, &fs, &kernel, ino, fh.0, ask, page, reply),
                        Err(e) => reply.error(fail(&e)),
                    }
                });
            }
            Err(e) => return reply.error(fail(&e)),
        };
        let _s = span.entered();
        send_dir_page(
            &self.rt,
            &self.fs,
            &self.kernel,
            ino,
            fh.0,
            ask,
            page,
            reply,
        );
    }

    fn readdirplus(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let (fs, kernel, rt) = (self.fs.clone(), self.kernel.clone(), self.rt.clone());
        self.spawn(
            span!("readdirplus", req, ino = ino.0, fh = fh.0),
            async move {
                let mut ask = DirAsk::first(offset, READDIRPLUS_CALL_ENTRIES);
                let (mut sent, mut expire_at) = (0, None);
                loop {
                    let page = match fs.readdirplus(ino.0, fh.0, ask).await {
                        Ok(page) => page,
                        Err(e) if sent == 0 => return reply.error(fail(&e)),
                        // The kernel asks again from here, and gets it then.
                        Err(_) => break,
                    };
                    expire_at = earliest(expire_at, page.expire_at);
                    let (added, full) = add_plus_entries(&fs, &mut reply, &page.entries);
                    sent += added;
                    match page.more {
                        Some(next) if !full => ask = ask.next(next, sent),
                        _ => break,
                    }
                }
                reply.ok();
                expire_kernel_dir(&rt, &fs, &kernel, ino, expire_at);
            },
        );
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let fs = self.fs.clone();
        self.spawn(span!("fsyncdir", req, ino = ino.0), async move {
            reply_empty(reply, fs.fsyncdir(ino.0).await)
        });
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.fs.statfs();
        reply.statfs(
            s.blocks, s.bfree, s.bfree, s.files, s.ffree, s.bsize, s.namelen, s.bsize,
        );
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        // The S3 facts are read-only: setting one to its value succeeds.
        if let Some(n) = name.to_str().filter(|n| n.starts_with("user.s3.")) {
            let (fs, n, v) = (self.fs.clone(), n.to_string(), value.to_vec());
            return self.spawn(span!("setxattr", req, ino = ino.0), async move {
                match fs.set_s3_xattr(ino.0, &n, &v).await {
                    Ok(()) => reply.ok(),
                    Err(e) => reply.error(fail(&e)),
                }
            });
        }
        let kept = name.to_str().is_some_and(|n| self.kept_xattr(n));
        let (fs, name, value) = (self.fs.clone(), name.to_owned(), value.to_vec());
        let kernel = self.kernel.clone();
        self.spawn(
            span!("setxattr", req, ino = ino.0, name = ?name),
            async move {
                let r = match name.to_str() {
                    Some(n) if kept => fs.set_xattr(ino.0, n, &value, flags).await,
                    _ => Err(FsError::NotSupported),
                };
                let acl = r.is_ok() && name.to_str().is_some_and(crate::fs::acl::is_acl_name);
                reply_empty(reply, r);
                if acl {
                    drop_versions_attr(&fs, &kernel, ino.0);
                }
            },
        );
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let kept = name.to_str().is_some_and(|n| self.kept_xattr(n));
        let (fs, name) = (self.fs.clone(), name.to_owned());
        let kernel = self.kernel.clone();
        self.spawn(
            span!("removexattr", req, ino = ino.0, name = ?name),
            async move {
                let r = match name.to_str() {
                    Some(n) if kept => fs.remove_xattr(ino.0, n).await,
                    _ => Err(FsError::NotSupported),
                };
                let acl = r.is_ok() && name.to_str().is_some_and(crate::fs::acl::is_acl_name);
                reply_empty(reply, r);
                if acl {
                    drop_versions_attr(&fs, &kernel, ino.0);
                }
            },
        );
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        // `ls -l` asks every entry for security.selinux and the POSIX
        // ACLs, answered here without a task: "not supported" for the
        // namespaces bucketfs does not keep. ls remembers that per
        // filesystem and stops asking: two FUSE round trips fewer per
        // listed entry.
        let Some(n) = name.to_str().filter(|n| self.kept_xattr(n)) else {
            return reply.error(fail(&FsError::NotSupported));
        };
        // The ACLs the kernel asks for at each permission check once its
        // attributes expired (and `ls -l` for every entry): answered here
        // too when the attributes are known.
        if crate::fs::acl::is_acl_name(n)
            && let Some(a) = self.fs.getattr_cached(ino.0)
        {
            let _span = quick_span!("getxattr", req, ino = ino.0, name = n).entered();
            return match crate::fs::acl_xattr(&a, n) {
                Err(e) => reply.error(fail(&e)),
                Ok(v) if size == 0 => reply.size(v.len() as u32),
                Ok(v) if v.len() > size as usize => reply.error(fail(&FsError::Range)),
                Ok(v) => reply.data(&v),
            };
        }
        let (fs, name) = (self.fs.clone(), n.to_string());
        self.spawn(
            span!("getxattr", req, ino = ino.0, name = ?name),
            async move {
                match fs.get_xattr(ino.0, &name).await {
                    Err(e) => reply.error(fail(&e)),
                    Ok(v) if size == 0 => reply.size(v.len() as u32),
                    Ok(v) if v.len() > size as usize => reply.error(fail(&FsError::Range)),
                    Ok(v) => reply.data(&v),
                }
            },
        );
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let (fs, posix_acl) = (self.fs.clone(), self.posix_acl);
        self.spawn(span!("listxattr", req, ino = ino.0), async move {
            let names = match fs.list_xattr(ino.0).await {
                Ok(all) => all
                    .into_iter()
                    .filter(|k| posix_acl || !crate::fs::acl::is_acl_name(k))
                    .flat_map(|k| [k.into_bytes(), vec![0]].concat())
                    .collect::<Vec<u8>>(),
                Err(e) => return reply.error(fail(&e)),
            };
            if size == 0 {
                reply.size(names.len() as u32);
            } else if names.len() > size as usize {
                reply.error(fail(&FsError::Range));
            } else {
                reply.data(&names);
            }
        });
    }

    /// No ioctl applies to an object: ENOTTY, as for a regular file on a
    /// local disk (`isatty` on every Python `open` asks), without a log line.
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (fs, name, c) = (self.fs.clone(), name.to_owned(), creator(req, mode, umask));
        let pid = req.pid();
        let (io, on) = (self.io.clone(), self.passthrough.clone());
        let offer = offers_backing(flags);
        self.spawn(
            span!("create", req, ino = parent.0, name = ?name),
            async move {
                match fs.create(parent.0, &name, c, flags).await {
                    Ok((a, fh)) => {
                        if let Some(t) = tgid_of(pid) {
                            fs.set_opener(fh, t);
                        }
                        let register = |f: &std::fs::File| reply.open_backing(f);
                        let (ttl, attr) = (fs.kernel_ttl(a.ino), file_attr(&a, &fs));
                        match io_mode(&fs, &io, &on, a.ino, fh, offer, register).await {
                            Some(id) => reply.created_passthrough(
                                &ttl,
                                &attr,
                                Generation(0),
                                FileHandle(fh),
                                FopenFlags::empty(),
                                &id,
                            ),
                            None => reply.created(
                                &ttl,
                                &attr,
                                Generation(0),
                                FileHandle(fh),
                                FopenFlags::empty(),
                            ),
                        }
                    }
                    Err(e) => reply.error(fail(&e)),
                }
            },
        );
    }
}
