//! What authentication keeps in Redis: login sessions with rotating refresh tokens, the registry
//! of service tokens, single-use invitations, and the reservations that make user names and
//! e-mail addresses unique.
//!
//! # Sessions and refresh tokens
//!
//! A login opens a session (`…auth:session:<sid>`, a hash with the user, the tenant and the
//! SHA-256 of the one refresh token currently valid; it expires `auth.refresh_ttl_secs` after the
//! login). A refresh token is `<sid>.<secret>`. Refreshing swaps the current token for a new one
//! atomically (a Lua script). Presenting a token the session issued before — it was used
//! already, so someone holds a copy — deletes the session: the whole family is revoked, and every
//! access token of the session (they carry `sid`) stops working at once, because session-bound
//! tokens are accepted only while their session exists. The session remembers the digests of its
//! last 32 spent tokens for this; a token it never issued (a guess built from the `sid` every
//! access token shows) is refused as unknown and changes nothing. Logout deletes the session too.
//!
//! # Service tokens and invitations
//!
//! A service token is valid while its id is in its tenant's registry (`…auth:services:<tenant>`);
//! revoking deletes it. An invitation's id is stored until it is used once or expires.

use base64::Engine;
use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{AuthError, Claims, TokenKind};

/// The Redis side of authentication.
#[derive(Clone)]
pub struct AuthStore {
    conn: ConnectionManager,
    prefix: String,
    breaker: std::sync::Arc<crate::redis_conn::Breaker>,
}

/// A session as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Session id (`sid` of its access tokens).
    pub sid: String,
    /// The user's id.
    pub user_id: String,
    /// The user's name.
    pub username: String,
    /// The user's tenant.
    pub tenant: String,
}

/// What a refresh attempt found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refreshed {
    /// The token was current: here is the session, and the returned token replaces it.
    Rotated(Session, String),
    /// No such session (expired, logged out, or revoked).
    Unknown,
    /// The token was already used: the session was revoked.
    Reused,
}

/// A registered service token (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceToken {
    /// Its id (`jti`).
    pub id: String,
    /// Its name.
    pub name: String,
    /// What it grants.
    pub grants: Vec<super::Grant>,
    /// Who created it.
    pub created_by: String,
    /// When, seconds since the epoch.
    pub created_at: u64,
    /// Expiry, seconds since the epoch.
    pub expires_at: u64,
    /// An operator token (cluster-wide operations; only `syncflow token --operator` makes one).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub operator: bool,
    /// What its admin grants rest on: the user who created it (or who created the service token
    /// that did), whose current admin grants bound them; or the signing key. `None` in records
    /// made before 2026-12-06 (see `admin::backer_of_record`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backed_by: Option<Backer>,
}

/// What a service token's admin grants rest on: see [`ServiceToken::backed_by`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Backer {
    /// A user: the token administers at most what the user administers now.
    User {
        /// The user's id.
        user_id: String,
        /// The user's name (the users view is looked up by name; the id must match).
        username: String,
    },
    /// The signing key: made by `syncflow token --service`, or through the API with a token
    /// made with the key (`syncflow token`), or by a service token resting on it. Bounded by
    /// nothing but its own grants.
    SigningKey {
        /// Always true.
        signing_key: bool,
    },
}

/// A pending invitation (never the invitation itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invite {
    /// Its id (`jti`).
    pub id: String,
    /// What it grants the member who registers with it.
    pub grants: Vec<super::Grant>,
    /// Who made it (`sub` of the token).
    pub created_by: String,
    /// When, seconds since the epoch.
    pub created_at: u64,
    /// Expiry, seconds since the epoch.
    pub expires_at: u64,
}

/// Which unique name is already taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// The user name.
    Username,
    /// The e-mail address.
    Email,
    /// The tenant name.
    Tenant,
}

/// Errors talking to Redis.
#[derive(Debug, thiserror::Error)]
#[error("redis: {0}")]
pub struct StoreError(#[from] pub redis::RedisError);

impl From<StoreError> for AuthError {
    fn from(e: StoreError) -> Self {
        AuthError::Unavailable(e.to_string())
    }
}

fn digest(secret: &str) -> String {
    let mut out = String::with_capacity(64);
    for b in Sha256::digest(secret.as_bytes()) {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

fn random_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Splits a refresh token into its session id and secret.
fn split_refresh(token: &str) -> Option<(&str, &str)> {
    let (sid, secret) = token.split_once('.')?;
    let ok = |s: &str, max: usize| {
        !s.is_empty()
            && s.len() <= max
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    (ok(sid, 64) && ok(secret, 64)).then_some((sid, secret))
}

/// How many spent refresh tokens a session remembers (their digests), to tell a reused token,
/// which revokes the session, from a made-up one, which does not.
const SPENT_KEPT: usize = 32;

/// Adds a service token to its tenant's registry unless it holds as many as allowed, and marks
/// the tenant as one that has had service tokens, for good (a registration cannot claim it, even
/// once the token is gone). The mark is a key of its own: a pending registration's reservation
/// of the name may be released or lapse. KEYS: the registry, the mark; ARGV: the token's id, its
/// record, the cap (negative: none). Returns -1 (added) or the count held.
const ADD_SERVICE: &str = r"
local held = redis.call('HLEN', KEYS[1])
local cap = tonumber(ARGV[3])
if cap >= 0 and held >= cap then return held end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SET', KEYS[2], '1')
return -1
";

/// Removes a service token from its tenant's registry, marking the tenant first (as
/// [`ADD_SERVICE`] does: tokens registered before the mark existed get it when they go). KEYS:
/// the registry, the mark; ARGV: the token's id. Returns how many were removed.
const FORGET_SERVICE: &str = r"
redis.call('SET', KEYS[2], '1')
return redis.call('HDEL', KEYS[1], ARGV[1])
";

/// Rotates a session's refresh token. KEYS[1]: the session; ARGV: the presented token's digest,
/// the new token's, and the spent list's longest length (1 + 65 per entry). `spent` is `,d1,d2,…,` with the newest
/// first. Returns `{1, user, name, tenant}` (rotated), `{-1}` (a spent token: the session is
/// deleted) or `{0}` (no such session, or a token this session never issued: nothing changes).
const ROTATE: &str = r"
local cur = redis.call('HGET', KEYS[1], 'current')
if not cur then return {0} end
local spent = redis.call('HGET', KEYS[1], 'spent') or ','
if cur ~= ARGV[1] then
  if string.find(spent, ',' .. ARGV[1] .. ',', 1, true) then
    redis.call('DEL', KEYS[1])
    return {-1}
  end
  return {0}
end
spent = ',' .. ARGV[1] .. spent
-- Digests are 64 characters: the first ARGV[3] characters are the newest entries, whole.
spent = string.sub(spent, 1, tonumber(ARGV[3]))
redis.call('HSET', KEYS[1], 'current', ARGV[2], 'spent', spent)
local f = redis.call('HMGET', KEYS[1], 'user', 'name', 'tenant')
return {1, f[1], f[2], f[3]}
";

/// Ends the session when ARGV[1] is its current refresh token or one it spent (a copy of a
/// spent one exists: as on a refresh, the family ends).
const LOGOUT: &str = r"
local cur = redis.call('HGET', KEYS[1], 'current')
if not cur then return 0 end
local spent = redis.call('HGET', KEYS[1], 'spent') or ','
if cur == ARGV[1] or string.find(spent, ',' .. ARGV[1] .. ',', 1, true) then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Stores an invitation unless it was withdrawn or its tenant holds `cap` (ARGV[4], -1: no cap).
/// KEYS: its marker, the tenant's list, its withdrawal mark; ARGV: id, record, ttl, cap. Returns
/// -1 (stored), -2 (withdrawn: not stored) or the count held (refused).
const PUT_INVITE: &str = r"
if redis.call('EXISTS', KEYS[3]) == 1 then return -2 end
local cap = tonumber(ARGV[4])
if cap >= 0 then
  local held = redis.call('HLEN', KEYS[2])
  if held >= cap then return held end
end
redis.call('SET', KEYS[1], '1', 'EX', ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return -1
";

/// Withdraws an invitation and marks it withdrawn for the rest of its life (ARGV[2] seconds).
/// KEYS as [`PUT_INVITE`]; ARGV: id, seconds. Returns whether its marker was there.
const WITHDRAW_INVITE: &str = r"
local was = redis.call('DEL', KEYS[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('SET', KEYS[3], '1', 'EX', ARGV[2])
return was
";

/// Drops an invitation from its tenant's list if its marker is still gone. KEYS: the marker, the
/// list; ARGV: the id.
const PRUNE_INVITE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.call('HDEL', KEYS[2], ARGV[1]) end
return 0
";

const RESERVE: &str = r"
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then return i end
end
for i = 1, tonumber(ARGV[3]) do
  redis.call('SET', KEYS[i], ARGV[1], 'PX', ARGV[2])
end
return 0
";

const RELEASE: &str = r"
local n = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then n = n + redis.call('DEL', key) end
end
return n
";

const EXTEND: &str = r"
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('PEXPIRE', key, ARGV[2]) end
end
return 0
";

const CONFIRM: &str = r"
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('PERSIST', key) end
end
return 0
";

impl AuthStore {
    /// A store on `conn`; keys start with `prefix` (the topic prefix, so environments are apart).
    pub fn new(conn: ConnectionManager, prefix: &str) -> Self {
        Self {
            conn,
            prefix: prefix.into(),
            breaker: Default::default(),
        }
    }

    fn key(&self, what: &str, id: &str) -> String {
        format!("{}syncflow:auth:{what}:{id}", self.prefix)
    }

    /// Fails at once while Redis cannot be reached (the breaker is open, or a `PING` fails): a
    /// login asks before it checks the password, so that an outage, when no session can be
    /// opened and no attempt counted, does not make it an unlimited password oracle.
    pub async fn check_available(&self) -> Result<(), AuthError> {
        if self.breaker.is_open() {
            return Err(AuthError::Unavailable(
                "redis failed a moment ago; no session can be opened".into(),
            ));
        }
        let mut conn = self.conn.clone();
        let pong = redis::cmd("PING").query_async::<String>(&mut conn).await;
        self.breaker.record(&pong);
        pong.map(drop).map_err(|e| StoreError(e).into())
    }

    /// Opens a session for a user; returns it with its first refresh token.
    pub async fn open_session(
        &self,
        user_id: &str,
        username: &str,
        tenant: &str,
        ttl_secs: u64,
    ) -> Result<(Session, String), StoreError> {
        let sid = uuid::Uuid::now_v7().simple().to_string();
        let secret = random_secret();
        let key = self.key("session", &sid);
        let mut conn = self.conn.clone();
        redis::pipe()
            .atomic()
            .hset_multiple(
                &key,
                &[
                    ("user", user_id),
                    ("name", username),
                    ("tenant", tenant),
                    ("current", &digest(&secret)),
                ],
            )
            .expire(&key, ttl_secs as i64)
            // The user's sessions, so that an admin can end them all (the set lives as long as
            // the newest session; the older ones end before it).
            .sadd(self.key("user_sessions", user_id), &sid)
            .expire(self.key("user_sessions", user_id), ttl_secs as i64)
            .query_async::<()>(&mut conn)
            .await?;
        let session = Session {
            sid: sid.clone(),
            user_id: user_id.into(),
            username: username.into(),
            tenant: tenant.into(),
        };
        Ok((session, format!("{sid}.{secret}")))
    }

    /// The session a refresh token names, without checking or spending the token.
    pub async fn session_of(&self, token: &str) -> Result<Option<Session>, StoreError> {
        let Some((sid, _)) = split_refresh(token) else {
            return Ok(None);
        };
        let mut conn = self.conn.clone();
        let fields: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(self.key("session", sid))
            .arg(&["user", "name", "tenant"])
            .query_async(&mut conn)
            .await?;
        Ok(match fields.as_slice() {
            [Some(user_id), Some(username), Some(tenant)] => Some(Session {
                sid: sid.into(),
                user_id: user_id.clone(),
                username: username.clone(),
                tenant: tenant.clone(),
            }),
            _ => None,
        })
    }

    /// Rotates a refresh token (see the module documentation).
    pub async fn refresh(&self, token: &str) -> Result<Refreshed, StoreError> {
        let Some((sid, secret)) = split_refresh(token) else {
            return Ok(Refreshed::Unknown);
        };
        let next = random_secret();
        let mut conn = self.conn.clone();
        let out: Vec<redis::Value> = redis::Script::new(ROTATE)
            .key(self.key("session", sid))
            .arg(digest(secret))
            .arg(digest(&next))
            .arg(SPENT_KEPT * 65 + 1)
            .invoke_async(&mut conn)
            .await?;
        let text = |v: Option<&redis::Value>| -> String {
            v.and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
                .unwrap_or_default()
        };
        let status = out
            .first()
            .and_then(|v| redis::from_redis_value_ref::<i64>(v).ok())
            .unwrap_or(0);
        Ok(match status {
            1 => Refreshed::Rotated(
                Session {
                    sid: sid.into(),
                    user_id: text(out.get(1)),
                    username: text(out.get(2)),
                    tenant: text(out.get(3)),
                },
                format!("{sid}.{next}"),
            ),
            -1 => Refreshed::Reused,
            _ => Refreshed::Unknown,
        })
    }

    /// Ends the session of a refresh token: its current one, or one of the last it spent (as
    /// a refresh with it would: a copy of it exists). Returns whether one ended.
    pub async fn logout_refresh(&self, token: &str) -> Result<bool, StoreError> {
        let Some((sid, secret)) = split_refresh(token) else {
            return Ok(false);
        };
        let mut conn = self.conn.clone();
        let ended: i64 = redis::Script::new(LOGOUT)
            .key(self.key("session", sid))
            .arg(digest(secret))
            .invoke_async(&mut conn)
            .await?;
        Ok(ended > 0)
    }

    /// Ends every session of user `user_id` (opened since sessions were listed per user, on
    /// 2026-12-05): its refresh tokens and access tokens are refused at once. Returns how many
    /// were live.
    pub async fn end_user_sessions(&self, user_id: &str) -> Result<usize, StoreError> {
        let index = self.key("user_sessions", user_id);
        let mut conn = self.conn.clone();
        let sids: Vec<String> = conn.smembers(&index).await?;
        let keys: Vec<String> = sids.iter().map(|s| self.key("session", s)).collect();
        let live = if keys.is_empty() {
            0
        } else {
            conn.del::<_, usize>(&keys).await?
        };
        // The index last: a session opened meanwhile stays listed (and live).
        if !sids.is_empty() {
            conn.srem::<_, _, ()>(&index, &sids).await?;
        }
        Ok(live)
    }

    /// Ends a session by id (logout with an access token). Returns whether one ended.
    pub async fn end_session(&self, sid: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        Ok(conn.del::<_, i64>(self.key("session", sid)).await? > 0)
    }

    /// Whether a verified token is still live: its session exists (user tokens) or it is still
    /// registered (service tokens). Development tokens (no session) are always live.
    /// While Redis is failing (see [`crate::redis_conn::Breaker`]) this fails at once instead of
    /// waiting for a timeout per request.
    pub async fn check_live(&self, claims: &Claims) -> Result<(), AuthError> {
        let mut conn = self.conn.clone();
        let session_bound = claims.sid.is_some() || claims.typ == TokenKind::Service;
        if session_bound && self.breaker.is_open() {
            return Err(AuthError::Unavailable(
                "redis failed a moment ago; the token cannot be checked".into(),
            ));
        }
        match (claims.typ, &claims.sid, &claims.jti) {
            (TokenKind::Access, Some(sid), _) => {
                let exists = conn.exists(self.key("session", sid)).await;
                self.breaker.record(&exists);
                let exists: bool = exists.map_err(StoreError)?;
                if !exists {
                    return Err(AuthError::Invalid(
                        "the session of this token has ended (logged out or revoked)".into(),
                    ));
                }
            }
            (TokenKind::Service, _, Some(jti)) => {
                let exists = conn
                    .hexists(self.key("services", &claims.tenant), jti)
                    .await;
                self.breaker.record(&exists);
                let exists: bool = exists.map_err(StoreError)?;
                if !exists {
                    return Err(AuthError::Invalid(
                        "this service token has been revoked".into(),
                    ));
                }
            }
            (TokenKind::Service, _, None) => {
                return Err(AuthError::Invalid("a service token needs an id".into()))
            }
            _ => {}
        }
        Ok(())
    }

    /// Registers a service token, unless `tenant` has `cap` registered already (checked and
    /// added in one step, so concurrent requests cannot pass the cap together), and marks the
    /// tenant's name as taken, as a registration does. `Ok(None)` when registered, `Ok(Some(n))`
    /// when refused with `n` registered.
    pub async fn add_service(
        &self,
        tenant: &str,
        t: &ServiceToken,
        cap: Option<usize>,
    ) -> Result<Option<usize>, StoreError> {
        let mut conn = self.conn.clone();
        let json = serde_json::to_string(t).expect("plain struct");
        let cap = cap.map_or(-1, |c| i64::try_from(c).unwrap_or(i64::MAX));
        let held: i64 = redis::Script::new(ADD_SERVICE)
            .key(self.key("services", tenant))
            .key(self.key("tenant_services", tenant))
            .arg(&t.id)
            .arg(json)
            .arg(cap)
            .invoke_async(&mut conn)
            .await?;
        Ok((held >= 0).then(|| usize::try_from(held).unwrap_or(usize::MAX)))
    }

    /// Whether `tenant` has or has had a service token: such a tenant exists even before any of
    /// its data reached the view, and stays taken once its tokens are gone.
    pub async fn has_services(&self, tenant: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let keys = [
            self.key("services", tenant),
            self.key("tenant_services", tenant),
        ];
        Ok(conn.exists::<_, usize>(&keys).await? > 0)
    }

    /// The live service tokens of `tenant` (expired ones are dropped from the registry).
    pub async fn list_services(
        &self,
        tenant: &str,
        now_secs: u64,
    ) -> Result<Vec<ServiceToken>, StoreError> {
        let key = self.key("services", tenant);
        let mut conn = self.conn.clone();
        let all: Vec<(String, String)> = conn.hgetall(&key).await?;
        let mut out = Vec::new();
        for (id, json) in all {
            match serde_json::from_str::<ServiceToken>(&json) {
                Ok(t) if t.expires_at > now_secs => out.push(t),
                Ok(_) => {
                    self.forget_service(tenant, &id).await?;
                }
                // Kept: maybe a newer release's record, read during a rolling upgrade.
                Err(e) => {
                    tracing::warn!(%tenant, %id, error = %e, "unreadable service token record skipped")
                }
            }
        }
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// The registered service token `id` of `tenant`, if any.
    pub async fn service(
        &self,
        tenant: &str,
        id: &str,
    ) -> Result<Option<ServiceToken>, StoreError> {
        let mut conn = self.conn.clone();
        let json: Option<String> = conn.hget(self.key("services", tenant), id).await?;
        Ok(json.and_then(|j| serde_json::from_str(&j).ok()))
    }

    /// Revokes a service token of `tenant`. Returns whether it existed.
    pub async fn revoke_service(&self, tenant: &str, id: &str) -> Result<bool, StoreError> {
        Ok(self.forget_service(tenant, id).await? > 0)
    }

    /// Removes a service token from the registry (see [`FORGET_SERVICE`]); how many were.
    async fn forget_service(&self, tenant: &str, id: &str) -> Result<i64, StoreError> {
        let mut conn = self.conn.clone();
        Ok(redis::Script::new(FORGET_SERVICE)
            .key(self.key("services", tenant))
            .key(self.key("tenant_services", tenant))
            .arg(id)
            .invoke_async(&mut conn)
            .await?)
    }

    /// Marks `tenant` as handed out, for good (as its first service token does): a registration
    /// may no longer create it. An invitation into a tenant nobody registered (an operator's)
    /// marks it, so that a stranger cannot register the tenant before the invited member joins.
    pub async fn mark_tenant(&self, tenant: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        conn.set::<_, _, ()>(self.key("tenant_services", tenant), 1)
            .await?;
        Ok(())
    }

    /// Stores an invitation of `tenant` until it is used, withdrawn or `ttl_secs` pass, unless
    /// the tenant has `cap` pending already (checked and added in one step). `Ok(None)` when
    /// stored, `Ok(Some(n))` when refused with `n` pending.
    pub async fn add_invite(
        &self,
        tenant: &str,
        invite: &Invite,
        ttl_secs: u64,
        cap: usize,
    ) -> Result<Option<usize>, StoreError> {
        // Used and expired ones leave the tenant's list first, so that they do not count.
        self.list_invites(tenant, invite.created_at).await?;
        let cap = i64::try_from(cap).unwrap_or(i64::MAX);
        let held = self.run_put_invite(tenant, invite, ttl_secs, cap).await?;
        Ok((held >= 0).then(|| usize::try_from(held).unwrap_or(usize::MAX)))
    }

    /// Makes a used invitation pending again for `ttl_secs` (a registration that failed after
    /// using it gives it back), unless it was withdrawn meanwhile. Returns whether it is back.
    pub async fn put_invite(
        &self,
        tenant: &str,
        invite: &Invite,
        ttl_secs: u64,
    ) -> Result<bool, StoreError> {
        Ok(self.run_put_invite(tenant, invite, ttl_secs, -1).await? == -1)
    }

    /// [`PUT_INVITE`]: -1 stored, -2 withdrawn (not stored), `n` refused with `n` held.
    async fn run_put_invite(
        &self,
        tenant: &str,
        invite: &Invite,
        ttl_secs: u64,
        cap: i64,
    ) -> Result<i64, StoreError> {
        let mut conn = self.conn.clone();
        let json = serde_json::to_string(invite).expect("plain struct");
        Ok(redis::Script::new(PUT_INVITE)
            .key(self.key("invite", &invite.id))
            .key(self.key("invites", tenant))
            .key(self.key("invite_withdrawn", &invite.id))
            .arg(&invite.id)
            .arg(json)
            .arg(ttl_secs.max(1))
            .arg(cap)
            .invoke_async(&mut conn)
            .await?)
    }

    /// The pending invitations of `tenant`, oldest first; used, withdrawn and expired ones are
    /// dropped from its list.
    pub async fn list_invites(
        &self,
        tenant: &str,
        now_secs: u64,
    ) -> Result<Vec<Invite>, StoreError> {
        let key = self.key("invites", tenant);
        let mut conn = self.conn.clone();
        let all: Vec<(String, String)> = conn.hgetall(&key).await?;
        let mut out = Vec::new();
        for (id, json) in all {
            match serde_json::from_str::<Invite>(&json) {
                Ok(i) if i.expires_at > now_secs => out.push(i),
                _ => {
                    conn.hdel::<_, _, ()>(&key, &id).await?;
                }
            }
        }
        if out.is_empty() {
            return Ok(out);
        }
        let mut alive = redis::pipe();
        for i in &out {
            alive.exists(self.key("invite", &i.id));
        }
        let alive: Vec<bool> = alive.query_async(&mut conn).await?;
        let mut pending = Vec::with_capacity(out.len());
        for (i, alive) in out.into_iter().zip(alive) {
            if alive {
                pending.push(i);
            } else {
                // Removed only if still used up when it is removed: a registration that failed
                // may have given it back since.
                redis::Script::new(PRUNE_INVITE)
                    .key(self.key("invite", &i.id))
                    .key(&key)
                    .arg(&i.id)
                    .invoke_async::<i64>(&mut conn)
                    .await?;
            }
        }
        pending.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(pending)
    }

    /// The record of invitation `id` of `tenant`, pending or in use by a registration.
    pub async fn invite(&self, tenant: &str, id: &str) -> Result<Option<Invite>, StoreError> {
        let mut conn = self.conn.clone();
        let json: Option<String> = conn.hget(self.key("invites", tenant), id).await?;
        Ok(json.and_then(|j| serde_json::from_str(&j).ok()))
    }

    /// Withdraws an invitation of `tenant` for good: it can no longer be used, and a
    /// registration that used it and fails cannot give it back. Returns whether it was still
    /// pending (not in use by a registration).
    pub async fn withdraw_invite(&self, tenant: &str, invite: &Invite) -> Result<bool, StoreError> {
        let left = invite
            .expires_at
            .saturating_sub(crate::now_ms() / 1000)
            .max(1);
        let mut conn = self.conn.clone();
        let was: i64 = redis::Script::new(WITHDRAW_INVITE)
            .key(self.key("invite", &invite.id))
            .key(self.key("invites", tenant))
            .key(self.key("invite_withdrawn", &invite.id))
            .arg(&invite.id)
            .arg(left)
            .invoke_async(&mut conn)
            .await?;
        Ok(was > 0)
    }

    /// Uses an invitation. Returns false if it was used already, withdrawn or expired.
    pub async fn use_invite(&self, jti: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        Ok(conn.del::<_, i64>(self.key("invite", jti)).await? > 0)
    }

    fn unique_keys(&self, r: &Reservation<'_>) -> Vec<String> {
        let mut keys = vec![self.key("username", r.username), self.key("email", r.email)];
        if let Some(t) = r.new_tenant {
            keys.push(self.key("tenant", t));
        }
        keys
    }

    /// Reserves the names of `r`, all or none, for `pending_ms`; [`AuthStore::confirm`] makes
    /// them permanent. Returns the first name already taken, if any (a new tenant's name also
    /// when the tenant has had service tokens).
    pub async fn reserve(
        &self,
        r: &Reservation<'_>,
        pending_ms: u64,
    ) -> Result<Option<Taken>, StoreError> {
        let claimed = self.unique_keys(r);
        let lua = redis::Script::new(RESERVE);
        let mut script = lua.prepare_invoke();
        for k in &claimed {
            script.key(k);
        }
        if let Some(t) = r.new_tenant {
            script.key(self.key("tenant_services", t));
        }
        script.arg(r.owner).arg(pending_ms).arg(claimed.len());
        let mut conn = self.conn.clone();
        let which: i64 = script.invoke_async(&mut conn).await?;
        Ok(match which {
            0 => None,
            1 => Some(Taken::Username),
            2 => Some(Taken::Email),
            _ => Some(Taken::Tenant),
        })
    }

    /// Makes the reservations of `r` permanent.
    pub async fn confirm(&self, r: &Reservation<'_>) -> Result<(), StoreError> {
        self.run_owned(CONFIRM, r, None).await.map(drop)
    }

    /// Keeps the reservations of `r` for `ms` from now (its outcome is not known yet).
    pub async fn extend(&self, r: &Reservation<'_>, ms: u64) -> Result<(), StoreError> {
        self.run_owned(EXTEND, r, Some(ms)).await.map(drop)
    }

    /// Gives up the reservations of `r` (the registration failed).
    pub async fn release(&self, r: &Reservation<'_>) -> Result<(), StoreError> {
        self.run_owned(RELEASE, r, None).await.map(drop)
    }

    async fn run_owned(
        &self,
        lua: &str,
        r: &Reservation<'_>,
        extra: Option<u64>,
    ) -> Result<i64, StoreError> {
        let lua = redis::Script::new(lua);
        let mut script = lua.prepare_invoke();
        for k in self.unique_keys(r) {
            script.key(k);
        }
        script.arg(r.owner);
        if let Some(x) = extra {
            script.arg(x);
        }
        let mut conn = self.conn.clone();
        Ok(script.invoke_async::<i64>(&mut conn).await?)
    }
}

/// The unique names one registration claims.
#[derive(Debug, Clone, Copy)]
pub struct Reservation<'a> {
    /// Who claims them (the new user's id).
    pub owner: &'a str,
    /// The user name.
    pub username: &'a str,
    /// The e-mail address.
    pub email: &'a str,
    /// The tenant name, when the registration creates the tenant.
    pub new_tenant: Option<&'a str>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_tokens_split_strictly() {
        assert_eq!(split_refresh("abc.def"), Some(("abc", "def")));
        assert_eq!(split_refresh("abc."), None);
        assert_eq!(split_refresh(".def"), None);
        assert_eq!(split_refresh("a*c.def"), None);
        assert_eq!(split_refresh("nodot"), None);
        assert_eq!(split_refresh(&format!("a.{}", "x".repeat(65))), None);
        assert_eq!(digest("x").len(), 64);
        assert_ne!(random_secret(), random_secret());
    }
}
