//! Sans-IO server side of SASL for XMPP (RFC 6120 §6, RFC 4422).
//!
//! Mechanisms: SCRAM-SHA-256 (RFC 7677), SCRAM-SHA-1 (RFC 5802) and PLAIN (RFC 4616). Channel binding is
//! not implemented, so the `-PLUS` variants are never offered and a client that asks for channel binding
//! (`p=` GS2 flag) is refused; `n` and `y` flags are accepted (RFC 5802 §6: `y` means "the client supports
//! channel binding but thinks the server does not", which is true here).
//!
//! The caller owns all IO and the base64 transport encoding of RFC 6120 §6.4.2: it decodes the character
//! data of `<auth/>` / `<response/>` and encodes what [`Step`] returns. RFC 6120 §6.4.2 also says that an
//! `<auth/>` whose content is the single character `=` carries an *empty* initial response, while an
//! `<auth/>` with no content carries *no* initial response: the caller maps `=` to `Some(&[])` and empty
//! content to `None` when calling [`SaslServer::start`]. Likewise an empty [`Step::Challenge`] is sent as
//! `<challenge/>` with no content and `additional: Some(..)` in [`Step::Success`] goes base64-encoded into
//! `<success/>` (RFC 6120 §6.3.10).
//!
//! PBKDF2 work happens inside [`CredentialLookup`] implementations (and [`ScramCredentials::derive`]), which
//! can take milliseconds; async callers should run `start`/`step` on a blocking-capable thread.

use std::fmt;
use std::sync::OnceLock;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// A SASL mechanism this server implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mechanism {
    /// RFC 7677.
    ScramSha256,
    /// RFC 5802.
    ScramSha1,
    /// RFC 4616. Only acceptable over TLS (RFC 6120 §13.8: PLAIN exposes the password to the server and
    /// to the wire without a confidentiality layer).
    Plain,
}

impl Mechanism {
    /// The registered IANA mechanism name, as sent in `<mechanism/>` and the `mechanism` attribute.
    pub fn name(&self) -> &'static str {
        match self {
            Mechanism::ScramSha256 => "SCRAM-SHA-256",
            Mechanism::ScramSha1 => "SCRAM-SHA-1",
            Mechanism::Plain => "PLAIN",
        }
    }

    /// Parses a mechanism name. Exact match: RFC 4422 §3.1 names are upper case and the client must echo
    /// one of the advertised names (RFC 6120 §6.4.2); anything else is `invalid-mechanism` for the caller.
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "SCRAM-SHA-256" => Some(Mechanism::ScramSha256),
            "SCRAM-SHA-1" => Some(Mechanism::ScramSha1),
            "PLAIN" => Some(Mechanism::Plain),
            _ => None,
        }
    }

    fn scram_hash(&self) -> Option<ScramHash> {
        match self {
            Mechanism::ScramSha256 => Some(ScramHash::Sha256),
            Mechanism::ScramSha1 => Some(ScramHash::Sha1),
            Mechanism::Plain => None,
        }
    }
}

impl fmt::Display for Mechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Mechanisms offered inside TLS, in preference order (strongest first, RFC 6120 §6.3.3 lets the server
/// order them). PLAIN is only ever offered over TLS; the caller never offers any mechanism before TLS
/// (RFC 6120 §5.3.1 mandatory-to-negotiate STARTTLS).
pub const OFFERED: &[Mechanism] = &[
    Mechanism::ScramSha256,
    Mechanism::ScramSha1,
    Mechanism::Plain,
];

/// What the caller sends next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send `<challenge/>` with this payload (base64-encoded by the caller; empty → no content).
    Challenge(Vec<u8>),
    /// Send `<success/>` (RFC 6120 §6.3.10) with `additional` data if any (SCRAM `v=` server-final
    /// message). `username` is the authenticated localpart, already case-folded to lower case.
    Success {
        username: String,
        additional: Option<Vec<u8>>,
    },
    /// Send `<failure/>` with this condition (RFC 6120 §6.5).
    Failure(SaslFailure),
}

/// SASL failure conditions of RFC 6120 §6.5 that this server can produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SaslFailure {
    /// §6.5.10: wrong credentials or unknown user (deliberately indistinguishable).
    NotAuthorized,
    /// §6.5.6: the request could not be parsed.
    MalformedRequest,
    /// §6.5.5: authzid is not the authenticated identity's bare JID.
    InvalidAuthzid,
    /// §6.5.6 (`invalid-mechanism`): the mechanism is not offered.
    InvalidMechanism,
    /// §6.5.1: the client sent `<abort/>`.
    Aborted,
    /// §6.5.4: the mechanism needs TLS which is not in place.
    EncryptionRequired,
    /// §6.5.9: a server-side problem (e.g. the account store is unavailable).
    TemporaryAuthFailure,
}

impl SaslFailure {
    /// The RFC 6120 §6.5 element name, as a child of `<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>`.
    pub fn condition(&self) -> &'static str {
        match self {
            SaslFailure::NotAuthorized => "not-authorized",
            SaslFailure::MalformedRequest => "malformed-request",
            SaslFailure::InvalidAuthzid => "invalid-authzid",
            SaslFailure::InvalidMechanism => "invalid-mechanism",
            SaslFailure::Aborted => "aborted",
            SaslFailure::EncryptionRequired => "encryption-required",
            SaslFailure::TemporaryAuthFailure => "temporary-auth-failure",
        }
    }
}

impl fmt::Display for SaslFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.condition())
    }
}

/// The hash function of a SCRAM family member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScramHash {
    /// SCRAM-SHA-1 (RFC 5802).
    Sha1,
    /// SCRAM-SHA-256 (RFC 7677).
    Sha256,
}

impl ScramHash {
    /// Output length of H() in bytes, which is also the length of keys, signatures and proofs.
    pub fn output_len(&self) -> usize {
        match self {
            ScramHash::Sha1 => 20,
            ScramHash::Sha256 => 32,
        }
    }

    fn tag(&self) -> &'static str {
        match self {
            ScramHash::Sha1 => "sha1",
            ScramHash::Sha256 => "sha256",
        }
    }

    /// H(data).
    fn h(&self, data: &[u8]) -> Vec<u8> {
        match self {
            ScramHash::Sha1 => Sha1::digest(data).to_vec(),
            ScramHash::Sha256 => Sha256::digest(data).to_vec(),
        }
    }

    /// HMAC(key, data).
    fn hmac(&self, key: &[u8], data: &[u8]) -> Vec<u8> {
        match self {
            ScramHash::Sha1 => {
                let mut m =
                    <Hmac<Sha1> as Mac>::new_from_slice(key).expect("HMAC accepts any key length");
                m.update(data);
                m.finalize().into_bytes().to_vec()
            }
            ScramHash::Sha256 => {
                let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key)
                    .expect("HMAC accepts any key length");
                m.update(data);
                m.finalize().into_bytes().to_vec()
            }
        }
    }

    /// Hi(password, salt, i) of RFC 5802 §2.2, which is PBKDF2 with HMAC-H and dkLen = output length.
    fn hi(&self, password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
        let mut out = vec![0u8; self.output_len()];
        match self {
            ScramHash::Sha1 => pbkdf2::pbkdf2_hmac::<Sha1>(password, salt, iterations, &mut out),
            ScramHash::Sha256 => {
                pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut out)
            }
        }
        out
    }
}

/// What the server stores per user and hash for SCRAM (RFC 5802 §3): never the password itself, only
/// StoredKey = H(ClientKey) (verifies the client proof) and ServerKey (signs the server-final message).
/// Serialised with base64 byte strings so `accounts.json` stays readable.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ScramCredentials {
    #[serde(with = "b64_bytes")]
    pub salt: Vec<u8>,
    pub iterations: u32,
    #[serde(with = "b64_bytes")]
    pub stored_key: Vec<u8>,
    #[serde(with = "b64_bytes")]
    pub server_key: Vec<u8>,
}

impl fmt::Debug for ScramCredentials {
    /// Keys are redacted: a StoredKey/ServerKey pair lets anyone impersonate the server to clients and
    /// brute-force the password offline, so it must not end up in logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramCredentials")
            .field("salt", &B64.encode(&self.salt))
            .field("iterations", &self.iterations)
            .field("stored_key", &"<redacted>")
            .field("server_key", &"<redacted>")
            .finish()
    }
}

impl ScramCredentials {
    /// Derives the stored SCRAM data from a password (RFC 5802 §3):
    /// SaltedPassword = Hi(password, salt, i), ClientKey = HMAC(SaltedPassword, "Client Key"),
    /// StoredKey = H(ClientKey), ServerKey = HMAC(SaltedPassword, "Server Key").
    ///
    /// The password is used as its UTF-8 bytes without SASLprep (RFC 4013); this is identical for ASCII
    /// passwords, which is what device credentials (hex) and operator-set passwords are in practice.
    /// An iteration count of 0 is raised to 1, since RFC 5802 §5.1 requires a positive `i`.
    pub fn derive(password: &str, salt: &[u8], iterations: u32, hash: ScramHash) -> Self {
        let iterations = iterations.max(1);
        let salted = hash.hi(password.as_bytes(), salt, iterations);
        let client_key = hash.hmac(&salted, b"Client Key");
        let stored_key = hash.h(&client_key);
        let server_key = hash.hmac(&salted, b"Server Key");
        Self {
            salt: salt.to_vec(),
            iterations,
            stored_key,
            server_key,
        }
    }
}

/// Serde helper: `Vec<u8>` as a standard base64 string.
mod b64_bytes {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as B64;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&B64.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        B64.decode(s.as_bytes()).map_err(serde::de::Error::custom)
    }
}

/// What a mechanism needs to know about a user. Implemented by [`crate::auth::Authenticator`].
///
/// Usernames passed in are SCRAM-decoded / PLAIN authcids case-folded to lower case; they are *not*
/// otherwise validated here, so implementations must treat anything that is not a valid localpart as an
/// unknown user.
pub trait CredentialLookup {
    /// SCRAM stored data for `username` with the given hash; None if unknown (the SCRAM exchange then
    /// still proceeds with a fake salt derived deterministically from the username, and fails at the end —
    /// no user enumeration, RFC 5802 §9 / RFC 7677 §5).
    fn scram(&self, username: &str, hash: ScramHash) -> Option<ScramCredentials>;

    /// PLAIN: true iff the password is right (constant-time comparison inside).
    fn verify_plain(&self, username: &str, password: &str) -> bool;

    /// Iteration count advertised to unknown users. It should equal what real accounts use, otherwise the
    /// `i=` attribute tells them apart. Default: 4096, the RFC 7677 §4 minimum.
    fn unknown_user_iterations(&self, _hash: ScramHash) -> u32 {
        4096
    }

    /// Whether a non-empty authzid is acceptable for the authenticated `username`. RFC 6120 §6.3.8 lets a
    /// client name an authorization identity; this server only allows the user's own bare JID. The default
    /// compares the localpart (case-insensitively) and requires a non-empty domainpart and no resource; an
    /// implementation that knows the served domain should also compare the domain.
    fn authzid_matches(&self, username: &str, authzid: &str) -> bool {
        match authzid.split_once('@') {
            Some((local, domain)) => {
                local.to_lowercase() == username
                    && !domain.is_empty()
                    && !domain.contains(['/', '@'])
            }
            None => false,
        }
    }
}

/// Per-process secret behind fake salts for unknown users. Stable for the lifetime of the process, so
/// repeated probes for the same name see the same salt (as for a real user); not derivable by a client, so
/// the salt cannot be predicted and compared.
fn fake_salt_key() -> &'static [u8; 32] {
    static KEY: OnceLock<[u8; 32]> = OnceLock::new();
    KEY.get_or_init(rand::random)
}

/// Credentials for a user that does not exist: a deterministic fake salt and keys nobody knows the
/// password for, so the exchange runs the same code path as for a real user and fails at the proof.
fn fake_credentials(username: &str, hash: ScramHash, iterations: u32) -> ScramCredentials {
    let key = fake_salt_key();
    let h = ScramHash::Sha256;
    let salt_full = h.hmac(
        key,
        format!("tern-fake-salt:{}:{username}", hash.tag()).as_bytes(),
    );
    let stored = h.hmac(
        key,
        format!("tern-fake-stored:{}:{username}", hash.tag()).as_bytes(),
    );
    let server = h.hmac(
        key,
        format!("tern-fake-server:{}:{username}", hash.tag()).as_bytes(),
    );
    let n = hash.output_len();
    ScramCredentials {
        salt: salt_full[..16].to_vec(),
        iterations: iterations.max(1),
        stored_key: stored[..n].to_vec(),
        server_key: server[..n].to_vec(),
    }
}

/// A SCRAM exchange waiting for the client-final message.
struct ScramPending {
    hash: ScramHash,
    username: String,
    gs2_header: String,
    client_first_bare: String,
    server_first: String,
    nonce: String,
    creds: ScramCredentials,
    /// False when `creds` are fake: the exchange must fail at the end.
    known: bool,
}

enum State {
    /// Waiting for the client-first message (no initial response was given).
    ScramFirst(ScramHash),
    ScramFinal(Box<ScramPending>),
    /// Waiting for the PLAIN message (no initial response was given).
    Plain,
    /// Success or failure has been returned; anything further is a protocol error.
    Done,
}

/// One SASL negotiation (RFC 6120 §6.4). Create with [`SaslServer::start`] on `<auth/>`, feed every
/// `<response/>` to [`SaslServer::step`].
pub struct SaslServer {
    mech: Mechanism,
    server_nonce: String,
    state: State,
}

impl fmt::Debug for SaslServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::ScramFirst(_) => "await-client-first",
            State::ScramFinal(_) => "await-client-final",
            State::Plain => "await-plain",
            State::Done => "done",
        };
        f.debug_struct("SaslServer")
            .field("mech", &self.mech)
            .field("state", &state)
            .finish()
    }
}

impl SaslServer {
    /// Starts a negotiation for `mech` with the optional initial response (RFC 4422 §5, RFC 6120 §6.4.2;
    /// the caller maps `=` to `Some(&[])`). `nonce` is the server's random contribution to the SCRAM nonce
    /// (RFC 5802 §5.1 `r=`); it is injected so the caller uses a CSPRNG and tests are reproducible. It is
    /// base64-encoded into 24 printable characters (never `,`).
    pub fn start(
        mech: Mechanism,
        initial: Option<&[u8]>,
        creds: &dyn CredentialLookup,
        nonce: [u8; 18],
    ) -> (Self, Step) {
        Self::start_with_server_nonce(mech, initial, creds, B64.encode(nonce))
    }

    /// [`SaslServer::start`] with the printable server nonce given verbatim (for RFC test vectors).
    fn start_with_server_nonce(
        mech: Mechanism,
        initial: Option<&[u8]>,
        creds: &dyn CredentialLookup,
        server_nonce: String,
    ) -> (Self, Step) {
        let state = match mech.scram_hash() {
            Some(h) => State::ScramFirst(h),
            None => State::Plain,
        };
        let mut server = SaslServer {
            mech,
            server_nonce,
            state,
        };
        let step = match initial {
            // No initial response: RFC 4422 §5 says the server sends an empty challenge and the client's
            // first message arrives as a response.
            None => Step::Challenge(Vec::new()),
            Some(data) => server.step(data, creds),
        };
        (server, step)
    }

    /// The mechanism being negotiated.
    pub fn mechanism(&self) -> Mechanism {
        self.mech
    }

    /// Whether the negotiation has ended (success or failure was returned).
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Processes one client message (decoded `<response/>` payload).
    pub fn step(&mut self, response: &[u8], creds: &dyn CredentialLookup) -> Step {
        let state = std::mem::replace(&mut self.state, State::Done);
        let (next, step) = match state {
            State::ScramFirst(hash) => match self.scram_first(hash, response, creds) {
                Ok((pending, server_first)) => (
                    State::ScramFinal(Box::new(pending)),
                    Step::Challenge(server_first.into_bytes()),
                ),
                Err(f) => (State::Done, Step::Failure(f)),
            },
            State::ScramFinal(pending) => (State::Done, scram_final(&pending, response)),
            State::Plain => (State::Done, plain(response, creds)),
            State::Done => (State::Done, Step::Failure(SaslFailure::MalformedRequest)),
        };
        self.state = next;
        step
    }

    /// Handles client-first-message (RFC 5802 §7) and builds server-first-message.
    fn scram_first(
        &self,
        hash: ScramHash,
        msg: &[u8],
        creds: &dyn CredentialLookup,
    ) -> Result<(ScramPending, String), SaslFailure> {
        let msg = std::str::from_utf8(msg).map_err(|_| SaslFailure::MalformedRequest)?;
        // gs2-header = gs2-cbind-flag "," [ authzid ] ","
        let (cbind, rest) = msg.split_once(',').ok_or(SaslFailure::MalformedRequest)?;
        match cbind {
            "n" | "y" => {}
            // "p=" asks for channel binding, which is only valid with the -PLUS mechanisms (RFC 5802 §6)
            // that this server does not offer.
            _ => return Err(SaslFailure::MalformedRequest),
        }
        let (authzid_attr, bare) = rest.split_once(',').ok_or(SaslFailure::MalformedRequest)?;
        let authzid = if authzid_attr.is_empty() {
            None
        } else {
            let raw = authzid_attr
                .strip_prefix("a=")
                .ok_or(SaslFailure::MalformedRequest)?;
            Some(decode_saslname(raw)?)
        };
        let gs2_header = &msg[..msg.len() - bare.len()];

        // client-first-message-bare = [reserved-mext ","] username "," nonce ["," extensions]
        let mut attrs = bare.split(',');
        let user_attr = attrs.next().ok_or(SaslFailure::MalformedRequest)?;
        // A mandatory extension ("m=") we do not understand must fail the exchange (RFC 5802 §5.1).
        let raw_user = user_attr
            .strip_prefix("n=")
            .ok_or(SaslFailure::MalformedRequest)?;
        let username = decode_saslname(raw_user)?.to_lowercase();
        let client_nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .ok_or(SaslFailure::MalformedRequest)?;
        if client_nonce.is_empty() || !client_nonce.bytes().all(is_nonce_char) {
            return Err(SaslFailure::MalformedRequest);
        }
        for ext in attrs {
            if !is_attr(ext) {
                return Err(SaslFailure::MalformedRequest);
            }
        }
        if let Some(a) = authzid
            && !creds.authzid_matches(&username, &a)
        {
            return Err(SaslFailure::InvalidAuthzid);
        }

        let (scram_creds, known) = match creds.scram(&username, hash) {
            Some(c)
                if c.stored_key.len() == hash.output_len()
                    && c.server_key.len() == hash.output_len() =>
            {
                (c, true)
            }
            Some(_) => {
                tracing::warn!(
                    username,
                    "stored SCRAM credentials have the wrong key length"
                );
                return Err(SaslFailure::TemporaryAuthFailure);
            }
            None => (
                fake_credentials(&username, hash, creds.unknown_user_iterations(hash)),
                false,
            ),
        };

        let nonce = format!("{client_nonce}{}", self.server_nonce);
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&scram_creds.salt),
            scram_creds.iterations
        );
        Ok((
            ScramPending {
                hash,
                username,
                gs2_header: gs2_header.to_owned(),
                client_first_bare: bare.to_owned(),
                server_first: server_first.clone(),
                nonce,
                creds: scram_creds,
                known,
            },
            server_first,
        ))
    }
}

/// Handles client-final-message (RFC 5802 §7) and verifies the proof (RFC 5802 §3).
fn scram_final(p: &ScramPending, msg: &[u8]) -> Step {
    match scram_final_inner(p, msg) {
        Ok(v) => Step::Success {
            username: p.username.clone(),
            additional: Some(v.into_bytes()),
        },
        Err(f) => Step::Failure(f),
    }
}

fn scram_final_inner(p: &ScramPending, msg: &[u8]) -> Result<String, SaslFailure> {
    let msg = std::str::from_utf8(msg).map_err(|_| SaslFailure::MalformedRequest)?;
    // client-final-message = client-final-message-without-proof "," proof; proof is the last attribute.
    let idx = msg.rfind(",p=").ok_or(SaslFailure::MalformedRequest)?;
    let without_proof = &msg[..idx];
    let proof_b64 = &msg[idx + 3..];

    let mut attrs = without_proof.split(',');
    let cbind_b64 = attrs
        .next()
        .and_then(|a| a.strip_prefix("c="))
        .ok_or(SaslFailure::MalformedRequest)?;
    let nonce = attrs
        .next()
        .and_then(|a| a.strip_prefix("r="))
        .ok_or(SaslFailure::MalformedRequest)?;
    for ext in attrs {
        if !is_attr(ext) {
            return Err(SaslFailure::MalformedRequest);
        }
    }
    let cbind = B64
        .decode(cbind_b64.as_bytes())
        .map_err(|_| SaslFailure::MalformedRequest)?;
    let proof = B64
        .decode(proof_b64.as_bytes())
        .map_err(|_| SaslFailure::MalformedRequest)?;
    if proof.len() != p.hash.output_len() {
        return Err(SaslFailure::MalformedRequest);
    }
    // Without channel binding, c= must carry exactly the GS2 header of client-first (RFC 5802 §5.1).
    if cbind != p.gs2_header.as_bytes() {
        return Err(SaslFailure::NotAuthorized);
    }
    // The nonce must be the one the server sent, or the exchange could be replayed (RFC 5802 §5.1).
    if !bool::from(nonce.as_bytes().ct_eq(p.nonce.as_bytes())) {
        return Err(SaslFailure::NotAuthorized);
    }

    // AuthMessage = client-first-message-bare + "," + server-first-message + "," +
    //               client-final-message-without-proof
    let auth_message = format!(
        "{},{},{}",
        p.client_first_bare, p.server_first, without_proof
    );
    let h = p.hash;
    let client_signature = h.hmac(&p.creds.stored_key, auth_message.as_bytes());
    let client_key: Vec<u8> = proof
        .iter()
        .zip(&client_signature)
        .map(|(a, b)| a ^ b)
        .collect();
    let ok = h.h(&client_key).ct_eq(&p.creds.stored_key) & subtle::Choice::from(u8::from(p.known));
    if !bool::from(ok) {
        return Err(SaslFailure::NotAuthorized);
    }
    let server_signature = h.hmac(&p.creds.server_key, auth_message.as_bytes());
    Ok(format!("v={}", B64.encode(server_signature)))
}

/// PLAIN (RFC 4616 §2): message = [authzid] UTF8NUL authcid UTF8NUL passwd.
fn plain(msg: &[u8], creds: &dyn CredentialLookup) -> Step {
    let mut parts = msg.split(|&b| b == 0);
    let (Some(authzid), Some(authcid), Some(passwd), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Step::Failure(SaslFailure::MalformedRequest);
    };
    let (Ok(authzid), Ok(authcid), Ok(passwd)) = (
        std::str::from_utf8(authzid),
        std::str::from_utf8(authcid),
        std::str::from_utf8(passwd),
    ) else {
        return Step::Failure(SaslFailure::MalformedRequest);
    };
    // RFC 4616 §2: authcid and passwd are 1*SAFE; the server need not accept more than 255 octets each.
    if authcid.is_empty() || passwd.is_empty() || authcid.len() > 255 || passwd.len() > 255 {
        return Step::Failure(SaslFailure::MalformedRequest);
    }
    let username = authcid.to_lowercase();
    if !authzid.is_empty() && !creds.authzid_matches(&username, authzid) {
        return Step::Failure(SaslFailure::InvalidAuthzid);
    }
    if creds.verify_plain(&username, passwd) {
        Step::Success {
            username,
            additional: None,
        }
    } else {
        Step::Failure(SaslFailure::NotAuthorized)
    }
}

/// Decodes a SCRAM `saslname` (RFC 5802 §7): `=2C` is `,` and `=3D` is `=`; any other `=` is malformed.
fn decode_saslname(s: &str) -> Result<String, SaslFailure> {
    if s.is_empty() {
        return Err(SaslFailure::MalformedRequest);
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('=') {
        out.push_str(&rest[..i]);
        let esc = rest
            .get(i + 1..i + 3)
            .ok_or(SaslFailure::MalformedRequest)?;
        out.push(match esc {
            "2C" => ',',
            "3D" => '=',
            _ => return Err(SaslFailure::MalformedRequest),
        });
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    Ok(out)
}

/// RFC 5802 §7 `printable`: %x21-2B / %x2D-7E (printable ASCII except `,`).
fn is_nonce_char(b: u8) -> bool {
    (0x21..=0x7e).contains(&b) && b != b','
}

/// RFC 5802 §7 `attr-val`: a single ASCII letter, `=`, value.
fn is_attr(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b'='
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Test lookup: users with a password and salt per hash; SCRAM data derived as a real store would.
    struct Users {
        users: HashMap<String, (String, HashMap<&'static str, Vec<u8>>)>,
        iterations: u32,
    }

    impl Users {
        fn rfc() -> Self {
            let mut salts = HashMap::new();
            // RFC 5802 §5 and RFC 7677 §3 salts for user "user", password "pencil".
            salts.insert("sha1", B64.decode("QSXCR+Q6sek8bf92").expect("literal"));
            salts.insert(
                "sha256",
                B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").expect("literal"),
            );
            let mut users = HashMap::new();
            users.insert("user".to_string(), ("pencil".to_string(), salts));
            Users {
                users,
                iterations: 4096,
            }
        }
    }

    impl CredentialLookup for Users {
        fn scram(&self, username: &str, hash: ScramHash) -> Option<ScramCredentials> {
            let (pw, salts) = self.users.get(username)?;
            let salt = salts.get(hash.tag())?;
            Some(ScramCredentials::derive(pw, salt, self.iterations, hash))
        }
        fn verify_plain(&self, username: &str, password: &str) -> bool {
            self.users
                .get(username)
                .is_some_and(|(pw, _)| bool::from(pw.as_bytes().ct_eq(password.as_bytes())))
        }
    }

    fn failure(step: &Step) -> Option<SaslFailure> {
        match step {
            Step::Failure(f) => Some(*f),
            _ => None,
        }
    }

    fn challenge(step: Step) -> String {
        match step {
            Step::Challenge(c) => String::from_utf8(c).expect("utf8"),
            other => panic!("expected challenge, got {other:?}"),
        }
    }

    #[test]
    fn rfc5802_scram_sha1_vector() {
        let users = Users::rfc();
        let (mut s, step) = SaslServer::start_with_server_nonce(
            Mechanism::ScramSha1,
            Some(b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL"),
            &users,
            "3rfcNHYJY1ZVvWVs7j".into(),
        );
        assert_eq!(
            challenge(step),
            "r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096"
        );
        let step = s.step(
            b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
            &users,
        );
        assert_eq!(
            step,
            Step::Success {
                username: "user".into(),
                additional: Some(b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ=".to_vec()),
            }
        );
        assert!(s.is_done());
        // Nothing is accepted after the outcome.
        assert_eq!(
            failure(&s.step(b"x", &users)),
            Some(SaslFailure::MalformedRequest)
        );
    }

    #[test]
    fn rfc7677_scram_sha256_vector() {
        let users = Users::rfc();
        let (mut s, step) = SaslServer::start_with_server_nonce(
            Mechanism::ScramSha256,
            Some(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"),
            &users,
            "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0".into(),
        );
        assert_eq!(
            challenge(step),
            "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
        );
        let step = s.step(
            b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
              p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
            &users,
        );
        assert_eq!(
            step,
            Step::Success {
                username: "user".into(),
                additional: Some(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=".to_vec()),
            }
        );
    }

    /// A minimal SCRAM client (RFC 5802 §3), used to drive exchanges through the public API.
    struct Client {
        hash: ScramHash,
        gs2: String,
        bare: String,
        client_nonce: String,
    }

    impl Client {
        fn new(hash: ScramHash, gs2: &str, user: &str) -> Self {
            let client_nonce = "clientNONCEabc123".to_string();
            Client {
                hash,
                gs2: gs2.into(),
                bare: format!("n={user},r={client_nonce}"),
                client_nonce,
            }
        }
        fn first(&self) -> Vec<u8> {
            format!("{}{}", self.gs2, self.bare).into_bytes()
        }
        /// Parses server-first and returns (client-final, expected server-final).
        fn fin(
            &self,
            server_first: &str,
            password: &str,
            iter_override: Option<u32>,
        ) -> (String, String) {
            let mut r = "";
            let mut s = "";
            let mut i = "";
            for a in server_first.split(',') {
                match a.split_at(2) {
                    ("r=", v) => r = v,
                    ("s=", v) => s = v,
                    ("i=", v) => i = v,
                    _ => {}
                }
            }
            assert!(r.starts_with(&self.client_nonce));
            let iterations = iter_override.unwrap_or_else(|| i.parse().expect("i"));
            let salt = B64.decode(s).expect("salt");
            let h = self.hash;
            let salted = h.hi(password.as_bytes(), &salt, iterations);
            let client_key = h.hmac(&salted, b"Client Key");
            let stored = h.h(&client_key);
            let without_proof = format!("c={},r={r}", B64.encode(self.gs2.as_bytes()));
            let auth = format!("{},{server_first},{without_proof}", self.bare);
            let sig = h.hmac(&stored, auth.as_bytes());
            let proof: Vec<u8> = client_key.iter().zip(&sig).map(|(a, b)| a ^ b).collect();
            let server_key = h.hmac(&salted, b"Server Key");
            let v = B64.encode(h.hmac(&server_key, auth.as_bytes()));
            (
                format!("{without_proof},p={}", B64.encode(proof)),
                format!("v={v}"),
            )
        }
    }

    fn run_scram(mech: Mechanism, gs2: &str, user: &str, password: &str, users: &Users) -> Step {
        let hash = mech.scram_hash().expect("scram");
        let c = Client::new(hash, gs2, user);
        let (mut s, step) = SaslServer::start(mech, None, users, [7u8; 18]);
        assert_eq!(step, Step::Challenge(Vec::new()));
        let sf = challenge(s.step(&c.first(), users));
        let (cf, expected_v) = c.fin(&sf, password, None);
        let step = s.step(cf.as_bytes(), users);
        if let Step::Success { additional, .. } = &step {
            assert_eq!(additional.as_deref(), Some(expected_v.as_bytes()));
        }
        step
    }

    #[test]
    fn scram_roundtrip_public_api_both_hashes() {
        let users = Users::rfc();
        for mech in [Mechanism::ScramSha1, Mechanism::ScramSha256] {
            for gs2 in ["n,,", "y,,", "n,a=user@example.org,"] {
                let step = run_scram(mech, gs2, "user", "pencil", &users);
                assert!(
                    matches!(&step, Step::Success { username, .. } if username == "user"),
                    "{mech} {gs2}: {step:?}"
                );
            }
            // Username case-folding.
            let step = run_scram(mech, "n,,", "USER", "pencil", &users);
            assert!(matches!(&step, Step::Success { username, .. } if username == "user"));
        }
    }

    #[test]
    fn server_nonce_is_base64_of_injected_bytes() {
        let users = Users::rfc();
        let (_, step) = SaslServer::start(
            Mechanism::ScramSha256,
            Some(b"n,,n=user,r=abc"),
            &users,
            [0u8; 18],
        );
        let sf = challenge(step);
        assert!(sf.starts_with("r=abcAAAAAAAAAAAAAAAAAAAAAAAA,s="), "{sf}");
    }

    #[test]
    fn scram_wrong_password_fails() {
        let users = Users::rfc();
        for mech in [Mechanism::ScramSha1, Mechanism::ScramSha256] {
            let step = run_scram(mech, "n,,", "user", "pencil2", &users);
            assert_eq!(failure(&step), Some(SaslFailure::NotAuthorized));
        }
    }

    #[test]
    fn scram_wrong_proof_fails() {
        let users = Users::rfc();
        let (mut s, _) = SaslServer::start_with_server_nonce(
            Mechanism::ScramSha1,
            Some(b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL"),
            &users,
            "3rfcNHYJY1ZVvWVs7j".into(),
        );
        // First proof byte altered.
        let step = s.step(
            b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=w0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
            &users,
        );
        assert_eq!(failure(&step), Some(SaslFailure::NotAuthorized));
    }

    #[test]
    fn scram_unknown_user_full_exchange_then_fails() {
        let users = Users::rfc();
        let c = Client::new(ScramHash::Sha256, "n,,", "nobody");
        let (mut s, step) =
            SaslServer::start(Mechanism::ScramSha256, Some(&c.first()), &users, [1; 18]);
        let sf = challenge(step);
        // Looks like a real server-first: 16-byte salt, advertised iterations.
        assert!(sf.ends_with(",i=4096"), "{sf}");
        let salt_b64 = sf
            .split(",s=")
            .nth(1)
            .and_then(|x| x.split(',').next())
            .expect("salt");
        assert_eq!(B64.decode(salt_b64).expect("b64").len(), 16);
        // Same fake salt each time for the same name, different for another name.
        let (_, again) =
            SaslServer::start(Mechanism::ScramSha256, Some(&c.first()), &users, [1; 18]);
        assert_eq!(challenge(again), sf);
        let other = Client::new(ScramHash::Sha256, "n,,", "someone");
        let (_, other_sf) = SaslServer::start(
            Mechanism::ScramSha256,
            Some(&other.first()),
            &users,
            [1; 18],
        );
        assert_ne!(
            challenge(other_sf).split(",s=").nth(1),
            sf.split(",s=").nth(1)
        );

        let (cf, _) = c.fin(&sf, "anything", None);
        assert_eq!(
            failure(&s.step(cf.as_bytes(), &users)),
            Some(SaslFailure::NotAuthorized)
        );
    }

    #[test]
    fn scram_iteration_tampering_fails() {
        // A man in the middle lowering i= makes the client compute a proof over different keys.
        let users = Users::rfc();
        let c = Client::new(ScramHash::Sha256, "n,,", "user");
        let (mut s, step) =
            SaslServer::start(Mechanism::ScramSha256, Some(&c.first()), &users, [2; 18]);
        let sf = challenge(step);
        let tampered = sf.replace(",i=4096", ",i=1");
        let (cf, _) = c.fin(&tampered, "pencil", Some(1));
        assert_eq!(
            failure(&s.step(cf.as_bytes(), &users)),
            Some(SaslFailure::NotAuthorized)
        );
    }

    #[test]
    fn scram_nonce_mismatch_fails() {
        let users = Users::rfc();
        let (mut s, _) = SaslServer::start_with_server_nonce(
            Mechanism::ScramSha1,
            Some(b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL"),
            &users,
            "3rfcNHYJY1ZVvWVs7j".into(),
        );
        let step = s.step(
            b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7X,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
            &users,
        );
        assert_eq!(failure(&step), Some(SaslFailure::NotAuthorized));
    }

    #[test]
    fn scram_channel_binding_mismatch_fails() {
        // Client said "y" but claims "n,," in c= (downgrade detection, RFC 5802 §6).
        let users = Users::rfc();
        let c = Client::new(ScramHash::Sha256, "y,,", "user");
        let (mut s, step) =
            SaslServer::start(Mechanism::ScramSha256, Some(&c.first()), &users, [3; 18]);
        let sf = challenge(step);
        let (cf, _) = c.fin(&sf, "pencil", None);
        let cf = cf.replacen("c=eSws", "c=biws", 1);
        assert_eq!(
            failure(&s.step(cf.as_bytes(), &users)),
            Some(SaslFailure::NotAuthorized)
        );
    }

    #[test]
    fn scram_malformed_client_first() {
        let users = Users::rfc();
        let cases: &[(&[u8], SaslFailure)] = &[
            (b"", SaslFailure::MalformedRequest),
            (b"n", SaslFailure::MalformedRequest),
            (b"n,,", SaslFailure::MalformedRequest),
            (b"n,,n=user", SaslFailure::MalformedRequest),
            (b"n,,r=abc,n=user", SaslFailure::MalformedRequest),
            (b"n,,n=,r=abc", SaslFailure::MalformedRequest),
            (b"n,,n=user,r=", SaslFailure::MalformedRequest),
            (b"n,,n=us=er,r=abc", SaslFailure::MalformedRequest),
            (b"n,,n=user=2,r=abc", SaslFailure::MalformedRequest),
            (b"n,,m=ext,n=user,r=abc", SaslFailure::MalformedRequest),
            (b"n,,n=user,r=abc,garbage", SaslFailure::MalformedRequest),
            (b"p=tls-unique,,n=user,r=abc", SaslFailure::MalformedRequest),
            (b"x,,n=user,r=abc", SaslFailure::MalformedRequest),
            (b"n,user,n=user,r=abc", SaslFailure::MalformedRequest),
            (b"n,,n=user,r=ab\x7fc", SaslFailure::MalformedRequest),
            (b"n,,n=\xff\xfe,r=abc", SaslFailure::MalformedRequest),
            (
                b"n,a=other@example.org,n=user,r=abc",
                SaslFailure::InvalidAuthzid,
            ),
            (
                b"n,a=user@example.org/res,n=user,r=abc",
                SaslFailure::InvalidAuthzid,
            ),
            (b"n,a=user,n=user,r=abc", SaslFailure::InvalidAuthzid),
        ];
        for (msg, want) in cases {
            let (s, step) = SaslServer::start(Mechanism::ScramSha256, Some(msg), &users, [0; 18]);
            assert_eq!(
                failure(&step),
                Some(*want),
                "{:?}",
                String::from_utf8_lossy(msg)
            );
            assert!(s.is_done());
        }
    }

    #[test]
    fn truncated_and_mutated_messages_never_panic() {
        // One PBKDF2 round keeps the thousands of exchanges fast; the RFC proof then no longer matches.
        let users = Users {
            iterations: 1,
            ..Users::rfc()
        };
        let first: &[u8] = b"n,a=user@example.org,n=us=2Cer,r=fyko+d2lbbFgONRv9qkxdawL";
        let fin: &[u8] =
            b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=";
        let plain_msg: &[u8] = b"user@example.org\0user\0pencil";
        let mut variants: Vec<Vec<u8>> = Vec::new();
        for msg in [first, fin, plain_msg] {
            for i in 0..=msg.len() {
                variants.push(msg[..i].to_vec());
                for b in [0u8, b',', b'=', 0xff, 0xc3] {
                    let mut m = msg.to_vec();
                    if i < m.len() {
                        m[i] = b;
                        variants.push(m);
                    }
                }
            }
        }
        for v in &variants {
            for mech in OFFERED {
                let (mut s, step) = SaslServer::start(*mech, Some(v), &users, [5; 18]);
                if matches!(step, Step::Challenge(_)) {
                    for w in variants.iter().step_by(7) {
                        let _ = s.step(w, &users);
                    }
                }
            }
            let (mut s, _) = SaslServer::start_with_server_nonce(
                Mechanism::ScramSha1,
                Some(b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL"),
                &users,
                "3rfcNHYJY1ZVvWVs7j".into(),
            );
            assert!(!matches!(s.step(v, &users), Step::Success { .. }));
        }
    }

    #[test]
    fn scram_saslname_escapes() {
        assert_eq!(decode_saslname("a=2Cb=3Dc").as_deref(), Ok("a,b=c"));
        assert_eq!(decode_saslname("=2"), Err(SaslFailure::MalformedRequest));
        assert_eq!(decode_saslname("=2c"), Err(SaslFailure::MalformedRequest));
        assert_eq!(decode_saslname("é=3D"), Ok("é=".to_string()));
    }

    #[test]
    fn scram_malformed_client_final() {
        let users = Users::rfc();
        let nonce = "fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j";
        let proof = "v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=";
        let cases: Vec<(String, SaslFailure)> = vec![
            (String::new(), SaslFailure::MalformedRequest),
            (format!("c=biws,r={nonce}"), SaslFailure::MalformedRequest),
            (
                format!("r={nonce},p={proof}"),
                SaslFailure::MalformedRequest,
            ),
            (format!("c=biws,p={proof}"), SaslFailure::MalformedRequest),
            (
                format!("c=b!ws,r={nonce},p={proof}"),
                SaslFailure::MalformedRequest,
            ),
            (
                format!("c=biws,r={nonce},p=not*base64"),
                SaslFailure::MalformedRequest,
            ),
            (
                format!("c=biws,r={nonce},p="),
                SaslFailure::MalformedRequest,
            ),
            (
                format!("c=biws,r={nonce},p=AAAA"),
                SaslFailure::MalformedRequest,
            ),
            (
                format!("c=biws,r={nonce},junk,p={proof}"),
                SaslFailure::MalformedRequest,
            ),
            (
                format!("c=eSws,r={nonce},p={proof}"),
                SaslFailure::NotAuthorized,
            ),
            (
                format!("c=biws,r=other,p={proof}"),
                SaslFailure::NotAuthorized,
            ),
        ];
        for (msg, want) in cases {
            let (mut s, _) = SaslServer::start_with_server_nonce(
                Mechanism::ScramSha1,
                Some(b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL"),
                &users,
                "3rfcNHYJY1ZVvWVs7j".into(),
            );
            assert_eq!(
                failure(&s.step(msg.as_bytes(), &users)),
                Some(want),
                "{msg}"
            );
        }
        // Invalid UTF-8.
        let (mut s, _) = SaslServer::start(
            Mechanism::ScramSha1,
            Some(b"n,,n=user,r=x"),
            &users,
            [0; 18],
        );
        assert_eq!(
            failure(&s.step(b"\xff", &users)),
            Some(SaslFailure::MalformedRequest)
        );
    }

    #[test]
    fn plain_success_and_failure() {
        let users = Users::rfc();
        let ok = |msg: &[u8]| SaslServer::start(Mechanism::Plain, Some(msg), &users, [0; 18]).1;
        let success = Step::Success {
            username: "user".into(),
            additional: None,
        };
        assert_eq!(ok(b"\0user\0pencil"), success);
        assert_eq!(ok(b"\0User\0pencil"), success);
        assert_eq!(ok(b"user@example.org\0user\0pencil"), success);
        assert_eq!(
            failure(&ok(b"\0user\0pencil2")),
            Some(SaslFailure::NotAuthorized)
        );
        assert_eq!(
            failure(&ok(b"\0nobody\0pencil")),
            Some(SaslFailure::NotAuthorized)
        );
        assert_eq!(
            failure(&ok(b"admin@example.org\0user\0pencil")),
            Some(SaslFailure::InvalidAuthzid)
        );
        for bad in [
            &b""[..],
            b"user\0pencil",
            b"\0\0pencil",
            b"\0user\0",
            b"\0user\0pen\0cil",
            b"\0us\xffer\0pencil",
        ] {
            assert_eq!(
                failure(&ok(bad)),
                Some(SaslFailure::MalformedRequest),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn plain_without_initial_response() {
        let users = Users::rfc();
        let (mut s, step) = SaslServer::start(Mechanism::Plain, None, &users, [0; 18]);
        assert_eq!(step, Step::Challenge(Vec::new()));
        assert!(!s.is_done());
        assert!(matches!(
            s.step(b"\0user\0pencil", &users),
            Step::Success { .. }
        ));
    }

    #[test]
    fn mechanism_names_and_conditions() {
        for m in OFFERED {
            assert_eq!(Mechanism::from_name(m.name()), Some(*m));
        }
        assert_eq!(Mechanism::from_name("SCRAM-SHA-256-PLUS"), None);
        assert_eq!(Mechanism::from_name("plain"), None);
        assert_eq!(OFFERED[0], Mechanism::ScramSha256);
        assert_eq!(SaslFailure::NotAuthorized.condition(), "not-authorized");
        assert_eq!(
            SaslFailure::TemporaryAuthFailure.condition(),
            "temporary-auth-failure"
        );
    }

    #[test]
    fn credentials_debug_redacts_keys() {
        let c = ScramCredentials::derive("pencil", b"salt", 1, ScramHash::Sha1);
        let d = format!("{c:?}");
        assert!(d.contains("redacted") && !d.contains(&B64.encode(&c.stored_key)));
        let json = serde_json::to_string(&c).expect("json");
        let back: ScramCredentials = serde_json::from_str(&json).expect("json");
        assert_eq!(back, c);
    }
}
