//! The embedded location cache: what `nearby serve` uses when no Redis is
//! configured (the embedded bus is `nearby-hub`'s in-process broker).
//!
//! [`MemoryCache`] is a sharded map with per-entry deadlines, swept by one
//! background task (reads also ignore expired entries, so the sweep only
//! bounds memory, never correctness).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod cache;

pub use cache::MemoryCache;
