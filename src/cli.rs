//! The command line. One shape for people and for mount(8):
//!
//! ```text
//! bucketfs [-f] [-o OPT[,OPT...]] BUCKET[:/PREFIX] MOUNTPOINT
//! mount.s3fs BUCKET[:/PREFIX] MOUNTPOINT [-sfnv] [-o OPTS]   (the same program)
//! ```
//!
//! Options after the positionals are accepted, as mount(8) passes them.

use clap::Parser;

use crate::config::{ConfigError, OPTION_HELP, Options};

#[derive(Parser, Debug)]
#[command(
    name = "bucketfs",
    version,
    about = "Mount an S3 bucket as a directory",
    after_help = OPTION_HELP
)]
pub struct Cli {
    /// BUCKET or BUCKET:/PREFIX (a key prefix mounted as the root)
    pub source: String,
    /// Existing directory to mount on
    pub mountpoint: std::path::PathBuf,
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

impl Cli {
    /// The mount's options, and notices about accepted no-op options.
    pub fn into_options(self) -> Result<(Options, Vec<String>, bool), ConfigError> {
        let mut o = Options::default();
        o.set_source(&self.source)?;
        o.mountpoint = self.mountpoint;
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
    fn unknown_option_is_an_error() {
        let cli = Cli::try_parse_from(["bucketfs", "-f", "-o", "nosuchthing", "b", "/m"]).unwrap();
        assert!(cli.into_options().is_err());
    }
}
