//! The `nearby` wire protocol, as serde types.
//!
//! Two halves: [`ws`] for the JSON text frames of the WebSocket, [`rest`] for
//! the JSON bodies of the REST API. `docs/protocol.md` is the prose version
//! of this crate; keep the two in step.
//!
//! **Architecture invariant:** types and parsing only; no I/O.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod rest;
pub mod ws;

/// Distances go on the wire rounded to decimetres: GPS is not more precise,
/// and shorter numbers make smaller frames.
pub fn round_distance(m: f64) -> f64 {
    (m * 10.0).round() / 10.0
}
