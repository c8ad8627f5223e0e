//! What a token says: its kind, its tenant and its bucket grants.

use serde::{Deserialize, Serialize};

/// What a grant allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Perm {
    /// Read documents and changes.
    Read,
    /// Write documents.
    Write,
    /// Administer the bucket (implies read and write, and lets the holder grant access to it).
    Admin,
}

impl Perm {
    /// The lower-case name used in messages and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Perm::Read => "read",
            Perm::Write => "write",
            Perm::Admin => "admin",
        }
    }
}

/// A grant on one bucket, or on every bucket whose name starts with a prefix (`"todo*"`, `"*"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// Bucket name, or a prefix followed by `*`.
    pub bucket: String,
    /// What it allows.
    pub perms: Vec<Perm>,
}

impl Grant {
    /// Whether the grant's pattern covers `bucket`.
    pub fn covers(&self, bucket: &str) -> bool {
        match self.bucket.strip_suffix('*') {
            Some(prefix) => bucket.starts_with(prefix),
            None => self.bucket == bucket,
        }
    }

    /// Whether every bucket `pattern` can name is covered by this grant's pattern.
    pub fn covers_pattern(&self, pattern: &str) -> bool {
        match (self.bucket.strip_suffix('*'), pattern.strip_suffix('*')) {
            (Some(mine), Some(theirs)) => theirs.starts_with(mine),
            (Some(mine), None) => pattern.starts_with(mine),
            (None, Some(_)) => false,
            (None, None) => self.bucket == pattern,
        }
    }

    /// Checks the pattern and the permissions of a grant someone asks for.
    pub fn check(&self) -> Result<(), String> {
        let name = self.bucket.strip_suffix('*').unwrap_or(&self.bucket);
        if name.contains('*') {
            return Err(format!(
                "grant pattern {:?} may only end with '*'",
                self.bucket
            ));
        }
        if !name.is_empty() {
            // A prefix is checked as the bucket name it starts.
            processors::limits::check_bucket(name)
                .map_err(|e| format!("grant pattern {:?}: {}", self.bucket, e.message))?;
        } else if self.bucket.is_empty() {
            return Err("a grant needs a bucket or a pattern".into());
        }
        if self.perms.is_empty() {
            return Err(format!("grant {:?} has no permissions", self.bucket));
        }
        // Each at most once: grants travel in every access token.
        let repeated = (1..self.perms.len())
            .find(|&i| self.perms[..i].contains(&self.perms[i]))
            .map(|i| self.perms[i]);
        if let Some(p) = repeated {
            return Err(format!(
                "grant {:?} lists permission {:?} twice",
                self.bucket,
                p.as_str()
            ));
        }
        Ok(())
    }
}

/// The kinds of signed token. A token of one kind is never accepted as another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenKind {
    /// A short-lived access token (of a user session when it has `sid`; of development when not).
    Access,
    /// A long-lived service token of a tenant, valid while registered (`jti`).
    Service,
    /// A single-use invitation to register into a tenant (`jti`); not an access token.
    Invite,
}

/// The claims of a SyncFlow token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Subject: user id, service token name, or invite issuer.
    pub sub: String,
    /// The tenant whose buckets the token may touch. No token reaches another tenant.
    pub tenant: String,
    /// Bucket grants.
    pub grants: Vec<Grant>,
    /// What kind of token this is.
    pub typ: TokenKind,
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
    /// The user session an access token belongs to: valid only while that session lives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
    /// The id of a service token or invite.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// The user name of a user's access token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// An operator token: may use the cluster-wide operations (`GET /v1/checkpoints`). Grants no
    /// bucket by itself.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub operator: bool,
}

impl Claims {
    /// Claims of an access token for `sub` of `tenant`, valid `ttl_secs` from `now_secs` (the
    /// issuer and audience are filled in when signed).
    pub fn access(
        sub: &str,
        tenant: &str,
        grants: Vec<Grant>,
        now_secs: u64,
        ttl_secs: u64,
    ) -> Self {
        Claims {
            sub: sub.into(),
            tenant: tenant.into(),
            grants,
            typ: TokenKind::Access,
            iss: String::new(),
            aud: String::new(),
            exp: now_secs + ttl_secs,
            nbf: now_secs.saturating_sub(1),
            iat: now_secs,
            sid: None,
            jti: None,
            name: None,
            operator: false,
        }
    }

    /// Whether the token allows `perm` on `bucket` of its own tenant.
    pub fn allows(&self, perm: Perm, bucket: &str) -> bool {
        self.grants.iter().any(|g| {
            g.covers(bucket) && (g.perms.contains(&perm) || g.perms.contains(&Perm::Admin))
        })
    }

    /// Whether the token administers every bucket `pattern` names (so it may grant on it).
    pub fn administers(&self, pattern: &str) -> bool {
        self.grants
            .iter()
            .any(|g| g.perms.contains(&Perm::Admin) && g.covers_pattern(pattern))
    }

    /// Whether the token administers the whole tenant (admin on `*`).
    pub fn is_tenant_admin(&self) -> bool {
        self.administers("*")
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

    fn with(grants: &str) -> Claims {
        Claims::access("u", "t", parse_grants(grants).unwrap(), 0, 0)
    }

    #[test]
    fn grants_parse_and_match() {
        let c = with("todos:rw, notes*:r");
        assert!(c.allows(Perm::Write, "todos"));
        assert!(!c.allows(Perm::Write, "todos2"));
        assert!(c.allows(Perm::Read, "notes-1"));
        assert!(!c.allows(Perm::Write, "notes-1"));
        assert!(parse_grants("todos").is_err());
        assert!(parse_grants("todos:x").is_err());
    }

    #[test]
    fn administering_patterns() {
        let c = with("team-*:a,solo:a,other:rw");
        assert!(c.administers("team-a"));
        assert!(c.administers("team-a*"));
        assert!(c.administers("team-*"));
        assert!(!c.administers("team*"), "a wider pattern than the grant");
        assert!(!c.administers("*"));
        assert!(c.administers("solo"));
        assert!(!c.administers("solo*"), "a pattern under an exact grant");
        assert!(!c.administers("other"), "read-write is not admin");
        assert!(with("*:a").is_tenant_admin());
        assert!(!c.is_tenant_admin());
    }

    #[test]
    fn grant_checks() {
        let g = |b: &str| Grant {
            bucket: b.into(),
            perms: vec![Perm::Read],
        };
        assert!(g("todos").check().is_ok());
        assert!(g("todo*").check().is_ok());
        assert!(g("*").check().is_ok());
        assert!(g("").check().is_err());
        assert!(g("a*b").check().is_err());
        assert!(g("a/b").check().is_err());
        let empty = Grant {
            bucket: "x".into(),
            perms: vec![],
        };
        assert!(empty.check().is_err());
        let twice = Grant {
            bucket: "x".into(),
            perms: vec![Perm::Read, Perm::Write, Perm::Read],
        };
        assert_eq!(
            twice.check(),
            Err("grant \"x\" lists permission \"read\" twice".into())
        );
        let all = Grant {
            bucket: "x".into(),
            perms: vec![Perm::Read, Perm::Write, Perm::Admin],
        };
        assert!(all.check().is_ok());
    }
}
