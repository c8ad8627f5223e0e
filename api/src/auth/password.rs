//! Passwords: argon2id (the crate's defaults: 19 MiB, 2 passes, 1 lane) in PHC string form.
//!
//! Hashing is deliberately slow, so it runs on the blocking pool, and at most
//! `auth.max_concurrent_hashes` run at once: a burst of logins queues instead of taking all
//! memory and every core.

use std::sync::Arc;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use rand::RngCore;
use tokio::sync::Semaphore;

/// Shortest password accepted, in characters.
pub const MIN_LEN: usize = 8;
/// Longest password accepted, in bytes (hashing cost grows with it).
pub const MAX_BYTES: usize = 1024;

/// Hashes and verifies passwords, a bounded number at a time.
#[derive(Clone)]
pub struct Passwords {
    permits: Arc<Semaphore>,
    /// Verified against when the user does not exist, so that answer takes as long as a wrong
    /// password does.
    dummy: Arc<String>,
}

/// Why a password cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    /// Too short or too long.
    #[error("the password must be {MIN_LEN} to {MAX_BYTES} bytes long")]
    Length,
    /// The hasher failed (never for valid input).
    #[error("password hashing failed: {0}")]
    Hash(String),
}

fn hash_now(password: &str) -> Result<String, PasswordError> {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(|e| PasswordError::Hash(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| PasswordError::Hash(e.to_string()))
}

fn verify_now(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

impl Passwords {
    /// At most `concurrent` hashes at once.
    pub fn new(concurrent: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(concurrent.max(1))),
            dummy: Arc::new(hash_now("not a password of anyone").expect("hashing a constant")),
        }
    }

    /// Checks the length rules.
    pub fn check(password: &str) -> Result<(), PasswordError> {
        if password.chars().count() < MIN_LEN || password.len() > MAX_BYTES {
            return Err(PasswordError::Length);
        }
        Ok(())
    }

    /// The argon2id PHC string of `password`.
    pub async fn hash(&self, password: &str) -> Result<String, PasswordError> {
        Self::check(password)?;
        let _permit = self.permits.acquire().await.expect("never closed");
        let password = password.to_owned();
        tokio::task::spawn_blocking(move || hash_now(&password))
            .await
            .map_err(|e| PasswordError::Hash(e.to_string()))?
    }

    /// Whether `password` matches `phc`; with `None` (no such user) it spends the same time and
    /// answers false.
    pub async fn verify(&self, password: &str, phc: Option<&str>) -> bool {
        if password.len() > MAX_BYTES {
            return false;
        }
        let _permit = self.permits.acquire().await.expect("never closed");
        let known = phc.is_some();
        let phc = phc.map_or_else(|| self.dummy.to_string(), str::to_owned);
        let password = password.to_owned();
        tokio::task::spawn_blocking(move || verify_now(&password, &phc))
            .await
            .unwrap_or(false)
            && known
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_verify_and_differ() {
        let p = Passwords::new(2);
        let a = p.hash("correct horse battery").await.unwrap();
        let b = p.hash("correct horse battery").await.unwrap();
        assert!(a.starts_with("$argon2id$"), "{a}");
        assert_ne!(a, b, "salted");
        assert!(p.verify("correct horse battery", Some(&a)).await);
        assert!(!p.verify("wrong horse battery", Some(&a)).await);
        assert!(!p.verify("correct horse battery", None).await);
        assert!(!p.verify("x", Some("not a phc string")).await);
        assert!(matches!(p.hash("short").await, Err(PasswordError::Length)));
        assert!(matches!(
            p.hash(&"x".repeat(MAX_BYTES + 1)).await,
            Err(PasswordError::Length)
        ));
    }
}
