//! JWT authentication and bucket grants.
//!
//! Access tokens are HS256 JWTs (the algorithm is pinned: `alg: none` and every other algorithm
//! are refused) carrying the tenant and the bucket grants. `exp`, `nbf`, `iss` and `aud` are checked.

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// The development secret. Refused outside development mode.
pub const DEV_SECRET: &str = "syncflow-dev-secret-change-me";

/// Authentication settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// HMAC secret for HS256 tokens (at least 32 bytes outside development).
    pub jwt_secret: String,
    /// Expected `iss` claim.
    pub issuer: String,
    /// Expected `aud` claim.
    pub audience: String,
    /// Lifetime of tokens minted by `syncflow token`, in seconds.
    pub token_ttl_secs: u64,
    /// Development mode: allows the built-in development secret.
    pub dev_mode: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            jwt_secret: String::new(),
            issuer: "syncflow".into(),
            audience: "syncflow".into(),
            token_ttl_secs: 3600,
            dev_mode: false,
        }
    }
}

impl AuthConfig {
    /// Problems with this configuration, all of them.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.jwt_secret.is_empty() {
            out.push("auth.jwt_secret is not set (SYNCFLOW_AUTH_JWT_SECRET); set a secret of at least 32 bytes, or enable auth.dev_mode for local development".into());
        } else if !self.dev_mode && self.jwt_secret == DEV_SECRET {
            out.push("auth.jwt_secret is the public development secret; it is only allowed with auth.dev_mode = true".into());
        } else if !self.dev_mode && self.jwt_secret.len() < 32 {
            out.push("auth.jwt_secret must be at least 32 bytes outside development mode".into());
        }
        if self.issuer.is_empty() || self.audience.is_empty() {
            out.push("auth.issuer and auth.audience must not be empty".into());
        }
        out
    }
}

/// What a grant allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Perm {
    /// Read documents and changes.
    Read,
    /// Write documents.
    Write,
    /// Administer the bucket (implies read and write).
    Admin,
}

/// A grant on one bucket, or on every bucket whose name starts with a prefix (`"todo*"`, `"*"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Bucket name, or a prefix followed by `*`.
    pub bucket: String,
    /// What it allows.
    pub perms: Vec<Perm>,
}

impl Grant {
    fn covers(&self, bucket: &str) -> bool {
        match self.bucket.strip_suffix('*') {
            Some(prefix) => bucket.starts_with(prefix),
            None => self.bucket == bucket,
        }
    }
}

/// The claims of a SyncFlow access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Subject: user or service id.
    pub sub: String,
    /// The tenant whose buckets the token may touch. No token reaches another tenant.
    pub tenant: String,
    /// Bucket grants.
    pub grants: Vec<Grant>,
    /// Issuer.
    pub iss: String,
    /// Audience.
    pub aud: String,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Not before, seconds since the epoch.
    pub nbf: u64,
    /// Issued at, seconds since the epoch.
    pub iat: u64,
    /// An operator token: may use the cluster-wide operations (`GET /v1/checkpoints`). Grants no
    /// bucket by itself.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub operator: bool,
}

impl Claims {
    /// Whether the token allows `perm` on `bucket` of its own tenant.
    pub fn allows(&self, perm: Perm, bucket: &str) -> bool {
        self.grants.iter().any(|g| {
            g.covers(bucket) && (g.perms.contains(&perm) || g.perms.contains(&Perm::Admin))
        })
    }
}

/// Why a token is refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No bearer token in the request.
    #[error("missing bearer token")]
    Missing,
    /// The token is malformed, wrongly signed, expired, not yet valid or for another audience.
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// Signs and verifies tokens with one pinned algorithm.
#[derive(Clone)]
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    issuer: String,
    audience: String,
}

impl TokenKeys {
    /// Keys for the configured secret (HS256).
    pub fn new(cfg: &AuthConfig) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[cfg.issuer.as_str()]);
        validation.set_audience(&[cfg.audience.as_str()]);
        validation.validate_nbf = true;
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        Self {
            encoding: EncodingKey::from_secret(cfg.jwt_secret.as_bytes()),
            decoding: DecodingKey::from_secret(cfg.jwt_secret.as_bytes()),
            validation,
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
        }
    }

    /// Mints a token for `sub` of `tenant` with `grants`, valid for `ttl_secs` from `now_secs`.
    pub fn mint(
        &self,
        sub: &str,
        tenant: &str,
        grants: Vec<Grant>,
        now_secs: u64,
        ttl_secs: u64,
    ) -> String {
        let claims = Claims {
            sub: sub.into(),
            tenant: tenant.into(),
            grants,
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            exp: now_secs + ttl_secs,
            nbf: now_secs.saturating_sub(1),
            iat: now_secs,
            operator: false,
        };
        encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing of plain claims cannot fail")
    }

    /// Mints an operator token (no bucket grants) for `sub`.
    pub fn mint_operator(&self, sub: &str, tenant: &str, now_secs: u64, ttl_secs: u64) -> String {
        let claims = Claims {
            sub: sub.into(),
            tenant: tenant.into(),
            grants: Vec::new(),
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            exp: now_secs + ttl_secs,
            nbf: now_secs.saturating_sub(1),
            iat: now_secs,
            operator: true,
        };
        encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing of plain claims cannot fail")
    }

    /// Verifies a token and returns its claims.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let data = decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        processors::limits::check_tenant(&data.claims.tenant)
            .map_err(|e| AuthError::Invalid(format!("tenant claim: {}", e.message)))?;
        Ok(data.claims)
    }
}

/// Parses grants written as `bucket:perms` lists, e.g. `todos:rw,notes*:r,*:a`.
pub fn parse_grants(text: &str) -> Result<Vec<Grant>, String> {
    text.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|item| {
            let (bucket, perms) = item
                .trim()
                .rsplit_once(':')
                .ok_or_else(|| format!("grant {item:?} must look like bucket:rw"))?;
            let perms = perms
                .chars()
                .map(|c| match c {
                    'r' => Ok(Perm::Read),
                    'w' => Ok(Perm::Write),
                    'a' => Ok(Perm::Admin),
                    other => Err(format!(
                        "unknown permission {other:?} in {item:?} (use r, w, a)"
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?;
            if bucket.is_empty() || perms.is_empty() {
                return Err(format!("grant {item:?} needs a bucket and permissions"));
            }
            Ok(Grant {
                bucket: bucket.into(),
                perms,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(secret: &str) -> TokenKeys {
        TokenKeys::new(&AuthConfig {
            jwt_secret: secret.into(),
            ..AuthConfig::default()
        })
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn grants_parse_and_match() {
        let g = parse_grants("todos:rw, notes*:r").unwrap();
        let c = Claims {
            sub: "u".into(),
            tenant: "t".into(),
            grants: g,
            iss: String::new(),
            aud: String::new(),
            exp: 0,
            nbf: 0,
            iat: 0,
            operator: false,
        };
        assert!(c.allows(Perm::Write, "todos"));
        assert!(!c.allows(Perm::Write, "todos2"));
        assert!(c.allows(Perm::Read, "notes-1"));
        assert!(!c.allows(Perm::Write, "notes-1"));
        assert!(parse_grants("todos").is_err());
        assert!(parse_grants("todos:x").is_err());
    }

    #[test]
    fn verify_refuses_bad_tokens() {
        let k = keys("0123456789abcdef0123456789abcdef");
        let good = k.mint("u", "acme", parse_grants("*:r").unwrap(), now(), 60);
        assert_eq!(k.verify(&good).unwrap().tenant, "acme");
        let other = keys("another-secret-another-secret-xx");
        assert!(other.verify(&good).is_err(), "wrong signature accepted");
        let expired = k.mint("u", "acme", vec![], now() - 3600, 60);
        assert!(k.verify(&expired).is_err(), "expired token accepted");
        // alg none: header {"alg":"none"} with the same claims and no signature.
        let payload = good.split('.').nth(1).unwrap();
        let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}.");
        assert!(k.verify(&none).is_err(), "alg none accepted");
        assert!(k.verify("garbage").is_err());
    }

    #[test]
    fn config_problems() {
        assert!(!AuthConfig::default().problems().is_empty());
        let dev = AuthConfig {
            jwt_secret: DEV_SECRET.into(),
            ..AuthConfig::default()
        };
        assert!(!dev.problems().is_empty());
        let dev_ok = AuthConfig {
            dev_mode: true,
            ..dev
        };
        assert!(dev_ok.problems().is_empty());
    }
}
