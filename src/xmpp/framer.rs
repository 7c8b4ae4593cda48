//! Sans-IO XMPP stream framer (RFC 6120 §4 "XML Streams", §11 "XML Usage").
//!
//! Bytes go in with [`Framer::push`], events come out of [`Framer::next`]; the framer owns no socket
//! and no clock. It splits the stream into:
//!
//! * the stream header `<stream:stream ...>` (RFC 6120 §4.2, §4.7), optionally preceded by an XML
//!   declaration, reported as [`Event::StreamOpen`];
//! * every top-level child of the stream (RFC 6120 §4.1 "first-level element", i.e. stanzas and
//!   stream-level elements like `<starttls/>` or `<auth/>`), reported as [`Event::Stanza`] with the
//!   exact received bytes as a zero-copy [`bytes::Bytes`];
//! * the closing `</stream:stream>` (RFC 6120 §4.4), reported as [`Event::StreamClose`].
//!
//! Whitespace between first-level elements (keep-alives, RFC 6120 §4.6.1) is discarded.
//!
//! # Design
//!
//! An incremental boundary scanner walks each byte once (quote-aware inside tags, CDATA-aware in
//! content, tracking nesting depth), so a stanza trickling in one byte at a time costs O(n) in total.
//! Limits are enforced while the element is still arriving: the scanner never looks further than
//! `max_stanza_bytes + 1` bytes into an unfinished element, and fails as soon as the element is known
//! to be larger, so an oversized element is never buffered in full.
//!
//! When an element is complete it is validated once: UTF-8 and XML 1.0 `Char` production (§2.2 of
//! XML 1.0), structure (via `quick-xml`: matching end tags, one root), strict start-tag syntax (names,
//! `=`, quoting, whitespace between attributes, duplicate attributes, `<` in values) and
//! references. Errors map onto RFC 6120 §4.9.3 stream error conditions through
//! [`FrameError::condition`].
//!
//! # Restricted XML (RFC 6120 §11.1)
//!
//! Comments, processing instructions (other than the XML declaration before a stream header), DTDs
//! (`<!DOCTYPE`) and entity references other than the five predefined ones are rejected with
//! [`FrameError::RestrictedXml`]. Numeric character references are accepted when they denote a
//! legal XML character. **CDATA sections are allowed** inside stanzas (RFC 6120 does not restrict
//! them); the stanza's raw bytes keep them verbatim.
//!
//! Not checked here (left to the session layer): whether the stream header's name/namespace are the
//! expected ones (RFC 6120 §4.8.1 invalid-namespace) and XML namespace well-formedness (undeclared
//! prefixes). Attribute values are unescaped but not whitespace-normalised.
//!
//! # Memory
//!
//! The internal buffer is released as soon as it becomes empty, so an idle session holds no buffer
//! allocation. Emitted stanzas share the receive allocation (zero copy) until they are dropped.

use std::borrow::Cow;

use bytes::{Buf, Bytes, BytesMut};
use quick_xml::events::Event as XmlEvent;

/// Limits applied to every first-level element (and to the stream header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FramerLimits {
    /// Maximum size in bytes of one first-level element, as received (RFC 6120 §13.12 item 4).
    pub max_stanza_bytes: usize,
    /// Maximum element nesting inside a stanza; the stanza element itself is depth 1.
    pub max_depth: usize,
}

impl Default for FramerLimits {
    fn default() -> Self {
        FramerLimits {
            max_stanza_bytes: 256 * 1024,
            max_depth: 32,
        }
    }
}

/// An event produced by [`Framer::next`].
#[derive(Debug, Clone)]
pub enum Event {
    /// The opening stream header (RFC 6120 §4.2, §4.7).
    StreamOpen(StreamHeader),
    /// One complete first-level element of the stream.
    Stanza(Stanza),
    /// The closing stream tag (RFC 6120 §4.4).
    StreamClose,
}

/// Attributes of the opening stream header (RFC 6120 §4.7). Values are unescaped.
#[derive(Debug, Clone, Default)]
pub struct StreamHeader {
    /// Qualified name as written, e.g. `"stream:stream"`.
    pub name: String,
    /// Namespace bound to the element's prefix (`xmlns:stream` value), or the default namespace if
    /// the element is unprefixed.
    pub stream_ns: Option<String>,
    /// Value of `xmlns=` (the content namespace, e.g. `"jabber:client"`).
    pub default_ns: Option<String>,
    pub to: Option<String>,
    pub from: Option<String>,
    pub id: Option<String>,
    pub version: Option<String>,
    /// `xml:lang`
    pub lang: Option<String>,
}

/// Errors; after one is returned the framer is dead (the caller sends a stream error and closes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// RFC 6120 §4.9.3.13 `<not-well-formed/>`.
    #[error("not well-formed: {0}")]
    NotWellFormed(String),
    /// RFC 6120 §4.9.3.18 `<restricted-xml/>` (§11.1).
    #[error("restricted XML: {0}")]
    RestrictedXml(String),
    /// RFC 6120 §4.9.3.14 `<policy-violation/>` (§13.12 item 4).
    #[error("element larger than {limit} bytes")]
    StanzaTooLarge { limit: usize },
    /// RFC 6120 §4.9.3.14 `<policy-violation/>`.
    #[error("element nesting deeper than {limit}")]
    TooDeep { limit: usize },
}

impl FrameError {
    /// The RFC 6120 §4.9.3 stream error condition to send for this error.
    pub fn condition(&self) -> &'static str {
        match self {
            FrameError::NotWellFormed(_) => "not-well-formed",
            FrameError::RestrictedXml(_) => "restricted-xml",
            FrameError::StanzaTooLarge { .. } | FrameError::TooDeep { .. } => "policy-violation",
        }
    }
}

fn nwf(msg: impl Into<String>) -> FrameError {
    FrameError::NotWellFormed(msg.into())
}

fn restricted(msg: impl Into<String>) -> FrameError {
    FrameError::RestrictedXml(msg.into())
}

/// XML-escape text or an attribute value: `&` `<` `>` `'` `"` become entity references.
/// Borrows when nothing needs escaping.
pub fn escape(s: &str) -> Cow<'_, str> {
    let bytes = s.as_bytes();
    let Some(first) = bytes
        .iter()
        .position(|b| matches!(b, b'&' | b'<' | b'>' | b'\'' | b'"'))
    else {
        return Cow::Borrowed(s);
    };
    let mut out = String::with_capacity(s.len() + 16);
    let mut last = 0;
    for (i, &b) in bytes.iter().enumerate().skip(first) {
        let rep = match b {
            b'&' => "&amp;",
            b'<' => "&lt;",
            b'>' => "&gt;",
            b'\'' => "&apos;",
            b'"' => "&quot;",
            _ => continue,
        };
        // All escaped characters are ASCII, so `last..i` are char boundaries.
        out.push_str(s.get(last..i).unwrap_or_default());
        out.push_str(rep);
        last = i + 1;
    }
    out.push_str(s.get(last..).unwrap_or_default());
    Cow::Owned(out)
}

// ---------------------------------------------------------------------------------------------
// Stanza
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum NsVal {
    None,
    /// Byte range of the (escape-free) xmlns value inside `raw`.
    Span(usize, usize),
    /// Unescaped value when the raw value contained references.
    Owned(Box<str>),
}

/// One complete first-level element of the stream (RFC 6120 §4.1), e.g. `<message>`, `<iq>`,
/// `<presence>`, `<auth xmlns=...>`, `<starttls/>`, `<r/>`.
#[derive(Debug, Clone)]
pub struct Stanza {
    raw: Bytes,
    name_len: usize,
    /// Offset one past the `>` of the element's start tag.
    stag_end: usize,
    ns: NsVal,
}

impl Stanza {
    /// The element exactly as received (a zero-copy split of the receive buffer).
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    /// Qualified name as written (`"message"`, `"stream:error"`, ...).
    pub fn name(&self) -> &str {
        self.raw
            .get(1..1 + self.name_len)
            .and_then(|n| std::str::from_utf8(n).ok())
            .unwrap_or("")
    }

    /// Value of the element's own `xmlns` attribute, if any.
    pub fn ns(&self) -> Option<&str> {
        match &self.ns {
            NsVal::None => None,
            NsVal::Span(s, e) => self
                .raw
                .get(*s..*e)
                .and_then(|v| std::str::from_utf8(v).ok()),
            NsVal::Owned(v) => Some(v),
        }
    }

    /// Start-tag content: name and attributes, without `<`, `>` and a trailing `/`.
    fn tag_content(&self) -> &[u8] {
        let mut end = self.stag_end.saturating_sub(1);
        if end >= 1 && self.raw.get(end - 1) == Some(&b'/') {
            end -= 1;
        }
        self.raw.get(1..end).unwrap_or_default()
    }

    /// Unescaped value of an attribute of the start tag (`name` as written, e.g. `"xml:lang"`).
    pub fn attr(&self, name: &str) -> Option<Cow<'_, str>> {
        let content = self.tag_content();
        let mut it = TagScan::new(content).ok()?;
        while let Ok(Some(a)) = it.next_attr() {
            if a.name == name.as_bytes() {
                return Some(unescape_value(a.value));
            }
        }
        None
    }

    pub fn to(&self) -> Option<Cow<'_, str>> {
        self.attr("to")
    }

    pub fn from(&self) -> Option<Cow<'_, str>> {
        self.attr("from")
    }

    pub fn id(&self) -> Option<Cow<'_, str>> {
        self.attr("id")
    }

    /// The `type` attribute.
    pub fn stanza_type(&self) -> Option<Cow<'_, str>> {
        self.attr("type")
    }

    /// Re-serialise with `from` and/or `to` set (RFC 6120 §8.1.1, §8.1.2: the server stamps
    /// addresses). Existing `from`/`to` attributes are removed when a new value is given, the new
    /// value is XML-escaped and quoted with apostrophes, and everything else is copied verbatim.
    /// `None` leaves that attribute as it was.
    pub fn with_addressing(&self, from: Option<&str>, to: Option<&str>) -> Bytes {
        if from.is_none() && to.is_none() {
            return self.raw.clone();
        }
        let raw: &[u8] = &self.raw;
        let content = self.tag_content();
        let mut out = Vec::with_capacity(
            raw.len() + from.map_or(0, |f| f.len() + 16) + to.map_or(0, |t| t.len() + 16),
        );
        // `content` starts at raw[1].
        let Ok(mut it) = TagScan::new(content) else {
            return self.raw.clone();
        };
        let mut copied = 1 + it.pos; // up to end of element name
        out.extend_from_slice(raw.get(..copied).unwrap_or_default());
        while let Ok(Some(a)) = it.next_attr() {
            let drop = (a.name == b"from" && from.is_some()) || (a.name == b"to" && to.is_some());
            if !drop {
                out.extend_from_slice(
                    raw.get(1 + a.span_start..1 + a.span_end)
                        .unwrap_or_default(),
                );
            }
            copied = 1 + a.span_end;
        }
        for (key, val) in [("from", from), ("to", to)] {
            if let Some(v) = val {
                out.push(b' ');
                out.extend_from_slice(key.as_bytes());
                out.extend_from_slice(b"='");
                out.extend_from_slice(escape(v).as_bytes());
                out.push(b'\'');
            }
        }
        out.extend_from_slice(raw.get(copied..).unwrap_or_default());
        Bytes::from(out)
    }

    /// First child element's (qualified name, `xmlns` value) if any, e.g.
    /// `("ping", Some("urn:xmpp:ping"))` for an IQ (RFC 6120 §8.2.3 payload).
    pub fn first_child(&self) -> Option<(String, Option<String>)> {
        let body = self.raw.get(self.stag_end..)?;
        let mut reader = quick_xml::Reader::from_reader(body);
        reader.config_mut().check_end_names = false;
        loop {
            match reader.read_event() {
                Ok(XmlEvent::Start(e)) | Ok(XmlEvent::Empty(e)) => {
                    let content: &[u8] = &e;
                    let mut it = TagScan::new(content).ok()?;
                    let name = String::from_utf8_lossy(content.get(..it.pos)?).into_owned();
                    let mut ns = None;
                    while let Ok(Some(a)) = it.next_attr() {
                        if a.name == b"xmlns" {
                            ns = Some(unescape_value(a.value).into_owned());
                        }
                    }
                    return Some((name, ns));
                }
                Ok(XmlEvent::End(_)) | Ok(XmlEvent::Eof) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }
}

fn unescape_value(v: &[u8]) -> Cow<'_, str> {
    let s = match std::str::from_utf8(v) {
        Ok(s) => s,
        Err(_) => return String::from_utf8_lossy(v),
    };
    if memchr::memchr(b'&', v).is_none() {
        return Cow::Borrowed(s);
    }
    quick_xml::escape::unescape(s).unwrap_or(Cow::Borrowed(s))
}

// ---------------------------------------------------------------------------------------------
// Character, name and reference checks (XML 1.0 fifth edition §2.2, §2.3, §4.1)
// ---------------------------------------------------------------------------------------------

#[inline]
fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

/// XML 1.0 §2.2 `Char` for a decoded scalar value (surrogates cannot occur in a `char`).
fn is_xml_char(c: u32) -> bool {
    matches!(c, 0x9 | 0xA | 0xD | 0x20..=0xD7FF | 0xE000..=0xFFFD | 0x10000..=0x10FFFF)
}

/// Validate UTF-8 and the XML `Char` production over a whole element.
fn check_chars(raw: &[u8]) -> Result<&str, FrameError> {
    let s = std::str::from_utf8(raw).map_err(|_| nwf("invalid UTF-8"))?;
    // C0 controls other than TAB, LF, CR. Chunked so the inner fold vectorises.
    let bad_ctrl = raw.chunks(64).any(|c| {
        c.iter().fold(false, |acc, &b| {
            acc | (b < 0x20 && b != b'\t' && b != b'\n' && b != b'\r')
        })
    });
    if bad_ctrl {
        return Err(nwf("control character not allowed in XML"));
    }
    // U+FFFE and U+FFFF (EF BF BE / EF BF BF). Surrogates are rejected by UTF-8 validation.
    for i in memchr::memchr_iter(0xEF, raw) {
        if raw.get(i + 1) == Some(&0xBF) && matches!(raw.get(i + 2), Some(0xBE | 0xBF)) {
            return Err(nwf("non-character U+FFFE/U+FFFF not allowed in XML"));
        }
    }
    Ok(s)
}

fn is_name_start(c: char) -> bool {
    matches!(c,
        ':' | 'A'..='Z' | '_' | 'a'..='z' | '\u{C0}'..='\u{D6}' | '\u{D8}'..='\u{F6}'
        | '\u{F8}'..='\u{2FF}' | '\u{370}'..='\u{37D}' | '\u{37F}'..='\u{1FFF}'
        | '\u{200C}'..='\u{200D}' | '\u{2070}'..='\u{218F}' | '\u{2C00}'..='\u{2FEF}'
        | '\u{3001}'..='\u{D7FF}' | '\u{F900}'..='\u{FDCF}' | '\u{FDF0}'..='\u{FFFD}'
        | '\u{10000}'..='\u{EFFFF}')
}

fn is_name_char(c: char) -> bool {
    is_name_start(c)
        || matches!(c, '-' | '.' | '0'..='9' | '\u{B7}' | '\u{300}'..='\u{36F}' | '\u{203F}'..='\u{2040}')
}

/// ASCII classes: bit 0 = NameStartChar, bit 1 = NameChar.
const ASCII_NAME: [u8; 128] = {
    let mut t = [0u8; 128];
    let mut i = 0;
    while i < 128 {
        let c = i as u8;
        let start = c == b':' || c == b'_' || c.is_ascii_alphabetic();
        let name = start || c == b'-' || c == b'.' || c.is_ascii_digit();
        t[i] = (start as u8) | ((name as u8) << 1);
        i += 1;
    }
    t
};

/// XML 1.0 §2.3 `Name`.
fn is_valid_name(name: &[u8]) -> bool {
    // ASCII fast path (table lookup).
    if name.is_ascii() {
        let mut it = name.iter();
        return match it.next() {
            Some(&f) if ASCII_NAME[usize::from(f & 0x7f)] & 1 != 0 => {
                it.all(|&b| ASCII_NAME[usize::from(b & 0x7f)] & 2 != 0)
            }
            _ => false,
        };
    }
    let Ok(s) = std::str::from_utf8(name) else {
        return false;
    };
    let mut chars = s.chars();
    match chars.next() {
        Some(f) if is_name_start(f) => chars.all(is_name_char),
        _ => false,
    }
}

/// Check the name of a reference `&name;` (XML 1.0 §4.1) against RFC 6120 §11.1.
fn check_ref(name: &[u8]) -> Result<(), FrameError> {
    match name {
        b"lt" | b"gt" | b"amp" | b"apos" | b"quot" => Ok(()),
        [b'#', b'x', hex @ ..] => check_char_ref(hex, 16),
        [b'#', dec @ ..] => check_char_ref(dec, 10),
        _ if is_valid_name(name) => Err(restricted(format!(
            "entity reference &{};",
            String::from_utf8_lossy(name)
        ))),
        _ => Err(nwf("malformed reference")),
    }
}

fn check_char_ref(digits: &[u8], radix: u32) -> Result<(), FrameError> {
    if digits.is_empty() {
        return Err(nwf("empty character reference"));
    }
    let mut v: u32 = 0;
    for &d in digits {
        let dv = (d as char)
            .to_digit(radix)
            .ok_or_else(|| nwf("malformed character reference"))?;
        v = v
            .checked_mul(radix)
            .and_then(|v| v.checked_add(dv))
            .ok_or_else(|| nwf("character reference out of range"))?;
    }
    if !is_xml_char(v) || (0xD800..=0xDFFF).contains(&v) {
        return Err(nwf("character reference to a character not allowed in XML"));
    }
    Ok(())
}

/// Check all references inside a raw attribute value or text run.
fn check_refs(v: &[u8]) -> Result<(), FrameError> {
    let mut from = 0;
    while let Some(i) = memchr::memchr(b'&', v.get(from..).unwrap_or_default()) {
        let start = from + i + 1;
        let rest = v.get(start..).unwrap_or_default();
        let semi = memchr::memchr(b';', rest).ok_or_else(|| nwf("unterminated reference"))?;
        check_ref(rest.get(..semi).unwrap_or_default())?;
        from = start + semi + 1;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Strict start-tag parser (XML 1.0 §3.1 STag / EmptyElemTag / Attribute)
// ---------------------------------------------------------------------------------------------

/// One attribute; spans are relative to the tag content and include the preceding whitespace.
struct RawAttr<'a> {
    name: &'a [u8],
    value: &'a [u8],
    span_start: usize,
    span_end: usize,
}

/// Walks start-tag content (`name attr='v' ...`, without `<`, `>` and a trailing `/`).
struct TagScan<'a> {
    c: &'a [u8],
    /// Current offset; right after `new` it is the end of the element name.
    pos: usize,
}

impl<'a> TagScan<'a> {
    fn new(c: &'a [u8]) -> Result<Self, FrameError> {
        let end = c
            .iter()
            .position(|&b| is_ws(b) || matches!(b, b'=' | b'\'' | b'"' | b'<' | b'>' | b'/'))
            .unwrap_or(c.len());
        let name = c.get(..end).unwrap_or_default();
        if !is_valid_name(name) {
            return Err(nwf(format!(
                "invalid element name '{}'",
                String::from_utf8_lossy(name)
            )));
        }
        Ok(TagScan { c, pos: end })
    }

    fn skip_ws(&mut self) {
        while self.c.get(self.pos).is_some_and(|&b| is_ws(b)) {
            self.pos += 1;
        }
    }

    fn next_attr(&mut self) -> Result<Option<RawAttr<'a>>, FrameError> {
        let span_start = self.pos;
        self.skip_ws();
        if self.pos >= self.c.len() {
            return Ok(None);
        }
        if self.pos == span_start {
            return Err(nwf("missing whitespace before attribute"));
        }
        let name_start = self.pos;
        while self
            .c
            .get(self.pos)
            .is_some_and(|&b| !is_ws(b) && !matches!(b, b'=' | b'\'' | b'"' | b'<' | b'>' | b'/'))
        {
            self.pos += 1;
        }
        let name = self.c.get(name_start..self.pos).unwrap_or_default();
        if !is_valid_name(name) {
            return Err(nwf(format!(
                "invalid attribute name '{}'",
                String::from_utf8_lossy(name)
            )));
        }
        self.skip_ws();
        if self.c.get(self.pos) != Some(&b'=') {
            return Err(nwf("expected '=' after attribute name"));
        }
        self.pos += 1;
        self.skip_ws();
        let quote = match self.c.get(self.pos) {
            Some(&q @ (b'\'' | b'"')) => q,
            _ => return Err(nwf("attribute value must be quoted")),
        };
        self.pos += 1;
        let rest = self.c.get(self.pos..).unwrap_or_default();
        let len = memchr::memchr(quote, rest).ok_or_else(|| nwf("unclosed attribute value"))?;
        let value = rest.get(..len).unwrap_or_default();
        self.pos += len + 1;
        Ok(Some(RawAttr {
            name,
            value,
            span_start,
            span_end: self.pos,
        }))
    }
}

/// Result of validating a start tag.
struct TagInfo {
    name_len: usize,
    /// Range of the raw `xmlns` value inside the tag content.
    xmlns: Option<(usize, usize)>,
}

/// Fully validate start-tag content: names, syntax, duplicate attributes, values.
fn validate_tag(c: &[u8]) -> Result<TagInfo, FrameError> {
    let mut it = TagScan::new(c)?;
    let name_len = it.pos;
    let mut xmlns = None;
    // Small inline set for duplicate detection; falls back to a hash set for huge tags so that
    // adversarial input stays O(n).
    let mut seen: [&[u8]; 16] = [&[]; 16];
    let mut n_seen = 0usize;
    let mut big: Option<std::collections::HashSet<&[u8]>> = None;
    while let Some(a) = it.next_attr()? {
        if memchr::memchr(b'<', a.value).is_some() {
            return Err(nwf("'<' in attribute value"));
        }
        check_refs(a.value)?;
        let dup = if let Some(set) = big.as_mut() {
            !set.insert(a.name)
        } else if seen.iter().take(n_seen).any(|s| *s == a.name) {
            true
        } else if n_seen < seen.len() {
            if let Some(slot) = seen.get_mut(n_seen) {
                *slot = a.name;
            }
            n_seen += 1;
            false
        } else {
            let mut set: std::collections::HashSet<&[u8]> = seen.iter().copied().collect();
            set.insert(a.name);
            big = Some(set);
            false
        };
        if dup {
            return Err(nwf(format!(
                "duplicate attribute '{}'",
                String::from_utf8_lossy(a.name)
            )));
        }
        if a.name == b"xmlns" {
            let vstart = a.span_end - 1 - a.value.len();
            xmlns = Some((vstart, a.span_end - 1));
        }
    }
    Ok(TagInfo { name_len, xmlns })
}

/// Validate a complete first-level element; returns (name length, xmlns).
fn validate_stanza(raw: &[u8]) -> Result<(usize, Option<(usize, usize)>), FrameError> {
    let s = check_chars(raw)?;
    let mut reader = quick_xml::Reader::from_str(s);
    let mut depth = 0usize;
    let mut root: Option<(usize, Option<(usize, usize)>)> = None;
    let mut root_done = false;
    // Namespace prefixes declared inside this stanza, with the depth that declared them.
    let mut scope: Vec<(Vec<u8>, usize)> = Vec::new();
    loop {
        let ev = reader.read_event().map_err(|e| nwf(e.to_string()))?;
        if root_done && !matches!(ev, XmlEvent::Eof) {
            return Err(nwf("content after the element"));
        }
        match ev {
            XmlEvent::Start(ref e) | XmlEvent::Empty(ref e) => {
                let content: &[u8] = e;
                let info = validate_tag(content)?;
                // Declarations belong to this element's level and end with it.
                check_prefixes(content, depth + 1, &mut scope)?;
                if matches!(ev, XmlEvent::Empty(_)) {
                    scope.retain(|&(_, d)| d <= depth);
                }
                if root.is_none() {
                    // Root content starts right after '<' at raw[1].
                    root = Some((info.name_len, info.xmlns.map(|(a, b)| (a + 1, b + 1))));
                }
                if matches!(ev, XmlEvent::Start(_)) {
                    depth += 1;
                } else if depth == 0 {
                    root_done = true;
                }
            }
            XmlEvent::End(_) => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| nwf("unexpected end tag"))?;
                scope.retain(|&(_, d)| d <= depth);
                if depth == 0 {
                    root_done = true;
                }
            }
            XmlEvent::Text(t) => {
                if root.is_none() {
                    return Err(nwf("text before element"));
                }
                let t: &[u8] = &t;
                if memchr::memchr_iter(b'>', t).any(|i| i >= 2 && t.get(i - 2..i) == Some(b"]]")) {
                    return Err(nwf("']]>' in character data"));
                }
            }
            XmlEvent::GeneralRef(r) => check_ref(&r)?,
            XmlEvent::CData(_) => {}
            XmlEvent::Comment(_) => return Err(restricted("comment")),
            XmlEvent::PI(_) | XmlEvent::Decl(_) => {
                return Err(restricted("processing instruction"));
            }
            XmlEvent::DocType(_) => return Err(restricted("DTD")),
            XmlEvent::Eof => break,
        }
    }
    if !root_done {
        return Err(nwf("unclosed element"));
    }
    root.ok_or_else(|| nwf("no element"))
}

/// Every prefix a stanza uses must be declared inside the stanza itself (Namespaces in XML §5): routed
/// stanzas are forwarded as raw bytes into other streams, where the sender's stream-header declarations
/// do not exist, so an undeclared prefix would make the recipient's stream not namespace-well-formed.
/// `xml:` is predeclared, and `stream:` is declared on every stream header Tern sends (RFC 6120 §4.8.5),
/// so it stays well-formed wherever the stanza goes; `xmlns:` declares.
fn check_prefixes(
    content: &[u8],
    depth: usize,
    scope: &mut Vec<(Vec<u8>, usize)>,
) -> Result<(), FrameError> {
    let mut it = TagScan::new(content)?;
    let name = content.get(..it.pos).unwrap_or_default();
    let mut used: [Option<&[u8]>; 1] = [None];
    let mut attr_prefixes: Vec<&[u8]> = Vec::new();
    if let Some(i) = memchr::memchr(b':', name) {
        used[0] = name.get(..i);
    }
    while let Some(a) = it.next_attr()? {
        match a.name.strip_prefix(b"xmlns:") {
            Some(p) => scope.push((p.to_vec(), depth)),
            None => {
                if let Some(i) = memchr::memchr(b':', a.name) {
                    attr_prefixes.push(a.name.get(..i).unwrap_or_default());
                }
            }
        }
    }
    for p in used.into_iter().flatten().chain(attr_prefixes) {
        if p != b"xml" && p != b"stream" && !scope.iter().any(|(q, _)| q == p) {
            return Err(nwf(format!(
                "undeclared namespace prefix `{}`",
                String::from_utf8_lossy(p)
            )));
        }
    }
    Ok(())
}

/// Parse and validate the stream header start tag `<name ...>` (RFC 6120 §4.7).
fn parse_header(raw: &[u8]) -> Result<StreamHeader, FrameError> {
    check_chars(raw)?;
    let content = raw.get(1..raw.len().saturating_sub(1)).unwrap_or_default();
    validate_tag(content)?;
    let mut it = TagScan::new(content)?;
    let name = String::from_utf8_lossy(content.get(..it.pos).unwrap_or_default()).into_owned();
    let prefix_attr = name.split_once(':').map(|(p, _)| format!("xmlns:{p}"));
    let mut h = StreamHeader {
        name,
        ..StreamHeader::default()
    };
    let mut prefixed_ns = None;
    while let Some(a) = it.next_attr()? {
        let v = || Some(unescape_value(a.value).into_owned());
        match a.name {
            b"xmlns" => h.default_ns = v(),
            b"to" => h.to = v(),
            b"from" => h.from = v(),
            b"id" => h.id = v(),
            b"version" => h.version = v(),
            b"xml:lang" => h.lang = v(),
            n if prefix_attr.as_deref().map(str::as_bytes) == Some(n) => prefixed_ns = v(),
            _ => {}
        }
    }
    h.stream_ns = if prefix_attr.is_some() {
        prefixed_ns
    } else {
        h.default_ns.clone()
    };
    Ok(h)
}

/// Validate an XML declaration `<?xml ...?>` (XML 1.0 §2.8).
fn validate_decl(raw: &[u8]) -> Result<(), FrameError> {
    check_chars(raw)?;
    let target_end = raw
        .iter()
        .skip(2)
        .position(|&b| is_ws(b) || b == b'?')
        .map_or(raw.len(), |p| p + 2);
    if raw.get(2..target_end) != Some(b"xml".as_slice()) {
        return Err(restricted("processing instruction"));
    }
    if memchr::memmem::find(raw, b"version").is_none() {
        return Err(nwf("XML declaration without version"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Incremental boundary scanner
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    /// Between first-level items: whitespace is skipped, `pos` is 0.
    Idle,
    /// After `<`.
    TagOpen,
    /// Inside a start tag, outside quotes.
    StartTag,
    /// Inside a quoted attribute value.
    Quoted(u8),
    /// Inside an end tag.
    EndTag,
    /// After `<!`.
    Bang,
    /// Inside `<![CDATA[`...`]]>`; `cdata_start` marks the content start.
    CData,
    /// Inside `<?`...`?>` (only the XML declaration reaches this).
    Pi,
    /// Character data inside a stanza.
    Content,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ItemKind {
    Decl,
    Header,
    Stanza,
    Close,
}

#[derive(Debug, Clone, Copy)]
struct ScanState {
    lex: Lex,
    /// Scan offset inside the buffer; the current item always starts at offset 0.
    pos: usize,
    depth: usize,
    cdata_start: usize,
    /// End (exclusive) of the current stanza's start tag.
    root_stag_end: usize,
    /// True once the stream header has been seen.
    in_stream: bool,
    decl_allowed: bool,
}

impl ScanState {
    fn fresh(in_stream: bool) -> Self {
        ScanState {
            lex: Lex::Idle,
            pos: 0,
            depth: 0,
            cdata_start: 0,
            root_stag_end: 0,
            in_stream,
            decl_allowed: !in_stream,
        }
    }
}

const CDATA_OPEN: &[u8] = b"[CDATA[";

/// Advance the scanner over `data` (the buffered bytes, window-limited). Returns the completed
/// item's kind and length, or `None` when more bytes are needed.
fn scan_item(
    data: &[u8],
    st: &mut ScanState,
    max_depth: usize,
) -> Result<Option<(ItemKind, usize)>, FrameError> {
    loop {
        match st.lex {
            Lex::Idle => return Ok(None),
            Lex::TagOpen => {
                let Some(&b) = data.get(st.pos) else {
                    return Ok(None);
                };
                match b {
                    b'/' => {
                        if st.depth == 0 && !st.in_stream {
                            return Err(nwf("end tag before stream header"));
                        }
                        st.pos += 1;
                        st.lex = Lex::EndTag;
                    }
                    b'!' => {
                        st.pos += 1;
                        st.lex = Lex::Bang;
                    }
                    b'?' => {
                        if st.depth == 0 && !st.in_stream && st.decl_allowed {
                            st.pos += 1;
                            st.lex = Lex::Pi;
                        } else {
                            return Err(restricted("processing instruction"));
                        }
                    }
                    _ => st.lex = Lex::StartTag,
                }
            }
            Lex::StartTag => loop {
                let Some(&b) = data.get(st.pos) else {
                    return Ok(None);
                };
                match b {
                    b'\'' | b'"' => {
                        st.pos += 1;
                        st.lex = Lex::Quoted(b);
                        break;
                    }
                    b'<' => return Err(nwf("'<' inside a tag")),
                    b'>' => {
                        let self_closing = st.pos >= 1 && data.get(st.pos - 1) == Some(&b'/');
                        st.pos += 1;
                        if !st.in_stream {
                            if self_closing {
                                return Err(nwf("self-closing stream header"));
                            }
                            return Ok(Some((ItemKind::Header, st.pos)));
                        }
                        if st.depth == 0 {
                            st.root_stag_end = st.pos;
                        }
                        if st.depth + 1 > max_depth {
                            return Err(FrameError::TooDeep { limit: max_depth });
                        }
                        if self_closing {
                            if st.depth == 0 {
                                return Ok(Some((ItemKind::Stanza, st.pos)));
                            }
                        } else {
                            st.depth += 1;
                        }
                        st.lex = Lex::Content;
                        break;
                    }
                    _ => st.pos += 1,
                }
            },
            Lex::Quoted(q) => {
                let rest = data.get(st.pos..).unwrap_or_default();
                match memchr::memchr2(q, b'<', rest) {
                    Some(i) => {
                        if rest.get(i) == Some(&b'<') {
                            return Err(nwf("'<' in attribute value"));
                        }
                        st.pos += i + 1;
                        st.lex = Lex::StartTag;
                    }
                    None => {
                        st.pos = data.len();
                        return Ok(None);
                    }
                }
            }
            Lex::EndTag => {
                let rest = data.get(st.pos..).unwrap_or_default();
                match memchr::memchr(b'>', rest) {
                    Some(i) => {
                        st.pos += i + 1;
                        if st.depth == 0 {
                            return Ok(Some((ItemKind::Close, st.pos)));
                        }
                        st.depth -= 1;
                        if st.depth == 0 {
                            return Ok(Some((ItemKind::Stanza, st.pos)));
                        }
                        st.lex = Lex::Content;
                    }
                    None => {
                        st.pos = data.len();
                        return Ok(None);
                    }
                }
            }
            Lex::Bang => {
                let Some(&b) = data.get(st.pos) else {
                    return Ok(None);
                };
                match b {
                    b'-' => return Err(restricted("comment")),
                    b'D' => return Err(restricted("DTD")),
                    b'[' if st.depth > 0 => {
                        let avail = data.get(st.pos..).unwrap_or_default();
                        let n = avail.len().min(CDATA_OPEN.len());
                        if avail.get(..n) != CDATA_OPEN.get(..n) {
                            return Err(nwf("malformed CDATA section"));
                        }
                        if n < CDATA_OPEN.len() {
                            return Ok(None);
                        }
                        st.pos += CDATA_OPEN.len();
                        st.cdata_start = st.pos;
                        st.lex = Lex::CData;
                    }
                    b'[' => return Err(nwf("CDATA at stream level")),
                    _ => return Err(nwf("malformed markup declaration")),
                }
            }
            Lex::CData => {
                let rest = data.get(st.pos..).unwrap_or_default();
                match memchr::memchr(b'>', rest) {
                    Some(i) => {
                        let j = st.pos + i;
                        st.pos = j + 1;
                        if j >= st.cdata_start + 2 && data.get(j - 2..j) == Some(b"]]".as_slice()) {
                            st.lex = Lex::Content;
                        }
                    }
                    None => {
                        st.pos = data.len();
                        return Ok(None);
                    }
                }
            }
            Lex::Pi => {
                let rest = data.get(st.pos..).unwrap_or_default();
                match memchr::memchr(b'>', rest) {
                    Some(i) => {
                        let j = st.pos + i;
                        st.pos = j + 1;
                        // "<?" occupies 0..2, so the closing '?' must be at index >= 2.
                        if j >= 3 && data.get(j - 1) == Some(&b'?') {
                            return Ok(Some((ItemKind::Decl, st.pos)));
                        }
                    }
                    None => {
                        st.pos = data.len();
                        return Ok(None);
                    }
                }
            }
            Lex::Content => {
                let rest = data.get(st.pos..).unwrap_or_default();
                match memchr::memchr(b'<', rest) {
                    Some(i) => {
                        st.pos += i + 1;
                        st.lex = Lex::TagOpen;
                    }
                    None => {
                        st.pos = data.len();
                        return Ok(None);
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Framer
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Phase {
    /// Before the stream header (initially and after `reset`).
    Prolog,
    /// Inside the stream.
    Stream,
    /// `</stream:stream>` seen; further input is ignored.
    Closed,
    /// An error was returned; it is repeated on every call.
    Dead(FrameError),
}

/// Sans-IO XMPP stream framer. See the module documentation.
#[derive(Debug)]
pub struct Framer {
    limits: FramerLimits,
    buf: BytesMut,
    st: ScanState,
    phase: Phase,
    /// Qualified name of the current stream header, to match `</stream:stream>`.
    stream_name: String,
}

impl Framer {
    pub fn new(limits: FramerLimits) -> Self {
        Framer {
            limits,
            buf: BytesMut::new(),
            st: ScanState::fresh(false),
            phase: Phase::Prolog,
            stream_name: String::new(),
        }
    }

    /// Append received bytes. Cheap; all checking happens in [`Framer::next`].
    /// Ignored once the stream is closed or the framer is dead.
    pub fn push(&mut self, data: &[u8]) {
        if matches!(self.phase, Phase::Prolog | Phase::Stream) {
            self.buf.extend_from_slice(data);
        }
    }

    /// Bytes currently buffered (for tests/metrics).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Stream restart after SASL success (RFC 6120 §6.4.6) or STARTTLS (§5.4.3.3): expect a new
    /// stream header, optionally preceded by an XML declaration. Bytes already buffered after the
    /// last event are kept (a pipelining client may already have sent the new header).
    pub fn reset(&mut self) {
        if matches!(self.phase, Phase::Dead(_)) {
            return;
        }
        self.phase = Phase::Prolog;
        self.st = ScanState::fresh(false);
    }

    /// Next complete event, `Ok(None)` when more bytes are needed. After an `Err` the framer is
    /// dead and returns the same error again. Limits are enforced while an element is still
    /// arriving, so call this after every [`Framer::push`].
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<Event>, FrameError> {
        match &self.phase {
            Phase::Dead(e) => return Err(e.clone()),
            Phase::Closed => return Ok(None),
            Phase::Prolog | Phase::Stream => {}
        }
        loop {
            let step = self.scan().and_then(|item| match item {
                Some((kind, end)) => self.finish(kind, end).map(Some),
                None => Ok(None),
            });
            match step {
                Ok(Some(Some(ev))) => return Ok(Some(ev)),
                Ok(Some(None)) => continue, // XML declaration consumed
                Ok(None) => return Ok(None),
                Err(e) => {
                    self.phase = Phase::Dead(e.clone());
                    self.buf = BytesMut::new();
                    return Err(e);
                }
            }
        }
    }

    fn release_if_empty(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() != 0 {
            self.buf = BytesMut::new();
        }
    }

    fn scan(&mut self) -> Result<Option<(ItemKind, usize)>, FrameError> {
        if self.st.lex == Lex::Idle {
            let skip = self
                .buf
                .iter()
                .position(|&b| !is_ws(b))
                .unwrap_or(self.buf.len());
            if skip > 0 {
                self.buf.advance(skip);
            }
            self.release_if_empty();
            match self.buf.first() {
                None => return Ok(None),
                Some(b'<') => {}
                Some(_) => {
                    return Err(nwf(if self.st.in_stream {
                        "text at stream level"
                    } else {
                        "text before stream header"
                    }));
                }
            }
            self.st.pos = 1;
            self.st.depth = 0;
            self.st.lex = Lex::TagOpen;
        }
        let max = self.limits.max_stanza_bytes;
        let window = self.buf.len().min(max.saturating_add(1));
        let data = self.buf.get(..window).unwrap_or_default();
        match scan_item(data, &mut self.st, self.limits.max_depth)? {
            Some((_, end)) if end > max => Err(FrameError::StanzaTooLarge { limit: max }),
            Some(item) => Ok(Some(item)),
            // The unfinished item starts at offset 0, so everything buffered belongs to it.
            None if self.buf.len() > max => Err(FrameError::StanzaTooLarge { limit: max }),
            None => Ok(None),
        }
    }

    fn finish(&mut self, kind: ItemKind, end: usize) -> Result<Option<Event>, FrameError> {
        let root_stag_end = self.st.root_stag_end;
        self.st = ScanState::fresh(kind != ItemKind::Decl);
        let ev = match kind {
            ItemKind::Decl => {
                validate_decl(self.buf.get(..end).unwrap_or_default())?;
                self.buf.advance(end);
                self.st.decl_allowed = false;
                None
            }
            ItemKind::Header => {
                let h = parse_header(self.buf.get(..end).unwrap_or_default())?;
                self.buf.advance(end);
                self.phase = Phase::Stream;
                self.stream_name.clear();
                self.stream_name.push_str(&h.name);
                Some(Event::StreamOpen(h))
            }
            ItemKind::Stanza => {
                if end > self.buf.len() {
                    return Err(nwf("internal framing error"));
                }
                let raw = self.buf.split_to(end).freeze();
                let (name_len, xmlns) = validate_stanza(&raw)?;
                let ns = match xmlns {
                    None => NsVal::None,
                    Some((s, e)) => match raw.get(s..e) {
                        Some(v) if memchr::memchr(b'&', v).is_some() => {
                            NsVal::Owned(unescape_value(v).into())
                        }
                        _ => NsVal::Span(s, e),
                    },
                };
                Some(Event::Stanza(Stanza {
                    raw,
                    name_len,
                    stag_end: root_stag_end,
                    ns,
                }))
            }
            ItemKind::Close => {
                let tag = self.buf.get(..end).unwrap_or_default();
                check_chars(tag)?;
                let inner = tag.get(2..end.saturating_sub(1)).unwrap_or_default();
                let name_end = inner.iter().position(|&b| is_ws(b)).unwrap_or(inner.len());
                let (name, trailing) = inner.split_at(name_end);
                if name != self.stream_name.as_bytes() || !trailing.iter().all(|&b| is_ws(b)) {
                    return Err(nwf("end tag does not match the stream header"));
                }
                self.buf.advance(end);
                self.phase = Phase::Closed;
                Some(Event::StreamClose)
            }
        };
        self.release_if_empty();
        Ok(ev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HDR: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
        xmlns:stream='http://etherx.jabber.org/streams' to='example.com' version='1.0' \
        xml:lang='en'>";

    fn limits() -> FramerLimits {
        FramerLimits {
            max_stanza_bytes: 64 * 1024,
            max_depth: 16,
        }
    }

    fn opened() -> Framer {
        let mut f = Framer::new(limits());
        f.push(HDR.as_bytes());
        assert!(matches!(f.next(), Ok(Some(Event::StreamOpen(_)))));
        f
    }

    /// Drain all currently available events.
    fn drain(f: &mut Framer) -> Result<Vec<Event>, FrameError> {
        let mut out = Vec::new();
        while let Some(ev) = f.next()? {
            out.push(ev);
        }
        Ok(out)
    }

    fn stanzas(evs: &[Event]) -> Vec<&Stanza> {
        evs.iter()
            .filter_map(|e| match e {
                Event::Stanza(s) => Some(s),
                _ => None,
            })
            .collect()
    }

    /// Feed `input` after an opened stream; return the first error.
    fn err_of(input: &str) -> FrameError {
        err_of_bytes(input.as_bytes())
    }

    fn err_of_bytes(input: &[u8]) -> FrameError {
        let mut f = opened();
        f.push(input);
        match drain(&mut f) {
            Err(e) => e,
            Ok(evs) => panic!(
                "expected error for {:?}, got {evs:?}",
                String::from_utf8_lossy(input)
            ),
        }
    }

    /// Feed a whole document from the start (including the header); return the first error.
    fn doc_err(input: &str) -> FrameError {
        let mut f = Framer::new(limits());
        f.push(input.as_bytes());
        match drain(&mut f) {
            Err(e) => e,
            Ok(evs) => panic!("expected error for {input:?}, got {evs:?}"),
        }
    }

    fn summary(evs: &[Event]) -> Vec<String> {
        evs.iter()
            .map(|e| match e {
                Event::StreamOpen(h) => format!("open {} {:?} {:?}", h.name, h.stream_ns, h.to),
                Event::Stanza(s) => format!("stanza {}", String::from_utf8_lossy(s.raw())),
                Event::StreamClose => "close".to_string(),
            })
            .collect()
    }

    const DOC: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
        xmlns:stream='http://etherx.jabber.org/streams' to='ex&amp;ample.com' version='1.0'>\n \
        <message to='juliet@example.com/balcony' type='chat' id='a&lt;b'><body>Wherefore &amp; \
        art thou? \u{e9}\u{1F600}</body><x xmlns='jabber:x:data'><![CDATA[<not>a tag]]]]></x></message>\
        <iq type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq> \t\r\n\
        <presence a=\"x>y\"/><r xmlns='urn:xmpp:sm:3'/><stream:error><conflict \
        xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error></stream:stream>";

    #[test]
    fn whole_document_in_one_push() {
        let mut f = Framer::new(limits());
        f.push(DOC.as_bytes());
        let evs = drain(&mut f).unwrap();
        let s = summary(&evs);
        assert_eq!(s.len(), 7, "{s:?}");
        assert_eq!(
            s[0],
            "open stream:stream Some(\"http://etherx.jabber.org/streams\") Some(\"ex&ample.com\")"
        );
        assert!(s[1].starts_with("stanza <message to='juliet@example.com/balcony'"));
        assert!(s[1].ends_with("</x></message>"));
        assert_eq!(
            s[2],
            "stanza <iq type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>"
        );
        assert_eq!(s[3], "stanza <presence a=\"x>y\"/>");
        assert_eq!(s[4], "stanza <r xmlns='urn:xmpp:sm:3'/>");
        assert!(s[5].starts_with("stanza <stream:error>"));
        assert_eq!(s[6], "close");
        assert_eq!(f.buffered(), 0);
        assert_eq!(f.buf.capacity(), 0);
        // Nothing more after close.
        f.push(b"<junk");
        assert!(f.next().unwrap().is_none());
    }

    #[test]
    fn split_at_every_byte_boundary() {
        let mut whole = Framer::new(limits());
        whole.push(DOC.as_bytes());
        let expected = summary(&drain(&mut whole).unwrap());
        let bytes = DOC.as_bytes();
        for i in 0..=bytes.len() {
            let mut f = Framer::new(limits());
            let mut evs = Vec::new();
            f.push(&bytes[..i]);
            evs.extend(drain(&mut f).unwrap());
            f.push(&bytes[i..]);
            evs.extend(drain(&mut f).unwrap());
            assert_eq!(summary(&evs), expected, "split at {i}");
        }
        // And one byte at a time.
        let mut f = Framer::new(limits());
        let mut evs = Vec::new();
        for b in bytes {
            f.push(std::slice::from_ref(b));
            evs.extend(drain(&mut f).unwrap());
        }
        assert_eq!(summary(&evs), expected);
    }

    #[test]
    fn many_stanzas_in_one_push() {
        let mut f = opened();
        let mut input = String::new();
        for i in 0..1000 {
            input.push_str(&format!("<message id='m{i}'><body>hi {i}</body></message>"));
        }
        f.push(input.as_bytes());
        let evs = drain(&mut f).unwrap();
        let st = stanzas(&evs);
        assert_eq!(st.len(), 1000);
        for (i, s) in st.iter().enumerate() {
            assert_eq!(s.id().as_deref(), Some(format!("m{i}").as_str()));
            assert_eq!(s.name(), "message");
        }
        assert_eq!(f.buffered(), 0);
    }

    #[test]
    fn whitespace_keepalives_are_skipped_and_buffer_released() {
        let mut f = opened();
        for _ in 0..10 {
            f.push(b" ");
            assert!(f.next().unwrap().is_none());
            f.push(b"\n\r\t");
            assert!(f.next().unwrap().is_none());
            assert_eq!(f.buffered(), 0);
            assert_eq!(f.buf.capacity(), 0, "idle framer must not hold a buffer");
        }
        f.push(b"  <presence/>  ");
        let evs = drain(&mut f).unwrap();
        assert_eq!(stanzas(&evs)[0].raw().as_ref(), b"<presence/>");
        assert_eq!(f.buf.capacity(), 0);
    }

    #[test]
    fn idle_after_stanza_holds_no_buffer() {
        let mut f = opened();
        f.push(b"<message><body>x</body></message>");
        let ev = f.next().unwrap();
        assert!(ev.is_some());
        assert_eq!(f.buf.capacity(), 0);
        // Partial stanza holds a buffer, which is released once complete.
        f.push(b"<iq type='get'");
        assert!(f.next().unwrap().is_none());
        assert!(f.buffered() > 0);
        f.push(b"/>");
        assert!(f.next().unwrap().is_some());
        assert_eq!(f.buf.capacity(), 0);
    }

    #[test]
    fn header_fields() {
        let mut f = Framer::new(limits());
        f.push(HDR.as_bytes());
        let Some(Event::StreamOpen(h)) = f.next().unwrap() else {
            panic!()
        };
        assert_eq!(h.name, "stream:stream");
        assert_eq!(
            h.stream_ns.as_deref(),
            Some("http://etherx.jabber.org/streams")
        );
        assert_eq!(h.default_ns.as_deref(), Some("jabber:client"));
        assert_eq!(h.to.as_deref(), Some("example.com"));
        assert_eq!(h.version.as_deref(), Some("1.0"));
        assert_eq!(h.lang.as_deref(), Some("en"));
        assert_eq!(h.from, None);
        assert_eq!(h.id, None);

        // Unprefixed header, no declaration, leading whitespace.
        let mut f = Framer::new(limits());
        f.push(b"\n<stream xmlns='http://etherx.jabber.org/streams' from='a@b' id='x'>");
        let Some(Event::StreamOpen(h)) = f.next().unwrap() else {
            panic!()
        };
        assert_eq!(h.name, "stream");
        assert_eq!(
            h.stream_ns.as_deref(),
            Some("http://etherx.jabber.org/streams")
        );
        assert_eq!(h.from.as_deref(), Some("a@b"));
        assert_eq!(h.id.as_deref(), Some("x"));
        f.push(b"<message/></stream>");
        let evs = drain(&mut f).unwrap();
        assert!(matches!(
            evs.as_slice(),
            [Event::Stanza(_), Event::StreamClose]
        ));
    }

    #[test]
    fn stanza_accessors() {
        let mut f = opened();
        f.push(
            "<iq xmlns='jabber:client' type='set' id='a&amp;b' to=\"x@y/&#x263A;\" from='z'>\
             <query xmlns='jabber:iq:roster'/></iq>"
                .as_bytes(),
        );
        let Some(Event::Stanza(s)) = f.next().unwrap() else {
            panic!()
        };
        assert_eq!(s.name(), "iq");
        assert_eq!(s.ns(), Some("jabber:client"));
        assert_eq!(s.stanza_type().as_deref(), Some("set"));
        assert_eq!(s.id().as_deref(), Some("a&b"));
        assert_eq!(s.to().as_deref(), Some("x@y/\u{263A}"));
        assert_eq!(s.from().as_deref(), Some("z"));
        assert_eq!(s.attr("nope"), None);
        assert_eq!(
            s.first_child(),
            Some(("query".to_string(), Some("jabber:iq:roster".to_string())))
        );
    }

    #[test]
    fn escaped_namespace_is_unescaped() {
        let mut f = opened();
        f.push(b"<a xmlns='urn:x&amp;y'/>");
        let Some(Event::Stanza(s)) = f.next().unwrap() else {
            panic!()
        };
        assert_eq!(s.ns(), Some("urn:x&y"));
        assert_eq!(s.first_child(), None);
    }

    #[test]
    fn with_addressing_round_trips_escaped_and_unicode_values() {
        let mut f = opened();
        f.push(
            "<message from='old' type='chat' to=\"o&amp;ld\"  id='1'><body>caf\u{e9} &lt;3</body></message>"
                .as_bytes(),
        );
        let Some(Event::Stanza(s)) = f.next().unwrap() else {
            panic!()
        };
        let from = "r\u{e9}mi&co<'\">@\u{1F600}.example/\u{263A}";
        let to = "b\u{fc}ro@ex.com";
        let out = s.with_addressing(Some(from), Some(to));
        let text = std::str::from_utf8(&out).unwrap();
        assert_eq!(
            text,
            "<message type='chat'  id='1' from='r\u{e9}mi&amp;co&lt;&apos;&quot;&gt;@\u{1F600}.example/\u{263A}' \
             to='b\u{fc}ro@ex.com'><body>caf\u{e9} &lt;3</body></message>"
        );
        // Round trip through the framer.
        let mut g = opened();
        g.push(&out);
        let Some(Event::Stanza(t)) = g.next().unwrap() else {
            panic!()
        };
        assert_eq!(t.from().as_deref(), Some(from));
        assert_eq!(t.to().as_deref(), Some(to));
        assert_eq!(t.id().as_deref(), Some("1"));
        assert_eq!(t.stanza_type().as_deref(), Some("chat"));

        // Only `from`: `to` kept verbatim.
        let out = s.with_addressing(Some("a@b"), None);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "<message type='chat' to=\"o&amp;ld\"  id='1' from='a@b'><body>caf\u{e9} &lt;3</body></message>"
        );
        // Neither: unchanged.
        assert_eq!(s.with_addressing(None, None), s.raw());
    }

    #[test]
    fn with_addressing_self_closing_and_no_attributes() {
        let mut f = opened();
        f.push(b"<presence/><presence type='unavailable' />");
        let evs = drain(&mut f).unwrap();
        let st = stanzas(&evs);
        assert_eq!(
            st[0].with_addressing(Some("a@b/c"), None).as_ref(),
            b"<presence from='a@b/c'/>"
        );
        assert_eq!(
            st[1].with_addressing(None, Some("x")).as_ref(),
            b"<presence type='unavailable' to='x' />"
        );
    }

    #[test]
    fn attribute_value_with_gt_and_slash_inside_quotes() {
        let mut f = opened();
        f.push(b"<message id='a>b/' note=\"/>\"><body>x</body></message><iq id='/'/>");
        let evs = drain(&mut f).unwrap();
        let st = stanzas(&evs);
        assert_eq!(st.len(), 2);
        assert_eq!(st[0].id().as_deref(), Some("a>b/"));
        assert_eq!(st[0].attr("note").as_deref(), Some("/>"));
        assert_eq!(st[1].raw().as_ref(), b"<iq id='/'/>");
    }

    #[test]
    fn self_closing_stanzas() {
        let mut f = opened();
        f.push(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/><r/><a xmlns='urn:xmpp:sm:3' h='5'/>");
        let evs = drain(&mut f).unwrap();
        let st = stanzas(&evs);
        assert_eq!(st.len(), 3);
        assert_eq!(st[0].name(), "starttls");
        assert_eq!(st[0].ns(), Some("urn:ietf:params:xml:ns:xmpp-tls"));
        assert_eq!(st[1].name(), "r");
        assert_eq!(st[1].ns(), None);
        assert_eq!(st[2].attr("h").as_deref(), Some("5"));
        assert_eq!(st[2].first_child(), None);
    }

    #[test]
    fn namespaced_child_detection() {
        let mut f = opened();
        f.push(
            b"<iq type='get' id='1'>\n  <ping xmlns='urn:xmpp:ping'/></iq>\
              <iq type='set' id='2'><![CDATA[<fake/>]]><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>\
              <resource>r</resource></bind></iq>\
              <message><x:y xmlns:x='urn:x'/></message><iq type='result' id='3'/><iq id='4'>text</iq>",
        );
        let evs = drain(&mut f).unwrap();
        let st = stanzas(&evs);
        assert_eq!(
            st[0].first_child(),
            Some(("ping".into(), Some("urn:xmpp:ping".into())))
        );
        assert_eq!(
            st[1].first_child(),
            Some((
                "bind".into(),
                Some("urn:ietf:params:xml:ns:xmpp-bind".into())
            ))
        );
        assert_eq!(st[2].first_child(), Some(("x:y".into(), None)));
        assert_eq!(st[3].first_child(), None);
        assert_eq!(st[4].first_child(), None);
    }

    #[test]
    fn stream_close() {
        let mut f = opened();
        f.push(b"<presence/></stream:stream >");
        let evs = drain(&mut f).unwrap();
        assert!(matches!(
            evs.as_slice(),
            [Event::Stanza(_), Event::StreamClose]
        ));
        assert_eq!(f.buffered(), 0);
        assert!(f.next().unwrap().is_none());
        // Mismatched close name.
        assert_eq!(err_of("</stream>").condition(), "not-well-formed");
        assert_eq!(
            err_of("</stream:stream x='1'>").condition(),
            "not-well-formed"
        );
    }

    #[test]
    fn reset_keeps_pipelined_bytes() {
        let mut f = Framer::new(limits());
        f.push(HDR.as_bytes());
        f.push(b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGp1bGlldAByMG0zMA==</auth>");
        // Pipelined new stream header + stanza + part of another, arriving before the server
        // processed the auth.
        f.push(
            b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
            xmlns:stream='http://etherx.jabber.org/streams' to='example.com' version='1.0'>\
            <iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq><pres",
        );
        assert!(matches!(f.next(), Ok(Some(Event::StreamOpen(_)))));
        let Some(Event::Stanza(auth)) = f.next().unwrap() else {
            panic!()
        };
        assert_eq!(auth.name(), "auth");
        f.reset();
        let Some(Event::StreamOpen(h)) = f.next().unwrap() else {
            panic!()
        };
        assert_eq!(h.to.as_deref(), Some("example.com"));
        let Some(Event::Stanza(iq)) = f.next().unwrap() else {
            panic!()
        };
        assert_eq!(iq.id().as_deref(), Some("b"));
        assert!(f.next().unwrap().is_none());
        assert_eq!(f.buffered(), 5);
        f.push(b"ence/>");
        let Some(Event::Stanza(p)) = f.next().unwrap() else {
            panic!()
        };
        assert_eq!(p.name(), "presence");
    }

    #[test]
    fn reset_mid_scan_rescans_from_item_start() {
        let mut f = opened();
        f.push(b"<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/><stream:str");
        assert!(matches!(f.next(), Ok(Some(Event::Stanza(_)))));
        assert!(f.next().unwrap().is_none());
        f.reset();
        f.push(b"eam xmlns:stream='http://etherx.jabber.org/streams'>");
        assert!(matches!(f.next(), Ok(Some(Event::StreamOpen(_)))));
    }

    #[test]
    fn size_limit_triggers_while_arriving() {
        let limit = 256 * 1024;
        let mut f = Framer::new(FramerLimits {
            max_stanza_bytes: limit,
            max_depth: 16,
        });
        f.push(HDR.as_bytes());
        assert!(f.next().unwrap().is_some());
        f.push(b"<message><body>");
        let chunk = vec![b'a'; 4096];
        let mut pushed = 0usize;
        let err = loop {
            assert!(pushed < 10 * 1024 * 1024, "never failed");
            f.push(&chunk);
            pushed += chunk.len();
            assert!(f.buffered() <= limit + chunk.len());
            match f.next() {
                Ok(None) => {}
                Ok(Some(ev)) => panic!("unexpected {ev:?}"),
                Err(e) => break e,
            }
        };
        assert_eq!(err, FrameError::StanzaTooLarge { limit });
        assert_eq!(err.condition(), "policy-violation");
        assert!(pushed <= limit + chunk.len());
        // Dead: repeats the error, buffers nothing.
        f.push(&chunk);
        assert_eq!(f.next().unwrap_err(), err);
        assert_eq!(f.buffered(), 0);
    }

    #[test]
    fn size_limit_exact_boundary() {
        let st = b"<a>0123456789</a>"; // 17 bytes
        for (limit, ok) in [(17, true), (16, false)] {
            let mut f = Framer::new(FramerLimits {
                max_stanza_bytes: limit,
                max_depth: 4,
            });
            f.push(b"<s>");
            assert!(f.next().unwrap().is_some());
            f.push(st);
            assert_eq!(f.next().is_ok(), ok, "limit {limit}");
        }
        // Also enforced on the stream header and with a complete oversized stanza in one push.
        let mut f = Framer::new(FramerLimits {
            max_stanza_bytes: 10,
            max_depth: 4,
        });
        f.push(b"<stream:stream xmlns:stream='x'>");
        assert_eq!(
            f.next().unwrap_err(),
            FrameError::StanzaTooLarge { limit: 10 }
        );
    }

    #[test]
    fn one_byte_pieces_large_stanza() {
        // 256 KiB stanza in 1-byte pushes: must stay linear (finishes quickly even in debug).
        let mut f = Framer::new(FramerLimits {
            max_stanza_bytes: 300 * 1024,
            max_depth: 8,
        });
        f.push(HDR.as_bytes());
        assert!(f.next().unwrap().is_some());
        let mut st = b"<message to='a'><body>".to_vec();
        st.extend(std::iter::repeat_n(b'x', 256 * 1024));
        st.extend_from_slice(b"</body></message>");
        let mut got = None;
        for b in &st {
            f.push(std::slice::from_ref(b));
            if let Some(ev) = f.next().unwrap() {
                got = Some(ev);
            }
        }
        let Some(Event::Stanza(s)) = got else {
            panic!()
        };
        assert_eq!(s.raw().len(), st.len());
    }

    #[test]
    fn depth_limit() {
        let lim = FramerLimits {
            max_stanza_bytes: 4096,
            max_depth: 3,
        };
        let mut f = Framer::new(lim);
        f.push(b"<s><a><b><c/></b></a>");
        assert!(f.next().unwrap().is_some());
        assert!(f.next().unwrap().is_some()); // depth 3 ok
        f.push(b"<a><b><c><d/>");
        assert_eq!(f.next().unwrap_err(), FrameError::TooDeep { limit: 3 });
        assert_eq!(f.next().unwrap_err().condition(), "policy-violation");
        // Error raised while the stanza is still arriving.
        let mut f = Framer::new(lim);
        f.push(b"<s><a><b><c><d>");
        assert!(f.next().unwrap().is_some());
        assert!(matches!(f.next(), Err(FrameError::TooDeep { .. })));
    }

    #[test]
    fn restricted_xml_cases() {
        let cases = [
            "<message><!-- c --></message>",
            "<!-- stream level comment -->",
            "<message><?pi x?></message>",
            "<?pi x?>",
            "<?xml version='1.0'?>",
            "<message><!DOCTYPE x></message>",
            "<message>&foo;</message>",
            "<message to='&foo;'/>",
            "<message>&nbsp;</message>",
        ];
        for c in cases {
            let e = err_of(c);
            assert_eq!(e.condition(), "restricted-xml", "{c}: {e:?}");
        }
        for doc in [
            "<!DOCTYPE stream><stream:stream>",
            "<!-- hi --><stream:stream>",
            "<?xml version='1.0'?><?xml version='1.0'?><stream:stream>",
            "<?xml-stylesheet href='x'?><stream:stream>",
        ] {
            let e = doc_err(doc);
            assert_eq!(e.condition(), "restricted-xml", "{doc}: {e:?}");
        }
    }

    #[test]
    fn allowed_references_and_cdata() {
        let mut f = opened();
        f.push(
            b"<message a='&lt;&gt;&amp;&apos;&quot;&#65;&#x42;'><body>&lt;&#x1F600;&#10;</body>\
              <c><![CDATA[ & < ]] > ]]></c></message>",
        );
        let Some(Event::Stanza(s)) = f.next().unwrap() else {
            panic!()
        };
        assert_eq!(s.attr("a").as_deref(), Some("<>&'\"AB"));
    }

    #[test]
    fn not_well_formed_cases() {
        let cases: &[&[u8]] = &[
            b"<message></msg>",
            b"<message><body></message></body>",
            b"<message to=juliet/>",
            b"<message to/>",
            b"<message to='a'from='b'/>",
            b"<message to='a' to='b'/>",
            b"<message to='a<b'/>",
            b"<message to='a><iq/>",
            b"<message to=\"a'/><presence/>",
            b"<1message/>",
            b"<message 1to='x'/>",
            b"<-x/>",
            b"< message/>",
            b"<message/ >x</message>",
            b"<message>\xff\xfe</message>",
            b"<message to='\xc3'/>",
            b"<message>\x00</message>",
            b"<message>\x01</message>",
            b"<message a='\x1b'/>",
            b"<message>\xef\xbf\xbe</message>",
            b"hello",
            b"<presence/>text",
            b"<message>a & b</message>",
            b"<message>&#0;</message>",
            b"<message>&#xD800;</message>",
            b"<message>&#x110000;</message>",
            b"<message>&#99999999999;</message>",
            b"<message>&#xZZ;</message>",
            b"<message a='&amp'/>",
            b"<message>]]></message>",
            b"<![CDATA[x]]>",
            b"<message><![CDAT[x]]></message>",
            b"<message><!ELEMENT x></message>",
        ];
        for c in cases {
            let e = err_of_bytes(c);
            assert_eq!(
                e.condition(),
                "not-well-formed",
                "{}: {e:?}",
                String::from_utf8_lossy(c)
            );
        }
        for doc in [
            "</stream:stream>",
            "text<stream:stream>",
            "<stream:stream/>",
            "<stream:stream a='1' a='2'>",
            "<stream:stream a=1>",
            "<?xml encoding='x'?><stream:stream>",
        ] {
            let e = doc_err(doc);
            assert_eq!(e.condition(), "not-well-formed", "{doc}: {e:?}");
        }
    }

    #[test]
    fn unclosed_quote_detected_early() {
        // The unclosed quote swallows the next tag's '<', which is detected at once.
        let mut f = opened();
        f.push(b"<message to='juliet><body>");
        assert!(matches!(f.next(), Err(FrameError::NotWellFormed(_))));
    }

    #[test]
    fn errors_are_sticky() {
        let mut f = opened();
        f.push(b"<a><!-- x --></a><presence/>");
        let e = f.next().unwrap_err();
        assert!(matches!(e, FrameError::RestrictedXml(_)));
        assert_eq!(f.next().unwrap_err(), e);
        f.reset();
        assert_eq!(f.next().unwrap_err(), e);
    }

    #[test]
    fn many_attributes_duplicate_detection() {
        let mut s = String::from("<message");
        for i in 0..40 {
            s.push_str(&format!(" a{i}='v'"));
        }
        let ok = format!("{s}/>");
        let mut f = opened();
        f.push(ok.as_bytes());
        assert!(f.next().unwrap().is_some());
        let dup = format!("{s} a3='x'/>");
        assert_eq!(err_of(&dup).condition(), "not-well-formed");
        let dup = format!("{s} a39='x'/>");
        assert_eq!(err_of(&dup).condition(), "not-well-formed");
    }

    #[test]
    fn escape_function() {
        assert!(matches!(escape("plain"), Cow::Borrowed("plain")));
        assert_eq!(
            escape("a&b<c>d'e\"f\u{e9}"),
            "a&amp;b&lt;c&gt;d&apos;e&quot;f\u{e9}"
        );
        assert_eq!(escape(""), "");
    }

    #[test]
    fn conditions() {
        assert_eq!(nwf("x").condition(), "not-well-formed");
        assert_eq!(restricted("x").condition(), "restricted-xml");
        assert_eq!(
            FrameError::StanzaTooLarge { limit: 1 }.condition(),
            "policy-violation"
        );
        assert_eq!(
            FrameError::TooDeep { limit: 1 }.condition(),
            "policy-violation"
        );
    }

    #[test]
    fn namespace_prefixes_must_be_declared_in_the_stanza() {
        for ok in [
            "<message><x:y xmlns:x='urn:x'/></message>",
            "<message xmlns:x='urn:x'><a><x:y x:attr='1'/></a></message>",
            "<message xml:lang='en'><body xml:lang='de'>x</body></message>",
            "<iq type='set' id='1'><a xmlns:p='urn:p'/><b xmlns='urn:b'/></iq>",
        ] {
            let mut f = Framer::new(FramerLimits::default());
            f.push(HDR_FOR_PREFIX_TEST.as_bytes());
            f.push(ok.as_bytes());
            assert!(matches!(f.next(), Ok(Some(Event::StreamOpen(_)))));
            assert!(matches!(f.next(), Ok(Some(Event::Stanza(_)))), "{ok}");
        }
        for bad in [
            "<message><x:y/></message>",
            "<message><b x:attr='1'/></message>",
            // A declaration ends with its element.
            "<message><a xmlns:x='urn:x'/><x:y/></message>",
            "<message><a xmlns:x='urn:x'></a><x:y/></message>",
        ] {
            let mut f = Framer::new(FramerLimits::default());
            f.push(HDR_FOR_PREFIX_TEST.as_bytes());
            f.push(bad.as_bytes());
            assert!(matches!(f.next(), Ok(Some(Event::StreamOpen(_)))));
            let e = f.next().expect_err(bad);
            assert_eq!(e.condition(), "not-well-formed", "{bad}: {e}");
        }
    }

    const HDR_FOR_PREFIX_TEST: &str = "<stream:stream xmlns='jabber:client' \
        xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>";

    #[test]
    fn garbage_never_panics() {
        // Cheap deterministic pseudo-fuzz over the markup alphabet.
        let alphabet = b"<>/='\"!?[]-&;# \nabx:\xc3\xa9\x00";
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..3000 {
            let mut f = Framer::new(FramerLimits {
                max_stanza_bytes: 200,
                max_depth: 4,
            });
            f.push(b"<s>");
            let _ = f.next();
            for _ in 0..8 {
                let mut chunk = Vec::new();
                for _ in 0..16 {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    chunk.push(alphabet[(seed % alphabet.len() as u64) as usize]);
                }
                f.push(&chunk);
                while let Ok(Some(ev)) = f.next() {
                    if let Event::Stanza(s) = ev {
                        let _ = s.with_addressing(Some("a'<"), Some("b"));
                        let _ = (s.name(), s.ns(), s.to(), s.first_child());
                    }
                }
            }
        }
    }
}
