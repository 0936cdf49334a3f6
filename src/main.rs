//! The `bucketfs` binary, also installed as `/sbin/mount.s3fs`: mount(8)
//! calls helpers as `mount.s3fs SPEC DIR [-sfnv] [-o OPTS]`, where `-f`
//! means "fake" (do everything but mount). The same command line serves
//! both; `bucketfs status MOUNTPOINT` reports on a live mount.

use std::path::Path;
use std::process::ExitCode;

use clap::Parser;

use bucketfs::cli::{Cli, Command};
use bucketfs::{mount, status};

/// jemalloc: every S3 request allocates and frees many small buffers (the
/// SDK's request building, headers, signing); glibc's malloc took about a
/// fifth of the daemon's CPU in a cold `ls -l` of 10,000 objects. Unlike
/// mimalloc, which it replaced, it can be told to give back pages freed by
/// any thread: mimalloc kept a dropped 200,000-entry listing's memory
/// (250 MiB) while the threads that had allocated it sat idle.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read when it starts (`_RJEM_MALLOC_CONF` overrides):
/// few arenas, for a daemon that mostly waits on the network; slabs of 16
/// pages for every small size class (1 to 8 by default), so a large
/// listing's nodes take a sixteenth of the slabs, each with a header in
/// jemalloc's own metadata, which it never gives back. A 200,000-entry
/// listing here: peak RSS 193–194 → 173–189 MiB, after the sweep
/// 27.7–28.6 → 24.9–26.7 MiB (2 runs each, /tmp scripts); the daemon's
/// CPU for a cold `ls -l` of 10,000 entries within its noise.
///
/// Thread caches of at most 32 objects of each small size and 4 of each
/// large one (200 and 20 by default): a thread that freed part of a burst
/// and then sat idle keeps its cache, and each cached object keeps its
/// slab's pages resident. The same listing, then `drop_caches`, then the
/// sweep: 21.4–22.3 → 21.0–21.5 MiB from 18.2–18.4 mounted (+16–18%
/// against +17–21%; 6 and 4 runs, /tmp scripts on Garage); the listing
/// took the same time (12.1 s against 11.9–12.1 s, a debug Garage).
///
/// At most one background thread (see `start_background_purge`).
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8] = b"narenas:4,slab_sizes:1-4096:16,tcache_nslots_small_max:32,\
tcache_nslots_large:4,max_background_threads:1\0";

/// Starts jemalloc's background thread, which purges freed pages as they
/// age (10 s) also while every other thread sits idle: without it
/// jemalloc purges only when a thread allocates, so what a burst freed
/// stayed resident in an idle daemon. An `ls -f` of 2,000 entries here,
/// RSS 60 s later: 26.3 → 23.1 MiB (18.2 mounted); 60,000 entries: 72 →
/// 64 MiB in the first 30 s, before the inode table's sweep gives the
/// rest back. Started by the mount once it runs as the daemon, not from
/// `malloc_conf`: jemalloc would start it before `main`, and a thread
/// does not survive the fork into the background (jemalloc turns it off
/// in the child).
fn start_background_purge() {
    let mut on = true;
    let r = unsafe {
        tikv_jemalloc_sys::mallctl(
            c"background_thread".as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            (&raw mut on).cast(),
            std::mem::size_of::<bool>(),
        )
    };
    if r != 0 {
        tracing::debug!(errno = r, "jemalloc: no background purging");
    }
}

/// Hands the pages jemalloc holds unused back to the system, at once.
/// jemalloc purges on its own only as threads allocate; the threads that
/// allocated a large listing may sit idle once the table has dropped it.
fn release_free_memory() {
    // What this thread freed last (the table's nodes, a listing) sits in
    // its cache of free objects, not in an arena: hand it back first.
    // Then every arena (MALLCTL_ARENAS_ALL) gives its unused pages back.
    for name in [c"thread.tcache.flush", c"arena.4096.purge"] {
        let r = unsafe {
            tikv_jemalloc_sys::mallctl(
                name.as_ptr(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            )
        };
        if r != 0 {
            tracing::debug!(errno = r, ?name, "jemalloc: could not give memory back");
        }
    }
}

fn main() -> ExitCode {
    bucketfs::fs::set_release_free_memory(release_free_memory);
    bucketfs::fs::set_background_purge(start_background_purge);
    let args: Vec<String> = std::env::args().collect();
    let cli = Cli::parse();
    if let Some(Command::Url { path, expires }) = &cli.command {
        return match status::presigned_url(path, *expires) {
            Ok(url) => {
                println!("{url}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("bucketfs: {e}");
                ExitCode::from(1)
            }
        };
    }
    if let Some(Command::Status { mountpoint }) = &cli.command {
        return match status::print(mountpoint) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bucketfs: {e}");
                ExitCode::from(1)
            }
        };
    }
    let helper = args
        .first()
        .and_then(|a| Path::new(a).file_name())
        .is_some_and(|n| n.to_string_lossy().starts_with("mount."));
    let (mut opts, notices, verbose) = match cli.into_options() {
        Ok(x) => x,
        Err(e) => {
            eprintln!("bucketfs: {e}");
            return ExitCode::from(mount::EXIT_MOUNT_FAILED);
        }
    };
    for n in notices {
        eprintln!("bucketfs: {n}");
    }
    if helper {
        if opts.foreground {
            // mount -f: a fake mount; the options were checked above.
            return ExitCode::SUCCESS;
        }
        opts.foreground = false;
    }
    ExitCode::from(mount::run(opts, verbose))
}
