//! A client of the `nearby` server, over real HTTP and WebSocket, written
//! against `docs/protocol.md`.
//!
//! * [`Client`] — the REST calls (accounts, friends, sharing, nearby), one
//!   method per route, and [`Client::connect`] for the live feed.
//! * [`Live`] — one open WebSocket: send locations, receive frames.
//! * [`ClientError`] — every failure, as one line a person can read; the
//!   server's `{"code","message"}` bodies are kept as they are.
//! * [`config`] — the login saved between runs of the command line.
//! * [`cli`] — `nearby client …`: the subcommands and their output.
//!
//! The wire types are `nearby-proto`'s, so the client and the server cannot
//! drift apart silently; frames the client does not know are passed through
//! as text, as the protocol asks (either side may add fields or types).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod api;
pub mod backoff;
pub mod cli;
pub mod config;
mod error;
mod live;

pub use api::Client;
pub use error::ClientError;
pub use live::{Incoming, Live};

pub use nearby_core::{FriendStatus, LeftReason, UserId};
pub use nearby_proto::rest::{FriendView, HistoryPoint, SessionCreated, UserView};
pub use nearby_proto::ws::{NearbyFriend, ServerFrame};
