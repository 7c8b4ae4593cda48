//! TCP connections from a rotating set of loopback source addresses, the insecure rustls client
//! configuration, and resource limits.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use rustls::client::Resumption;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::net::{TcpSocket, TcpStream};

/// Source addresses to bind before connecting, e.g. `127.0.0.1-127.0.0.50` or
/// `127.0.0.1,127.0.0.2` (IPv4 ranges, or any comma-separated list of addresses).
#[derive(Debug, Clone)]
pub struct SourceIps(pub Vec<IpAddr>);

impl SourceIps {
    pub fn parse(s: &str) -> Result<SourceIps, String> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if let Some((a, b)) = part.split_once('-') {
                let a: Ipv4Addr = a.trim().parse().map_err(|e| format!("{a}: {e}"))?;
                let b: Ipv4Addr = b.trim().parse().map_err(|e| format!("{b}: {e}"))?;
                let (a, b) = (u32::from(a), u32::from(b));
                if b < a || b - a > 1 << 20 {
                    return Err(format!("bad address range {part}"));
                }
                out.extend((a..=b).map(|x| IpAddr::V4(Ipv4Addr::from(x))));
            } else {
                out.push(part.parse().map_err(|e| format!("{part}: {e}"))?);
            }
        }
        if out.is_empty() {
            return Err("no source address".into());
        }
        Ok(SourceIps(out))
    }

    /// Source address for client number `i` (round robin).
    pub fn pick(&self, i: u64) -> IpAddr {
        self.0[(i % self.0.len() as u64) as usize]
    }
}

/// Connect to `server` from `src` (port chosen by the kernel at connect time, so each source
/// address gives a full ephemeral port range per destination), with `TCP_NODELAY`.
pub async fn connect(server: SocketAddr, src: IpAddr) -> std::io::Result<TcpStream> {
    let sock = if server.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if !src.is_unspecified() {
        // IP_BIND_ADDRESS_NO_PORT: defer port allocation to connect(), otherwise bind() reserves
        // a port for the address alone and the range is exhausted after ~28k sockets per address.
        let one: libc::c_int = 1;
        // SAFETY: valid fd, option value is a c_int that lives for the call.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        sock.bind(SocketAddr::new(src, 0))?;
    }
    sock.set_nodelay(true)?;
    sock.connect(server).await
}

/// Accepts any certificate and any signature: the benchmark talks to a server with a self-signed
/// certificate and measures the server, not the PKI.
#[derive(Debug)]
struct AcceptAnything(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// One client configuration shared by all connections of the process. With `resume`, a shared
/// in-memory session store lets later connections resume TLS sessions like reconnecting clients.
/// Which TLS 1.3 cipher suite the client offers first (the server normally follows the client).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SuitePref {
    /// rustls' order (AES-256-GCM-SHA384 first).
    Default,
    /// TLS13_AES_128_GCM_SHA256 first (BoringSSL/Android order).
    Aes128,
    /// TLS13_AES_256_GCM_SHA384 first.
    Aes256,
    /// TLS13_CHACHA20_POLY1305_SHA256 first.
    Chacha20,
}

pub fn client_config(
    resume: bool,
    sessions: usize,
    alpn: bool,
    suite: SuitePref,
) -> anyhow::Result<Arc<ClientConfig>> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    let first = match suite {
        SuitePref::Default => None,
        SuitePref::Aes128 => Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256),
        SuitePref::Aes256 => Some(rustls::CipherSuite::TLS13_AES_256_GCM_SHA384),
        SuitePref::Chacha20 => Some(rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256),
    };
    if let Some(first) = first {
        // Stable sort: the chosen suite first, the rest in rustls' order.
        provider.cipher_suites.sort_by_key(|s| s.suite() != first);
    }
    let provider = Arc::new(provider);
    let mut cfg = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnything(provider)))
        .with_no_client_auth();
    cfg.resumption = if resume {
        Resumption::in_memory_sessions(sessions.max(256))
    } else {
        Resumption::disabled()
    };
    if alpn {
        // XEP-0368 direct TLS clients announce ALPN "xmpp-client".
        cfg.alpn_protocols = vec![b"xmpp-client".to_vec()];
    }
    Ok(Arc::new(cfg))
}

/// Raise the soft open-files limit to the hard limit; returns the new soft limit.
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit out-parameter.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_source_ips() {
        let s = SourceIps::parse("127.0.0.1-127.0.0.50").unwrap();
        assert_eq!(s.0.len(), 50);
        assert_eq!(s.pick(0).to_string(), "127.0.0.1");
        assert_eq!(s.pick(51).to_string(), "127.0.0.2");
        let s = SourceIps::parse("127.0.0.1, ::1").unwrap();
        assert_eq!(s.0.len(), 2);
        assert!(SourceIps::parse("127.0.0.9-127.0.0.1").is_err());
        assert!(SourceIps::parse("").is_err());
    }
}
