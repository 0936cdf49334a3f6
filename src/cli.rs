//! The command line. One shape for people and for mount(8):
//!
//! ```text
//! bucketfs [-f] [-o OPT[,OPT...]] BUCKET[:/PREFIX] MOUNTPOINT
//! bucketfs [-f] [-o OPT[,OPT...]] s3://[BUCKET[/PREFIX/]] MOUNTPOINT
//! mount.s3fs BUCKET[:/PREFIX] MOUNTPOINT [-sfnv] [-o OPTS]   (the same program)
//! bucketfs status MOUNTPOINT
//! bucketfs url PATH [--expires SECONDS]
//! bucketfs help [COMMAND]
//! ```
//!
//! Options after the positionals are accepted, as mount(8) passes them. A
//! first word that names a subcommand (`status`, `help`) is that
//! subcommand; a bucket with such a name is mounted as `bucketfs -- status DIR`
//! or `bucketfs s3://status/ DIR`. `s3://` alone mounts every bucket.

use clap::{Parser, Subcommand};

use crate::config::{ConfigError, OPTION_HELP, Options};

#[derive(Parser, Debug)]
#[command(
    name = "bucketfs",
    version,
    about = "Mount an S3 bucket as a directory",
    override_usage = "bucketfs [OPTIONS] BUCKET[:/PREFIX] MOUNTPOINT\n       \
                      bucketfs [OPTIONS] s3://BUCKET/PREFIX/ MOUNTPOINT\n       \
                      bucketfs [OPTIONS] s3:// MOUNTPOINT     (every bucket of the account)\n       \
                      bucketfs status MOUNTPOINT\n       \
                      bucketfs url PATH [--expires SECONDS]\n       \
                      bucketfs help [COMMAND]",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = OPTION_HELP
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// BUCKET or BUCKET:/PREFIX (a key prefix mounted as the root), the
    /// same as s3://BUCKET/PREFIX/; s3:// alone: every bucket of the
    /// account, each a top-level directory (mkdir makes a bucket, rmdir
    /// removes an empty one)
    #[arg(required = true, value_name = "BUCKET[:/PREFIX]")]
    pub source: Option<String>,
    /// Existing directory to mount on
    #[arg(required = true, value_name = "MOUNTPOINT")]
    pub mountpoint: Option<std::path::PathBuf>,
    /// Stay in the foreground (default: return once the mount is live)
    #[arg(short = 'f', long)]
    pub foreground: bool,
    /// Mount options, comma-separated (see below); may be repeated
    #[arg(short = 'o', value_name = "OPT[,OPT...]")]
    pub options: Vec<String>,
    /// S3 endpoint URL (same as -o endpoint=URL)
    #[arg(long)]
    pub endpoint: Option<String>,
    /// Region (same as -o region=NAME)
    #[arg(long)]
    pub region: Option<String>,
    /// Path-style addressing (same as -o path_style)
    #[arg(long)]
    pub path_style: bool,
    /// Read-only (same as -o ro)
    #[arg(long)]
    pub read_only: bool,
    /// More log output (debug)
    #[arg(short = 'v', long)]
    pub verbose: bool,
    /// mount(8) helper flag: sloppy options (accepted, ignored)
    #[arg(short = 's', hide = true)]
    pub sloppy: bool,
    /// mount(8) helper flag: do not write mtab (accepted, ignored)
    #[arg(short = 'n', hide = true)]
    pub no_mtab: bool,
    /// mount(8) helper: the filesystem type (accepted, ignored)
    #[arg(short = 't', hide = true)]
    pub fs_type: Option<String>,
    /// mount(8) helper: a mount namespace (accepted, ignored)
    #[arg(short = 'N', hide = true)]
    pub namespace: Option<String>,
}

/// What `bucketfs` does besides mounting.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Report on a live mount: bucket, endpoint, uptime, files not yet
    /// uploaded, block cache use and the S3 requests made
    #[command(
        long_about = "Report on a live mount: the bucket, endpoint, uptime, the files open \
                      for writing with data not yet in S3, block cache use and hit rate, and \
                      the S3 requests made by type. Reads the mount's status socket (under \
                      $XDG_RUNTIME_DIR/bucketfs or /run/bucketfs); never shows credentials."
    )]
    Status {
        /// The directory a bucketfs mount is mounted on
        mountpoint: std::path::PathBuf,
    },
    /// Print a presigned URL to GET a file of a live mount
    #[command(
        long_about = "Print a presigned GET URL for a file under a live bucketfs mount, so \
                      anyone with the URL can download it until it expires. The URL is made \
                      by the daemon that serves the mount (it holds the credentials), through \
                      its status socket. A file under .versions/NAME/ gets a URL of that \
                      version; on a requester_pays mount the URL carries \
                      x-amz-request-payer=requester in its query. An SSE-C object, a delete \
                      marker or a path outside any bucketfs mount is an error."
    )]
    Url {
        /// A file under a bucketfs mount
        path: std::path::PathBuf,
        /// How long the URL works, in seconds (1..=604800, seven days)
        #[arg(long, default_value_t = 3600, value_name = "SECONDS")]
        expires: u64,
    },
}

impl Cli {
    /// The mount's options, and notices about accepted no-op options.
    pub fn into_options(self) -> Result<(Options, Vec<String>, bool), ConfigError> {
        let mut o = Options::default();
        // clap requires both when there is no subcommand.
        o.set_source(self.source.as_deref().unwrap_or_default())?;
        o.mountpoint = self.mountpoint.unwrap_or_default();
        o.foreground = self.foreground;
        let mut notices = Vec::new();
        for opts in &self.options {
            notices.extend(o.apply(opts)?);
        }
        if let Some(e) = self.endpoint {
            notices.extend(o.apply(&format!("endpoint={e}"))?);
        }
        if let Some(r) = self.region {
            o.region = Some(r);
        }
        o.path_style |= self.path_style;
        o.read_only |= self.read_only;
        o.validate()?;
        Ok((o, notices, self.verbose))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helper_form_with_options_after_positionals() {
        let cli = Cli::try_parse_from([
            "mount.s3fs",
            "bucket:/p",
            "/mnt/x",
            "-n",
            "-o",
            "rw,_netdev,endpoint=http://127.0.0.1:1,path_style",
        ])
        .unwrap();
        let (o, _, _) = cli.into_options().unwrap();
        assert_eq!((o.bucket.as_str(), o.prefix.as_str()), ("bucket", "p/"));
        assert_eq!(o.endpoint.as_deref(), Some("http://127.0.0.1:1"));
        assert!(o.path_style && !o.foreground);
    }

    #[test]
    fn status_is_a_subcommand_with_its_own_help() {
        let cli = Cli::try_parse_from(["bucketfs", "status", "/mnt/x"]).unwrap();
        assert!(
            matches!(cli.command, Some(Command::Status { ref mountpoint }) if mountpoint.as_os_str() == "/mnt/x")
        );
        let e = Cli::try_parse_from(["bucketfs", "status", "--help"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::DisplayHelp);
        assert!(e.to_string().contains("status <MOUNTPOINT>"), "{e}");
        let e = Cli::try_parse_from(["bucketfs", "help"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::DisplayHelp);
    }

    #[test]
    fn the_mount_form_is_unchanged() {
        let cli = Cli::try_parse_from(["bucketfs", "-f", "-o", "ro", "b:/p", "/m"]).unwrap();
        assert!(cli.command.is_none());
        let (o, _, _) = cli.into_options().unwrap();
        assert!(o.foreground && o.read_only);
        // mount(8)'s helper flags, after the positionals.
        let cli = Cli::try_parse_from([
            "mount.s3fs",
            "b",
            "/m",
            "-s",
            "-n",
            "-t",
            "s3fs",
            "-N",
            "/proc/1/ns/mnt",
            "-o",
            "rw",
        ])
        .unwrap();
        assert!(cli.command.is_none() && cli.sloppy && cli.no_mtab);
        // A bucket named like a subcommand, after --.
        let cli = Cli::try_parse_from(["bucketfs", "--", "status", "/m"]).unwrap();
        let (o, _, _) = cli.into_options().unwrap();
        assert_eq!(o.bucket, "status");
        // Without a mountpoint it is an error, not a mount of "".
        assert!(Cli::try_parse_from(["bucketfs", "b"]).is_err());
        assert!(Cli::try_parse_from(["bucketfs"]).is_err());
    }

    #[test]
    fn unknown_option_is_an_error() {
        let cli = Cli::try_parse_from(["bucketfs", "-f", "-o", "nosuchthing", "b", "/m"]).unwrap();
        assert!(cli.into_options().is_err());
    }
}
