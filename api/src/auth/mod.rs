//! Authentication: signed tokens, bucket grants, passwords, sessions and service tokens.
//!
//! - [`claims`]: what a token says (kind, tenant, grants) and what grants allow;
//! - [`keys`]: the key ring (HS256, RS256, EdDSA; the algorithm pinned per key, rotation by `kid`);
//! - [`password`]: argon2id hashing, off the async workers and bounded;
//! - [`sessions`]: what lives in Redis: login sessions with rotating refresh tokens, service
//!   tokens, single-use invitations.

pub mod claims;
pub mod keys;
pub mod password;
pub mod sessions;

pub use claims::{parse_grants, Claims, Grant, Perm, TokenKind};
pub use keys::{KeyConfig, TokenKeys, DEFAULT_KID};

use serde::{Deserialize, Serialize};

/// The development secret. Refused outside development mode.
pub const DEV_SECRET: &str = "syncflow-dev-secret-change-me";

/// Authentication settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// HMAC secret of the HS256 key `"default"` (at least 32 bytes outside development).
    pub jwt_secret: String,
    /// More keys (RS256, EdDSA or HS256), each with its `kid`: for rotation and asymmetric keys.
    pub keys: Vec<KeyConfig>,
    /// The `kid` of the key new tokens are signed with.
    pub signing_kid: String,
    /// Expected `iss` claim.
    pub issuer: String,
    /// Expected `aud` claim.
    pub audience: String,
    /// Lifetime of tokens minted by `syncflow token`, in seconds.
    pub token_ttl_secs: u64,
    /// Lifetime of a user's access token, in seconds.
    pub access_ttl_secs: u64,
    /// Lifetime of a login session (its refresh tokens), in seconds.
    pub refresh_ttl_secs: u64,
    /// Longest lifetime of a service token, in seconds.
    pub service_token_max_ttl_secs: u64,
    /// Longest lifetime of an invitation, in seconds.
    pub invite_ttl_secs: u64,
    /// How long registration and grant changes wait for the users view, in ms.
    pub view_wait_ms: u64,
    /// Most password hashes computed at once (each takes about 19 MiB and tens of ms of CPU).
    pub max_concurrent_hashes: usize,
    /// Development mode: allows the built-in development secret and short secrets.
    pub dev_mode: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            jwt_secret: String::new(),
            keys: Vec::new(),
            signing_kid: DEFAULT_KID.into(),
            issuer: "syncflow".into(),
            audience: "syncflow".into(),
            token_ttl_secs: 3600,
            access_ttl_secs: 900,
            refresh_ttl_secs: 30 * 24 * 3600,
            service_token_max_ttl_secs: 365 * 24 * 3600,
            invite_ttl_secs: 7 * 24 * 3600,
            view_wait_ms: 5000,
            max_concurrent_hashes: 4,
            dev_mode: false,
        }
    }
}

impl AuthConfig {
    /// Problems with this configuration: an unusable key ring, a missing secret, the development
    /// secret outside development mode, inconsistent lifetimes.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Err(e) = TokenKeys::new(self) {
            out.push(e);
        }
        if self.access_ttl_secs == 0 || self.refresh_ttl_secs < self.access_ttl_secs {
            out.push(
                "auth.access_ttl_secs must be at least 1 and at most auth.refresh_ttl_secs".into(),
            );
        }
        if self.token_ttl_secs == 0 {
            out.push("auth.token_ttl_secs must be at least 1 (a token valid for no time)".into());
        }
        if self.max_concurrent_hashes == 0 {
            out.push("auth.max_concurrent_hashes must be at least 1".into());
        }
        out
    }
}

/// Why a token is refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No bearer token in the request.
    #[error("missing bearer token")]
    Missing,
    /// The token is malformed, wrongly signed, expired, not yet valid, for another audience, of
    /// the wrong kind, or its session or registration is gone.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// Whether the token is still valid cannot be checked now (Redis is unreachable).
    #[error("cannot check the token now: {0}")]
    Unavailable(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn keys(secret: &str) -> TokenKeys {
        TokenKeys::new(&AuthConfig {
            jwt_secret: secret.into(),
            ..AuthConfig::default()
        })
        .unwrap()
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn b64(bytes: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    #[test]
    fn verify_refuses_bad_tokens() {
        let k = keys(SECRET);
        let good = k.mint("u", "acme", parse_grants("*:r").unwrap(), now(), 60);
        assert_eq!(k.verify(&good).unwrap().tenant, "acme");
        let other = keys("another-secret-another-secret-xx");
        assert!(other.verify(&good).is_err(), "wrong signature accepted");
        let expired = k.mint("u", "acme", vec![], now() - 3600, 60);
        assert!(k.verify(&expired).is_err(), "expired token accepted");
        // alg none: the same claims, no signature, with and without the key's kid.
        let payload = good.split('.').nth(1).unwrap();
        for header in [
            r#"{"alg":"none","typ":"JWT"}"#,
            r#"{"alg":"none","typ":"JWT","kid":"default"}"#,
        ] {
            let none = format!("{}.{payload}.", b64(header.as_bytes()));
            assert!(k.verify(&none).is_err(), "alg none accepted: {header}");
        }
        assert!(k.verify("garbage").is_err());
    }

    #[test]
    fn token_kinds_are_not_interchangeable() {
        let k = keys(SECRET);
        let mut invite = Claims::access("admin", "acme", vec![], now(), 60);
        invite.typ = TokenKind::Invite;
        let invite = k.sign(invite);
        assert!(
            k.verify(&invite).is_err(),
            "an invite is not an access token"
        );
        assert!(k.verify_kind(&invite, &[TokenKind::Invite]).is_ok());
        let access = k.mint("u", "acme", vec![], now(), 60);
        assert!(k.verify_kind(&access, &[TokenKind::Invite]).is_err());
    }

    #[test]
    fn config_problems() {
        assert!(!AuthConfig::default().problems().is_empty(), "no secret");
        let dev = AuthConfig {
            jwt_secret: DEV_SECRET.into(),
            ..AuthConfig::default()
        };
        assert!(!dev.problems().is_empty(), "development secret outside dev");
        let short = AuthConfig {
            jwt_secret: "short".into(),
            ..AuthConfig::default()
        };
        assert!(!short.problems().is_empty(), "short secret outside dev");
        let dev_ok = AuthConfig {
            dev_mode: true,
            ..dev
        };
        assert!(dev_ok.problems().is_empty());
        let unknown_kid = AuthConfig {
            jwt_secret: SECRET.into(),
            signing_kid: "k2".into(),
            ..AuthConfig::default()
        };
        assert!(!unknown_kid.problems().is_empty());
    }

    /// Writes a key pair made by the `openssl` command line (`genpkey` arguments) to `dir`.
    fn openssl_pair(dir: &std::path::Path, name: &str, args: &[&str]) -> (String, String) {
        let private = dir.join(format!("{name}.pem"));
        let public = dir.join(format!("{name}.pub.pem"));
        let ok = std::process::Command::new("openssl")
            .arg("genpkey")
            .args(args)
            .arg("-out")
            .arg(&private)
            .status()
            .expect("openssl is installed")
            .success();
        assert!(ok, "openssl genpkey {args:?}");
        let ok = std::process::Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&private)
            .arg("-out")
            .arg(&public)
            .status()
            .unwrap()
            .success();
        assert!(ok, "openssl pkey -pubout");
        (private.display().to_string(), public.display().to_string())
    }

    #[test]
    fn asymmetric_keys_and_rotation_by_kid() {
        let dir = std::env::temp_dir().join(format!("syncflow-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (ed_priv, ed_pub) = openssl_pair(&dir, "ed", &["-algorithm", "ed25519"]);
        let (rsa_priv, rsa_pub) = openssl_pair(
            &dir,
            "rsa",
            &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        );
        let ed = KeyConfig {
            kid: "ed-2026".into(),
            alg: "EdDSA".into(),
            private_key_file: ed_priv,
            public_key_file: ed_pub.clone(),
            ..KeyConfig::default()
        };
        let rsa = KeyConfig {
            kid: "rsa-2026".into(),
            alg: "RS256".into(),
            private_key_file: rsa_priv,
            public_key_file: rsa_pub,
            ..KeyConfig::default()
        };
        // Stage 1: the old HS256 key signs; the new EdDSA key is only trusted.
        let stage1 = AuthConfig {
            jwt_secret: SECRET.into(),
            keys: vec![ed.clone(), rsa.clone()],
            ..AuthConfig::default()
        };
        let k1 = TokenKeys::new(&stage1).unwrap();
        let old = k1.mint("u", "acme", vec![], now(), 600);
        // Stage 2: the EdDSA key signs; the old key still verifies tokens issued before.
        let stage2 = AuthConfig {
            signing_kid: "ed-2026".into(),
            ..stage1.clone()
        };
        let k2 = TokenKeys::new(&stage2).unwrap();
        let new = k2.mint("u", "acme", vec![], now(), 600);
        let header = jsonwebtoken::decode_header(&new).unwrap();
        assert_eq!(header.kid.as_deref(), Some("ed-2026"));
        assert_eq!(header.alg, jsonwebtoken::Algorithm::EdDSA);
        assert!(k2.verify(&old).is_ok(), "old tokens verify during rotation");
        assert!(
            k1.verify(&new).is_ok(),
            "nodes not yet switched verify new tokens"
        );
        // Stage 3: the old key is removed; its tokens are refused.
        let stage3 = AuthConfig {
            jwt_secret: String::new(),
            ..stage2.clone()
        };
        let k3 = TokenKeys::new(&stage3).unwrap();
        assert!(k3.verify(&new).is_ok());
        assert!(
            k3.verify(&old).is_err(),
            "a removed key's tokens are refused"
        );
        // RS256 signs and verifies too.
        let rs = TokenKeys::new(&AuthConfig {
            signing_kid: "rsa-2026".into(),
            ..stage3.clone()
        })
        .unwrap();
        let rs_token = rs.mint("u", "acme", vec![], now(), 600);
        assert!(k3.verify(&rs_token).is_ok());
        // Algorithm pinned per key: an HS256 token signed with the EdDSA public key's bytes
        // under that key's kid (the classic key-confusion attack) is refused.
        let public_bytes = std::fs::read(&ed_pub).unwrap();
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        header.kid = Some("ed-2026".into());
        let mut claims = Claims::access("eve", "acme", parse_grants("*:a").unwrap(), now(), 600);
        claims.iss = "syncflow".into();
        claims.aud = "syncflow".into();
        let confused = jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(&public_bytes),
        )
        .unwrap();
        assert!(
            k3.verify(&confused).is_err(),
            "algorithm confusion accepted"
        );
        // A verify-only key cannot be the signing key.
        let verify_only = AuthConfig {
            keys: vec![KeyConfig {
                private_key_file: String::new(),
                ..ed
            }],
            ..stage2
        };
        assert!(!verify_only.problems().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
