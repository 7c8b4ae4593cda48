//! Just enough DER/X.509 reading to pick certificates by name and order a chain.
//!
//! Why hand-rolled: rustls deliberately exposes no certificate parser, and all this module needs is the
//! issuer/subject names (to order a bundle's chain), the SubjectPublicKeyInfo (to find the leaf that
//! matches the private key), the DNS names (SAN, RFC 6125 §6.4.4 CN fallback) used for SNI selection
//! (RFC 6120 §13.7.1.2 requires the server certificate to carry the XMPP domain), and `notAfter` for the
//! expiry log line. Everything is bounds-checked; malformed input yields `Err`, never a panic.

/// A DER parse failure; the caller adds the file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DerError(pub &'static str);

impl std::fmt::Display for DerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

const TAG_BOOLEAN: u8 = 0x01;
const TAG_OCTET_STRING: u8 = 0x04;
const TAG_OID: u8 = 0x06;
const TAG_UTF8: u8 = 0x0c;
const TAG_PRINTABLE: u8 = 0x13;
const TAG_T61: u8 = 0x14;
const TAG_IA5: u8 = 0x16;
const TAG_UTC_TIME: u8 = 0x17;
const TAG_GENERALIZED_TIME: u8 = 0x18;
const TAG_SEQUENCE: u8 = 0x30;
const TAG_SET: u8 = 0x31;

/// id-ce-subjectAltName (2.5.29.17), content octets of the OID.
const OID_SAN: &[u8] = &[0x55, 0x1d, 0x11];
/// id-ce-basicConstraints (2.5.29.19).
const OID_BASIC_CONSTRAINTS: &[u8] = &[0x55, 0x1d, 0x13];
/// id-at-commonName (2.5.4.3).
const OID_CN: &[u8] = &[0x55, 0x04, 0x03];

/// One DER TLV: tag, content octets, and the whole encoding (tag + length + content).
#[derive(Debug, Clone, Copy)]
pub struct Tlv<'a> {
    pub tag: u8,
    pub content: &'a [u8],
    pub raw: &'a [u8],
}

/// Read one TLV from the front of `input`; returns it and the rest.
pub fn read_tlv(input: &[u8]) -> Result<(Tlv<'_>, &[u8]), DerError> {
    let (&tag, rest) = input.split_first().ok_or(DerError("truncated DER (tag)"))?;
    if tag & 0x1f == 0x1f {
        return Err(DerError("unsupported high-tag-number DER form"));
    }
    let (&first, mut rest) = rest
        .split_first()
        .ok_or(DerError("truncated DER (length)"))?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return Err(DerError("unsupported DER length"));
        }
        if rest.len() < n {
            return Err(DerError("truncated DER (length)"));
        }
        let mut len = 0usize;
        for &b in &rest[..n] {
            len = (len << 8) | usize::from(b);
        }
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return Err(DerError("truncated DER (content)"));
    }
    let header = input.len() - rest.len();
    let (content, after) = rest.split_at(len);
    Ok((
        Tlv {
            tag,
            content,
            raw: &input[..header + len],
        },
        after,
    ))
}

/// Read one TLV that must carry `tag`.
pub fn expect_tlv<'a>(
    input: &'a [u8],
    tag: u8,
    what: &'static str,
) -> Result<(Tlv<'a>, &'a [u8]), DerError> {
    let (tlv, rest) = read_tlv(input)?;
    if tlv.tag != tag {
        return Err(DerError(what));
    }
    Ok((tlv, rest))
}

/// Iterate over the TLVs of a constructed value's content.
pub fn children(mut content: &[u8]) -> impl Iterator<Item = Result<Tlv<'_>, DerError>> {
    std::iter::from_fn(move || {
        if content.is_empty() {
            return None;
        }
        match read_tlv(content) {
            Ok((tlv, rest)) => {
                content = rest;
                Some(Ok(tlv))
            }
            Err(e) => {
                content = &[];
                Some(Err(e))
            }
        }
    })
}

/// The parts of an X.509 certificate that certificate selection needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// DER of the issuer Name (compared bytewise with subjects to order chains).
    pub issuer: Vec<u8>,
    /// DER of the subject Name.
    pub subject: Vec<u8>,
    /// DER of the SubjectPublicKeyInfo.
    pub spki: Vec<u8>,
    /// dNSName entries of subjectAltName, lowercased.
    pub san_dns: Vec<String>,
    /// iPAddress entries of subjectAltName.
    pub san_ip: Vec<std::net::IpAddr>,
    /// Subject commonName values (lowercased), used only when there are no SAN dNSNames.
    pub common_names: Vec<String>,
    /// basicConstraints cA flag.
    pub is_ca: bool,
    /// notAfter as seconds since the Unix epoch.
    pub not_after: i64,
}

impl CertInfo {
    /// Names for SNI matching: SAN dNSNames, or, only when there are none, the subject CN
    /// (RFC 6125 §6.4.4: CN is a legacy fallback that must be ignored when SAN DNS-IDs exist).
    pub fn dns_names(&self) -> Vec<String> {
        if self.san_dns.is_empty() {
            self.common_names
                .iter()
                .filter(|cn| looks_like_dns_name(cn))
                .cloned()
                .collect()
        } else {
            self.san_dns.clone()
        }
    }

    pub fn is_self_issued(&self) -> bool {
        self.issuer == self.subject
    }
}

fn looks_like_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'*' | b'_'))
}

/// Parse a DER certificate.
pub fn parse_certificate(der: &[u8]) -> Result<CertInfo, DerError> {
    let (cert, _) = expect_tlv(der, TAG_SEQUENCE, "certificate is not a DER SEQUENCE")?;
    let (tbs, _) = expect_tlv(
        cert.content,
        TAG_SEQUENCE,
        "tbsCertificate is not a SEQUENCE",
    )?;
    let mut rest = tbs.content;
    // [0] EXPLICIT version, optional.
    let (first, after) = read_tlv(rest)?;
    if first.tag == 0xa0 {
        rest = after;
    }
    let (_serial, r) = read_tlv(rest)?;
    let (_sig_alg, r) = expect_tlv(r, TAG_SEQUENCE, "bad signature algorithm")?;
    let (issuer, r) = expect_tlv(r, TAG_SEQUENCE, "bad issuer name")?;
    let (validity, r) = expect_tlv(r, TAG_SEQUENCE, "bad validity")?;
    let (subject, r) = expect_tlv(r, TAG_SEQUENCE, "bad subject name")?;
    let (spki, mut r) = expect_tlv(r, TAG_SEQUENCE, "bad subjectPublicKeyInfo")?;

    let (_not_before, v) = read_tlv(validity.content)?;
    let (not_after, _) = read_tlv(v)?;
    let not_after = parse_time(not_after)?;

    let mut info = CertInfo {
        issuer: issuer.raw.to_vec(),
        subject: subject.raw.to_vec(),
        spki: spki.raw.to_vec(),
        san_dns: Vec::new(),
        san_ip: Vec::new(),
        common_names: common_names(subject.content)?,
        is_ca: false,
        not_after,
    };

    while !r.is_empty() {
        let (tlv, after) = read_tlv(r)?;
        r = after;
        if tlv.tag != 0xa3 {
            continue; // issuerUniqueID / subjectUniqueID
        }
        let (exts, _) = expect_tlv(tlv.content, TAG_SEQUENCE, "bad extensions")?;
        for ext in children(exts.content) {
            let ext = ext?;
            let (oid, mut e) = expect_tlv(ext.content, TAG_OID, "bad extension id")?;
            let (mut value, after) = read_tlv(e)?;
            if value.tag == TAG_BOOLEAN {
                e = after;
                value = read_tlv(e)?.0;
            }
            if value.tag != TAG_OCTET_STRING {
                return Err(DerError("bad extension value"));
            }
            if oid.content == OID_SAN {
                parse_san(value.content, &mut info)?;
            } else if oid.content == OID_BASIC_CONSTRAINTS {
                let (bc, _) = expect_tlv(value.content, TAG_SEQUENCE, "bad basicConstraints")?;
                if let Some(first) = children(bc.content).next() {
                    let first = first?;
                    info.is_ca = first.tag == TAG_BOOLEAN && first.content.first() == Some(&0xff);
                }
            }
        }
    }
    Ok(info)
}

fn parse_san(value: &[u8], info: &mut CertInfo) -> Result<(), DerError> {
    let (names, _) = expect_tlv(value, TAG_SEQUENCE, "bad subjectAltName")?;
    for name in children(names.content) {
        let name = name?;
        match name.tag {
            // dNSName [2] IA5String
            0x82 => {
                let s =
                    std::str::from_utf8(name.content).map_err(|_| DerError("non-ASCII dNSName"))?;
                info.san_dns.push(normalize_name(s));
            }
            // iPAddress [7] OCTET STRING
            0x87 => match name.content.len() {
                4 => {
                    let mut b = [0u8; 4];
                    b.copy_from_slice(name.content);
                    info.san_ip.push(std::net::IpAddr::from(b));
                }
                16 => {
                    let mut b = [0u8; 16];
                    b.copy_from_slice(name.content);
                    info.san_ip.push(std::net::IpAddr::from(b));
                }
                _ => {}
            },
            _ => {}
        }
    }
    Ok(())
}

fn common_names(name: &[u8]) -> Result<Vec<String>, DerError> {
    let mut out = Vec::new();
    for rdn in children(name) {
        let rdn = rdn?;
        if rdn.tag != TAG_SET {
            return Err(DerError("bad relative distinguished name"));
        }
        for atv in children(rdn.content) {
            let atv = atv?;
            let (oid, r) = expect_tlv(atv.content, TAG_OID, "bad attribute type")?;
            if oid.content != OID_CN {
                continue;
            }
            let (value, _) = read_tlv(r)?;
            if matches!(value.tag, TAG_UTF8 | TAG_PRINTABLE | TAG_IA5 | TAG_T61)
                && let Ok(s) = std::str::from_utf8(value.content)
            {
                out.push(normalize_name(s));
            }
        }
    }
    Ok(out)
}

/// Lowercase and drop a trailing dot, so names compare like DNS does.
pub fn normalize_name(s: &str) -> String {
    s.trim().trim_end_matches('.').to_ascii_lowercase()
}

fn digits(s: &[u8]) -> Result<i64, DerError> {
    let mut v = 0i64;
    for &b in s {
        if !b.is_ascii_digit() {
            return Err(DerError("bad time"));
        }
        v = v * 10 + i64::from(b - b'0');
    }
    Ok(v)
}

/// UTCTime (`YYMMDDHHMMSSZ`, RFC 5280 §4.1.2.5.1) or GeneralizedTime (`YYYYMMDDHHMMSSZ`) → Unix seconds.
fn parse_time(tlv: Tlv<'_>) -> Result<i64, DerError> {
    let s = tlv.content;
    let (year, rest) = match tlv.tag {
        TAG_UTC_TIME if s.len() >= 12 => {
            let yy = digits(&s[..2])?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &s[2..])
        }
        TAG_GENERALIZED_TIME if s.len() >= 14 => (digits(&s[..4])?, &s[4..]),
        _ => return Err(DerError("bad validity time")),
    };
    let month = digits(&rest[0..2])?;
    let day = digits(&rest[2..4])?;
    let hour = digits(&rest[4..6])?;
    let min = digits(&rest[6..8])?;
    let sec = digits(&rest[8..10])?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 60 {
        return Err(DerError("bad validity time"));
    }
    Ok(days_from_civil(year, month, day) * 86_400 + hour * 3600 + min * 60 + sec)
}

/// Days since 1970-01-01 for a proleptic Gregorian date (Howard Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// (year, month, day) for days since 1970-01-01.
pub fn civil_from_days(z: i64) -> (i64, u8, u8) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    // d is 1..=31 and m is 1..=12 by construction.
    (if m <= 2 { y + 1 } else { y }, m as u8, d as u8)
}

/// `YYYY-MM-DD` for Unix seconds (UTC), for log lines.
pub fn format_date(unix: i64) -> String {
    let (y, m, d) = civil_from_days(unix.div_euclid(86_400));
    format!("{y:04}-{m:02}-{d:02}")
}

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_round_trip() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        for z in [-1000, 0, 59, 60, 11_016, 20_000, 2_932_896] {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, i64::from(m), i64::from(d)), z);
        }
        assert_eq!(format_date(951_782_400), "2000-02-29");
    }

    #[test]
    fn parses_rcgen_certificate() {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(vec![
            "Example.COM".to_string(),
            "*.example.com".to_string(),
            "127.0.0.1".to_string(),
        ])
        .expect("params");
        params.not_after = rcgen::date_time_ymd(2031, 7, 9);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "cn.example.com");
        let cert = params.self_signed(&key).expect("cert");
        let info = parse_certificate(cert.der()).expect("parse");
        assert_eq!(info.san_dns, vec!["example.com", "*.example.com"]);
        assert_eq!(info.san_ip, vec![std::net::IpAddr::from([127, 0, 0, 1])]);
        assert!(info.common_names.contains(&"cn.example.com".to_string()));
        // SAN present → CN ignored.
        assert_eq!(info.dns_names(), vec!["example.com", "*.example.com"]);
        assert_eq!(format_date(info.not_after), "2031-07-09");
        assert!(info.is_self_issued());
        assert!(!info.is_ca);
    }

    #[test]
    fn cn_fallback_without_san() {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "legacy.example.org");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).expect("cert");
        let info = parse_certificate(cert.der()).expect("parse");
        assert_eq!(info.dns_names(), vec!["legacy.example.org"]);
        assert!(info.is_ca);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for input in [
            &[][..],
            &[0x30],
            &[0x30, 0x85, 1, 2, 3, 4, 5],
            &[0x30, 0x05, 0x02],
        ] {
            assert!(parse_certificate(input).is_err());
        }
    }
}
