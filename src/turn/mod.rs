//! The embedded STUN/TURN server (RFC 8489, RFC 8656) remote-control traffic is relayed through.
//!
//! - [`stun`]: the STUN message codec and ChannelData framing (sans-IO, no allocation on the
//!   ChannelData path).
//! - [`auth`]: long-term credentials (TURN REST API scheme with rotating secrets, static users),
//!   stateless expiring NONCEs, and the per-source limit on unauthenticated answers.
//! - [`peer`]: which peer addresses may be relayed to (private ranges refused by default).
//! - [`engine`]: the sans-IO allocation engine: packets and `now` in, packets out; permissions,
//!   channels, lifetimes, quotas, bandwidth caps.
//! - `mmsg`: batched UDP reads and writes (`recvmmsg`/`sendmmsg`) for the relay hot path.
//! - [`server`]: the thin Tokio layer: the UDP/TCP listener, relay sockets, timers.

pub mod auth;
pub mod engine;
mod mmsg;
pub mod peer;
pub mod server;
pub mod stun;
