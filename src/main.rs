//! The `bucketfs` binary, also installed as `/sbin/mount.s3fs`: mount(8)
//! calls helpers as `mount.s3fs SPEC DIR [-sfnv] [-o OPTS]`, where `-f`
//! means "fake" (do everything but mount). The same command line serves
//! both; `bucketfs status MOUNTPOINT` reports on a live mount.

use std::path::Path;
use std::process::ExitCode;

use clap::Parser;

use bucketfs::cli::{Cli, Command};
use bucketfs::{mount, status};

/// mimalloc: every S3 request allocates and frees many small buffers (the
/// SDK's request building, headers, signing); glibc's malloc took about a
/// fifth of the daemon's CPU in a cold `ls -l` of 10,000 objects.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
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
