//! XMPP client-to-server (RFC 6120, RFC 6121).
//!
//! - [`framer`]: sans-IO bytes → stream header / raw stanzas, with the RFC 6120 §11 restrictions and limits.
//! - [`c2s`]: sans-IO stream negotiation and session state machine.
//! - [`sasl`]: sans-IO SASL mechanisms.
//! - [`router`]: the session registry and RFC 6121 §8.5 delivery rules.
//! - [`server_iq`]: IQs the server answers itself (ping, disco, roster, session, XEP-0215).
//! - [`extdisco`]: XEP-0215 STUN/TURN services and credentials.
//! - [`conn`]: the thin Tokio task per connection.

pub mod c2s;
pub mod conn;
pub mod extdisco;
pub mod framer;
pub mod router;
pub mod sasl;
pub mod server_iq;
pub mod sm;
