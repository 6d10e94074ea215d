//! The API's bearer token: read from a file, or generated on first start into a new file that
//! only its owner can read. A token file must belong to the user the daemon runs as (root)
//! and be readable by nobody else: otherwise whoever owns it could read or change the token.
//! The token is compared in constant time.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

/// Default token file (systemd's `StateDirectory=filterd`).
pub const DEFAULT_TOKEN_FILE: &str = "/var/lib/filterd/api-token";

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("token file {path} is empty; delete it to have a new token generated")]
    Empty { path: String },
    #[error(
        "token file {path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`"
    )]
    Permissions { path: String, mode: u32 },
    #[error("token file {path} belongs to uid {owner}, not to uid {want} that filterd runs as (root): whoever owns it can read or replace the token; run `chown {want} {path}`")]
    Owner { path: String, owner: u32, want: u32 },
}

/// What [`load_or_create`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum TokenSource {
    Read,
    Generated,
}

/// The token in `path`, or a new random one written there (mode 0600, parent created 0700).
pub fn load_or_create(path: &Path) -> Result<(String, TokenSource), TokenError> {
    let shown = path.display().to_string();
    let io = |source| TokenError::Io {
        path: shown.clone(),
        source,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let meta = std::fs::metadata(path).map_err(io)?;
            let want = unsafe { libc::geteuid() };
            if std::os::unix::fs::MetadataExt::uid(&meta) != want {
                return Err(TokenError::Owner {
                    path: shown,
                    owner: std::os::unix::fs::MetadataExt::uid(&meta),
                    want,
                });
            }
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(TokenError::Permissions { path: shown, mode });
            }
            let token = text.trim().to_owned();
            if token.is_empty() {
                return Err(TokenError::Empty { path: shown });
            }
            Ok((token, TokenSource::Read))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(io)?;
            }
            let mut raw = [0u8; 32];
            getrandom::fill(&mut raw).expect("the kernel's random source is available");
            let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io)?;
            f.write_all(format!("{token}\n").as_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
            Ok((token, TokenSource::Generated))
        }
        Err(e) => Err(io(e)),
    }
}

/// Read a token file as a client does (no permission checks, no creation).
pub fn read(path: &Path) -> Result<String, TokenError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| TokenError::Io {
        path: shown.clone(),
        source,
    })?;
    let token = text.trim().to_owned();
    if token.is_empty() {
        return Err(TokenError::Empty { path: shown });
    }
    Ok(token)
}

/// Equality whose time does not depend on where the inputs differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_once_then_read_back_and_private() {
        let dir = std::env::temp_dir().join(format!("filterd-token-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("sub").join("token");
        let (t1, s1) = load_or_create(&path).unwrap();
        assert_eq!((t1.len(), s1), (64, TokenSource::Generated));
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let (t2, s2) = load_or_create(&path).unwrap();
        assert_eq!((t2, s2), (t1.clone(), TokenSource::Read));
        assert_eq!(read(&path).unwrap(), t1);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load_or_create(&path),
            Err(TokenError::Permissions { mode: 0o644, .. })
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        // Owned by someone else: refused (only root can give a file away).
        let me = unsafe { libc::geteuid() };
        if me == 0 {
            let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
            assert_eq!(unsafe { libc::chown(c.as_ptr(), 65534, 65534) }, 0);
            match load_or_create(&path) {
                Err(
                    e @ TokenError::Owner {
                        owner: 65534,
                        want: 0,
                        ..
                    },
                ) => {
                    assert!(e.to_string().contains("chown 0"), "{e}")
                }
                other => panic!("{other:?}"),
            }
        } else {
            eprintln!("auth: not root, the owner check is not exercised with another owner");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn constant_time_eq_is_eq() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
