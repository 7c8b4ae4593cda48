//! Tern: an XMPP push and remote-control relay server.
//!
//! Layout (one concern per module):
//! - [`config`]: TOML + environment configuration.
//! - [`tls`]: certificate loading (Tigase bundles, SNI, reload) and the rustls acceptors.
//! - [`xmpp`]: the sans-IO stream framer and c2s state machine, SASL, the session router, and the
//!   thin Tokio connection task.
//! - [`store`]: the embedded account store.
//! - [`auth`]: credential sources (account store, device secret) and failed-login throttling.
//! - [`server`]: wires listeners, router and shutdown together.
//! - [`turn`]: the embedded STUN/TURN server.

pub mod auth;
pub mod config;
pub mod http;
pub mod limits;
pub mod server;
pub mod store;
pub mod tls;
pub mod turn;
pub mod xmpp;
