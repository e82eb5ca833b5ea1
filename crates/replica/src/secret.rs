//! The family's shared secret: read from a file, never logged. It keys packet MACs,
//! and a token derived from it authenticates calls to replica servers (the secret
//! itself never travels).

use multisite_core::packet::codec::FamilySecret;
use ring::hmac;
use ring::rand::SecureRandom;
use std::path::Path;

/// Environment variable naming the secret file when `--secret-file` is not given.
pub const SECRET_FILE_ENV: &str = "MULTISITE_SECRET_FILE";

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error(
        "no family secret: pass --secret-file FILE or set {SECRET_FILE_ENV} (`replica init` creates the file)"
    )]
    Missing,
    #[error("cannot read the family secret from {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("cannot create the family secret file {path}: {reason}")]
    Create { path: String, reason: String },
    #[error("the family secret in {path} is too short: {reason}")]
    TooShort { path: String, reason: String },
}

/// The loaded secret: the packet key and the API token derived from it.
pub struct Secret {
    pub packets: FamilySecret,
    pub api_token: String,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The token a caller presents (`Authorization: Bearer ...`).
fn api_token(bytes: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, bytes);
    let tag = hmac::sign(&key, b"multisite api token v1");
    tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads the secret file; surrounding whitespace is ignored.
pub fn load(path: &Path) -> Result<Secret, SecretError> {
    let text = std::fs::read(path).map_err(|e| SecretError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    from_bytes(&text).map_err(|reason| SecretError::TooShort {
        path: path.display().to_string(),
        reason,
    })
}

/// The secret from its text (as held in a file or a Kubernetes Secret); surrounding
/// whitespace is ignored. The error says why it is unusable.
pub fn from_bytes(text: &[u8]) -> Result<Secret, String> {
    let bytes = text.trim_ascii();
    let packets = FamilySecret::from_bytes(bytes).map_err(|e| e.to_string())?;
    Ok(Secret {
        packets,
        api_token: api_token(bytes),
    })
}

/// A fresh secret: 32 random bytes as hex.
pub fn generate() -> Result<String, SecretError> {
    let mut raw = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut raw)
        .map_err(|_| SecretError::Create {
            path: "(new secret)".into(),
            reason: "no randomness available".into(),
        })?;
    Ok(raw.iter().map(|b| format!("{b:02x}")).collect())
}

/// Creates a secret file with 32 random bytes (hex) if it does not exist, readable
/// by its owner only.
pub fn create_if_missing(path: &Path) -> Result<bool, SecretError> {
    if path.exists() {
        return Ok(false);
    }
    let fail = |reason: String| SecretError::Create {
        path: path.display().to_string(),
        reason,
    };
    let hex = generate()?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| fail(e.to_string()))?;
    }
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| fail(e.to_string()))?;
    file.write_all(format!("{hex}\n").as_bytes())
        .map_err(|e| fail(e.to_string()))?;
    Ok(true)
}
