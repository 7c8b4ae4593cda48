//! A self-signed certificate for first starts and development.
//!
//! Why: RFC 6120 §5 makes TLS mandatory-to-negotiate, so a server without configured certificates still
//! needs one to offer STARTTLS at all. The generated ECDSA P-256 certificate is kept in
//! `{data_dir}/tls/selfsigned.pem` (key + certificate, mode 0600) and reused, so clients that pinned it
//! (RFC 6120 §13.7.2.2 lets them accept it after an out-of-band check) keep working across restarts. It is
//! regenerated only when the domain changed or it is about to expire.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::TlsError;
use super::bundle::{self, Bundle};
use super::x509::{self, normalize_name};

/// Lifetime of a generated certificate. 825 days is the longest that Apple platforms accept for TLS
/// server certificates.
const VALIDITY_DAYS: i64 = 825;
/// Regenerate when less than this remains.
const RENEW_BEFORE_SECS: i64 = 30 * 86_400;

/// Where the self-signed bundle lives.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("tls").join("selfsigned.pem")
}

fn err(path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Names the certificate must carry for `domain`.
fn wanted_names(domain: &str) -> Vec<String> {
    let domain = normalize_name(domain);
    let mut names = vec![domain.clone()];
    if domain == "localhost" {
        names.push("127.0.0.1".into());
    }
    names
}

/// Load `{data_dir}/tls/selfsigned.pem`, generating (or regenerating) it when needed.
pub fn load_or_generate(data_dir: &Path, domain: &str) -> Result<Bundle, TlsError> {
    let path = path(data_dir);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let existing = bundle::load_bundle_bytes(&path, &bytes)?;
            let covers = existing.dns_names().contains(&normalize_name(domain));
            let fresh = existing.leaf.not_after - x509::now_unix() > RENEW_BEFORE_SECS;
            if covers && fresh {
                return Ok(existing);
            }
            tracing::info!(
                file = %path.display(),
                domain,
                covers,
                fresh,
                "regenerating the self-signed certificate"
            );
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(TlsError::Io { path, source }),
    }
    let pem = generate(&path, domain)?;
    write_private(&path, pem.as_bytes())?;
    tracing::warn!(
        file = %path.display(),
        domain,
        "generated a self-signed TLS certificate; clients will not trust it without pinning — \
         configure tls.certs_dir or tls.cert/tls.key for production"
    );
    bundle::load_bundle_bytes(&path, pem.as_bytes())
}

/// Key (PKCS#8) + certificate PEM for `domain`.
fn generate(path: &Path, domain: &str) -> Result<String, TlsError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| err(path, format!("cannot generate a key: {e}")))?;
    let mut params = rcgen::CertificateParams::new(wanted_names(domain)).map_err(|e| {
        err(
            path,
            format!("domain {domain:?} cannot be a certificate name: {e}"),
        )
    })?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, normalize_name(domain));
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "Tern self-signed");
    // A closure because rcgen's date type (from the `time` crate) is not nameable here.
    let ymd = |days: i64| {
        let (y, m, d) = x509::civil_from_days(days);
        rcgen::date_time_ymd(i32::try_from(y).unwrap_or(9999), m, d)
    };
    let today = x509::now_unix().div_euclid(86_400);
    params.not_before = ymd(today - 1);
    params.not_after = ymd(today + VALIDITY_DAYS);
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params
        .self_signed(&key)
        .map_err(|e| err(path, format!("cannot sign the certificate: {e}")))?;
    Ok(format!("{}{}", key.serialize_pem(), cert.pem()))
}

/// Write `bytes` to `path` atomically (temp file + rename) with mode 0600: it holds a private key.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    let io = |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path
        .parent()
        .ok_or_else(|| err(path, "no parent directory"))?;
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(io)?;
    let tmp = path.with_extension("pem.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut file = opts.open(&tmp).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_then_reused() {
        let dir = tempfile::tempdir().expect("tmp");
        let first = load_or_generate(dir.path(), "localhost").expect("generate");
        let file = path(dir.path());
        assert!(file.exists());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&file).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(first.key_kind, "ECDSA");
        assert_eq!(first.dns_names(), vec!["localhost"]);
        assert_eq!(
            first.leaf.san_ip,
            vec![std::net::IpAddr::from([127, 0, 0, 1])]
        );
        let days_left = (first.leaf.not_after - x509::now_unix()) / 86_400;
        assert!(
            (VALIDITY_DAYS - 2..=VALIDITY_DAYS).contains(&days_left),
            "{days_left}"
        );
        let bytes = std::fs::read(&file).expect("read");

        let second = load_or_generate(dir.path(), "LOCALHOST").expect("reuse");
        assert_eq!(second.certified.cert, first.certified.cert);
        assert_eq!(std::fs::read(&file).expect("read"), bytes);
    }

    #[test]
    fn domain_change_regenerates_and_no_ip_for_other_domains() {
        let dir = tempfile::tempdir().expect("tmp");
        let a = load_or_generate(dir.path(), "localhost").expect("a");
        let b = load_or_generate(dir.path(), "xmpp.example.org").expect("b");
        assert_ne!(a.certified.cert, b.certified.cert);
        assert_eq!(b.dns_names(), vec!["xmpp.example.org"]);
        assert!(b.leaf.san_ip.is_empty());
    }

    #[test]
    fn corrupt_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = path(dir.path());
        std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
        std::fs::write(&file, "not a pem").expect("write");
        let e = load_or_generate(dir.path(), "localhost").expect_err("corrupt");
        assert!(e.to_string().contains("selfsigned.pem"), "{e}");
    }
}
