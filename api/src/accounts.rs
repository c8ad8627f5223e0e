//! Accounts: `POST /v1/auth/register|login|refresh|logout` and `GET /v1/auth/me`.
//!
//! A registration reserves the user name, the e-mail address and (for a new tenant) the tenant
//! name in Redis, all or none, so of concurrent duplicate registrations exactly one succeeds and
//! the others get `409`. It then produces `user.created` to Kafka; the projector puts the user in
//! the users view, which login reads. Access tokens are short-lived and bound to a session;
//! refresh tokens rotate on every use, and a reused one revokes its session
//! ([`crate::auth::sessions`]).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::password::Passwords;
use crate::auth::sessions::{AuthStore, Refreshed, Reservation, Session, Taken};
use crate::auth::{AuthConfig, Claims, Grant, Perm, TokenKind};
use crate::error::ApiError;
use crate::sink::WriteSink;
use crate::users::{User, UserEvent, UsersView, USER_EVENT_VERSION};
use crate::{now_ms, AppState};

/// Everything accounts need: Redis, the users view, the `user.events` producer, the hasher.
#[derive(Clone)]
pub struct Accounts {
    /// Sessions, service tokens, invitations, reservations.
    pub store: AuthStore,
    /// The users view.
    pub users: UsersView,
    /// Producer of `user.events`.
    pub events: Arc<dyn WriteSink>,
    /// Password hashing.
    pub passwords: Passwords,
    /// Lifetimes and waits.
    pub cfg: AuthConfig,
}

/// How long a reservation waits for its `user.created` to reach Kafka before it lapses.
const RESERVATION_MS: u64 = 60_000;

/// How long the names of a registration whose event Kafka did not acknowledge stay reserved.
const UNCONFIRMED_MS: u64 = 15 * 60_000;

pub(crate) fn accounts(state: &AppState) -> Result<&Accounts, ApiError> {
    state.accounts.as_ref().ok_or_else(|| {
        ApiError::Unavailable(
            "accounts need Redis and MongoDB, which this node has not configured".into(),
        )
    })
}

/// Whether `name` uses only `A-Z a-z 0-9 . _ -` (user names and service token names).
pub(crate) fn plain_name(name: &str) -> bool {
    name.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Lower-cases and checks a user name: 3-64 of `a-z 0-9 . _ -`, starting with a letter or digit.
pub fn normalize_username(raw: &str) -> Result<String, ApiError> {
    let name = raw.trim().to_ascii_lowercase();
    let ok = (3..=64).contains(&name.len())
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && plain_name(&name);
    if ok {
        Ok(name)
    } else {
        Err(ApiError::bad_request(
            "invalid_username",
            "a user name is 3-64 characters of a-z, 0-9, '.', '_' and '-', starting with a letter or digit",
        ))
    }
}

/// Lower-cases and checks an e-mail address (one `@`, a dotted domain, no spaces, at most 254).
pub fn normalize_email(raw: &str) -> Result<String, ApiError> {
    let email = raw.trim().to_lowercase();
    let ok = email.len() <= 254
        && !email.chars().any(|c| c.is_whitespace() || c.is_control())
        && email.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty()
                && !domain.contains('@')
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
        });
    if ok {
        Ok(email)
    } else {
        Err(ApiError::bad_request(
            "invalid_email",
            "the e-mail address is not valid",
        ))
    }
}

/// The most bytes of an account or administration request's body (names, a password, an
/// invitation, a list of grants).
const ACCOUNT_BODY_BYTES: usize = 64 * 1024;

/// An account or administration request's body (at most [`ACCOUNT_BODY_BYTES`], within the
/// body deadline: [`crate::routes::read_body`]).
async fn account_body(
    state: &AppState,
    body: axum::body::Body,
) -> Result<axum::body::Bytes, ApiError> {
    crate::routes::read_body(state, body, ACCOUNT_BODY_BYTES).await
}

/// Reads an account or administration request's JSON body into `T` ([`account_body`]).
pub(crate) async fn read_json<T: serde::de::DeserializeOwned>(
    state: &AppState,
    body: axum::body::Body,
) -> Result<T, ApiError> {
    json_body(&account_body(state, body).await?)
}

/// Parses a JSON body into `T`, with a 400 that says what is wrong.
fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request("invalid_body", format!("the body is not valid: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Register {
    username: String,
    email: String,
    password: String,
    tenant: Option<String>,
    invite: Option<String>,
}

impl Accounts {
    /// Mints the access token of a session.
    fn access_token(&self, state: &AppState, session: &Session, grants: Vec<Grant>) -> String {
        let mut claims = Claims::access(
            &session.user_id,
            &session.tenant,
            grants,
            now_ms() / 1000,
            self.cfg.access_ttl_secs,
        );
        claims.sid = Some(session.sid.clone());
        claims.name = Some(session.username.clone());
        state.keys.sign(claims)
    }

    fn token_body(&self, access: String, refresh: String) -> Value {
        json!({
            "access_token": access,
            "refresh_token": refresh,
            "token_type": "Bearer",
            "expires_in": self.cfg.access_ttl_secs,
        })
    }

    /// Produces a user event and waits until `visible` holds in the view (bounded).
    /// Returns the event's offset in its partition, when the log says.
    pub(crate) async fn emit(&self, event: &UserEvent) -> Result<Option<i64>, ApiError> {
        let payload = serde_json::to_vec(event).expect("plain event");
        self.events
            .send_at(event.key(), &payload)
            .await
            .map_err(|e| ApiError::backend("the user event log (Kafka)", e))
    }

    /// Polls the users view until `done` says the user is as expected, or the wait ends.
    pub(crate) async fn wait_view(
        &self,
        username: &str,
        done: impl Fn(&User) -> bool,
    ) -> Option<User> {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(self.cfg.view_wait_ms);
        loop {
            if let Ok(Some(u)) = self.users.find(username).await {
                if done(&u) {
                    return Some(u);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The key of the client address a request is counted under by the per-address limits.
fn client_of(
    state: &AppState,
    parts: &axum::http::request::Parts,
) -> Option<crate::client_addr::Client> {
    let peer = parts
        .extensions
        .get::<crate::client_addr::PeerAddr>()
        .copied();
    crate::client_addr::client_of(state, peer, &parts.headers)
}

/// `POST /v1/auth/register`.
pub async fn register(
    State(state): State<AppState>,
    request: axum::extract::Request,
) -> Result<impl IntoResponse, ApiError> {
    let acc = accounts(&state)?;
    let (parts, body) = request.into_parts();
    let client = client_of(&state, &parts);
    let req: Register = read_json(&state, body).await?;
    let username = normalize_username(&req.username)?;
    let email = normalize_email(&req.email)?;
    Passwords::check(&req.password)
        .map_err(|e| ApiError::bad_request("invalid_password", e.to_string()))?;
    if let Some(limiter) = &state.limiter {
        limiter
            .check_registration(client.as_ref())
            .await
            .map_err(ApiError::limited)?;
    }
    // The tenant: a new one (the user administers it), or the one of an invitation.
    let (tenant, grants, invite_id, creates_tenant) =
        match (req.tenant, req.invite) {
            (Some(tenant), None) => {
                processors::limits::check_tenant(&tenant).map_err(ApiError::from)?;
                let admin = vec![Grant {
                    bucket: "*".into(),
                    perms: vec![Perm::Admin],
                }];
                (tenant, admin, None, true)
            }
            (None, Some(invite)) => {
                let claims = state
                    .keys
                    .verify_kind(invite.trim(), &[TokenKind::Invite])
                    .map_err(|e| ApiError::Unauthorized(format!("invitation: {e}")))?;
                let id = claims
                    .jti
                    .ok_or_else(|| ApiError::Unauthorized("invitation without an id".into()))?;
                let invite = crate::auth::sessions::Invite {
                    id,
                    grants: claims.grants.clone(),
                    created_by: claims.sub,
                    created_at: claims.iat,
                    expires_at: claims.exp,
                };
                (claims.tenant, claims.grants, Some(invite), false)
            }
            _ => return Err(ApiError::bad_request(
                "invalid_body",
                "give exactly one of \"tenant\" (create a new tenant) and \"invite\" (join one)",
            )),
        };
    let taken = |what: Taken| {
        let (code, message) = match what {
            Taken::Username => (
                "username_taken",
                format!("the user name {username:?} is taken"),
            ),
            Taken::Email => (
                "email_taken",
                "the e-mail address is already registered".to_string(),
            ),
            Taken::Tenant => (
                "tenant_taken",
                format!("the tenant {tenant:?} exists; ask its admin for an invitation"),
            ),
        };
        ApiError::Conflict { code, message }
    };
    // The view knows every registration that reached it, even if Redis lost its reservations.
    if acc.users.find(&username).await?.is_some() {
        return Err(taken(Taken::Username));
    }
    if acc.users.find_by_email(&email).await?.is_some() {
        return Err(taken(Taken::Email));
    }
    // A tenant exists once registered, once it has data in the view, or once it has had service
    // tokens (an operator may mint them before anything reached the view). The reservation below
    // checks the service-token mark too, so a token minted after this check still counts.
    if creates_tenant
        && (acc.users.tenant_exists(&tenant).await? || acc.store.has_services(&tenant).await?)
    {
        return Err(taken(Taken::Tenant));
    }
    let user_id = uuid::Uuid::now_v7().to_string();
    let names = Reservation {
        owner: &user_id,
        username: &username,
        email: &email,
        new_tenant: creates_tenant.then_some(tenant.as_str()),
    };
    if let Some(what) = acc.store.reserve(&names, RESERVATION_MS).await? {
        return Err(taken(what));
    }
    let release = || async {
        if let Err(e) = acc.store.release(&names).await {
            tracing::warn!(error = %e, "releasing a failed registration's reservations");
        }
    };
    if let Some(invite) = &invite_id {
        match acc.store.use_invite(&invite.id).await {
            Ok(true) => {}
            Ok(false) => {
                release().await;
                return Err(ApiError::Conflict {
                    code: "invite_used",
                    message: "this invitation was used already, withdrawn or has expired".into(),
                });
            }
            Err(e) => {
                release().await;
                return Err(e.into());
            }
        }
    }
    // A registration that fails from here on gives its invitation back (for the rest of its
    // lifetime), so that the retry a 503 asks for can use it.
    let undo = || async {
        release().await;
        if let Some(invite) = &invite_id {
            let left = invite.expires_at.saturating_sub(now_ms() / 1000);
            if left > 0 {
                match acc.store.put_invite(&tenant, invite, left).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::info!(id = %invite.id, "a failed registration's invitation was withdrawn meanwhile; not given back")
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "giving a failed registration's invitation back")
                    }
                }
            }
        }
    };
    let hash = match acc.passwords.hash(&req.password).await {
        Ok(h) => h,
        Err(e) => {
            undo().await;
            return Err(ApiError::backend("the password hasher", e));
        }
    };
    let user = User {
        username: username.clone(),
        user_id: user_id.clone(),
        email: email.clone(),
        tenant: tenant.clone(),
        password_hash: hash,
        grants,
        created_at_ms: now_ms() as i64,
        grants_offset: None,
    };
    let event = UserEvent::Created {
        v: USER_EVENT_VERSION,
        event_id: uuid::Uuid::now_v7().to_string(),
        user: user.clone(),
        creates_tenant,
    };
    if let Err(e) = acc.emit(&event).await {
        // Kafka may have stored the event all the same (an acknowledgement that timed out): the
        // names stay reserved for long enough for the account to become visible, even after a
        // long outage, so nobody else registers them first; and the invitation stays used.
        if let Err(err) = acc.store.extend(&names, UNCONFIRMED_MS).await {
            tracing::warn!(error = %err, "keeping an unconfirmed registration's reservations");
        }
        tracing::warn!(error = %e, %username, "a registration's user.created was not acknowledged; it may be stored");
        return Err(ApiError::Unavailable(format!(
            "the registration was not confirmed by the user event log, and may have been recorded all the same: try logging in in a few minutes; if that fails, register again once {} minutes have passed (the names stay reserved until then)",
            UNCONFIRMED_MS / 60_000
        )));
    }
    // The account exists from here on (it is on `user.events`): nothing below may ask for the
    // registration to be retried, which would answer 409 and find its invitation used.
    if let Err(e) = acc.store.confirm(&names).await {
        // Else the reservations lapse in a minute, and a users projector further behind than
        // that would let another registration take the same names (or tenant) meanwhile: kept
        // as long as for an unacknowledged event, if Redis answers that.
        tracing::warn!(error = %e, %username, "confirming a registration's reservations failed");
        if let Err(err) = acc.store.extend(&names, UNCONFIRMED_MS).await {
            tracing::warn!(error = %err, "keeping an unconfirmed registration's reservations");
        }
    }
    tracing::info!(%username, %tenant, "user registered");
    let (session, refresh) = acc
        .store
        .open_session(&user_id, &username, &tenant, acc.cfg.refresh_ttl_secs)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, %username, "no session opened for a new account");
            ApiError::Unavailable(format!(
                "the account {username:?} was created, but no session could be opened: log in once the service answers; do not register again"
            ))
        })?;
    let access = acc.access_token(&state, &session, user.grants.clone());
    let visible = acc
        .wait_view(&username, |u| u.user_id == user_id)
        .await
        .is_some();
    let mut body = acc.token_body(access, refresh);
    body["user"] = user.public();
    body["visible"] = json!(visible);
    Ok((StatusCode::CREATED, Json(body)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    username: String,
    password: String,
}

/// `POST /v1/auth/login`: by user name or e-mail address.
pub async fn login(
    State(state): State<AppState>,
    request: axum::extract::Request,
) -> Result<impl IntoResponse, ApiError> {
    let acc = accounts(&state)?;
    let (parts, body) = request.into_parts();
    let client = client_of(&state, &parts);
    let req: Login = read_json(&state, body).await?;
    let name = req.username.trim().to_lowercase();
    if name.is_empty() || name.len() > 254 {
        return Err(ApiError::Unauthorized("wrong user name or password".into()));
    }
    // Without Redis no attempt is counted (the limiter lets requests through) and no session
    // can be opened: refused before the password is checked, or a 503 after a right password
    // and a 401 after a wrong one would make an unlimited oracle.
    acc.store.check_available().await?;
    if let Some(limiter) = &state.limiter {
        limiter
            .check_login(&name, client.as_ref())
            .await
            .map_err(|r| match r {
                crate::ratelimit::LoginRefused::Limited(l) => ApiError::limited(l),
                crate::ratelimit::LoginRefused::Uncounted => ApiError::Unavailable(
                    "login attempts cannot be counted right now (redis); try again shortly".into(),
                ),
            })?;
    }
    let user = if name.contains('@') {
        acc.users.find_by_email(&name).await
    } else {
        acc.users.find(&name).await
    }?;
    let ok = acc
        .passwords
        .verify(
            &req.password,
            user.as_ref().map(|u| u.password_hash.as_str()),
        )
        .await
        .map_err(|e| ApiError::backend("the password hasher", e))?;
    let Some(user) = user.filter(|_| ok) else {
        return Err(ApiError::Unauthorized("wrong user name or password".into()));
    };
    let (session, refresh) = acc
        .store
        .open_session(
            &user.user_id,
            &user.username,
            &user.tenant,
            acc.cfg.refresh_ttl_secs,
        )
        .await?;
    let access = acc.access_token(&state, &session, user.grants.clone());
    let mut body = acc.token_body(access, refresh);
    body["user"] = user.public();
    Ok(Json(body))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RefreshReq {
    refresh_token: String,
}

/// `POST /v1/auth/refresh`: a new access token and a new refresh token; the old one is spent.
pub async fn refresh(
    State(state): State<AppState>,
    body: axum::body::Body,
) -> Result<impl IntoResponse, ApiError> {
    let acc = accounts(&state)?;
    let req: RefreshReq = read_json(&state, body).await?;
    let token = req.refresh_token.trim();
    // The user first, without spending the token: grants come from the view (so an admin's
    // change arrives with the next refresh), and a user the view does not show yet (just
    // registered) can retry with the same token.
    let mut user = None;
    if let Some(session) = acc.store.session_of(token).await? {
        user = acc
            .users
            .find(&session.username)
            .await?
            .filter(|u| u.user_id == session.user_id);
        if user.is_none() {
            return Err(ApiError::Unavailable(
                "the account is not visible yet; retry with the same refresh token".into(),
            ));
        }
    }
    match acc.store.refresh(token).await? {
        Refreshed::Rotated(session, refresh) => {
            let Some(user) = user.filter(|u| u.user_id == session.user_id) else {
                let _ = acc.store.end_session(&session.sid).await;
                return Err(ApiError::Unauthorized(
                    "the session changed; log in again".into(),
                ));
            };
            let access = acc.access_token(&state, &session, user.grants);
            Ok(Json(acc.token_body(access, refresh)))
        }
        Refreshed::Reused => {
            tracing::warn!("a refresh token was used twice; its session is revoked");
            Err(ApiError::Unauthorized(
                "this refresh token was used already, so its session has been revoked: log in again".into(),
            ))
        }
        Refreshed::Unknown => Err(ApiError::Unauthorized(
            "unknown or expired refresh token (logged out, revoked or expired)".into(),
        )),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LogoutReq {
    refresh_token: Option<String>,
}

/// `POST /v1/auth/logout`: ends the session of the refresh token in the body, or of the bearer
/// access token. Its access tokens stop working at once.
pub async fn logout(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<impl IntoResponse, ApiError> {
    let acc = accounts(&state)?;
    let body = account_body(&state, body).await?;
    let req: LogoutReq = if body.is_empty() {
        LogoutReq::default()
    } else {
        json_body(&body)?
    };
    if let Some(token) = req.refresh_token {
        return if acc.store.logout_refresh(token.trim()).await? {
            Ok(StatusCode::NO_CONTENT)
        } else {
            Err(ApiError::Unauthorized(
                "unknown, spent or expired refresh token".into(),
            ))
        };
    }
    let claims = crate::routes::verified(&state, &headers).await?;
    match claims.sid {
        Some(sid) => {
            acc.store.end_session(&sid).await?;
            Ok(StatusCode::NO_CONTENT)
        }
        None => Err(ApiError::bad_request(
            "invalid_body",
            "this token has no session to end; send {\"refresh_token\": ...}",
        )),
    }
}

/// `GET /v1/auth/me`: the token's identity, and the user when it is a user's.
pub async fn me(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    let claims = crate::routes::verified(&state, &headers).await?;
    let mut body = json!({
        "sub": claims.sub,
        "tenant": claims.tenant,
        "kind": claims.typ,
        "grants": claims.grants,
        "expires_at": claims.exp,
        "operator": claims.operator,
    });
    if let (Some(name), Some(acc)) = (&claims.name, &state.accounts) {
        if let Some(user) = acc.users.find(name).await? {
            if user.user_id == claims.sub && user.tenant == claims.tenant {
                body["user"] = user.public();
            }
        }
    }
    Ok(Json(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_addresses_are_normalized_and_checked() {
        assert_eq!(normalize_username(" Ann.Lee ").unwrap(), "ann.lee");
        assert!(normalize_username("ab").is_err());
        assert!(normalize_username("-ann").is_err());
        assert!(normalize_username("ann lee").is_err());
        assert!(normalize_username("ann/lee").is_err());
        assert!(normalize_username(&"a".repeat(65)).is_err());
        assert_eq!(
            normalize_email("Ann@Example.COM").unwrap(),
            "ann@example.com"
        );
        for bad in [
            "ann", "ann@", "@x.io", "ann@x", "a b@x.io", "a@b@x.io", "a@.x", "a@x.",
        ] {
            assert!(normalize_email(bad).is_err(), "{bad}");
        }
    }
}
