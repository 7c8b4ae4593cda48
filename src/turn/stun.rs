//! STUN message codec (RFC 8489) with the TURN attributes (RFC 8656), and ChannelData framing.
//!
//! Sans-IO and allocation-free on the receive side: [`Message::parse`] validates the header and the
//! attribute TLVs once and keeps only offsets, so attribute values are slices of the datagram
//! (the DATA of a Send indication can be relayed without a copy). [`MessageBuilder`] appends a
//! message to a caller's buffer (`Vec<u8>` or `BytesMut`), so a reply reuses one buffer per task.
//!
//! The first two bits of a packet tell STUN (`00`) from ChannelData (`01`) (RFC 8656 §12,
//! RFC 7983); [`frame_len`] splits a TCP/TLS byte stream into those frames (RFC 8656 §12.5,
//! RFC 6062).
//!
//! Long-term credentials (RFC 8489 §9.2): usernames, realms and passwords go through the PRECIS
//! OpaqueString profile (RFC 8265 §4.2) before they are hashed into a key or a USERHASH
//! ([`opaque_string`]); for printable ASCII, which is all Tern mints, that is the identity, so
//! RFC 5389 clients (which used SASLprep, RFC 4013) compute the same keys. NONCEs may start with
//! the nonce cookie that announces the STUN security features ([`security_features`], §9.2).

use std::borrow::Cow;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;

use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use precis_core::profile::PrecisFastInvocation;
use precis_profiles::OpaqueString;
use sha1::Sha1;
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// The fixed value in bytes 4..8 of every RFC 5389/8489 message (§5).
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// STUN header size (§5).
pub const HEADER_LEN: usize = 20;
/// ChannelData header size (RFC 8656 §12.4).
pub const CHANNEL_DATA_HEADER_LEN: usize = 4;
/// FINGERPRINT is the CRC-32 of the message XORed with this (§14.7).
const FINGERPRINT_XOR: u32 = 0x5354_554E;
/// MESSAGE-INTEGRITY value size: an HMAC-SHA1 (§14.5).
const INTEGRITY_LEN: usize = 20;
/// Full MESSAGE-INTEGRITY-SHA256 value size; it may be truncated to 16 (§14.6).
const INTEGRITY_SHA256_LEN: usize = 32;

/// Attribute types (RFC 8489 §18.3, RFC 8656 §18, RFC 8445 for the ICE ones a Binding may carry).
/// `0x0000..=0x7FFF` are comprehension-required: a request carrying one the server does not know
/// is answered with 420 (§6.3.1).
pub mod attr {
    pub const MAPPED_ADDRESS: u16 = 0x0001;
    pub const USERNAME: u16 = 0x0006;
    pub const MESSAGE_INTEGRITY: u16 = 0x0008;
    pub const ERROR_CODE: u16 = 0x0009;
    pub const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
    pub const CHANNEL_NUMBER: u16 = 0x000C;
    pub const LIFETIME: u16 = 0x000D;
    pub const XOR_PEER_ADDRESS: u16 = 0x0012;
    pub const DATA: u16 = 0x0013;
    pub const REALM: u16 = 0x0014;
    pub const NONCE: u16 = 0x0015;
    pub const XOR_RELAYED_ADDRESS: u16 = 0x0016;
    pub const REQUESTED_ADDRESS_FAMILY: u16 = 0x0017;
    pub const EVEN_PORT: u16 = 0x0018;
    pub const REQUESTED_TRANSPORT: u16 = 0x0019;
    pub const DONT_FRAGMENT: u16 = 0x001A;
    pub const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
    pub const PASSWORD_ALGORITHM: u16 = 0x001D;
    pub const USERHASH: u16 = 0x001E;
    pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
    pub const RESERVATION_TOKEN: u16 = 0x0022;
    pub const PRIORITY: u16 = 0x0024;
    pub const USE_CANDIDATE: u16 = 0x0025;
    pub const ADDITIONAL_ADDRESS_FAMILY: u16 = 0x8000;
    pub const PASSWORD_ALGORITHMS: u16 = 0x8002;
    pub const ALTERNATE_DOMAIN: u16 = 0x8003;
    pub const SOFTWARE: u16 = 0x8022;
    pub const ALTERNATE_SERVER: u16 = 0x8023;
    pub const FINGERPRINT: u16 = 0x8028;
    pub const ICE_CONTROLLED: u16 = 0x8029;
    pub const ICE_CONTROLLING: u16 = 0x802A;

    /// Comprehension-required types this codec understands (the rest of `0x0000..=0x7FFF` gets
    /// a 420).
    pub const fn is_known_required(t: u16) -> bool {
        matches!(
            t,
            MAPPED_ADDRESS
                | USERNAME
                | MESSAGE_INTEGRITY
                | ERROR_CODE
                | UNKNOWN_ATTRIBUTES
                | CHANNEL_NUMBER
                | LIFETIME
                | XOR_PEER_ADDRESS
                | DATA
                | REALM
                | NONCE
                | XOR_RELAYED_ADDRESS
                | REQUESTED_ADDRESS_FAMILY
                | EVEN_PORT
                | REQUESTED_TRANSPORT
                | DONT_FRAGMENT
                | MESSAGE_INTEGRITY_SHA256
                | PASSWORD_ALGORITHM
                | USERHASH
                | XOR_MAPPED_ADDRESS
                | RESERVATION_TOKEN
                | PRIORITY
                | USE_CANDIDATE
        )
    }

    /// `0x0000..=0x7FFF` must be understood; `0x8000..` may be ignored (RFC 8489 §14).
    pub const fn is_comprehension_required(t: u16) -> bool {
        t < 0x8000
    }
}

/// Error codes used by TURN (RFC 8489 §14.8, RFC 8656 §18).
pub mod code {
    pub const TRY_ALTERNATE: u16 = 300;
    pub const BAD_REQUEST: u16 = 400;
    pub const UNAUTHENTICATED: u16 = 401;
    pub const FORBIDDEN: u16 = 403;
    pub const UNKNOWN_ATTRIBUTE: u16 = 420;
    pub const ALLOCATION_MISMATCH: u16 = 437;
    pub const STALE_NONCE: u16 = 438;
    pub const ADDRESS_FAMILY_NOT_SUPPORTED: u16 = 440;
    pub const WRONG_CREDENTIALS: u16 = 441;
    pub const UNSUPPORTED_TRANSPORT_PROTOCOL: u16 = 442;
    pub const PEER_ADDRESS_FAMILY_MISMATCH: u16 = 443;
    pub const ALLOCATION_QUOTA_REACHED: u16 = 486;
    pub const SERVER_ERROR: u16 = 500;
    pub const INSUFFICIENT_CAPACITY: u16 = 508;

    /// A short reason phrase; kept terse because error answers go to unauthenticated sources and
    /// must not amplify (RFC 8656 §21.1.1 style concerns).
    pub const fn reason(code: u16) -> &'static str {
        match code {
            TRY_ALTERNATE => "Try Alternate",
            BAD_REQUEST => "Bad Request",
            UNAUTHENTICATED => "Unauthenticated",
            FORBIDDEN => "Forbidden",
            UNKNOWN_ATTRIBUTE => "Unknown Attribute",
            ALLOCATION_MISMATCH => "Allocation Mismatch",
            STALE_NONCE => "Stale Nonce",
            ADDRESS_FAMILY_NOT_SUPPORTED => "Address Family not Supported",
            WRONG_CREDENTIALS => "Wrong Credentials",
            UNSUPPORTED_TRANSPORT_PROTOCOL => "Unsupported Transport Protocol",
            PEER_ADDRESS_FAMILY_MISMATCH => "Peer Address Family Mismatch",
            ALLOCATION_QUOTA_REACHED => "Allocation Quota Reached",
            SERVER_ERROR => "Server Error",
            INSUFFICIENT_CAPACITY => "Insufficient Capacity",
            _ => "",
        }
    }
}

/// Why bytes are not a STUN message, or an attribute value is malformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StunError {
    #[error("shorter than a STUN header")]
    TooShort,
    #[error("first two bits are not 00")]
    NotStun,
    #[error("wrong magic cookie")]
    BadCookie,
    #[error("message length {0} is not a multiple of 4")]
    UnalignedLength(u16),
    #[error("message length field {field} does not match the {actual} bytes after the header")]
    LengthMismatch { field: u16, actual: usize },
    #[error("attribute at offset {0} runs past the end of the message")]
    TruncatedAttribute(usize),
    #[error("attribute after FINGERPRINT")]
    FingerprintNotLast,
    #[error("malformed {0:#06x} attribute value")]
    BadAttribute(u16),
}

/// Why a message could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    #[error("message longer than 65535 bytes after the header")]
    TooLong,
}

/// Message class: the two class bits of the message type (§5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    Request,
    Indication,
    Success,
    Error,
}

/// The 12-bit method (§5; TURN methods in RFC 8656 §18).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Method(pub u16);

impl Method {
    pub const BINDING: Method = Method(0x001);
    pub const ALLOCATE: Method = Method(0x003);
    pub const REFRESH: Method = Method(0x004);
    pub const SEND: Method = Method(0x006);
    pub const DATA: Method = Method(0x007);
    pub const CREATE_PERMISSION: Method = Method(0x008);
    pub const CHANNEL_BIND: Method = Method(0x009);
}

/// Method and class, interleaved in the 14-bit type field (§5, figure 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MessageType {
    pub method: Method,
    pub class: Class,
}

impl MessageType {
    pub const fn new(method: Method, class: Class) -> Self {
        Self { method, class }
    }

    /// Decodes the 16-bit field; `None` when the top two bits are set (not STUN).
    pub const fn from_u16(v: u16) -> Option<Self> {
        if v & 0xC000 != 0 {
            return None;
        }
        let method = (v & 0x000F) | ((v >> 1) & 0x0070) | ((v >> 2) & 0x0F80);
        let class = match ((v >> 7) & 0x2) | ((v >> 4) & 0x1) {
            0 => Class::Request,
            1 => Class::Indication,
            2 => Class::Success,
            _ => Class::Error,
        };
        Some(Self {
            method: Method(method),
            class,
        })
    }

    /// Encodes to the 16-bit field (method bits beyond 12 are dropped).
    pub const fn to_u16(self) -> u16 {
        let m = self.method.0 & 0x0FFF;
        let c: u16 = match self.class {
            Class::Request => 0,
            Class::Indication => 1,
            Class::Success => 2,
            Class::Error => 3,
        };
        (m & 0x000F) | ((m & 0x0070) << 1) | ((m & 0x0F80) << 2) | ((c & 1) << 4) | ((c & 2) << 7)
    }
}

/// The 96-bit transaction id (§5).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TransactionId(pub [u8; 12]);

impl fmt::Debug for TransactionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Address families of REQUESTED-ADDRESS-FAMILY and the address attributes (§14.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressFamily {
    V4,
    V6,
}

impl AddressFamily {
    pub const fn of(ip: &IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }
    const fn code(self) -> u8 {
        match self {
            Self::V4 => 0x01,
            Self::V6 => 0x02,
        }
    }
    const fn from_code(c: u8) -> Option<Self> {
        match c {
            0x01 => Some(Self::V4),
            0x02 => Some(Self::V6),
            _ => None,
        }
    }
}

/// Password algorithms of PASSWORD-ALGORITHM(S) (RFC 8489 §18.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PasswordAlgorithm {
    Md5,
    Sha256,
}

impl PasswordAlgorithm {
    pub const fn code(self) -> u16 {
        match self {
            Self::Md5 => 0x0001,
            Self::Sha256 => 0x0002,
        }
    }
    pub const fn from_code(c: u16) -> Option<Self> {
        match c {
            0x0001 => Some(Self::Md5),
            0x0002 => Some(Self::Sha256),
            _ => None,
        }
    }
}

/// Why a credential string cannot be used in a key or a USERHASH: it is not a valid OpaqueString
/// (RFC 8265 §4.2: empty, or with control, unassigned or otherwise disallowed code points).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("the {0} is not a valid OpaqueString (RFC 8265 §4.2)")]
    NotOpaqueString(&'static str),
}

/// The OpaqueString profile (RFC 8265 §4.2) that RFC 8489 §9.2.2 and §14.4 apply to usernames,
/// realms and passwords before hashing: non-ASCII spaces mapped to U+0020, NFC, and the PRECIS
/// FreeformClass enforced (controls, unassigned code points and empty strings are refused). The
/// `precis-profiles` crate carries the Unicode tables this needs. Borrowed (no allocation) when the
/// string is already prepared, as printable ASCII always is. `what` names the field in the error.
pub fn opaque_string<'s>(s: &'s str, what: &'static str) -> Result<Cow<'s, str>, CredentialError> {
    // Printable ASCII is FreeformClass-valid and unchanged by every rule: skip the table lookups
    // on the path every request takes.
    if !s.is_empty() && s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Ok(Cow::Borrowed(s));
    }
    <OpaqueString as PrecisFastInvocation>::enforce(s)
        .map_err(|_| CredentialError::NotOpaqueString(what))
}

/// USERHASH (RFC 8489 §14.4): `SHA-256(OpaqueString(username) ":" OpaqueString(realm))`, which a
/// client sends instead of USERNAME when the server's NONCE offers username anonymity (§9.2.1).
pub fn userhash(username: &str, realm: &str) -> Result<[u8; 32], CredentialError> {
    let username = opaque_string(username, "username")?;
    let realm = opaque_string(realm, "realm")?;
    let mut h = Sha256::new();
    h.update(username.as_bytes());
    h.update(b":");
    h.update(realm.as_bytes());
    Ok(h.finalize().into())
}

/// A long-term credential key (RFC 8489 §9.2.2): MD5 or SHA-256 (the PASSWORD-ALGORITHM, §18.5)
/// of `username ":" realm ":" password`, each prepared with OpaqueString.
#[derive(Clone, PartialEq, Eq)]
pub struct LongTermKey {
    bytes: [u8; 32],
    len: u8,
}

impl fmt::Debug for LongTermKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LongTermKey(..)")
    }
}

impl LongTermKey {
    /// Derives the key from the [`opaque_string`]-prepared strings; an error when one of them is
    /// not a valid OpaqueString (no key exists for it, so no request can authenticate with it).
    pub fn derive(
        alg: PasswordAlgorithm,
        username: &str,
        realm: &str,
        password: &str,
    ) -> Result<Self, CredentialError> {
        let username = opaque_string(username, "username")?;
        let realm = opaque_string(realm, "realm")?;
        let password = opaque_string(password, "password")?;
        let mut bytes = [0u8; 32];
        let parts = [
            username.as_bytes(),
            b":",
            realm.as_bytes(),
            b":",
            password.as_bytes(),
        ];
        let len = match alg {
            PasswordAlgorithm::Md5 => {
                let mut h = Md5::new();
                for p in parts {
                    h.update(p);
                }
                bytes[..16].copy_from_slice(&h.finalize());
                16
            }
            PasswordAlgorithm::Sha256 => {
                let mut h = Sha256::new();
                for p in parts {
                    h.update(p);
                }
                bytes.copy_from_slice(&h.finalize());
                32
            }
        };
        Ok(Self { bytes, len })
    }

    /// The MD5 key every TURN client supports (§9.2.2).
    pub fn md5(username: &str, realm: &str, password: &str) -> Result<Self, CredentialError> {
        Self::derive(PasswordAlgorithm::Md5, username, realm, password)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// Constant-time comparison, so a stored key can be matched without a timing leak.
    pub fn ct_eq(&self, other: &Self) -> bool {
        self.as_bytes().ct_eq(other.as_bytes()).into()
    }
}

/// The "nonce cookie" (RFC 8489 §9.2): a NONCE starting with it carries the server's STUN
/// security features in the next [`FEATURES_LEN`] characters.
pub const NONCE_COOKIE: &str = "obMatJos2";
/// Base64 characters after the cookie: 24 feature bits (§9.2).
pub const FEATURES_LEN: usize = 4;

/// STUN security feature bits (RFC 8489 §18.1). Bit 0 is the least significant of the 24, as the
/// verified Errata 6290 puts it and the corrected Appendix B.1 vector (Errata 6268, nonce
/// `obMatJos2AAAC...` with USERHASH) uses.
pub mod feature {
    /// "Password algorithms": the server sends PASSWORD-ALGORITHMS and checks it is echoed (§9.2.4).
    pub const PASSWORD_ALGORITHMS: u32 = 1 << 0;
    /// "Username anonymity": the client sends USERHASH instead of USERNAME (§9.2.4, §14.4).
    pub const USERNAME_ANONYMITY: u32 = 1 << 1;
}

const B64_ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// The nonce cookie followed by `features` (the low 24 bits) as four base64 characters (§9.2).
pub fn nonce_prefix(features: u32) -> String {
    let mut out = String::with_capacity(NONCE_COOKIE.len() + FEATURES_LEN);
    out.push_str(NONCE_COOKIE);
    for shift in [18, 12, 6, 0] {
        out.push(char::from(
            B64_ALPHABET[((features >> shift) & 0x3f) as usize],
        ));
    }
    out
}

/// The security features a NONCE announces, or `None` when it does not start with the nonce
/// cookie and four base64 characters (then it is an opaque RFC 5389-style NONCE).
pub fn security_features(nonce: &str) -> Option<u32> {
    let encoded = nonce.strip_prefix(NONCE_COOKIE)?.get(..FEATURES_LEN)?;
    encoded.bytes().try_fold(0u32, |acc, c| {
        let v = B64_ALPHABET.iter().position(|&a| a == c)?;
        Some(acc << 6 | v as u32)
    })
}

/// One attribute as it sits in the message: its type, its value (without padding) and where the
/// value starts in the message, so a caller can relay `data[range]` without a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawAttribute<'a> {
    pub typ: u16,
    pub value: &'a [u8],
    pub offset: usize,
}

impl RawAttribute<'_> {
    /// Range of the value within the message bytes.
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.value.len()
    }
}

/// A parsed STUN message borrowing the bytes it was parsed from; nothing is allocated.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    raw: &'a [u8],
    typ: MessageType,
    /// Attributes before the first integrity/fingerprint attribute: everything else is ignored
    /// (§14.5, §14.6).
    attrs_end: usize,
    integrity: Option<usize>,
    integrity_sha256: Option<usize>,
    fingerprint: Option<usize>,
    unknown_required: bool,
}

#[inline]
fn be16(b: &[u8], at: usize) -> u16 {
    match b.get(at..at + 2) {
        Some(s) => u16::from_be_bytes([s[0], s[1]]),
        None => 0,
    }
}

#[inline]
fn be32(b: &[u8], at: usize) -> u32 {
    match b.get(at..at + 4) {
        Some(s) => u32::from_be_bytes([s[0], s[1], s[2], s[3]]),
        None => 0,
    }
}

#[inline]
const fn padded(len: usize) -> usize {
    (len + 3) & !3
}

impl<'a> Message<'a> {
    /// Parses and structurally validates a whole message (one UDP datagram or one TCP frame):
    /// header (§5: leading zero bits, magic cookie, length a multiple of 4 matching the bytes),
    /// attribute TLVs with 4-byte padding inside the message (§14), FINGERPRINT last (§14.7).
    /// Integrity is not checked here: that needs the key ([`Message::check_integrity`]).
    pub fn parse(data: &'a [u8]) -> Result<Self, StunError> {
        if data.len() < HEADER_LEN {
            return Err(StunError::TooShort);
        }
        let typ = MessageType::from_u16(be16(data, 0)).ok_or(StunError::NotStun)?;
        let len = be16(data, 2);
        if be32(data, 4) != MAGIC_COOKIE {
            return Err(StunError::BadCookie);
        }
        if !len.is_multiple_of(4) {
            return Err(StunError::UnalignedLength(len));
        }
        if usize::from(len) != data.len() - HEADER_LEN {
            return Err(StunError::LengthMismatch {
                field: len,
                actual: data.len() - HEADER_LEN,
            });
        }
        let mut msg = Self {
            raw: data,
            typ,
            attrs_end: data.len(),
            integrity: None,
            integrity_sha256: None,
            fingerprint: None,
            unknown_required: false,
        };
        let mut at = HEADER_LEN;
        while at < data.len() {
            if msg.fingerprint.is_some() {
                return Err(StunError::FingerprintNotLast);
            }
            if data.len() - at < 4 {
                return Err(StunError::TruncatedAttribute(at));
            }
            let t = be16(data, at);
            let l = usize::from(be16(data, at + 2));
            if padded(l) > data.len() - at - 4 {
                return Err(StunError::TruncatedAttribute(at));
            }
            let counted = msg.integrity.is_none() && msg.integrity_sha256.is_none();
            match t {
                attr::MESSAGE_INTEGRITY if counted => {
                    if l != INTEGRITY_LEN {
                        return Err(StunError::BadAttribute(t));
                    }
                    msg.integrity = Some(at);
                    msg.attrs_end = at;
                }
                attr::MESSAGE_INTEGRITY_SHA256 if msg.integrity_sha256.is_none() => {
                    // Only valid before or right after MESSAGE-INTEGRITY (§14.6); 16..=32, x4.
                    if !(16..=INTEGRITY_SHA256_LEN).contains(&l) || !l.is_multiple_of(4) {
                        return Err(StunError::BadAttribute(t));
                    }
                    msg.integrity_sha256 = Some(at);
                    if counted {
                        msg.attrs_end = at;
                    }
                }
                attr::FINGERPRINT => {
                    if l != 4 {
                        return Err(StunError::BadAttribute(t));
                    }
                    msg.fingerprint = Some(at);
                    if counted {
                        msg.attrs_end = at;
                    }
                }
                _ if counted
                    && attr::is_comprehension_required(t)
                    && !attr::is_known_required(t) =>
                {
                    msg.unknown_required = true;
                }
                // Known attributes, and anything after an integrity attribute (ignored, §14.5).
                _ => {}
            }
            at += 4 + padded(l);
        }
        Ok(msg)
    }

    /// The bytes the message was parsed from.
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    pub fn message_type(&self) -> MessageType {
        self.typ
    }

    pub fn method(&self) -> Method {
        self.typ.method
    }

    pub fn class(&self) -> Class {
        self.typ.class
    }

    pub fn transaction_id(&self) -> TransactionId {
        let mut t = [0u8; 12];
        if let Some(s) = self.raw.get(8..20) {
            t.copy_from_slice(s);
        }
        TransactionId(t)
    }

    /// Attributes that count: those before MESSAGE-INTEGRITY(-SHA256)/FINGERPRINT, in order.
    pub fn attributes(&self) -> Attributes<'a> {
        Attributes {
            raw: self.raw,
            at: HEADER_LEN,
            end: self.attrs_end,
        }
    }

    /// The first attribute of type `typ` (later duplicates are ignored, §14).
    pub fn get(&self, typ: u16) -> Option<RawAttribute<'a>> {
        self.attributes().find(|a| a.typ == typ)
    }

    /// Every attribute of type `typ` (CreatePermission may carry several XOR-PEER-ADDRESS).
    pub fn get_all(&self, typ: u16) -> impl Iterator<Item = RawAttribute<'a>> + use<'a> {
        self.attributes().filter(move |a| a.typ == typ)
    }

    /// Decodes the first attribute of type `typ`: `Ok(None)` when absent.
    pub fn decode(&self, typ: u16) -> Result<Option<Attribute<'a>>, StunError> {
        match self.get(typ) {
            Some(a) => Attribute::decode(a, &self.transaction_id()).map(Some),
            None => Ok(None),
        }
    }

    /// Whether a comprehension-required attribute this codec does not know is present (§6.3.1:
    /// a request gets 420, an indication is dropped).
    pub fn has_unknown_required(&self) -> bool {
        self.unknown_required
    }

    /// The unknown comprehension-required attribute types, for UNKNOWN-ATTRIBUTES.
    pub fn unknown_required(&self) -> impl Iterator<Item = u16> + use<'a> {
        self.attributes()
            .map(|a| a.typ)
            .filter(|&t| attr::is_comprehension_required(t) && !attr::is_known_required(t))
    }

    /// A UTF-8 attribute value (USERNAME, REALM, NONCE, SOFTWARE): `Ok(None)` when absent.
    pub fn text(&self, typ: u16) -> Result<Option<&'a str>, StunError> {
        match self.get(typ) {
            Some(a) => std::str::from_utf8(a.value)
                .map(Some)
                .map_err(|_| StunError::BadAttribute(typ)),
            None => Ok(None),
        }
    }

    /// An XOR-…-ADDRESS attribute (§14.2): `Ok(None)` when absent.
    pub fn xor_address(&self, typ: u16) -> Result<Option<SocketAddr>, StunError> {
        match self.get(typ) {
            Some(a) => decode_address(a.value, Some(&self.transaction_id()))
                .map(Some)
                .ok_or(StunError::BadAttribute(typ)),
            None => Ok(None),
        }
    }

    /// A 32-bit attribute value (LIFETIME): `Ok(None)` when absent.
    pub fn u32_value(&self, typ: u16) -> Result<Option<u32>, StunError> {
        match self.get(typ) {
            Some(a) if a.value.len() == 4 => Ok(Some(be32(a.value, 0))),
            Some(_) => Err(StunError::BadAttribute(typ)),
            None => Ok(None),
        }
    }

    pub fn has_integrity(&self) -> bool {
        self.integrity.is_some()
    }

    pub fn has_integrity_sha256(&self) -> bool {
        self.integrity_sha256.is_some()
    }

    pub fn has_fingerprint(&self) -> bool {
        self.fingerprint.is_some()
    }

    /// Verifies MESSAGE-INTEGRITY (HMAC-SHA1, §14.5) in constant time: the HMAC covers the
    /// message up to the attribute with the header length patched to end right after it.
    /// `false` when the attribute is absent.
    pub fn check_integrity(&self, key: &[u8]) -> bool {
        let Some(at) = self.integrity else {
            return false;
        };
        let (Some(expected), Ok(mut mac)) = (
            self.raw.get(at + 4..at + 4 + INTEGRITY_LEN),
            Hmac::<Sha1>::new_from_slice(key),
        ) else {
            return false;
        };
        feed_patched(&mut mac, self.raw, at, INTEGRITY_LEN);
        mac.finalize().into_bytes().ct_eq(expected).into()
    }

    /// Verifies MESSAGE-INTEGRITY-SHA256 (§14.6), which may be truncated to its first 16+ bytes.
    pub fn check_integrity_sha256(&self, key: &[u8]) -> bool {
        let Some(at) = self.integrity_sha256 else {
            return false;
        };
        let len = usize::from(be16(self.raw, at + 2));
        let (Some(expected), Ok(mut mac)) = (
            self.raw.get(at + 4..at + 4 + len),
            Hmac::<Sha256>::new_from_slice(key),
        ) else {
            return false;
        };
        feed_patched(&mut mac, self.raw, at, len);
        let full = mac.finalize().into_bytes();
        match full.get(..len) {
            Some(h) => h.ct_eq(expected).into(),
            None => false,
        }
    }

    /// Verifies FINGERPRINT (§14.7). `false` when absent.
    pub fn check_fingerprint(&self) -> bool {
        let Some(at) = self.fingerprint else {
            return false;
        };
        // FINGERPRINT is last, so the header length already ends right after it.
        match self.raw.get(..at) {
            Some(covered) => fingerprint(covered) == be32(self.raw, at + 4),
            None => false,
        }
    }
}

/// Feeds `raw[..at]` to a MAC with the header length set as if the message ended after an
/// attribute of `value_len` at `at` (§14.5): no copy of the message is made.
fn feed_patched<M: Mac>(mac: &mut M, raw: &[u8], at: usize, value_len: usize) {
    let patched = (at + 4 + value_len - HEADER_LEN) as u16;
    mac.update(raw.get(..2).unwrap_or_default());
    mac.update(&patched.to_be_bytes());
    mac.update(raw.get(4..at).unwrap_or_default());
}

fn fingerprint(covered: &[u8]) -> u32 {
    crc32fast::hash(covered) ^ FINGERPRINT_XOR
}

/// Iterator over a message's counted attributes.
#[derive(Debug, Clone)]
pub struct Attributes<'a> {
    raw: &'a [u8],
    at: usize,
    end: usize,
}

impl<'a> Iterator for Attributes<'a> {
    type Item = RawAttribute<'a>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.at + 4 > self.end {
            return None;
        }
        let typ = be16(self.raw, self.at);
        let len = usize::from(be16(self.raw, self.at + 2));
        let offset = self.at + 4;
        let value = self.raw.get(offset..offset + len)?;
        self.at = offset + padded(len);
        Some(RawAttribute { typ, value, offset })
    }
}

/// Decodes (XOR-)MAPPED-ADDRESS (§14.1, §14.2); `tid` given means XOR.
fn decode_address(v: &[u8], tid: Option<&TransactionId>) -> Option<SocketAddr> {
    let family = AddressFamily::from_code(*v.get(1)?)?;
    let mut port = be16(v, 2);
    if tid.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    let ip = match family {
        AddressFamily::V4 => {
            if v.len() != 8 {
                return None;
            }
            let mut a = be32(v, 4);
            if tid.is_some() {
                a ^= MAGIC_COOKIE;
            }
            IpAddr::V4(Ipv4Addr::from(a))
        }
        AddressFamily::V6 => {
            let b: [u8; 16] = v.get(4..20)?.try_into().ok()?;
            if v.len() != 20 {
                return None;
            }
            let mut a = u128::from_be_bytes(b);
            if let Some(t) = tid {
                a ^= xor_mask_v6(t);
            }
            IpAddr::V6(Ipv6Addr::from(a))
        }
    };
    Some(SocketAddr::new(ip, port))
}

/// IPv6 addresses are XORed with the cookie followed by the transaction id (§14.2).
fn xor_mask_v6(tid: &TransactionId) -> u128 {
    let mut m = [0u8; 16];
    m[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    m[4..].copy_from_slice(&tid.0);
    u128::from_be_bytes(m)
}

/// A decoded attribute. Values borrow the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attribute<'a> {
    MappedAddress(SocketAddr),
    XorMappedAddress(SocketAddr),
    XorPeerAddress(SocketAddr),
    XorRelayedAddress(SocketAddr),
    Username(&'a str),
    Realm(&'a str),
    Nonce(&'a str),
    Software(&'a str),
    MessageIntegrity(&'a [u8]),
    MessageIntegritySha256(&'a [u8]),
    Fingerprint(u32),
    /// An error code (300..=699) and its reason phrase (§14.8).
    ErrorCode {
        code: u16,
        reason: &'a str,
    },
    /// Big-endian u16 attribute types (§14.9); iterate with [`unknown_attribute_types`].
    UnknownAttributes(&'a [u8]),
    Lifetime(u32),
    /// IANA protocol number; 17 (UDP) is the only one a relay offers here (RFC 8656 §18.7).
    RequestedTransport(u8),
    ChannelNumber(u16),
    Data(&'a [u8]),
    DontFragment,
    /// The R bit: reserve the next-higher port too (RFC 8656 §18.6).
    EvenPort(bool),
    ReservationToken([u8; 8]),
    RequestedAddressFamily(AddressFamily),
    /// The algorithm code and its parameters (RFC 8489 §14.12).
    PasswordAlgorithm {
        algorithm: u16,
        params: &'a [u8],
    },
    /// The raw list (§14.11); iterate with [`password_algorithms`].
    PasswordAlgorithms(&'a [u8]),
    UserHash(&'a [u8; 32]),
    /// Any other type, kept raw.
    Other {
        typ: u16,
        value: &'a [u8],
    },
}

/// Limits on UTF-8 attributes (§14.3, §14.9, §14.10, §14.14): USERNAME < 509 bytes, the others
/// at most 763 bytes.
const MAX_USERNAME: usize = 508;
const MAX_TEXT: usize = 763;

impl<'a> Attribute<'a> {
    /// Decodes a raw attribute; `tid` is needed for the XOR address forms.
    pub fn decode(a: RawAttribute<'a>, tid: &TransactionId) -> Result<Self, StunError> {
        let bad = StunError::BadAttribute(a.typ);
        let v = a.value;
        let text = |max: usize| -> Result<&'a str, StunError> {
            if v.len() > max {
                return Err(bad);
            }
            std::str::from_utf8(v).map_err(|_| bad)
        };
        let fixed = |n: usize| if v.len() == n { Ok(()) } else { Err(bad) };
        Ok(match a.typ {
            attr::MAPPED_ADDRESS => Self::MappedAddress(decode_address(v, None).ok_or(bad)?),
            attr::XOR_MAPPED_ADDRESS => {
                Self::XorMappedAddress(decode_address(v, Some(tid)).ok_or(bad)?)
            }
            attr::XOR_PEER_ADDRESS => {
                Self::XorPeerAddress(decode_address(v, Some(tid)).ok_or(bad)?)
            }
            attr::XOR_RELAYED_ADDRESS => {
                Self::XorRelayedAddress(decode_address(v, Some(tid)).ok_or(bad)?)
            }
            attr::USERNAME => Self::Username(text(MAX_USERNAME)?),
            attr::REALM => Self::Realm(text(MAX_TEXT)?),
            attr::NONCE => Self::Nonce(text(MAX_TEXT)?),
            attr::SOFTWARE => Self::Software(text(MAX_TEXT)?),
            attr::MESSAGE_INTEGRITY => {
                fixed(INTEGRITY_LEN)?;
                Self::MessageIntegrity(v)
            }
            attr::MESSAGE_INTEGRITY_SHA256 => {
                if !(16..=INTEGRITY_SHA256_LEN).contains(&v.len()) || !v.len().is_multiple_of(4) {
                    return Err(bad);
                }
                Self::MessageIntegritySha256(v)
            }
            attr::FINGERPRINT => {
                fixed(4)?;
                Self::Fingerprint(be32(v, 0))
            }
            attr::ERROR_CODE => {
                if v.len() < 4 || v.len() > 4 + MAX_TEXT {
                    return Err(bad);
                }
                let class = u16::from(v[2] & 0x07);
                let number = u16::from(v[3]);
                if !(3..=6).contains(&class) || number > 99 {
                    return Err(bad);
                }
                let reason = std::str::from_utf8(&v[4..]).map_err(|_| bad)?;
                Self::ErrorCode {
                    code: class * 100 + number,
                    reason,
                }
            }
            attr::UNKNOWN_ATTRIBUTES => {
                if !v.len().is_multiple_of(2) {
                    return Err(bad);
                }
                Self::UnknownAttributes(v)
            }
            attr::LIFETIME => {
                fixed(4)?;
                Self::Lifetime(be32(v, 0))
            }
            attr::REQUESTED_TRANSPORT => {
                fixed(4)?;
                Self::RequestedTransport(v[0])
            }
            attr::CHANNEL_NUMBER => {
                fixed(4)?;
                Self::ChannelNumber(be16(v, 0))
            }
            attr::DATA => Self::Data(v),
            attr::DONT_FRAGMENT => {
                fixed(0)?;
                Self::DontFragment
            }
            attr::EVEN_PORT => {
                fixed(1)?;
                Self::EvenPort(v[0] & 0x80 != 0)
            }
            attr::RESERVATION_TOKEN => Self::ReservationToken(v.try_into().map_err(|_| bad)?),
            attr::REQUESTED_ADDRESS_FAMILY => {
                fixed(4)?;
                Self::RequestedAddressFamily(AddressFamily::from_code(v[0]).ok_or(bad)?)
            }
            attr::PASSWORD_ALGORITHM => {
                let (algorithm, params, rest) = split_algorithm(v).ok_or(bad)?;
                if !rest.is_empty() {
                    return Err(bad);
                }
                Self::PasswordAlgorithm { algorithm, params }
            }
            attr::PASSWORD_ALGORITHMS => {
                if password_algorithms(v).any(|r| r.is_none()) {
                    return Err(bad);
                }
                Self::PasswordAlgorithms(v)
            }
            attr::USERHASH => Self::UserHash(v.try_into().map_err(|_| bad)?),
            typ => Self::Other { typ, value: v },
        })
    }

    /// The attribute type this value is encoded as.
    pub fn typ(&self) -> u16 {
        match self {
            Self::MappedAddress(_) => attr::MAPPED_ADDRESS,
            Self::XorMappedAddress(_) => attr::XOR_MAPPED_ADDRESS,
            Self::XorPeerAddress(_) => attr::XOR_PEER_ADDRESS,
            Self::XorRelayedAddress(_) => attr::XOR_RELAYED_ADDRESS,
            Self::Username(_) => attr::USERNAME,
            Self::Realm(_) => attr::REALM,
            Self::Nonce(_) => attr::NONCE,
            Self::Software(_) => attr::SOFTWARE,
            Self::MessageIntegrity(_) => attr::MESSAGE_INTEGRITY,
            Self::MessageIntegritySha256(_) => attr::MESSAGE_INTEGRITY_SHA256,
            Self::Fingerprint(_) => attr::FINGERPRINT,
            Self::ErrorCode { .. } => attr::ERROR_CODE,
            Self::UnknownAttributes(_) => attr::UNKNOWN_ATTRIBUTES,
            Self::Lifetime(_) => attr::LIFETIME,
            Self::RequestedTransport(_) => attr::REQUESTED_TRANSPORT,
            Self::ChannelNumber(_) => attr::CHANNEL_NUMBER,
            Self::Data(_) => attr::DATA,
            Self::DontFragment => attr::DONT_FRAGMENT,
            Self::EvenPort(_) => attr::EVEN_PORT,
            Self::ReservationToken(_) => attr::RESERVATION_TOKEN,
            Self::RequestedAddressFamily(_) => attr::REQUESTED_ADDRESS_FAMILY,
            Self::PasswordAlgorithm { .. } => attr::PASSWORD_ALGORITHM,
            Self::PasswordAlgorithms(_) => attr::PASSWORD_ALGORITHMS,
            Self::UserHash(_) => attr::USERHASH,
            Self::Other { typ, .. } => *typ,
        }
    }
}

/// Splits one `algorithm, length, params (padded)` entry (RFC 8489 §14.11, §14.12).
fn split_algorithm(v: &[u8]) -> Option<(u16, &[u8], &[u8])> {
    let alg = be16(v, 0);
    let len = usize::from(be16(v, 2));
    let params = v.get(4..4 + len)?;
    // A last entry may lack its inner padding (the attribute's own padding follows).
    let rest = v.get(4 + padded(len)..).unwrap_or_default();
    Some((alg, params, rest))
}

/// Entries of a PASSWORD-ALGORITHMS value; `None` marks a malformed tail.
pub fn password_algorithms(v: &[u8]) -> impl Iterator<Item = Option<(u16, &[u8])>> {
    let mut rest = v;
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed || rest.is_empty() {
            return None;
        }
        match split_algorithm(rest) {
            Some((a, p, r)) => {
                rest = r;
                Some(Some((a, p)))
            }
            None => {
                failed = true;
                Some(None)
            }
        }
    })
}

/// The types listed in an UNKNOWN-ATTRIBUTES value.
pub fn unknown_attribute_types(v: &[u8]) -> impl Iterator<Item = u16> + '_ {
    v.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]]))
}

/// Where a builder writes: a `Vec<u8>` or a `BytesMut`.
pub trait OutBuf {
    fn put_slice(&mut self, b: &[u8]);
    fn written(&self) -> usize;
    fn bytes_mut(&mut self) -> &mut [u8];
    fn bytes(&self) -> &[u8];
}

impl OutBuf for Vec<u8> {
    fn put_slice(&mut self, b: &[u8]) {
        self.extend_from_slice(b);
    }
    fn written(&self) -> usize {
        self.len()
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self
    }
    fn bytes(&self) -> &[u8] {
        self
    }
}

impl OutBuf for bytes::BytesMut {
    fn put_slice(&mut self, b: &[u8]) {
        self.extend_from_slice(b);
    }
    fn written(&self) -> usize {
        self.len()
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self
    }
    fn bytes(&self) -> &[u8] {
        self
    }
}

/// Appends one STUN message to a buffer. Attributes are written as they are added and the header
/// length kept current, so MESSAGE-INTEGRITY and FINGERPRINT can be computed over what precedes
/// them (§14.5–§14.7). A message that would exceed 65535 bytes stops growing and
/// [`MessageBuilder::finish`] reports it, so callers need not check every step.
pub struct MessageBuilder<'b, B: OutBuf = Vec<u8>> {
    buf: &'b mut B,
    start: usize,
    tid: TransactionId,
    overflow: bool,
}

impl<'b, B: OutBuf> MessageBuilder<'b, B> {
    /// Starts a message at the end of `buf` (which may already hold other frames).
    pub fn new(buf: &'b mut B, typ: MessageType, tid: TransactionId) -> Self {
        let start = buf.written();
        let mut h = [0u8; HEADER_LEN];
        h[..2].copy_from_slice(&typ.to_u16().to_be_bytes());
        h[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        h[8..].copy_from_slice(&tid.0);
        buf.put_slice(&h);
        Self {
            buf,
            start,
            tid,
            overflow: false,
        }
    }

    fn body_len(&self) -> usize {
        self.buf.written() - self.start - HEADER_LEN
    }

    fn set_len(&mut self, len: usize) {
        let at = self.start + 2;
        if let Some(s) = self.buf.bytes_mut().get_mut(at..at + 2) {
            s.copy_from_slice(&(len as u16).to_be_bytes());
        }
    }

    /// Whether `value_len` more value bytes fit.
    fn fits(&mut self, value_len: usize) -> bool {
        if self.overflow || value_len > usize::from(u16::MAX) {
            self.overflow = true;
            return false;
        }
        if self.body_len() + 4 + padded(value_len) > usize::from(u16::MAX) {
            self.overflow = true;
            return false;
        }
        true
    }

    /// Appends an attribute from value parts (written back to back), zero-padded to 4 bytes.
    pub fn raw_parts(&mut self, typ: u16, parts: &[&[u8]]) -> &mut Self {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if !self.fits(len) {
            return self;
        }
        let mut h = [0u8; 4];
        h[..2].copy_from_slice(&typ.to_be_bytes());
        h[2..].copy_from_slice(&(len as u16).to_be_bytes());
        self.buf.put_slice(&h);
        for p in parts {
            self.buf.put_slice(p);
        }
        self.buf.put_slice(&[0u8; 3][..padded(len) - len]);
        let body = self.body_len();
        self.set_len(body);
        self
    }

    /// Appends an attribute with the given raw value.
    pub fn raw(&mut self, typ: u16, value: &[u8]) -> &mut Self {
        self.raw_parts(typ, &[value])
    }

    /// A MAPPED-ADDRESS or, with `xor`, an XOR-…-ADDRESS attribute (§14.1, §14.2).
    pub fn address(&mut self, typ: u16, addr: SocketAddr, xor: bool) -> &mut Self {
        let mut v = [0u8; 20];
        v[1] = AddressFamily::of(&addr.ip()).code();
        let mut port = addr.port();
        if xor {
            port ^= (MAGIC_COOKIE >> 16) as u16;
        }
        v[2..4].copy_from_slice(&port.to_be_bytes());
        let len = match addr.ip() {
            IpAddr::V4(ip) => {
                let mut a = u32::from(ip);
                if xor {
                    a ^= MAGIC_COOKIE;
                }
                v[4..8].copy_from_slice(&a.to_be_bytes());
                8
            }
            IpAddr::V6(ip) => {
                let mut a = u128::from(ip);
                if xor {
                    a ^= xor_mask_v6(&self.tid);
                }
                v[4..20].copy_from_slice(&a.to_be_bytes());
                20
            }
        };
        self.raw(typ, &v[..len])
    }

    /// An XOR-…-ADDRESS attribute (XOR-MAPPED-, XOR-PEER-, XOR-RELAYED-ADDRESS).
    pub fn xor_address(&mut self, typ: u16, addr: SocketAddr) -> &mut Self {
        self.address(typ, addr, true)
    }

    /// A UTF-8 attribute (USERNAME, REALM, NONCE, SOFTWARE).
    pub fn text(&mut self, typ: u16, s: &str) -> &mut Self {
        self.raw(typ, s.as_bytes())
    }

    /// A 32-bit attribute (LIFETIME).
    pub fn u32_value(&mut self, typ: u16, v: u32) -> &mut Self {
        self.raw(typ, &v.to_be_bytes())
    }

    /// ERROR-CODE (§14.8): class and number, then the reason phrase.
    pub fn error_code(&mut self, code: u16, reason: &str) -> &mut Self {
        let head = [0, 0, ((code / 100) & 0x07) as u8, (code % 100) as u8];
        self.raw_parts(attr::ERROR_CODE, &[&head, reason.as_bytes()])
    }

    /// UNKNOWN-ATTRIBUTES (§14.9).
    pub fn unknown_attributes(&mut self, types: impl IntoIterator<Item = u16>) -> &mut Self {
        let mut v = [0u8; 64];
        let mut n = 0;
        for t in types.into_iter().take(v.len() / 2) {
            v[n..n + 2].copy_from_slice(&t.to_be_bytes());
            n += 2;
        }
        self.raw(attr::UNKNOWN_ATTRIBUTES, &v[..n])
    }

    /// CHANNEL-NUMBER (RFC 8656 §18.1): the number then two RFFU bytes.
    pub fn channel_number(&mut self, ch: u16) -> &mut Self {
        let b = ch.to_be_bytes();
        self.raw(attr::CHANNEL_NUMBER, &[b[0], b[1], 0, 0])
    }

    /// REQUESTED-TRANSPORT (RFC 8656 §18.7).
    pub fn requested_transport(&mut self, protocol: u8) -> &mut Self {
        self.raw(attr::REQUESTED_TRANSPORT, &[protocol, 0, 0, 0])
    }

    /// REQUESTED-ADDRESS-FAMILY (RFC 8656 §18.8).
    pub fn requested_address_family(&mut self, f: AddressFamily) -> &mut Self {
        self.raw(attr::REQUESTED_ADDRESS_FAMILY, &[f.code(), 0, 0, 0])
    }

    /// DATA (RFC 8656 §18.4).
    pub fn data(&mut self, payload: &[u8]) -> &mut Self {
        self.raw(attr::DATA, payload)
    }

    /// Any decoded attribute, encoded back (MESSAGE-INTEGRITY(-SHA256) and FINGERPRINT values
    /// are copied as given, not computed: use the dedicated methods for those).
    pub fn add(&mut self, a: &Attribute<'_>) -> &mut Self {
        let t = a.typ();
        match *a {
            Attribute::MappedAddress(x) => self.address(t, x, false),
            Attribute::XorMappedAddress(x)
            | Attribute::XorPeerAddress(x)
            | Attribute::XorRelayedAddress(x) => self.address(t, x, true),
            Attribute::Username(s)
            | Attribute::Realm(s)
            | Attribute::Nonce(s)
            | Attribute::Software(s) => self.text(t, s),
            Attribute::MessageIntegrity(v)
            | Attribute::MessageIntegritySha256(v)
            | Attribute::UnknownAttributes(v)
            | Attribute::Data(v)
            | Attribute::PasswordAlgorithms(v) => self.raw(t, v),
            Attribute::Fingerprint(v) | Attribute::Lifetime(v) => self.u32_value(t, v),
            Attribute::ErrorCode { code, reason } => self.error_code(code, reason),
            Attribute::RequestedTransport(p) => self.requested_transport(p),
            Attribute::ChannelNumber(c) => self.channel_number(c),
            Attribute::DontFragment => self.raw(t, &[]),
            Attribute::EvenPort(r) => self.raw(t, &[if r { 0x80 } else { 0 }]),
            Attribute::ReservationToken(tok) => self.raw(t, &tok),
            Attribute::RequestedAddressFamily(f) => self.requested_address_family(f),
            Attribute::PasswordAlgorithm { algorithm, params } => {
                let mut h = [0u8; 4];
                h[..2].copy_from_slice(&algorithm.to_be_bytes());
                h[2..].copy_from_slice(&(params.len() as u16).to_be_bytes());
                let pad = [0u8; 3];
                let pad = &pad[..padded(params.len()) - params.len()];
                self.raw_parts(t, &[&h, params, pad])
            }
            Attribute::UserHash(h) => self.raw(t, h),
            Attribute::Other { typ, value } => self.raw(typ, value),
        }
    }

    /// Appends MESSAGE-INTEGRITY computed with `key` (§14.5).
    pub fn integrity(&mut self, key: &[u8]) -> &mut Self {
        self.append_mac::<Hmac<Sha1>>(attr::MESSAGE_INTEGRITY, key, INTEGRITY_LEN)
    }

    /// Appends MESSAGE-INTEGRITY-SHA256 computed with `key` (§14.6), untruncated.
    pub fn integrity_sha256(&mut self, key: &[u8]) -> &mut Self {
        self.append_mac::<Hmac<Sha256>>(attr::MESSAGE_INTEGRITY_SHA256, key, INTEGRITY_SHA256_LEN)
    }

    fn append_mac<M: Mac + hmac::digest::KeyInit>(
        &mut self,
        typ: u16,
        key: &[u8],
        len: usize,
    ) -> &mut Self {
        if !self.fits(len) {
            return self;
        }
        let Ok(mut mac) = <M as hmac::digest::KeyInit>::new_from_slice(key) else {
            self.overflow = true;
            return self;
        };
        let covered = self.body_len() + 4 + len;
        self.set_len(covered);
        mac.update(self.buf.bytes().get(self.start..).unwrap_or_default());
        let out = mac.finalize().into_bytes();
        self.raw(typ, out.get(..len).unwrap_or_default())
    }

    /// Appends FINGERPRINT (§14.7); it must be the last attribute.
    pub fn fingerprint(&mut self) -> &mut Self {
        if !self.fits(4) {
            return self;
        }
        let covered = self.body_len() + 8;
        self.set_len(covered);
        let crc = fingerprint(self.buf.bytes().get(self.start..).unwrap_or_default());
        self.u32_value(attr::FINGERPRINT, crc)
    }

    /// Ends the message: its total size, or the error when it did not fit (then the buffer
    /// holds a truncated message that must not be sent).
    pub fn finish(self) -> Result<usize, BuildError> {
        if self.overflow {
            Err(BuildError::TooLong)
        } else {
            Ok(self.buf.written() - self.start)
        }
    }
}

/// What a packet on a TURN port is, by its first byte (RFC 8656 §12, RFC 7983).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketKind {
    Stun,
    ChannelData,
    Other,
}

/// First two bits `00`: STUN; `01`: ChannelData (channel numbers 0x4000..=0x7FFF).
#[inline]
pub fn classify(data: &[u8]) -> PacketKind {
    match data.first() {
        Some(b) if b & 0xC0 == 0x00 => PacketKind::Stun,
        Some(b) if b & 0xC0 == 0x40 => PacketKind::ChannelData,
        _ => PacketKind::Other,
    }
}

/// Channel numbers a ChannelBind may use: RFC 8656 §12 allows 0x4000 through 0x4FFF, but
/// RFC 5766 §11 allowed up to 0x7FFF and clients still pick from that range (coturn's
/// `turnutils_uclient` does). Accepting it costs the server nothing: it only ever demultiplexes
/// STUN and ChannelData on its own ports; the narrower range protects the client's demultiplexing
/// (RFC 7983), which is the client's choice.
#[inline]
pub const fn is_valid_channel(ch: u16) -> bool {
    ch >= 0x4000 && ch <= 0x7FFF
}

/// Parses a ChannelData message (RFC 8656 §12.4): the channel number and the application data.
/// Trailing bytes beyond the length (padding over TCP, optional padding over UDP, §12.5) are
/// ignored. No allocation: the payload is a slice of `data`.
#[inline]
pub fn parse_channel_data(data: &[u8]) -> Option<(u16, &[u8])> {
    let h = data.get(..CHANNEL_DATA_HEADER_LEN)?;
    let ch = u16::from_be_bytes([h[0], h[1]]);
    if ch & 0xC000 != 0x4000 {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([h[2], h[3]]));
    let payload = data.get(CHANNEL_DATA_HEADER_LEN..CHANNEL_DATA_HEADER_LEN + len)?;
    Some((ch, payload))
}

/// The 4-byte ChannelData header (RFC 8656 §12.4).
#[inline]
pub const fn channel_data_header(channel: u16, len: u16) -> [u8; 4] {
    let c = channel.to_be_bytes();
    let l = len.to_be_bytes();
    [c[0], c[1], l[0], l[1]]
}

/// Appends a whole ChannelData message; over TCP/TLS (`pad`) it is padded to 4 bytes
/// (RFC 8656 §12.5). Returns `None` (and writes nothing) for payloads over 65535 bytes.
#[inline]
pub fn write_channel_data(
    out: &mut Vec<u8>,
    channel: u16,
    payload: &[u8],
    pad: bool,
) -> Option<usize> {
    let len = u16::try_from(payload.len()).ok()?;
    let start = out.len();
    out.extend_from_slice(&channel_data_header(channel, len));
    out.extend_from_slice(payload);
    if pad {
        out.extend_from_slice(&[0u8; 3][..padded(payload.len()) - payload.len()]);
    }
    Some(out.len() - start)
}

/// How much of a TCP/TLS stream the next frame takes (RFC 8656 §12.5, RFC 6062 §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameLen {
    /// The buffer starts with a whole frame of this many bytes.
    Complete(usize),
    /// The frame is not complete yet: read more.
    Incomplete,
    /// Neither STUN nor ChannelData, a STUN length that is not a multiple of 4, or a frame over
    /// the limit: a byte stream cannot be resynchronised, so the connection should be closed.
    Invalid,
}

/// Sizes the next frame of a TURN-over-TCP/TLS stream: STUN is `20 + length`, ChannelData
/// `4 + length` padded to a multiple of 4 (RFC 8656 §12.5). Frames over `max` are
/// [`FrameLen::Invalid`].
pub fn frame_len(buf: &[u8], max: usize) -> FrameLen {
    let Some(h) = buf.get(..4) else {
        return match buf.first() {
            Some(&b) if b & 0x80 != 0 => FrameLen::Invalid,
            _ => FrameLen::Incomplete,
        };
    };
    let len = u16::from_be_bytes([h[2], h[3]]);
    let total = match h[0] & 0xC0 {
        0x00 if len.is_multiple_of(4) => HEADER_LEN + usize::from(len),
        0x40 => CHANNEL_DATA_HEADER_LEN + padded(usize::from(len)),
        _ => return FrameLen::Invalid,
    };
    if total > max {
        FrameLen::Invalid
    } else if buf.len() >= total {
        FrameLen::Complete(total)
    } else {
        FrameLen::Incomplete
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        hex::decode(s).expect("test hex")
    }

    /// RFC 5769 §2.1.
    const REQUEST: &str = "00010058 2112a442 b7e7a701 bc34d686 fa87dfae
        80220010 5354554e 20746573 7420636c 69656e74
        00240004 6e0001ff
        80290008 932ff9b1 51263b36
        00060009 6576746a 3a683676 59202020
        00080014 9aeaa70c bfd8cb56 781ef2b5 b2d3f249 c1b571a2
        80280004 e57a3bcf";
    /// RFC 5769 §2.2.
    const RESPONSE_V4: &str = "0101003c 2112a442 b7e7a701 bc34d686 fa87dfae
        8022000b 74657374 20766563 746f7220
        00200008 0001a147 e112a643
        00080014 2b91f599 fd9e90c3 8c7489f9 2af9ba53 f06be7d7
        80280004 c07d4c96";
    /// RFC 5769 §2.3.
    const RESPONSE_V6: &str = "01010048 2112a442 b7e7a701 bc34d686 fa87dfae
        8022000b 74657374 20766563 746f7220
        00200014 0002a147 0113a9fa a5d3f179 bc25f4b5 bed2b9d9
        00080014 a382954e 4be67bf1 1784c97c 8292c275 bfe3ed41
        80280004 c8fb0b4c";
    /// RFC 5769 §2.4.
    const LONG_TERM: &str = "00010060 2112a442 78ad3433 c6ad72c0 29da412e
        00060012 e3839ee3 8388e383 aae38383 e382afe3 82b90000
        0015001c 662f2f34 39396b39 35346436 4f4c3334 6f4c3946 53547679 36347341
        0014000b 6578616d 706c652e 6f726700
        00080014 f6702465 6dd64a3e 02b8e071 2e85c9a2 8ca89666";
    const SHORT_TERM_KEY: &[u8] = b"VOkJxbRl1RmTxUk/WvJxBt";
    const TID: TransactionId = TransactionId([
        0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
    ]);

    #[test]
    fn message_type_interleaving() {
        for (m, c, v) in [
            (Method::BINDING, Class::Request, 0x0001),
            (Method::BINDING, Class::Success, 0x0101),
            (Method::BINDING, Class::Error, 0x0111),
            (Method::ALLOCATE, Class::Request, 0x0003),
            (Method::ALLOCATE, Class::Error, 0x0113),
            (Method::SEND, Class::Indication, 0x0016),
            (Method::DATA, Class::Indication, 0x0017),
            (Method::CHANNEL_BIND, Class::Success, 0x0109),
        ] {
            let t = MessageType::new(m, c);
            assert_eq!(t.to_u16(), v);
            assert_eq!(MessageType::from_u16(v), Some(t));
        }
        for v in 0..0x4000u16 {
            let t = MessageType::from_u16(v).expect("14-bit types decode");
            assert_eq!(t.to_u16(), v);
        }
        assert_eq!(MessageType::from_u16(0x4001), None);
    }

    #[test]
    fn rfc5769_request() {
        let raw = hex(REQUEST);
        let m = Message::parse(&raw).expect("parses");
        assert_eq!(
            m.message_type(),
            MessageType::new(Method::BINDING, Class::Request)
        );
        assert_eq!(m.transaction_id(), TID);
        assert_eq!(m.text(attr::SOFTWARE), Ok(Some("STUN test client")));
        assert_eq!(m.text(attr::USERNAME), Ok(Some("evtj:h6vY")));
        assert!(!m.has_unknown_required(), "PRIORITY is understood");
        assert!(m.check_integrity(SHORT_TERM_KEY));
        assert!(!m.check_integrity(b"VOkJxbRl1RmTxUk/WvJxBT"));
        assert!(m.check_fingerprint());
        assert!(!m.has_integrity_sha256());
        let types: Vec<u16> = m.attributes().map(|a| a.typ).collect();
        assert_eq!(
            types,
            [
                attr::SOFTWARE,
                attr::PRIORITY,
                attr::ICE_CONTROLLED,
                attr::USERNAME
            ]
        );
        // Round trip: the vector pads with spaces, we pad with zeros; otherwise identical.
        let mut out = Vec::new();
        let mut b = MessageBuilder::new(&mut out, m.message_type(), m.transaction_id());
        for a in m.attributes() {
            b.add(&Attribute::decode(a, &TID).expect("decodes"));
        }
        b.integrity(SHORT_TERM_KEY).fingerprint();
        assert_eq!(b.finish(), Ok(raw.len()));
        let again = Message::parse(&out).expect("own output parses");
        assert!(again.check_integrity(SHORT_TERM_KEY));
        assert!(again.check_fingerprint());
        assert_eq!(again.text(attr::USERNAME), Ok(Some("evtj:h6vY")));
    }

    #[test]
    fn rfc5769_responses() {
        for (vector, addr) in [
            (RESPONSE_V4, "192.0.2.1:32853"),
            (RESPONSE_V6, "[2001:db8:1234:5678:11:2233:4455:6677]:32853"),
        ] {
            let raw = hex(vector);
            let m = Message::parse(&raw).expect("parses");
            assert_eq!(m.class(), Class::Success);
            let addr: SocketAddr = addr.parse().expect("addr");
            assert_eq!(m.xor_address(attr::XOR_MAPPED_ADDRESS), Ok(Some(addr)));
            assert_eq!(m.text(attr::SOFTWARE), Ok(Some("test vector")));
            assert!(m.check_integrity(SHORT_TERM_KEY));
            assert!(m.check_fingerprint());
            // Rebuild with our own padding (zeros instead of the vector's space) and compare
            // everything but that pad byte and the checksums that cover it.
            let mut out = Vec::new();
            let mut b = MessageBuilder::new(&mut out, m.message_type(), TID);
            b.text(attr::SOFTWARE, "test vector")
                .xor_address(attr::XOR_MAPPED_ADDRESS, addr)
                .integrity(SHORT_TERM_KEY)
                .fingerprint();
            assert_eq!(b.finish(), Ok(raw.len()));
            assert_eq!(out[..35], raw[..35]);
            assert_eq!(out[36..raw.len() - 32], raw[36..raw.len() - 32]);
            let mut fixed = out.clone();
            fixed[35] = b' ';
            assert_eq!(fixed[..raw.len() - 32], raw[..raw.len() - 32]);
            let own = Message::parse(&out).expect("parses");
            assert!(own.check_integrity(SHORT_TERM_KEY) && own.check_fingerprint());
        }
    }

    #[test]
    fn rfc5769_long_term() {
        let raw = hex(LONG_TERM);
        let m = Message::parse(&raw).expect("parses");
        let user = "\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}";
        assert_eq!(m.text(attr::USERNAME), Ok(Some(user)));
        assert_eq!(m.text(attr::REALM), Ok(Some("example.org")));
        assert_eq!(
            m.text(attr::NONCE),
            Ok(Some("f//499k954d6OL34oL9FSTvy64sA"))
        );
        assert!(!m.has_fingerprint());
        // The password after SASLprep ("The\u{AD}M\u{AA}tr\u{2168}" before).
        let key = LongTermKey::md5(user, "example.org", "TheMatrIX").expect("key");
        assert!(m.check_integrity(key.as_bytes()));
        let wrong = LongTermKey::md5(user, "example.org", "TheMatrix").expect("key");
        assert!(!m.check_integrity(wrong.as_bytes()));
        // This vector pads with zeros, so it round-trips byte for byte.
        let mut out = Vec::new();
        let mut b = MessageBuilder::new(&mut out, m.message_type(), m.transaction_id());
        b.text(attr::USERNAME, user)
            .text(attr::NONCE, "f//499k954d6OL34oL9FSTvy64sA")
            .text(attr::REALM, "example.org")
            .integrity(key.as_bytes());
        assert_eq!(b.finish(), Ok(raw.len()));
        assert_eq!(out, raw);
    }

    /// RFC 8489 Appendix B.1 (a request with long-term authentication, USERHASH,
    /// PASSWORD-ALGORITHM and MESSAGE-INTEGRITY-SHA256) as corrected by the verified Errata 6268:
    /// the published message length 0x9c counted the header, and the vector lacked the
    /// PASSWORD-ALGORITHM (SHA-256) its MESSAGE-INTEGRITY-SHA256 needs.
    const RFC8489_B1: &str = "00010090 2112a442 78ad3433 c6ad72c0 29da412e
        001e0020 4a3cf38f ef6992bd a952c678 0417da0f 24819415 569e60b2 05c46e41 407f1704
        00150029 6f624d61 744a6f73 32414141 43662f2f 3439396b 39353464 364f4c33 346f4c39
                 46535476 79363473 41000000
        0014000b 6578616d 706c652e 6f726700
        001d0004 00020000
        001c0020 b5c7bf00 5b6c52a2 1c51c5e8 92f81924 136296cb 927c4314 9309278c c6518e65";

    #[test]
    fn rfc8489_b1_userhash_sha256_errata_6268() {
        let raw = hex(RFC8489_B1);
        let m = Message::parse(&raw).expect("the corrected vector parses");
        let user = "\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}";
        let realm = "example.org";
        let nonce = "obMatJos2AAACf//499k954d6OL34oL9FSTvy64sA";
        assert_eq!(m.text(attr::NONCE), Ok(Some(nonce)));
        assert_eq!(m.text(attr::REALM), Ok(Some(realm)));
        assert!(m.get(attr::USERNAME).is_none());
        // USERHASH = SHA-256(OpaqueString(username) ":" OpaqueString(realm)) (§14.4).
        let hash = userhash(user, realm).expect("valid OpaqueStrings");
        assert_eq!(
            m.decode(attr::USERHASH),
            Ok(Some(Attribute::UserHash(&hash)))
        );
        // The cookie announces username anonymity: bit 1, counting from the least significant
        // (Errata 6290), which is why this request carries USERHASH.
        assert_eq!(security_features(nonce), Some(feature::USERNAME_ANONYMITY));
        assert_eq!(
            m.decode(attr::PASSWORD_ALGORITHM),
            Ok(Some(Attribute::PasswordAlgorithm {
                algorithm: PasswordAlgorithm::Sha256.code(),
                params: &[],
            }))
        );
        // The key is SHA-256 over the password "TheMatrIX". The appendix calls that the
        // OpaqueString form of "The\u{AD}M\u{AA}tr\u{2168}", but it is the RFC 5389 SASLprep form
        // (soft hyphen dropped, NFKC): OpaqueString keeps NFC and refuses U+00AD, a default
        // ignorable code point (RFC 8264 §9.13). So what is verifiable is the key of the prepared
        // password, and that the raw one has no key at all.
        let key =
            LongTermKey::derive(PasswordAlgorithm::Sha256, user, realm, "TheMatrIX").expect("key");
        assert!(m.check_integrity_sha256(key.as_bytes()));
        let md5 = LongTermKey::md5(user, realm, "TheMatrIX").expect("key");
        assert!(!m.check_integrity_sha256(md5.as_bytes()));
        assert_eq!(
            LongTermKey::derive(
                PasswordAlgorithm::Sha256,
                user,
                realm,
                "The\u{AD}M\u{AA}tr\u{2168}"
            ),
            Err(CredentialError::NotOpaqueString("password"))
        );
        // As published (length 0x9c, the whole message), it is no STUN message at all.
        let mut published = raw.clone();
        published[3] = 0x9c;
        assert!(Message::parse(&published).is_err());
        // Rebuilt from its parts, byte for byte.
        let mut out = Vec::new();
        let mut b = MessageBuilder::new(&mut out, m.message_type(), m.transaction_id());
        b.raw(attr::USERHASH, &hash)
            .text(attr::NONCE, nonce)
            .text(attr::REALM, realm)
            .raw(attr::PASSWORD_ALGORITHM, &[0, 2, 0, 0])
            .integrity_sha256(key.as_bytes());
        assert_eq!(b.finish(), Ok(raw.len()));
        assert_eq!(out, raw);
    }

    #[test]
    fn opaque_string_preparation() {
        // Printable ASCII is already prepared, and not copied.
        for s in [
            "alice",
            "1700000000:bob@example.com/x",
            "pa ss:~!",
            "Tpz/nKkyvX/vMSLKvL4sbtBt8Vs=",
        ] {
            assert!(
                matches!(opaque_string(s, "x"), Ok(Cow::Borrowed(b)) if b == s),
                "{s}"
            );
        }
        // Non-ASCII spaces map to U+0020 (RFC 8265 §4.2.1, additional mapping rule).
        assert_eq!(
            opaque_string("pass\u{A0}word\u{3000}!", "x").as_deref(),
            Ok("pass word !")
        );
        // NFC (normalization rule): a combining accent composes, compatibility forms stay.
        assert_eq!(
            opaque_string("cafe\u{301}", "x").as_deref(),
            Ok("caf\u{e9}")
        );
        assert_eq!(opaque_string("\u{2168}", "x").as_deref(), Ok("\u{2168}"));
        assert_eq!(
            opaque_string("\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}", "x").as_deref(),
            Ok("\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}")
        );
        // FreeformClass refusals: empty, controls (also ASCII ones), unassigned, default ignorables.
        for bad in [
            "",
            "tab\there",
            "bell\u{7}",
            "del\u{7f}",
            "nl\n",
            "\u{378}",
            "soft\u{AD}hyphen",
        ] {
            assert_eq!(
                opaque_string(bad, "password"),
                Err(CredentialError::NotOpaqueString("password")),
                "{bad:?}"
            );
        }
        // Keys of equivalent spellings agree; a refused password has no key.
        assert_eq!(
            LongTermKey::md5("u", "r", "pass\u{A0}word"),
            LongTermKey::md5("u", "r", "pass word")
        );
        assert_eq!(
            LongTermKey::md5("u", "", "p"),
            Err(CredentialError::NotOpaqueString("realm"))
        );
    }

    #[test]
    fn nonce_cookie_features() {
        assert_eq!(nonce_prefix(0), "obMatJos2AAAA");
        assert_eq!(nonce_prefix(feature::PASSWORD_ALGORITHMS), "obMatJos2AAAB");
        assert_eq!(
            nonce_prefix(feature::PASSWORD_ALGORITHMS | feature::USERNAME_ANONYMITY),
            "obMatJos2AAAD"
        );
        assert_eq!(nonce_prefix(0x00ff_ffff), "obMatJos2////");
        for bits in [0, 1, 2, 3, 0x40, 0x00ab_cdef, 0x00ff_ffff] {
            let n = format!("{}rest", nonce_prefix(bits));
            assert_eq!(security_features(&n), Some(bits));
        }
        // RFC 5389-style opaque NONCEs, short or non-base64 feature fields: no features.
        for n in [
            "f//499k954d6OL34oL9FSTvy64sA",
            "obMatJos2",
            "obMatJos2AA",
            "obMatJos2AA-_x",
            "obMatJos2AA\u{e9}",
            "xobMatJos2AAAB",
        ] {
            assert_eq!(security_features(n), None, "{n}");
        }
    }

    #[test]
    fn integrity_sha256_and_both() {
        let key = LongTermKey::derive(PasswordAlgorithm::Sha256, "u", "r", "p").expect("key");
        let mut out = vec![0xAA, 0xBB]; // builder appends after existing bytes
        let mut b = MessageBuilder::new(
            &mut out,
            MessageType::new(Method::ALLOCATE, Class::Request),
            TID,
        );
        b.text(attr::USERNAME, "u")
            .integrity(key.as_bytes())
            .integrity_sha256(key.as_bytes())
            .fingerprint();
        let n = b.finish().expect("fits");
        assert_eq!(n, out.len() - 2);
        let m = Message::parse(&out[2..]).expect("parses");
        assert!(m.check_integrity(key.as_bytes()));
        assert!(m.check_integrity_sha256(key.as_bytes()));
        assert!(m.check_fingerprint());
        assert!(!m.check_integrity_sha256(b"other"));
        // Only USERNAME counts as an attribute.
        assert_eq!(m.attributes().count(), 1);
    }

    #[test]
    fn attributes_after_integrity_are_ignored() {
        let mut out = Vec::new();
        let mut b = MessageBuilder::new(
            &mut out,
            MessageType::new(Method::BINDING, Class::Request),
            TID,
        );
        b.integrity(b"k").raw(0x7777, b"xyz").fingerprint();
        b.finish().expect("fits");
        let m = Message::parse(&out).expect("parses");
        assert!(!m.has_unknown_required(), "ignored after MESSAGE-INTEGRITY");
        assert!(m.get(0x7777).is_none());
        assert!(m.check_fingerprint());
        // The HMAC covers nothing after it, so the extra attribute does not break it.
        assert!(m.check_integrity(b"k"));
    }

    #[test]
    fn every_attribute_round_trips() {
        let v4: SocketAddr = "203.0.113.5:3478".parse().expect("addr");
        let v6: SocketAddr = "[2001:db8::1]:5000".parse().expect("addr");
        let hash = [7u8; 32];
        let algs = [0u8, 1, 0, 0, 0, 2, 0, 0];
        let attrs = [
            Attribute::MappedAddress(v6),
            Attribute::XorMappedAddress(v4),
            Attribute::XorPeerAddress(v6),
            Attribute::XorRelayedAddress(v4),
            Attribute::Username("user"),
            Attribute::Realm("realm"),
            Attribute::Nonce("nonce"),
            Attribute::Software("tern"),
            Attribute::ErrorCode {
                code: 438,
                reason: "Stale Nonce",
            },
            Attribute::UnknownAttributes(&[0x77, 0x77, 0x00, 0x42]),
            Attribute::Lifetime(600),
            Attribute::RequestedTransport(17),
            Attribute::ChannelNumber(0x4001),
            Attribute::Data(b"hello"),
            Attribute::DontFragment,
            Attribute::EvenPort(true),
            Attribute::ReservationToken([1, 2, 3, 4, 5, 6, 7, 8]),
            Attribute::RequestedAddressFamily(AddressFamily::V6),
            Attribute::PasswordAlgorithm {
                algorithm: 2,
                params: b"ab",
            },
            Attribute::PasswordAlgorithms(&algs),
            Attribute::UserHash(&hash),
            Attribute::Other {
                typ: 0x8055,
                value: b"opt",
            },
        ];
        let mut out = Vec::new();
        let mut b = MessageBuilder::new(
            &mut out,
            MessageType::new(Method::ALLOCATE, Class::Request),
            TID,
        );
        for a in &attrs {
            b.add(a);
        }
        b.finish().expect("fits");
        let m = Message::parse(&out).expect("parses");
        let back: Vec<Attribute<'_>> = m
            .attributes()
            .map(|a| Attribute::decode(a, &TID).expect("decodes"))
            .collect();
        assert_eq!(back, attrs);
        assert_eq!(
            unknown_attribute_types(&[0x77, 0x77, 0x00, 0x42]).collect::<Vec<_>>(),
            [0x7777, 0x0042]
        );
        let parsed: Vec<_> = password_algorithms(&algs).collect();
        assert_eq!(parsed, [Some((1, &[][..])), Some((2, &[][..]))]);
    }

    #[test]
    fn unknown_required_attributes_are_reported() {
        let mut out = Vec::new();
        let mut b = MessageBuilder::new(
            &mut out,
            MessageType::new(Method::ALLOCATE, Class::Request),
            TID,
        );
        b.raw(0x7001, b"a").raw(0x8077, b"b").raw(0x0030, b"");
        b.finish().expect("fits");
        let m = Message::parse(&out).expect("parses");
        assert!(m.has_unknown_required());
        assert_eq!(m.unknown_required().collect::<Vec<_>>(), [0x7001, 0x0030]);
    }

    #[test]
    fn malformed_messages_are_errors() {
        let good = hex(RESPONSE_V4);
        assert_eq!(Message::parse(&good[..19]).err(), Some(StunError::TooShort));
        // Truncated: the header length promises more.
        assert!(matches!(
            Message::parse(&good[..good.len() - 4]),
            Err(StunError::LengthMismatch { .. })
        ));
        // Bad cookie.
        let mut bad = good.clone();
        bad[5] ^= 1;
        assert_eq!(Message::parse(&bad).err(), Some(StunError::BadCookie));
        // Top bits.
        let mut bad = good.clone();
        bad[0] |= 0x40;
        assert_eq!(Message::parse(&bad).err(), Some(StunError::NotStun));
        // Length not a multiple of 4.
        let mut bad = good.clone();
        bad[3] = 0x3d;
        bad.push(0);
        assert_eq!(
            Message::parse(&bad).err(),
            Some(StunError::UnalignedLength(0x3d))
        );
        // An attribute whose padding runs past the end (SOFTWARE claims 13 bytes: 16 padded).
        let mut bad =
            hex("01010010 2112a442 b7e7a701 bc34d686 fa87dfae 8022000d 74657374 20766563 746f7220");
        assert_eq!(
            Message::parse(&bad).err(),
            Some(StunError::TruncatedAttribute(20))
        );
        // An attribute header cut short.
        bad = hex("01010004 2112a442 b7e7a701 bc34d686 fa87dfae 80220000");
        assert!(Message::parse(&bad).is_ok());
        bad = hex("01010004 2112a442 b7e7a701 bc34d686 fa87dfae 80220004");
        assert_eq!(
            Message::parse(&bad).err(),
            Some(StunError::TruncatedAttribute(20))
        );
        // Something after FINGERPRINT.
        let mut bad = good.clone();
        bad.extend_from_slice(&[0x80, 0x22, 0, 0]);
        bad[3] += 4;
        assert_eq!(
            Message::parse(&bad).err(),
            Some(StunError::FingerprintNotLast)
        );
        // A corrupted fingerprint or integrity parses but does not verify.
        let mut bad = good.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let m = Message::parse(&bad).expect("parses");
        assert!(!m.check_fingerprint());
        assert!(m.check_integrity(SHORT_TERM_KEY));
        let mut bad = good.clone();
        bad[44] ^= 1;
        let m = Message::parse(&bad).expect("parses");
        assert!(!m.check_integrity(SHORT_TERM_KEY));
        // Bad attribute values decode to errors.
        let mut out = Vec::new();
        let mut b = MessageBuilder::new(
            &mut out,
            MessageType::new(Method::ALLOCATE, Class::Request),
            TID,
        );
        b.raw(attr::XOR_PEER_ADDRESS, &[0, 1, 0, 0])
            .raw(attr::LIFETIME, &[0, 0, 1])
            .raw(attr::USERNAME, &[0xff, 0xfe])
            .raw(attr::ERROR_CODE, &[0, 0, 7, 0]);
        b.finish().expect("fits");
        let m = Message::parse(&out).expect("parses");
        for a in m.attributes() {
            assert_eq!(
                Attribute::decode(a, &TID),
                Err(StunError::BadAttribute(a.typ))
            );
        }
        assert!(m.xor_address(attr::XOR_PEER_ADDRESS).is_err());
        assert!(m.u32_value(attr::LIFETIME).is_err());
        assert!(m.text(attr::USERNAME).is_err());
    }

    #[test]
    fn builder_overflow_is_reported() {
        let mut out = Vec::new();
        let mut b = MessageBuilder::new(
            &mut out,
            MessageType::new(Method::DATA, Class::Indication),
            TID,
        );
        b.xor_address(attr::XOR_PEER_ADDRESS, "1.2.3.4:5".parse().expect("addr"))
            .data(&vec![0u8; 65_520]);
        assert_eq!(b.finish(), Err(BuildError::TooLong));
        let mut out = bytes::BytesMut::new();
        let mut b = MessageBuilder::new(
            &mut out,
            MessageType::new(Method::DATA, Class::Indication),
            TID,
        );
        b.data(&[1, 2, 3]).fingerprint();
        assert_eq!(b.finish(), Ok(36));
        assert!(Message::parse(&out).expect("parses").check_fingerprint());
    }

    #[test]
    fn channel_data() {
        assert_eq!(classify(&[0x00]), PacketKind::Stun);
        assert_eq!(classify(&[0x40]), PacketKind::ChannelData);
        assert_eq!(classify(&[0x7f]), PacketKind::ChannelData);
        assert_eq!(classify(&[0x80]), PacketKind::Other);
        assert_eq!(classify(&[]), PacketKind::Other);
        let mut out = Vec::new();
        assert_eq!(
            write_channel_data(&mut out, 0x4001, b"hello", true),
            Some(12)
        );
        assert_eq!(out, b"\x40\x01\x00\x05hello\0\0\0");
        assert_eq!(parse_channel_data(&out), Some((0x4001, &b"hello"[..])));
        assert_eq!(parse_channel_data(&out[..8]), None);
        assert_eq!(parse_channel_data(&out[..3]), None);
        assert_eq!(parse_channel_data(b"\x00\x01\x00\x00"), None);
        assert_eq!(
            parse_channel_data(b"\x40\x00\x00\x00"),
            Some((0x4000, &b""[..]))
        );
        out.clear();
        assert_eq!(
            write_channel_data(&mut out, 0x4fff, b"hello", false),
            Some(9)
        );
        assert!(is_valid_channel(0x4000) && is_valid_channel(0x4fff) && is_valid_channel(0x7fff));
        assert!(!is_valid_channel(0x3fff) && !is_valid_channel(0x8000));
        assert_eq!(
            write_channel_data(&mut out, 0x4000, &vec![0; 70_000], false),
            None
        );
    }

    #[test]
    fn tcp_framing() {
        use FrameLen::*;
        let stun = hex(RESPONSE_V4);
        assert_eq!(frame_len(&[], 1500), Incomplete);
        assert_eq!(frame_len(&stun[..3], 1500), Incomplete);
        assert_eq!(frame_len(&stun[..4], 1500), Incomplete);
        assert_eq!(frame_len(&stun[..79], 1500), Incomplete);
        assert_eq!(frame_len(&stun, 1500), Complete(80));
        let mut two = stun.clone();
        two.extend_from_slice(&stun);
        assert_eq!(frame_len(&two, 1500), Complete(80));
        assert_eq!(frame_len(&stun, 79), Invalid);
        assert_eq!(
            frame_len(b"\x40\x01\x00\x05hello\0\0\0", 1500),
            Complete(12)
        );
        assert_eq!(frame_len(b"\x40\x01\x00\x05hello", 1500), Incomplete);
        assert_eq!(frame_len(b"\x80\x01\x00\x05", 1500), Invalid);
        assert_eq!(frame_len(b"\xc0", 1500), Invalid);
        assert_eq!(frame_len(b"\x00\x01\x00\x05", 1500), Invalid);
    }

    #[test]
    fn long_term_keys() {
        // MD5("user:realm:pass")
        let k = LongTermKey::md5("user", "realm", "pass").expect("key");
        assert_eq!(
            hex::encode(k.as_bytes()),
            "8493fbc53ba582fb4c044c456bdc40eb"
        );
        let s =
            LongTermKey::derive(PasswordAlgorithm::Sha256, "user", "realm", "pass").expect("key");
        assert_eq!(s.as_bytes().len(), 32);
        assert!(k.ct_eq(&k.clone()) && !k.ct_eq(&s));
    }

    #[test]
    fn never_panics_on_prefixes_and_bit_flips() {
        for v in [REQUEST, RESPONSE_V4, RESPONSE_V6, LONG_TERM] {
            let raw = hex(v);
            for n in 0..=raw.len() {
                let _ = Message::parse(&raw[..n]);
                let _ = frame_len(&raw[..n], 100);
                let _ = parse_channel_data(&raw[..n]);
            }
            for i in 0..raw.len() * 8 {
                let mut b = raw.clone();
                b[i / 8] ^= 1 << (i % 8);
                if let Ok(m) = Message::parse(&b) {
                    let _ = m.check_integrity(SHORT_TERM_KEY);
                    let _ = m.check_fingerprint();
                    for a in m.attributes() {
                        let _ = Attribute::decode(a, &m.transaction_id());
                    }
                }
            }
        }
    }
}
