//! Caches between the core and the store. Metadata (attributes and
//! listings with a TTL, negative entries) is kept in the core's inode
//! table; this module holds the block cache for object data.

pub mod block;
mod disk;
