//! The key ring: tokens are signed with one key and verified with any configured key, chosen by
//! the token's `kid`. Each key pins its algorithm: a token whose header names another algorithm
//! (including `none`) is refused, whatever its signature.

use std::collections::HashMap;

use jsonwebtoken::{decode, decode_header, encode, Algorithm, DecodingKey, EncodingKey, Header};
use jsonwebtoken::{errors::ErrorKind, Validation};
use serde::{Deserialize, Serialize};

use super::{AuthConfig, AuthError, Claims, TokenKind, DEV_SECRET};

/// The `kid` of the key made from `auth.jwt_secret`; tokens without a `kid` are checked with it.
pub const DEFAULT_KID: &str = "default";

/// One configured key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct KeyConfig {
    /// The key id tokens name in their header.
    pub kid: String,
    /// `HS256`, `RS256` or `EdDSA`: the only algorithm this key accepts.
    pub alg: String,
    /// HS256: a file holding the secret (at least 32 bytes). Preferred over `secret`.
    pub secret_file: String,
    /// HS256: the secret itself (keep it out of files under version control).
    pub secret: String,
    /// RS256/EdDSA: the PEM private key; only needed for the key that signs.
    pub private_key_file: String,
    /// RS256/EdDSA: the PEM public key.
    pub public_key_file: String,
}

struct Key {
    alg: Algorithm,
    encoding: Option<EncodingKey>,
    decoding: DecodingKey,
}

fn read(path: &str, what: &str, kid: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("auth key {kid:?}: cannot read {what} {path:?}: {e}"))
}

impl Key {
    fn hmac(kid: &str, secret: &[u8], dev_mode: bool) -> Result<Key, String> {
        if !dev_mode && secret == DEV_SECRET.as_bytes() {
            return Err(format!("auth key {kid:?} is the public development secret; it is only allowed with auth.dev_mode = true"));
        }
        if !dev_mode && secret.len() < 32 {
            return Err(format!(
                "auth key {kid:?}: an HS256 secret must be at least 32 bytes outside development mode"
            ));
        }
        Ok(Key {
            alg: Algorithm::HS256,
            encoding: Some(EncodingKey::from_secret(secret)),
            decoding: DecodingKey::from_secret(secret),
        })
    }

    fn load(cfg: &KeyConfig, dev_mode: bool) -> Result<Key, String> {
        let kid = cfg.kid.as_str();
        match cfg.alg.as_str() {
            "HS256" => {
                let secret = match (cfg.secret_file.is_empty(), cfg.secret.is_empty()) {
                    (false, true) => {
                        let mut bytes = read(&cfg.secret_file, "secret_file", kid)?;
                        while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
                            bytes.pop();
                        }
                        bytes
                    }
                    (true, false) => cfg.secret.as_bytes().to_vec(),
                    _ => {
                        return Err(format!(
                            "auth key {kid:?}: HS256 needs exactly one of secret_file and secret"
                        ))
                    }
                };
                Key::hmac(kid, &secret, dev_mode)
            }
            "RS256" | "EdDSA" => {
                if cfg.public_key_file.is_empty() {
                    return Err(format!(
                        "auth key {kid:?}: {} needs public_key_file",
                        cfg.alg
                    ));
                }
                let public = read(&cfg.public_key_file, "public_key_file", kid)?;
                let private = if cfg.private_key_file.is_empty() {
                    None
                } else {
                    Some(read(&cfg.private_key_file, "private_key_file", kid)?)
                };
                let bad = |what: &str, e: jsonwebtoken::errors::Error| {
                    format!("auth key {kid:?}: {what} is not a {} PEM key: {e}", cfg.alg)
                };
                let (alg, decoding, encoding) = if cfg.alg == "RS256" {
                    let d = DecodingKey::from_rsa_pem(&public).map_err(|e| bad("public key", e))?;
                    let e = private
                        .map(|p| EncodingKey::from_rsa_pem(&p).map_err(|e| bad("private key", e)))
                        .transpose()?;
                    (Algorithm::RS256, d, e)
                } else {
                    let d = DecodingKey::from_ed_pem(&public).map_err(|e| bad("public key", e))?;
                    let e = private
                        .map(|p| EncodingKey::from_ed_pem(&p).map_err(|e| bad("private key", e)))
                        .transpose()?;
                    (Algorithm::EdDSA, d, e)
                };
                Ok(Key {
                    alg,
                    encoding,
                    decoding,
                })
            }
            other => Err(format!(
                "auth key {kid:?}: algorithm {other:?} is not supported (HS256, RS256, EdDSA)"
            )),
        }
    }
}

/// Signs and verifies tokens.
#[derive(Clone)]
pub struct TokenKeys {
    keys: std::sync::Arc<HashMap<String, Key>>,
    signing_kid: String,
    issuer: String,
    audience: String,
    leeway: u64,
}

impl TokenKeys {
    /// The key ring of `cfg`: `auth.jwt_secret` as HS256 key [`DEFAULT_KID`] (when set) and every
    /// `auth.keys` entry. Fails on any unusable key, a duplicate `kid`, or a signing key that
    /// cannot sign.
    pub fn new(cfg: &AuthConfig) -> Result<Self, String> {
        let mut keys = HashMap::new();
        if !cfg.jwt_secret.is_empty() {
            keys.insert(
                DEFAULT_KID.to_string(),
                Key::hmac("jwt_secret", cfg.jwt_secret.as_bytes(), cfg.dev_mode)?,
            );
        }
        for k in &cfg.keys {
            if k.kid.is_empty() || k.kid.len() > 64 {
                return Err("every auth.keys entry needs a kid of 1-64 characters".into());
            }
            if keys
                .insert(k.kid.clone(), Key::load(k, cfg.dev_mode)?)
                .is_some()
            {
                return Err(format!("auth key id {:?} is configured twice", k.kid));
            }
        }
        match keys.get(&cfg.signing_kid) {
            None if keys.is_empty() => {
                return Err("no signing key: set auth.jwt_secret (SYNCFLOW_AUTH_JWT_SECRET) to a secret of at least 32 bytes, or configure auth.keys; auth.dev_mode allows the development secret".into())
            }
            None => {
                return Err(format!(
                    "auth.signing_kid {:?} names no configured key",
                    cfg.signing_kid
                ))
            }
            Some(k) if k.encoding.is_none() => {
                return Err(format!(
                    "auth.signing_kid {:?} has no private_key_file, so it cannot sign",
                    cfg.signing_kid
                ))
            }
            Some(_) => {}
        }
        if cfg.issuer.is_empty() || cfg.audience.is_empty() {
            return Err("auth.issuer and auth.audience must not be empty".into());
        }
        Ok(Self {
            keys: std::sync::Arc::new(keys),
            signing_kid: cfg.signing_kid.clone(),
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            leeway: 5,
        })
    }

    /// Signs `claims` with the signing key, filling in the issuer and audience.
    pub fn sign(&self, mut claims: Claims) -> String {
        claims.iss = self.issuer.clone();
        claims.aud = self.audience.clone();
        let key = &self.keys[&self.signing_kid];
        let mut header = Header::new(key.alg);
        header.kid = Some(self.signing_kid.clone());
        let encoding = key.encoding.as_ref().expect("checked in TokenKeys::new");
        encode(&header, &claims, encoding).expect("signing plain claims with a loaded key")
    }

    /// Mints an access token for `sub` of `tenant` with `grants`, valid for `ttl_secs` from
    /// `now_secs` (development and tests; user sessions add `sid`).
    pub fn mint(
        &self,
        sub: &str,
        tenant: &str,
        grants: Vec<super::Grant>,
        now_secs: u64,
        ttl_secs: u64,
    ) -> String {
        self.sign(Claims::access(sub, tenant, grants, now_secs, ttl_secs))
    }

    /// Mints an operator token (no bucket grants) for `sub`.
    pub fn mint_operator(&self, sub: &str, tenant: &str, now_secs: u64, ttl_secs: u64) -> String {
        let mut claims = Claims::access(sub, tenant, Vec::new(), now_secs, ttl_secs);
        claims.operator = true;
        self.sign(claims)
    }

    /// Verifies a token's key, algorithm, signature, `exp`, `nbf`, `iss` and `aud`, and that it
    /// is of `kind`. Whether its session or registration still lives is checked elsewhere.
    pub fn verify_kind(&self, token: &str, kinds: &[TokenKind]) -> Result<Claims, AuthError> {
        let header = decode_header(token).map_err(|e| AuthError::Invalid(e.to_string()))?;
        let kid = header.kid.as_deref().unwrap_or(DEFAULT_KID);
        let key = self
            .keys
            .get(kid)
            .ok_or_else(|| AuthError::Invalid(format!("unknown signing key {kid:?}")))?;
        if header.alg != key.alg {
            return Err(AuthError::Invalid(format!(
                "key {kid:?} only accepts {:?}, the token says {:?}",
                key.alg, header.alg
            )));
        }
        let mut validation = Validation::new(key.alg);
        validation.set_issuer(&[self.issuer.as_str()]);
        validation.set_audience(&[self.audience.as_str()]);
        validation.validate_nbf = true;
        validation.leeway = self.leeway;
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        let data = decode::<Claims>(token, &key.decoding, &validation).map_err(|e| {
            AuthError::Invalid(match e.kind() {
                ErrorKind::ExpiredSignature => "the token has expired".into(),
                ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)".into(),
                ErrorKind::InvalidSignature => "the signature does not match".into(),
                _ => e.to_string(),
            })
        })?;
        let claims = data.claims;
        if !kinds.contains(&claims.typ) {
            return Err(AuthError::Invalid(format!(
                "a {:?} token cannot be used here",
                claims.typ
            )));
        }
        processors::limits::check_tenant(&claims.tenant)
            .map_err(|e| AuthError::Invalid(format!("tenant claim: {}", e.message)))?;
        Ok(claims)
    }

    /// Verifies an access or service token (see [`TokenKeys::verify_kind`]).
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        self.verify_kind(token, &[TokenKind::Access, TokenKind::Service])
    }
}
