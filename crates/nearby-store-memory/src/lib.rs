//! Embedded adapters: what `nearby serve` uses when no Redis is configured.
//!
//! * [`MemoryCache`] — the location cache: a sharded map with per-entry
//!   deadlines, swept by one background task (reads also ignore expired
//!   entries, so the sweep only bounds memory, never correctness).
//! * [`LocalHub`] — node-local fan-out: channel → subscribers. It is the
//!   whole bus in embedded mode ([`MemoryBus`]); a broker adapter (Redis)
//!   puts the same hub behind its subscriber connections, subscribing to a
//!   channel upstream only when the hub's first local subscriber arrives.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod cache;
mod hub;

pub use cache::MemoryCache;
pub use hub::{LocalHub, MemoryBus};
