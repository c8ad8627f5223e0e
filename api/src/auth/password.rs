//! Passwords: argon2id (the crate's defaults: 19 MiB, 2 passes, 1 lane) in PHC string form.
//!
//! Hashing is deliberately slow, so it runs on the blocking pool, and at most
//! `auth.max_concurrent_hashes` run at once: a burst of logins queues instead of taking all
//! memory and every core.

use std::sync::Arc;
use std::time::Duration;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use rand::RngCore;
use tokio::sync::Semaphore;

/// Shortest password accepted, in characters.
pub const MIN_LEN: usize = 8;
/// Longest password accepted, in bytes (hashing cost grows with it).
pub const MAX_BYTES: usize = 1024;

/// How long a password check or hash waits for a free slot before it is refused as busy: past
/// that, logins come faster than the slots get through them (a flood), and waiting longer would
/// only grow the queue.
pub const TURN_WAIT: Duration = Duration::from_secs(5);

/// Hashes and verifies passwords, a bounded number at a time.
#[derive(Clone)]
pub struct Passwords {
    permits: Arc<Semaphore>,
    /// How long a request waits for its turn before it is answered "busy".
    wait: Duration,
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
    /// Every hashing slot stayed taken for as long as a request waits (a flood of logins).
    #[error("too many password checks in progress; retry in a few seconds")]
    Busy,
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
    /// At most `concurrent` hashes at once; a request waits up to [`TURN_WAIT`] for its turn.
    pub fn new(concurrent: usize) -> Self {
        Self::with_wait(concurrent, TURN_WAIT)
    }

    /// At most `concurrent` hashes at once; a request waits up to `wait` for its turn.
    pub fn with_wait(concurrent: usize, wait: Duration) -> Self {
        Self {
            wait,
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

    /// A hashing slot, if one frees up within the wait: requests beyond what the slots get
    /// through are refused instead of queueing without end.
    async fn turn(&self) -> Result<tokio::sync::SemaphorePermit<'_>, PasswordError> {
        match tokio::time::timeout(self.wait, self.permits.acquire()).await {
            Ok(permit) => Ok(permit.expect("never closed")),
            Err(_) => Err(PasswordError::Busy),
        }
    }

    /// The argon2id PHC string of `password`.
    pub async fn hash(&self, password: &str) -> Result<String, PasswordError> {
        Self::check(password)?;
        let _permit = self.turn().await?;
        let password = password.to_owned();
        tokio::task::spawn_blocking(move || hash_now(&password))
            .await
            .map_err(|e| PasswordError::Hash(e.to_string()))?
    }

    /// Whether `password` matches `phc`; with `None` (no such user) it spends the same time and
    /// answers false. [`PasswordError::Busy`] when no slot frees up in time.
    pub async fn verify(&self, password: &str, phc: Option<&str>) -> Result<bool, PasswordError> {
        if password.len() > MAX_BYTES {
            return Ok(false);
        }
        let _permit = self.turn().await?;
        let known = phc.is_some();
        let phc = phc.map_or_else(|| self.dummy.to_string(), str::to_owned);
        let password = password.to_owned();
        let matched = tokio::task::spawn_blocking(move || verify_now(&password, &phc))
            .await
            .unwrap_or(false);
        Ok(matched && known)
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
        assert!(p.verify("correct horse battery", Some(&a)).await.unwrap());
        assert!(!p.verify("wrong horse battery", Some(&a)).await.unwrap());
        assert!(!p.verify("correct horse battery", None).await.unwrap());
        assert!(!p.verify("x", Some("not a phc string")).await.unwrap());
        assert!(matches!(p.hash("short").await, Err(PasswordError::Length)));
        assert!(matches!(
            p.hash(&"x".repeat(MAX_BYTES + 1)).await,
            Err(PasswordError::Length)
        ));
    }

    #[tokio::test]
    async fn a_request_that_gets_no_slot_in_time_is_told_busy_instead_of_queueing() {
        let p = Passwords::with_wait(1, Duration::from_millis(1));
        let phc = p.hash("correct horse battery").await.unwrap();
        // The first takes the only slot for a whole argon2 check; the second gives up.
        let (first, second) = tokio::join!(
            p.verify("correct horse battery", Some(&phc)),
            p.verify("correct horse battery", Some(&phc))
        );
        assert!(first.unwrap());
        assert!(matches!(second, Err(PasswordError::Busy)), "{second:?}");
    }
}
