//! Reload triggers: SIGHUP and polling of the certificate files.
//!
//! Why polling rather than inotify: certificates are replaced by editors (write to temp + rename), by
//! certbot (symlinks into `archive/`), and by Kubernetes secret mounts (an atomic `..data` symlink
//! swap). Watching each of those correctly is fiddly, while hashing a handful of small files every
//! `reload_check_secs` sees every one of them, costs next to nothing, and cannot miss an event. A reload
//! only happens when the hash changes, so a broken file is reported once, not on every tick.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Source, Tls};

/// Hash of everything a reload would read: file names (for a directory) and contents. Unreadable
/// files contribute their error kind, so a file disappearing or coming back also counts as a change.
pub(super) fn fingerprint(source: &Source) -> u64 {
    let mut h = DefaultHasher::new();
    match source {
        Source::Dir { dir, .. } => match super::bundle_paths(dir) {
            Ok(paths) => {
                for p in paths {
                    hash_file(&mut h, &p);
                }
            }
            Err(e) => e.to_string().hash(&mut h),
        },
        Source::Explicit { cert, key } => {
            hash_file(&mut h, cert);
            hash_file(&mut h, key);
        }
        Source::SelfSigned { data_dir, .. } => {
            hash_file(&mut h, &super::selfsigned::path(data_dir))
        }
    }
    h.finish()
}

fn hash_file(h: &mut DefaultHasher, path: &Path) {
    path.hash(h);
    match std::fs::read(path) {
        Ok(bytes) => bytes.hash(h),
        Err(e) => format!("{:?}", e.kind()).hash(h),
    }
}

async fn fingerprint_async(tls: &Arc<Tls>) -> Option<u64> {
    let tls = Arc::clone(tls);
    tokio::task::spawn_blocking(move || fingerprint(&tls.source))
        .await
        .ok()
}

/// Run [`Tls::reload`] off the async threads; it logs its own outcome.
async fn reload_blocking(tls: &Arc<Tls>) {
    let tls = Arc::clone(tls);
    if let Err(e) = tokio::task::spawn_blocking(move || tls.reload()).await {
        tracing::warn!(error = %e, "TLS reload task failed");
    }
}

#[cfg(unix)]
type Hangup = tokio::signal::unix::Signal;
#[cfg(not(unix))]
type Hangup = ();

#[cfg(unix)]
fn hangup() -> Option<Hangup> {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; TLS certificates reload only by polling");
            None
        }
    }
}

#[cfg(not(unix))]
fn hangup() -> Option<Hangup> {
    None
}

/// Resolves on the next SIGHUP; never, if there is no signal stream (any more).
async fn next_hangup(sig: &mut Option<Hangup>) {
    #[cfg(unix)]
    if let Some(s) = sig.as_mut() {
        if s.recv().await.is_some() {
            return;
        }
        *sig = None;
    }
    #[cfg(not(unix))]
    let _ = sig;
    std::future::pending::<()>().await
}

async fn next_tick(interval: &mut Option<tokio::time::Interval>) {
    match interval.as_mut() {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending::<()>().await,
    }
}

pub(super) fn spawn(tls: &Arc<Tls>, check_secs: u64, cancel: CancellationToken) {
    let tls = Arc::clone(tls);
    tokio::spawn(async move {
        let mut sighup = hangup();
        let mut interval = (check_secs > 0).then(|| {
            let period = Duration::from_secs(check_secs);
            let mut i = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        });
        let mut last = if interval.is_some() {
            fingerprint_async(&tls).await
        } else {
            None
        };
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                () = next_hangup(&mut sighup) => {
                    tracing::info!("SIGHUP: reloading TLS certificates");
                    reload_blocking(&tls).await;
                    if interval.is_some() {
                        last = fingerprint_async(&tls).await;
                    }
                }
                () = next_tick(&mut interval) => {
                    let now = fingerprint_async(&tls).await;
                    if now.is_some() && now != last {
                        tracing::info!("TLS certificate files changed; reloading");
                        last = now;
                        reload_blocking(&tls).await;
                    }
                }
            }
        }
        tracing::debug!("TLS reloader stopped");
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::test_support::*;

    #[test]
    fn fingerprint_tracks_names_and_contents() {
        let pki = Pki::new();
        let dir = tempfile::tempdir().expect("tmp");
        let a = pki.leaf(&["a.example"], KeyAlg::EcdsaP256);
        std::fs::write(dir.path().join("a.pem"), a.bundle_pem()).expect("write");
        let source = Source::Dir {
            dir: dir.path().to_path_buf(),
            domain: "a.example".into(),
        };
        let f1 = fingerprint(&source);
        assert_eq!(f1, fingerprint(&source));
        std::fs::write(dir.path().join("ignored.txt"), "x").expect("write");
        assert_eq!(f1, fingerprint(&source));
        std::fs::write(dir.path().join("b.pem"), a.bundle_pem()).expect("write");
        let f2 = fingerprint(&source);
        assert_ne!(f1, f2);
        std::fs::write(dir.path().join("b.pem"), "changed").expect("write");
        assert_ne!(f2, fingerprint(&source));
    }

    #[tokio::test]
    async fn polling_picks_up_a_changed_file_and_stops_on_cancel() {
        let pki = Pki::new();
        let dir = tempfile::tempdir().expect("tmp");
        let a = pki.leaf(&["example.com"], KeyAlg::EcdsaP256);
        let path = dir.path().join("example.com.pem");
        std::fs::write(&path, a.bundle_pem()).expect("write");
        let cfg = crate::config::TlsConfig {
            certs_dir: Some(dir.path().to_path_buf()),
            reload_check_secs: 1,
            ..Default::default()
        };
        let server = crate::config::ServerConfig {
            domain: "example.com".into(),
            data_dir: dir.path().join("data"),
        };
        let tls = Tls::load(&server, &cfg).expect("load");
        let cancel = CancellationToken::new();
        tls.spawn_reloader(&cfg, cancel.clone());
        tokio::time::sleep(Duration::from_millis(200)).await;
        let b = pki.leaf(&["example.com"], KeyAlg::EcdsaP256);
        std::fs::write(&path, b.bundle_pem()).expect("write");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if tls.resolver.current().bundles[0].certified.cert[0] == b.cert_der {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "reload not picked up"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        cancel.cancel();
    }
}
