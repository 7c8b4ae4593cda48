//! TLS: certificates and acceptors.
