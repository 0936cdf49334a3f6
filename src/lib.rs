//! bucketfs: a FUSE filesystem that mounts an S3 bucket as a directory.
//!
//! Data flows one way: `fuse` (the adapter) → `fs` (the core) → `cache`
//! and `write` → `store` (the `ObjectStore` trait: S3 or in memory). A
//! module depends only on those to its right. See DESIGN.md in shared/.

pub mod buckets;
pub mod cache;
pub mod cli;
pub mod config;
pub mod error;
pub mod fs;
pub mod fuse;
mod fuse_modes;
pub mod mount;
pub mod private;
pub mod status;
pub mod store;
pub mod write;

/// Lowercase hex of `bytes` (hashes in file names, ETags).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
