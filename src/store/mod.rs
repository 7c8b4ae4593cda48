//! Embedded persistent state under `data_dir`.

pub mod accounts;
pub mod queue;

pub use accounts::{Account, AccountStore, StoreError};

use std::path::{Path, PathBuf};

/// A secret of the embedded defaults kept as `{data_dir}/{name}` (mode 0600): 32 random bytes in hex,
/// created on first start and reused afterwards, so what was handed out stays valid across restarts.
pub fn load_or_create_secret(data_dir: &Path, name: &str) -> std::io::Result<(String, PathBuf)> {
    use std::io::Write;
    let path = data_dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            let key = s.trim().to_string();
            if key.len() < 16 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "{}: the secret must be at least 16 characters; delete the file to generate a new one",
                        path.display()
                    ),
                ));
            }
            return Ok((key, path));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(data_dir)?;
    let mut raw = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut raw);
    let key = hex::encode(raw);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(&path)?;
    f.write_all(key.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    Ok((key, path))
}
