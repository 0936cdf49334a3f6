//! The `bucketfs` binary, also installed as `/sbin/mount.s3fs` (mount(8)
//! calls helpers as `mount.s3fs SPEC DIR [-sfnv] [-o OPTS]`; the same
//! command line serves both).

use std::process::ExitCode;

use clap::Parser;

use bucketfs::cli::Cli;
use bucketfs::mount;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (opts, notices, verbose) = match cli.into_options() {
        Ok(x) => x,
        Err(e) => {
            eprintln!("bucketfs: {e}");
            return ExitCode::from(mount::EXIT_MOUNT_FAILED);
        }
    };
    for n in notices {
        eprintln!("bucketfs: {n}");
    }
    ExitCode::from(mount::run(opts, verbose))
}
