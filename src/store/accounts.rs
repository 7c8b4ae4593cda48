//! The embedded account store: `accounts.json` under `data_dir`.
//!
//! Each account holds SCRAM-SHA-1 and SCRAM-SHA-256 stored data (RFC 5802 §3: salt, iteration count,
//! StoredKey, ServerKey) and never a plaintext password, so a leaked file does not directly reveal
//! passwords and the server can offer SCRAM without ever seeing one. PLAIN (RFC 4616) is verified by
//! re-deriving the SCRAM-SHA-256 StoredKey from the offered password with the stored salt.
//!
//! Durability: every change is written to a temporary file in the same directory, fsynced, renamed over
//! `accounts.json` and the directory fsynced, so a crash leaves either the old or the new file, never a
//! torn one. The file is created with mode 0600 since it holds password-equivalent verifiers.
//!
//! Concurrency: writers (the running server and `tern user add` in another process) serialise on an
//! advisory lock on `accounts.json.lock` and re-read the file under that lock before changing it, so no
//! update is lost. Readers never take the file lock; they see an in-memory snapshot that [`AccountStore::get`]
//! refreshes at most once per second when the file's identity (inode, size, mtime) changed.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime};

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::xmpp::sasl::{ScramCredentials, ScramHash};

/// File name of the store inside `data_dir`.
pub const FILE_NAME: &str = "accounts.json";
/// Format version written into the file; bumped on incompatible changes.
const FORMAT_VERSION: u32 = 1;
/// Salt length in bytes (RFC 5802 §5.1 does not fix one; 16 random bytes is the common choice).
pub const SALT_LEN: usize = 16;
/// Minimum interval between automatic refreshes from [`AccountStore::get`].
const REFRESH_INTERVAL_MS: u64 = 1000;

/// An account store problem. Messages name the file so the operator knows what to look at.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("account store {}: cannot {action}: {source}", .path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        source: io::Error,
    },
    #[error("account store {}: invalid contents (fix or restore the file): {source}", .path.display())]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "account store {}: unsupported format version {version} (this build understands {FORMAT_VERSION})",
        .path.display()
    )]
    Version { path: PathBuf, version: u32 },
    #[error("account store {}: invalid JID `{jid}`: {reason}", .path.display())]
    InvalidJid {
        path: PathBuf,
        jid: String,
        reason: &'static str,
    },
    #[error("account store {}: SCRAM iteration count must be at least 1", .path.display())]
    InvalidIterations { path: PathBuf },
}

/// One account: the normalised bare JID and its SCRAM verifiers for both hashes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// Bare JID, `localpart@domain`, lower case.
    pub jid: String,
    pub scram_sha1: ScramCredentials,
    pub scram_sha256: ScramCredentials,
}

impl Account {
    /// Builds an account with fresh random salts (one per hash, so the two verifiers are unrelated).
    fn new(jid: String, password: &str, iterations: u32) -> Self {
        let salt1: [u8; SALT_LEN] = rand::random();
        let salt256: [u8; SALT_LEN] = rand::random();
        Account {
            jid,
            scram_sha1: ScramCredentials::derive(password, &salt1, iterations, ScramHash::Sha1),
            scram_sha256: ScramCredentials::derive(
                password,
                &salt256,
                iterations,
                ScramHash::Sha256,
            ),
        }
    }

    /// The stored SCRAM data for `hash`.
    pub fn scram(&self, hash: ScramHash) -> &ScramCredentials {
        match hash {
            ScramHash::Sha1 => &self.scram_sha1,
            ScramHash::Sha256 => &self.scram_sha256,
        }
    }

    /// PLAIN verification: derive SCRAM-SHA-256 keys from `password` with the stored salt and iteration
    /// count and compare StoredKey in constant time (no plaintext is stored to compare against).
    /// Costs one PBKDF2 run.
    pub fn verify_password(&self, password: &str) -> bool {
        let c = &self.scram_sha256;
        let derived = ScramCredentials::derive(password, &c.salt, c.iterations, ScramHash::Sha256);
        bool::from(derived.stored_key.ct_eq(&c.stored_key))
    }
}

#[derive(Serialize, Deserialize)]
struct FileFormat {
    version: u32,
    accounts: Vec<Account>,
}

/// What identifies one version of the file, to notice replacement cheaply (`stat` only).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    len: u64,
    mtime: Option<SystemTime>,
    #[cfg(unix)]
    dev: u64,
    #[cfg(unix)]
    ino: u64,
}

impl Stamp {
    fn of(m: &fs::Metadata) -> Self {
        #[cfg(unix)]
        use std::os::unix::fs::MetadataExt as _;
        Stamp {
            len: m.len(),
            mtime: m.modified().ok(),
            #[cfg(unix)]
            dev: m.dev(),
            #[cfg(unix)]
            ino: m.ino(),
        }
    }
}

struct Snapshot {
    accounts: Arc<HashMap<String, Account>>,
    /// None when the file did not exist at the last read.
    stamp: Option<Stamp>,
}

/// The account store. Cheap to query from many threads: lookups take a read lock on an in-memory map.
pub struct AccountStore {
    path: PathBuf,
    lock_path: PathBuf,
    snapshot: RwLock<Snapshot>,
    /// Serialises writers inside this process (the file lock serialises processes).
    write_lock: Mutex<()>,
    /// Milliseconds since `epoch` of the last automatic refresh check, for the once-per-second limit.
    last_check_ms: AtomicU64,
    epoch: Instant,
}

impl std::fmt::Debug for AccountStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccountStore")
            .field("path", &self.path)
            .finish()
    }
}

impl AccountStore {
    /// Opens the store in `data_dir`, creating the directory (mode 0700) and an empty `accounts.json`
    /// (mode 0600) if missing.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let path = data_dir.join(FILE_NAME);
        create_dir(data_dir).map_err(|source| StoreError::Io {
            path: data_dir.to_path_buf(),
            action: "create the data directory",
            source,
        })?;
        let store = AccountStore {
            lock_path: data_dir.join(format!("{FILE_NAME}.lock")),
            path,
            snapshot: RwLock::new(Snapshot {
                accounts: Arc::new(HashMap::new()),
                stamp: None,
            }),
            write_lock: Mutex::new(()),
            last_check_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        };
        if !store.path.exists() {
            // Written under the lock so a concurrent first `add` elsewhere is not overwritten.
            store.mutate(|_| ())?;
        }
        store.refresh()?;
        store.warn_if_permissive();
        Ok(store)
    }

    /// Path of `accounts.json`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Adds `jid` with SCRAM verifiers derived from `password` (`iterations` PBKDF2 rounds, fresh salts);
    /// replaces the account if it exists. Costs two PBKDF2 runs.
    pub fn add(&self, jid: &str, password: &str, iterations: u32) -> Result<(), StoreError> {
        let jid = normalize_jid(jid).map_err(|reason| StoreError::InvalidJid {
            path: self.path.clone(),
            jid: jid.to_owned(),
            reason,
        })?;
        if iterations == 0 {
            return Err(StoreError::InvalidIterations {
                path: self.path.clone(),
            });
        }
        // Derive outside the file lock: PBKDF2 may take a while.
        let account = Account::new(jid.clone(), password, iterations);
        self.mutate(move |map| {
            map.insert(jid, account);
        })
    }

    /// Removes `jid`; returns whether it existed.
    pub fn remove(&self, jid: &str) -> Result<bool, StoreError> {
        let Ok(jid) = normalize_jid(jid) else {
            return Ok(false);
        };
        let mut existed = false;
        self.mutate(|map| existed = map.remove(&jid).is_some())?;
        Ok(existed)
    }

    /// All account JIDs, sorted.
    pub fn list(&self) -> Vec<String> {
        self.maybe_refresh();
        let mut v: Vec<String> = self.current().keys().cloned().collect();
        v.sort();
        v
    }

    /// The account for `jid` (normalised before lookup), refreshing from disk at most once per second.
    pub fn get(&self, jid: &str) -> Option<Account> {
        self.maybe_refresh();
        let jid = normalize_jid(jid).ok()?;
        self.current().get(&jid).cloned()
    }

    /// Re-reads the file if it changed on disk since the last read (so `tern user add` in another process
    /// is seen by a running server). Cheap when nothing changed: one `stat`. A missing file reads as an
    /// empty store (the operator deleted it).
    pub fn refresh(&self) -> Result<(), StoreError> {
        let current = match fs::metadata(&self.path) {
            Ok(m) => Some(Stamp::of(&m)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(source) => return Err(self.io_err("stat", source)),
        };
        if self.read_snapshot().stamp == current {
            return Ok(());
        }
        let (accounts, stamp) = self.load()?;
        let mut snap = self.snapshot.write().unwrap_or_else(|e| e.into_inner());
        snap.accounts = Arc::new(accounts);
        snap.stamp = stamp;
        Ok(())
    }

    /// Refreshes if the last check was at least a second ago; errors are logged and the previous
    /// snapshot kept, so a half-edited file does not lock every user out.
    fn maybe_refresh(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let last = self.last_check_ms.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < REFRESH_INTERVAL_MS {
            return;
        }
        // Only one thread does the check; the others use the current snapshot.
        if self
            .last_check_ms
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        if let Err(e) = self.refresh() {
            tracing::warn!(error = %e, "keeping previous accounts");
        }
    }

    fn current(&self) -> Arc<HashMap<String, Account>> {
        Arc::clone(&self.read_snapshot().accounts)
    }

    fn read_snapshot(&self) -> std::sync::RwLockReadGuard<'_, Snapshot> {
        self.snapshot.read().unwrap_or_else(|e| e.into_inner())
    }

    fn io_err(&self, action: &'static str, source: io::Error) -> StoreError {
        StoreError::Io {
            path: self.path.clone(),
            action,
            source,
        }
    }

    /// Reads and parses the file; the stamp comes from the open handle so it matches what was read even
    /// if the file is replaced meanwhile.
    fn load(&self) -> Result<(HashMap<String, Account>, Option<Stamp>), StoreError> {
        let mut f = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((HashMap::new(), None)),
            Err(source) => return Err(self.io_err("open", source)),
        };
        let meta = f.metadata().map_err(|e| self.io_err("stat", e))?;
        let mut buf = String::new();
        f.read_to_string(&mut buf)
            .map_err(|e| self.io_err("read", e))?;
        let parsed: FileFormat =
            serde_json::from_str(&buf).map_err(|source| StoreError::Parse {
                path: self.path.clone(),
                source,
            })?;
        if parsed.version != FORMAT_VERSION {
            return Err(StoreError::Version {
                path: self.path.clone(),
                version: parsed.version,
            });
        }
        let mut map = HashMap::with_capacity(parsed.accounts.len());
        for mut a in parsed.accounts {
            match normalize_jid(&a.jid) {
                Ok(j) => {
                    a.jid = j.clone();
                    map.insert(j, a);
                }
                Err(reason) => {
                    tracing::warn!(path = %self.path.display(), jid = %a.jid, reason, "skipping account");
                }
            }
        }
        Ok((map, Some(Stamp::of(&meta))))
    }

    /// Read-modify-write under both locks, then atomically replace the file and update the snapshot.
    fn mutate(&self, f: impl FnOnce(&mut HashMap<String, Account>)) -> Result<(), StoreError> {
        let _guard = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
        let lock_file = open_private(&self.lock_path, false).map_err(|source| StoreError::Io {
            path: self.lock_path.clone(),
            action: "open the lock file",
            source,
        })?;
        lock_file.lock().map_err(|source| StoreError::Io {
            path: self.lock_path.clone(),
            action: "lock",
            source,
        })?;
        // Re-read under the lock so a change made by another process since our last refresh is kept.
        let (mut map, _) = self.load()?;
        f(&mut map);
        self.write_file(&map)?;
        let meta = fs::metadata(&self.path).map_err(|e| self.io_err("stat", e))?;
        let mut snap = self.snapshot.write().unwrap_or_else(|e| e.into_inner());
        snap.accounts = Arc::new(map);
        snap.stamp = Some(Stamp::of(&meta));
        drop(snap);
        // Dropping the handle releases the lock; unlock explicitly anyway to be obvious about it.
        let _ = lock_file.unlock();
        Ok(())
    }

    /// Atomic replace: temp file (0600) → write → fsync → rename → fsync directory.
    fn write_file(&self, map: &HashMap<String, Account>) -> Result<(), StoreError> {
        let mut accounts: Vec<Account> = map.values().cloned().collect();
        accounts.sort_by(|a, b| a.jid.cmp(&b.jid));
        let mut json = serde_json::to_vec_pretty(&FileFormat {
            version: FORMAT_VERSION,
            accounts,
        })
        .map_err(|source| StoreError::Parse {
            path: self.path.clone(),
            source,
        })?;
        json.push(b'\n');

        let tmp = self
            .path
            .with_file_name(format!(".{FILE_NAME}.tmp.{}", std::process::id()));
        let tmp_err = |action, source| StoreError::Io {
            path: tmp.clone(),
            action,
            source,
        };
        let result = (|| {
            let mut f = open_private(&tmp, true).map_err(|e| tmp_err("create", e))?;
            f.write_all(&json).map_err(|e| tmp_err("write", e))?;
            f.sync_all().map_err(|e| tmp_err("fsync", e))?;
            drop(f);
            fs::rename(&tmp, &self.path).map_err(|e| self.io_err("replace", e))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result?;
        // Make the rename itself durable.
        if let Some(dir) = self.path.parent() {
            #[cfg(unix)]
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|source| StoreError::Io {
                    path: dir.to_path_buf(),
                    action: "fsync the data directory",
                    source,
                })?;
            #[cfg(not(unix))]
            let _ = dir;
        }
        Ok(())
    }

    fn warn_if_permissive(&self) {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            if let Ok(m) = fs::metadata(&self.path)
                && m.permissions().mode() & 0o077 != 0
            {
                tracing::warn!(
                    path = %self.path.display(),
                    mode = format!("{:o}", m.permissions().mode() & 0o777),
                    "account store is readable by other users; run chmod 600 on it"
                );
            }
        }
    }
}

/// Creates `dir` (and parents), mode 0700 for what this call creates.
fn create_dir(dir: &Path) -> io::Result<()> {
    let mut b = fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        b.mode(0o700);
    }
    b.create(dir)
}

/// Opens (creating, mode 0600) a file for writing; `truncate` for the temp file, not for the lock file.
fn open_private(path: &Path, truncate: bool) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.write(true).create(true).truncate(truncate);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        o.mode(0o600);
    }
    o.open(path)
}

/// Normalises a bare JID for use as a key: `localpart@domain`, both lower-cased (the localpart is
/// case-insensitive under RFC 7622 §3.3's UsernameCaseMapped profile for ASCII; the domain under
/// RFC 7622 §3.2). Rejects what RFC 7622 §3.3.1 forbids in a localpart (`"&'/:<>@`, whitespace, controls),
/// resources and empty parts. Full PRECIS enforcement is out of scope.
pub fn normalize_jid(jid: &str) -> Result<String, &'static str> {
    let (local, domain) = jid.split_once('@').ok_or("expected localpart@domain")?;
    if local.is_empty() {
        return Err("empty localpart");
    }
    if local.len() > 1023 || domain.len() > 1023 {
        return Err("part longer than 1023 bytes (RFC 7622 §3)");
    }
    if local
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || "\"&'/:<>@".contains(c))
    {
        return Err("localpart contains a character RFC 7622 §3.3.1 forbids");
    }
    let domain = domain.strip_suffix('.').unwrap_or(domain);
    if domain.is_empty() {
        return Err("empty domain");
    }
    if domain.contains('/') {
        return Err("a bare JID has no resource");
    }
    if domain
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '@')
    {
        return Err("domain contains an invalid character");
    }
    Ok(format!(
        "{}@{}",
        local.to_lowercase(),
        domain.to_lowercase()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const IT: u32 = 64; // Keep tests fast; production uses config `scram_iterations`.

    #[test]
    fn open_creates_dir_and_empty_file() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("nested/data");
        let store = AccountStore::open(&dir).expect("open");
        assert!(store.list().is_empty());
        assert!(dir.join(FILE_NAME).exists());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = fs::metadata(dir.join(FILE_NAME))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
            let dmode = fs::metadata(&dir).expect("meta").permissions().mode();
            assert_eq!(dmode & 0o077, 0);
        }
    }

    #[test]
    fn add_get_list_remove_persist() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = AccountStore::open(tmp.path()).expect("open");
        store.add("Alice@Example.ORG", "secret", IT).expect("add");
        store.add("bob@example.org", "hunter2", IT).expect("add");
        assert_eq!(store.list(), vec!["alice@example.org", "bob@example.org"]);

        let a = store.get("ALICE@example.org").expect("alice");
        assert_eq!(a.jid, "alice@example.org");
        assert_eq!(a.scram_sha1.stored_key.len(), 20);
        assert_eq!(a.scram_sha256.stored_key.len(), 32);
        assert_eq!(a.scram_sha256.iterations, IT);
        assert_ne!(a.scram_sha1.salt, a.scram_sha256.salt);
        assert!(a.verify_password("secret"));
        assert!(!a.verify_password("Secret"));
        // Verifiers match what a SCRAM client derives from the password.
        assert_eq!(
            ScramCredentials::derive("secret", &a.scram_sha1.salt, IT, ScramHash::Sha1),
            a.scram_sha1
        );

        // No plaintext on disk.
        let text = fs::read_to_string(tmp.path().join(FILE_NAME)).expect("read");
        assert!(!text.contains("secret") && !text.contains("hunter2"));

        // Replace.
        store.add("alice@example.org", "new", IT).expect("replace");
        assert!(
            store
                .get("alice@example.org")
                .expect("alice")
                .verify_password("new")
        );
        assert_eq!(store.list().len(), 2);

        assert!(store.remove("Bob@example.org").expect("remove"));
        assert!(!store.remove("bob@example.org").expect("remove"));
        assert!(!store.remove("not a jid").expect("remove"));

        let reopened = AccountStore::open(tmp.path()).expect("reopen");
        assert_eq!(reopened.list(), vec!["alice@example.org"]);
        assert!(
            reopened
                .get("alice@example.org")
                .expect("a")
                .verify_password("new")
        );
        assert!(reopened.get("bob@example.org").is_none());
        // No temp files left behind.
        let names: Vec<_> = fs::read_dir(tmp.path())
            .expect("readdir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.contains(".tmp.")), "{names:?}");
    }

    #[test]
    fn refresh_sees_changes_from_another_instance() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let server = AccountStore::open(tmp.path()).expect("open");
        let cli = AccountStore::open(tmp.path()).expect("open");
        cli.add("carol@example.org", "pw", IT).expect("add");
        server.refresh().expect("refresh");
        assert!(server.get("carol@example.org").is_some());
        // Writers re-read under the lock: the server's add keeps the CLI's account.
        server.add("dave@example.org", "pw", IT).expect("add");
        cli.refresh().expect("refresh");
        assert_eq!(cli.list(), vec!["carol@example.org", "dave@example.org"]);
        // Unchanged file: refresh is a no-op.
        cli.refresh().expect("refresh");
        // Deleted file reads as empty.
        fs::remove_file(tmp.path().join(FILE_NAME)).expect("rm");
        server.refresh().expect("refresh");
        assert!(server.list().is_empty());
    }

    #[test]
    fn invalid_input_is_rejected() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = AccountStore::open(tmp.path()).expect("open");
        for bad in [
            "",
            "alice",
            "@example.org",
            "alice@",
            "alice@example.org/res",
            "al ice@example.org",
            "a:b@example.org",
            "a@b@example.org",
        ] {
            let err = store.add(bad, "pw", IT).expect_err(bad);
            assert!(matches!(err, StoreError::InvalidJid { .. }), "{bad}: {err}");
            assert!(err.to_string().contains(FILE_NAME), "{err}");
            assert!(store.get(bad).is_none());
        }
        assert!(matches!(
            store.add("a@example.org", "pw", 0),
            Err(StoreError::InvalidIterations { .. })
        ));
        assert_eq!(
            normalize_jid("A@Example.org.").as_deref(),
            Ok("a@example.org")
        );
    }

    #[test]
    fn corrupt_file_errors_name_the_path_and_keep_snapshot() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = AccountStore::open(tmp.path()).expect("open");
        store.add("erin@example.org", "pw", IT).expect("add");
        fs::write(tmp.path().join(FILE_NAME), "{ not json").expect("write");
        let err = store.refresh().expect_err("corrupt");
        assert!(matches!(err, StoreError::Parse { .. }));
        assert!(err.to_string().contains(FILE_NAME), "{err}");
        // The previous snapshot stays usable.
        assert!(store.get("erin@example.org").is_some());
        let err = AccountStore::open(tmp.path()).expect_err("corrupt");
        assert!(err.to_string().contains(FILE_NAME), "{err}");

        fs::write(
            tmp.path().join(FILE_NAME),
            r#"{"version":99,"accounts":[]}"#,
        )
        .expect("write");
        assert!(matches!(
            store.refresh(),
            Err(StoreError::Version { version: 99, .. })
        ));
    }

    #[test]
    fn concurrent_readers_and_writer() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(AccountStore::open(tmp.path()).expect("open"));
        store.add("f@example.org", "pw", IT).expect("add");
        let readers: Vec<_> = (0..4)
            .map(|_| {
                let s = Arc::clone(&store);
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        assert!(s.get("f@example.org").is_some());
                    }
                })
            })
            .collect();
        for i in 0..5 {
            store
                .add(&format!("g{i}@example.org"), "pw", IT)
                .expect("add");
        }
        for r in readers {
            r.join().expect("reader");
        }
        assert_eq!(store.list().len(), 6);
    }
}
