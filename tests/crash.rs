//! Issue 9's crash loop through real FUSE: a mixed workload (small and
//! multipart files, new, rewritten with O_TRUNC, appended, edited in
//! place, some fsynced) runs in a background thread; the daemon gets
//! kill -9 at a seeded pseudo-random moment; the next mount (same cache
//! dir) recovers; then, in the bucket, through the S3 API:
//!
//! - every file whose close() returned Ok is exact;
//! - every file in flight is its old content, its new content, or its
//!   new content up to a write at or beyond its last successful fsync
//!   (the write in flight at the kill perhaps in part, up to a page
//!   boundary: the kernel sends one write(2) as several requests);
//! - no multipart upload is left open;
//! - no `*.bucketfs-recovered-*` key (no other client changed anything).
//!
//! 3 rounds by default; `BUCKETFS_CRASH_ROUNDS=N` for more (scripts/soak),
//! `BUCKETFS_CRASH_SEED=S` to replay a failure (each round prints its seed).

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::io::IntoRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;
/// The size of each write(). The kernel may send one write() as several
/// FUSE requests (see `FileRec::accepts`).
const CHUNK: usize = 64 * KIB;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[derive(Clone, Debug)]
enum Step {
    Write(u64, Arc<Vec<u8>>),
    Truncate(u64),
}

/// What the workload did to one file, since its last confirmed state.
#[derive(Default, Debug)]
struct FileRec {
    /// The content at the start of the current operation (None: absent).
    base: Option<Arc<Vec<u8>>>,
    /// Steps of the current operation, the one in flight included.
    steps: Vec<Step>,
    /// Steps covered by the last fsync that returned Ok.
    synced: usize,
    /// The operation's close() returned Ok.
    closed: bool,
    /// Human-readable history, for failure messages.
    history: Vec<String>,
}

/// `d` written into `c` at `off`, as pwrite does (growing it with zeros).
fn write_at(c: &mut Vec<u8>, off: u64, d: &[u8]) {
    let end = off as usize + d.len();
    if c.len() < end {
        c.resize(end, 0);
    }
    c[off as usize..end].copy_from_slice(d);
}

impl FileRec {
    fn state(&self, n: usize) -> Option<Vec<u8>> {
        let mut cur = self.base.as_ref().map(|b| b.to_vec());
        for s in &self.steps[..n] {
            let c = cur.get_or_insert_with(Vec::new);
            match s {
                Step::Write(off, d) => write_at(c, *off, d),
                Step::Truncate(len) => c.resize(*len as usize, 0),
            }
        }
        cur
    }

    fn size_after(&self, n: usize) -> usize {
        let mut len = self.base.as_ref().map_or(0, |b| b.len());
        for s in &self.steps[..n] {
            match s {
                Step::Write(off, d) => len = len.max(*off as usize + d.len()),
                Step::Truncate(l) => len = *l as usize,
            }
        }
        len
    }

    /// Whether `got` (None: no object) is an acceptable state.
    fn accepts(&self, got: Option<&[u8]>) -> Result<(), String> {
        let lo = if self.closed {
            self.steps.len()
        } else {
            self.synced
        };
        let hi = self.steps.len();
        if got.is_none() && self.base.is_none() && lo == 0 {
            return Ok(());
        }
        let Some(got) = got else {
            return Err(format!("no object; want a state in {lo}..={hi}"));
        };
        for n in lo..=hi {
            if self.size_after(n) != got.len() {
                continue;
            }
            if self.state(n).as_deref().unwrap_or(&[]) == got {
                return Ok(());
            }
        }
        // The write in flight at the kill (never returned, not covered by
        // an fsync) may have reached the daemon in part: the kernel cuts a
        // write(2) into several WRITE requests (a first partial page of
        // its own when that page is not cached), so a prefix of it ending
        // at a page boundary may be in the file.
        if !self.closed
            && hi > lo
            && let Some(Step::Write(off, d)) = self.steps.last()
        {
            let before = self.state(hi - 1).unwrap_or_default();
            let page = 4096;
            let first = (off / page + 1) * page;
            for cut in (first..off + d.len() as u64).step_by(page as usize) {
                let mut c = before.clone();
                write_at(&mut c, *off, &d[..(cut - off) as usize]);
                if c == got {
                    return Ok(());
                }
            }
        }
        Err(format!(
            "{} bytes match no state {lo}..={hi} of {} (sizes {:?}; closed {}, synced {})",
            got.len(),
            hi,
            (lo..=hi).map(|n| self.size_after(n)).collect::<Vec<_>>(),
            self.closed,
            self.synced
        ))
    }

    fn begin(&mut self, what: String) {
        // The previous operation ended (its close returned Ok, or nothing
        // was written): its final state is the new base.
        if !self.steps.is_empty() {
            self.base = self.state(self.steps.len()).map(Arc::new);
        }
        self.steps.clear();
        self.synced = 0;
        self.closed = false;
        self.history.push(what);
    }
}

type Records = Arc<Mutex<BTreeMap<String, FileRec>>>;

fn close(f: fs::File) -> std::io::Result<()> {
    if unsafe { libc::close(f.into_raw_fd()) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// One workload operation on one file; Err when a syscall fails (the
/// daemon was killed).
fn operate(
    m_dir: &std::path::Path,
    rec: &Records,
    rng: &mut Rng,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    const NAMES: [&str; 8] = ["s0", "s1", "s2", "e0", "e1", "m0", "m1", "big"];
    let name = NAMES[rng.below(NAMES.len() as u64) as usize];
    let path = m_dir.join(name);
    let exists =
        rec.lock().unwrap()[name].base.is_some() || !rec.lock().unwrap()[name].steps.is_empty();
    let kind = rng.below(5);
    let seed = rng.next();
    // (open options, steps to do, fsync after step k)
    let size_class = if name.starts_with('m') || name == "big" {
        6 * MIB + rng.below(6) as usize * MIB
    } else {
        1 + rng.below(300 * KIB as u64) as usize
    };
    let cur_len = {
        let r = rec.lock().unwrap();
        let f = &r[name];
        f.size_after(f.steps.len())
    };
    let create = matches!((kind, exists), (0 | 1, _) | (_, false));
    let (what, plan): (&str, Vec<Step>) = if create {
        // New content (create, or O_TRUNC rewrite), written in order.
        let data = pattern(size_class, seed);
        let mut plan = vec![Step::Truncate(0)];
        for (i, c) in data.chunks(CHUNK).enumerate() {
            plan.push(Step::Write((i * CHUNK) as u64, Arc::new(c.to_vec())));
        }
        ("create/O_TRUNC", plan)
    } else if kind == 2 {
        let add = pattern(1 + rng.below(2 * MIB as u64) as usize, seed);
        let plan = add
            .chunks(CHUNK)
            .enumerate()
            .map(|(i, c)| Step::Write((cur_len + i * CHUNK) as u64, Arc::new(c.to_vec())))
            .collect();
        ("append", plan)
    } else {
        // Edit in place: a few chunks at random offsets.
        let plan = (0..1 + rng.below(4))
            .map(|i| {
                let off = rng.below(cur_len as u64 + 1);
                let len = 1 + rng.below(CHUNK as u64) as usize;
                Step::Write(off, Arc::new(pattern(len, seed ^ i)))
            })
            .collect();
        ("edit", plan)
    };
    let fsync_at = (rng.below(3) == 0).then(|| rng.below(plan.len() as u64) as usize);
    let push = |step: &Step| {
        rec.lock()
            .unwrap()
            .get_mut(name)
            .unwrap()
            .steps
            .push(step.clone())
    };
    rec.lock().unwrap().get_mut(name).unwrap().begin(format!(
        "{what} {} steps, fsync at {fsync_at:?}",
        plan.len()
    ));
    // The O_TRUNC is recorded before the open that does it.
    if create {
        push(&plan[0]);
    }
    let mut file = match what {
        "create/O_TRUNC" => fs::File::create(&path)?,
        "append" => fs::OpenOptions::new().append(true).open(&path)?,
        _ => fs::OpenOptions::new().write(true).open(&path)?,
    };
    for (i, step) in plan.iter().enumerate() {
        if stop.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("stopped"));
        }
        if let Step::Write(off, d) = step {
            push(step);
            if what == "append" {
                file.write_all(d)?;
            } else {
                file.write_all_at(d, *off)?;
            }
        }
        if fsync_at == Some(i) {
            file.sync_all()?;
            let mut r = rec.lock().unwrap();
            let f = r.get_mut(name).unwrap();
            f.synced = f.steps.len();
        }
    }
    close(file)?;
    rec.lock().unwrap().get_mut(name).unwrap().closed = true;
    Ok(())
}

/// kill -9 of the daemon; its mountpoint stays (dead: ENOTCONN) until
/// `umount -l`, so the workload cannot write beneath it meanwhile.
fn kill9(m: &Mount) {
    let pid = m.pid().expect("a running daemon");
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    m.wait_exit(Duration::from_secs(30));
}

fn check(b: &Bucket, rec: &BTreeMap<String, FileRec>) -> Vec<String> {
    rec.iter()
        .filter_map(|(k, f)| {
            f.accepts(b.get(k).as_deref())
                .err()
                .map(|e| format!("{k}: {e}; history {:?}", f.history))
        })
        .collect()
}

fn round(seed: u64) {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let versioned = seed.is_multiple_of(2);
    // Every third round with `-o passthrough` where the kernel has it:
    // the kernel writes new and O_TRUNC'd files straight to their staged
    // copies, on and on after the daemon is dead, through descriptors
    // opened before the kill.
    let passthrough = seed % 3 == 2 && passthrough_available();
    let b = Bucket::new(server(), "crash", versioned);
    let rec: Records = Arc::new(Mutex::new(BTreeMap::new()));
    {
        let mut r = rec.lock().unwrap();
        for n in ["s0", "s1", "s2", "m0", "m1"] {
            r.insert(n.to_string(), FileRec::default());
        }
        for (n, len) in [("e0", 200 * KIB), ("e1", 50 * KIB), ("big", 7 * MIB)] {
            let d = pattern(len, seed ^ len as u64);
            b.put(n, &d);
            r.insert(
                n.to_string(),
                FileRec {
                    base: Some(Arc::new(d)),
                    ..Default::default()
                },
            );
        }
    }
    // Multipart above 5 MiB, so multipart files stay small and quick.
    let m = Mount::new(
        &b,
        if passthrough {
            "part_size=5M,passthrough"
        } else {
            "part_size=5M"
        },
    );
    assert!(
        !passthrough || !m.log_text().contains("passthrough is off"),
        "passthrough is on: {}",
        m.log_text()
    );
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let worker = {
        let (dir, rec, stop) = (m.dir.clone(), rec.clone(), stop.clone());
        let mut wrng = Rng(rng.next() | 1);
        std::thread::spawn(move || {
            let mut ops = 0;
            while !stop.load(Ordering::Relaxed) && ops < 200 {
                if operate(&dir, &rec, &mut wrng, &stop).is_err() {
                    break;
                }
                ops += 1;
            }
            let _ = tx.send(ops);
        })
    };
    // The kill comes 0.3 to 6 s into the workload (seeded).
    let at = Duration::from_millis(300 + rng.below(5700));
    std::thread::sleep(at);
    kill9(&m);
    let killed = Instant::now();
    stop.store(true, Ordering::Relaxed);
    let ops = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the workload stops once the daemon is dead");
    let _ = worker.join();
    let _ = Command::new("umount").arg("-l").arg(&m.dir).status();
    let stopped = killed.elapsed();
    m.restart();
    let restarted = killed.elapsed();
    // Recovery may run in the background: wait (bounded) until every
    // file is in an acceptable state and no upload is open.
    let deadline = Instant::now() + Duration::from_secs(60);
    let rec = rec.lock().unwrap();
    let mut bad;
    loop {
        bad = check(&b, &rec);
        if bad.is_empty() && b.open_multipart_uploads() == 0 {
            break;
        }
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let settled = killed.elapsed();
    // Then a clean unmount: whatever it uploads must still be acceptable.
    let code = m.unmount();
    eprintln!(
        "crash round seed {seed} (passthrough {passthrough}): killed after {at:?}, {ops} operations done; \
         since the kill: workload stopped {stopped:?}, remounted {restarted:?}, \
         settled {settled:?}, unmounted {:?}",
        killed.elapsed()
    );
    let after = check(&b, &rec);
    let open = b.open_multipart_uploads();
    let beside: Vec<String> = b
        .keys("")
        .into_iter()
        .filter(|k| k.contains("bucketfs-recovered"))
        .collect();
    let beside_history: Vec<String> = beside
        .iter()
        .filter_map(|k| k.split(".bucketfs-recovered").next())
        .filter_map(|k| rec.get(k).map(|f| format!("{k}: {:?}", f.history)))
        .collect();
    assert!(
        bad.is_empty() && after.is_empty() && open == 0 && beside.is_empty() && code == Some(0),
        "crash round seed {seed} (killed after {at:?}, {ops} ops, versioned {versioned}, passthrough {passthrough}):\n\
         wrong after remount: {bad:#?}\nwrong after unmount: {after:#?}\n\
         open multipart uploads: {open}\nrecovered-beside keys: {beside:?} {beside_history:?}\nunmount exit: {code:?}\n\
         log tail:\n{}",
        m.log_text()
            .lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn crash_loop_kill_9_mid_workload_then_remount_loses_nothing_confirmed() {
    let rounds: u64 = std::env::var("BUCKETFS_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let base: u64 = std::env::var("BUCKETFS_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(9);
    for r in 0..rounds {
        round(base + r);
    }
}
