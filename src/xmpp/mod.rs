//! XMPP client-to-server (RFC 6120, RFC 6121).

pub mod framer;
pub mod sasl;
