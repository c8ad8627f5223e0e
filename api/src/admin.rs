//! Tenant administration: grants, invitations, service tokens, and the bucket listing.
//!
//! Whoever administers a bucket pattern (an `admin` grant covering it) may hand out access to it:
//! a token may only grant, invite with, or create a service token for patterns it administers,
//! and may only change a user's grants if it administers every pattern the user holds or gets.
//! A tenant admin (admin on `*`) administers everything of the tenant. Nothing here reaches
//! another tenant: the tenant always comes from the caller's token.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use crate::accounts::{accounts, read_json};
use crate::auth::sessions::{Backer, Invite, ServiceToken};
use crate::auth::{Claims, Grant, Perm, TokenKind};
use crate::error::ApiError;
use crate::routes::verified;
use crate::users::{UserEvent, USER_EVENT_VERSION};
use crate::{now_ms, AppState};

/// Most grants one user, invitation or service token may carry.
pub const MAX_GRANTS: usize = 100;

/// Checks the number and the shape of grants someone asks for (whoever asks).
pub fn check_grant_shapes(grants: &[Grant]) -> Result<(), ApiError> {
    if grants.len() > MAX_GRANTS {
        return Err(ApiError::bad_request(
            "invalid_grants",
            format!("at most {MAX_GRANTS} grants"),
        ));
    }
    for g in grants {
        g.check()
            .map_err(|m| ApiError::bad_request("invalid_grants", m))?;
    }
    Ok(())
}

fn check_grants(caller: &Claims, grants: &[Grant]) -> Result<(), ApiError> {
    check_grant_shapes(grants)?;
    for g in grants {
        if !caller.administers(&g.bucket) {
            return Err(ApiError::Forbidden(format!(
                "the token does not administer {:?}, so it cannot grant on it",
                g.bucket
            )));
        }
    }
    Ok(())
}

/// [`check_grants`] for grants the caller hands out (an invitation, a service token): an empty
/// list, which no grant check covers, only a tenant admin may give.
fn check_giving(caller: &Claims, grants: &[Grant]) -> Result<(), ApiError> {
    check_grants(caller, grants)?;
    if grants.is_empty() {
        require_tenant_admin(caller)?;
    }
    Ok(())
}

/// Most live service tokens a tenant may have: the registry is read whole on every list and
/// revoke.
pub const MAX_SERVICE_TOKENS: usize = 1_000;

/// Who may revoke a service token with these grants: whoever administers every one of them; a
/// token without grants, which no grant check would cover, only a tenant admin; an operator
/// token only an operator (a tenant's admin is not the cluster's: whoever registered the tenant
/// the operators keep their tokens in could otherwise revoke them).
fn may_revoke_service_token(
    caller: &Claims,
    grants: &[Grant],
    operator: bool,
) -> Result<(), ApiError> {
    if operator {
        return if caller.operator {
            Ok(())
        } else {
            Err(ApiError::Forbidden(
                "an operator token is revoked only with an operator token (syncflow token --operator)"
                    .into(),
            ))
        };
    }
    if grants.is_empty() {
        return require_tenant_admin(caller);
    }
    if let Some(g) = grants.iter().find(|g| !caller.administers(&g.bucket)) {
        return Err(ApiError::Forbidden(format!(
            "the service token grants on {:?}, which this token does not administer",
            g.bucket
        )));
    }
    Ok(())
}

/// Claims of a new token of `kind` with a fresh id, valid `ttl` seconds from now.
fn issued(kind: TokenKind, sub: &str, tenant: &str, grants: Vec<Grant>, ttl: u64) -> Claims {
    let mut claims = Claims::access(sub, tenant, grants, now_ms() / 1000, ttl);
    claims.typ = kind;
    claims.jti = Some(uuid::Uuid::now_v7().to_string());
    claims
}

/// The caller of an administration endpoint. A user's session token carries the grants of its
/// issue, up to `auth.access_ttl_secs` old: here they are those the users view holds now, so an
/// admin who was demoted cannot use the token's to give itself (or anyone) back what it lost,
/// for good. A user the view does not show (yet, or ever: a registration the users projector
/// ignored, as of a tenant taken meanwhile) administers nothing until it does.
///
/// A service token's admin grants count only as far as the user they rest on
/// ([`ServiceToken::backed_by`]) still administers them: an admin who was demoted, or removed,
/// cannot keep administering through a service token made before (its admin on a pattern is
/// narrowed to the patterns under it the user still administers). Its grants stay for data. A
/// token resting on nothing known (its record gone or unreadable, or made by a token resting on
/// nothing) administers nothing.
async fn admin_caller(state: &AppState, headers: &HeaderMap) -> Result<Claims, ApiError> {
    Ok(backed_admin_caller(state, headers).await?.0)
}

/// [`admin_caller`], with what a service token the caller makes rests on ([`backer_of`]).
async fn backed_admin_caller(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<(Claims, Option<Backer>), ApiError> {
    let mut caller = verified(state, headers).await?;
    if let (Some(_), Some(name), Some(acc)) = (&caller.sid, &caller.name, &state.accounts) {
        match acc.users.find(name).await? {
            Some(user) if user.user_id == caller.sub && user.tenant == caller.tenant => {
                caller.grants = user.grants;
            }
            Some(_) => {
                return Err(ApiError::Forbidden(
                    "the token's account is not the one of that name".into(),
                ))
            }
            None => {
                return Err(ApiError::Unavailable(
                    "the token's account is not in the users view yet; retry in a moment".into(),
                ))
            }
        }
    }
    let backer = backer_of(state, &caller).await?;
    if caller.typ == TokenKind::Service {
        let backing = match &backer {
            Some(Backer::SigningKey { signing_key: true }) => return Ok((caller, backer)),
            Some(Backer::User { user_id, username }) => {
                let acc = accounts(state)?;
                match acc.users.find(username).await? {
                    Some(u) if &u.user_id == user_id && u.tenant == caller.tenant => u.grants,
                    // Removed, or the name now someone else's: it administers nothing.
                    _ => Vec::new(),
                }
            }
            Some(Backer::SigningKey { .. }) | None => Vec::new(),
        };
        caller.grants = bounded_admin(caller.grants, &backing);
    }
    Ok((caller, backer))
}

/// `grants` with their admin permission bounded by `backing`'s: a grant whose pattern `backing`
/// does not administer keeps read and write (which admin implies) and administers only the
/// patterns under it that `backing` does.
fn bounded_admin(grants: Vec<Grant>, backing: &[Grant]) -> Vec<Grant> {
    let backer = Claims::access("", "", backing.to_vec(), 0, 0);
    let mut out = Vec::with_capacity(grants.len());
    for mut grant in grants {
        if grant.perms.contains(&Perm::Admin) && !backer.administers(&grant.bucket) {
            for b in backing {
                if b.perms.contains(&Perm::Admin) && grant.covers_pattern(&b.bucket) {
                    out.push(Grant {
                        bucket: b.bucket.clone(),
                        perms: vec![Perm::Admin],
                    });
                }
            }
            grant.perms.retain(|p| *p != Perm::Admin);
            for p in [Perm::Read, Perm::Write] {
                if !grant.perms.contains(&p) {
                    grant.perms.push(p);
                }
            }
        }
        out.push(grant);
    }
    out
}

/// What a service token made by `caller` rests on ([`ServiceToken::backed_by`]): the caller's
/// user when it is a user's session; the signing key for a token made with it (`syncflow
/// token`); what its own record rests on when it is a service token (nothing, when that record
/// is gone or unreadable).
async fn backer_of(state: &AppState, caller: &Claims) -> Result<Option<Backer>, ApiError> {
    match (caller.typ, &caller.sid, &caller.name) {
        (_, Some(_), Some(name)) => {
            return Ok(Some(Backer::User {
                user_id: caller.sub.clone(),
                username: name.clone(),
            }))
        }
        (_, Some(_), None) => return Ok(None),
        (TokenKind::Service, None, _) => {}
        // A token without a session, not a service token: made with the signing key.
        _ => return Ok(Some(Backer::SigningKey { signing_key: true })),
    }
    let (Some(jti), Ok(acc)) = (&caller.jti, accounts(state)) else {
        return Ok(None);
    };
    match acc.store.service(&caller.tenant, jti).await? {
        Some(record) => backer_of_record(acc, record).await,
        None => Ok(None),
    }
}

/// What a registered service token rests on. A record made before 2026-12-06 names none: it
/// rests on the signing key when `syncflow token --service` made it, on its creator when a
/// user did (found by id), and on nothing when a service token did.
async fn backer_of_record(
    acc: &crate::accounts::Accounts,
    record: ServiceToken,
) -> Result<Option<Backer>, ApiError> {
    if record.backed_by.is_some() {
        return Ok(record.backed_by);
    }
    if record.created_by == "cli" {
        return Ok(Some(Backer::SigningKey { signing_key: true }));
    }
    Ok(acc
        .users
        .find_by_id(&record.created_by)
        .await?
        .map(|u| Backer::User {
            user_id: u.user_id,
            username: u.username,
        }))
}

fn require_tenant_admin(caller: &Claims) -> Result<(), ApiError> {
    if caller.is_tenant_admin() {
        Ok(())
    } else {
        Err(ApiError::Forbidden(
            "this needs a tenant admin (an admin grant on \"*\")".into(),
        ))
    }
}

/// `GET /v1/buckets?after=&limit=`: a page of the tenant's buckets the token may read, in name
/// order; `next` (the page's last name) when more may follow. Only readable names are read, so
/// none other shows, not even as `next`.
pub async fn list_buckets(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    let caller = verified(&state, &headers).await?;
    crate::routes::params(&query, &["after", "limit"])?;
    let limit = crate::routes::page_limit(&state, query.get("limit"))?;
    let after = query
        .get("after")
        .map(String::as_str)
        .filter(|a| !a.is_empty());
    if let Some(after) = after {
        processors::limits::check_bucket(after).map_err(ApiError::from)?;
    }
    // The patterns the token reads (admin implies read); `None`: all of them.
    let patterns: Vec<String> = caller
        .grants
        .iter()
        .filter(|g| g.perms.contains(&Perm::Read) || g.perms.contains(&Perm::Admin))
        .map(|g| g.bucket.clone())
        .collect();
    if patterns.is_empty() {
        return Ok(Json(json!({ "buckets": [], "next": null })));
    }
    let within = (!patterns.iter().any(|p| p == "*")).then_some(patterns.as_slice());
    let names = state
        .reader
        .bucket_names(&caller.tenant, after, limit, within)
        .await?;
    let next = (names.len() >= limit)
        .then(|| names.last().cloned())
        .flatten();
    // (The query read only these; checked here all the same.)
    let readable: Vec<String> = names
        .into_iter()
        .filter(|b| caller.allows(Perm::Read, b))
        .collect();
    Ok(Json(json!({ "buckets": readable, "next": next })))
}

/// `GET /v1/tenant/users`: the tenant's users (tenant admins only).
pub async fn list_users(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    let caller = admin_caller(&state, &headers).await?;
    require_tenant_admin(&caller)?;
    let users = accounts(&state)?.users.list(&caller.tenant).await?;
    Ok(Json(
        json!({ "users": users.iter().map(|u| u.public()).collect::<Vec<_>>() }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantsReq {
    grants: Vec<Grant>,
}

/// `PUT /v1/tenant/users/{username}/grants`: replaces a user's grants. They reach the user's
/// tokens at the next refresh or login.
pub async fn set_grants(
    State(state): State<AppState>,
    Path(username): Path<String>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<impl IntoResponse, ApiError> {
    let caller = admin_caller(&state, &headers).await?;
    let acc = accounts(&state)?;
    let req: GrantsReq = read_json(&state, body).await?;
    // Before any lookup: a token that administers nothing must not learn who exists (an empty
    // list, which no grant check covers, would otherwise tell it).
    require_some_admin(&caller, "changing grants")?;
    check_grants(&caller, &req.grants)?;
    let user = managed_user(&caller, acc, &username).await?;
    let (username, seen) = (user.username, user.grants_offset);
    // A tenant admin's change always applies, in log order: nobody below it can hold it off.
    // Anyone else's applies only over the grants it was decided on.
    let checked = !caller.is_tenant_admin();
    let event = UserEvent::GrantsSet {
        v: USER_EVENT_VERSION,
        event_id: uuid::Uuid::now_v7().to_string(),
        username: username.clone(),
        tenant: caller.tenant.clone(),
        grants: req.grants.clone(),
        by: caller.sub.clone(),
        at_ms: now_ms() as i64,
        if_grants_offset: seen.filter(|_| checked),
    };
    let ours = acc.emit(&event).await?;
    // Until the view shows this change, or (for a checked one) any change since the read.
    let landed = acc
        .wait_view(&username, |u| match (ours, seen) {
            (Some(_), Some(_)) if checked => u.grants_offset != seen,
            (Some(o), _) => u.grants_offset.is_some_and(|g| g >= o),
            (None, _) => u.grants == req.grants,
        })
        .await;
    let in_effect = match (&landed, ours) {
        (Some(u), Some(o)) => u.grants_offset == Some(o),
        (Some(u), None) => u.grants == req.grants,
        (None, _) => true,
    };
    if !in_effect {
        // Another change came first (this one is dropped), or right after it.
        return Err(ApiError::Conflict {
            code: "grants_changed",
            message: format!(
                "the grants of {username:?} were changed by another request at the same time; this change is not in effect: read them again, and retry if it is still wanted"
            ),
        });
    }
    Ok(Json(
        json!({"username": username, "grants": req.grants, "visible": landed.is_some()}),
    ))
}

/// Refuses a token that administers nothing (before any lookup: it must not learn who exists).
fn require_some_admin(caller: &Claims, what: &str) -> Result<(), ApiError> {
    if caller.grants.iter().any(|g| g.perms.contains(&Perm::Admin)) {
        Ok(())
    } else {
        Err(ApiError::Forbidden(format!("{what} needs an admin grant")))
    }
}

/// The user `username` of the caller's tenant, if the caller administers every grant it holds.
async fn managed_user(
    caller: &Claims,
    acc: &crate::accounts::Accounts,
    username: &str,
) -> Result<crate::users::User, ApiError> {
    let username = username.to_ascii_lowercase();
    let user = acc
        .users
        .find(&username)
        .await?
        .filter(|u| u.tenant == caller.tenant)
        .ok_or_else(|| ApiError::NotFound(format!("no user {username:?} in this tenant")))?;
    if user.grants.iter().any(|g| !caller.administers(&g.bucket)) {
        return Err(ApiError::Forbidden(
            "the user holds a grant this token does not administer".into(),
        ));
    }
    Ok(user)
}

/// `DELETE /v1/tenant/users/{username}/sessions`: ends every session of a user of the tenant
/// (offboarding, a stolen device): its tokens are refused at once and its WebSockets closed at
/// their next heartbeat. Allowed to whoever administers every grant the user holds.
pub async fn end_sessions(
    State(state): State<AppState>,
    Path(username): Path<String>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    let caller = admin_caller(&state, &headers).await?;
    let acc = accounts(&state)?;
    require_some_admin(&caller, "ending sessions")?;
    let user = managed_user(&caller, acc, &username).await?;
    let ended = acc.store.end_user_sessions(&user.user_id).await?;
    Ok(Json(json!({"username": user.username, "ended": ended})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InviteReq {
    grants: Vec<Grant>,
    ttl_secs: Option<u64>,
}

/// `POST /v1/tenant/invites`: a single-use invitation to register into the caller's tenant with
/// the given grants.
pub async fn create_invite(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<impl IntoResponse, ApiError> {
    let caller = admin_caller(&state, &headers).await?;
    let acc = accounts(&state)?;
    let req: InviteReq = read_json(&state, body).await?;
    // Without the admin check for an empty list, any token (a read-only user's, a producer's)
    // could invite new members into the tenant.
    check_giving(&caller, &req.grants)?;
    let ttl = req
        .ttl_secs
        .unwrap_or(acc.cfg.invite_ttl_secs)
        .clamp(1, acc.cfg.invite_ttl_secs.max(1));
    let claims = issued(
        TokenKind::Invite,
        &caller.sub,
        &caller.tenant,
        req.grants,
        ttl,
    );
    let record = Invite {
        id: claims.jti.clone().expect("issued with an id"),
        grants: claims.grants.clone(),
        created_by: caller.sub.clone(),
        created_at: claims.iat,
        expires_at: claims.exp,
    };
    let (jti, expires_at) = (record.id.clone(), claims.exp);
    acc.store.mark_tenant(&caller.tenant).await?;
    if let Some(pending) = acc
        .store
        .add_invite(&caller.tenant, &record, ttl, MAX_PENDING_INVITES)
        .await?
    {
        return Err(ApiError::Conflict {
            code: "too_many_invites",
            message: format!(
                "the tenant has {pending} pending invitations, the most allowed; withdraw some first"
            ),
        });
    }
    let invite = state.keys.sign(claims);
    Ok((
        StatusCode::CREATED,
        Json(json!({"invite": invite, "id": jti, "expires_at": expires_at})),
    ))
}

/// Most pending invitations a tenant may have: its list is read whole on every list, withdrawal
/// and new invitation.
pub const MAX_PENDING_INVITES: usize = 1_000;

/// `GET /v1/tenant/invites`: the tenant's pending invitations whose grants the caller
/// administers (those it could have made; never the invitations themselves).
pub async fn list_invites(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    let caller = admin_caller(&state, &headers).await?;
    // Answers only a token that administers something (as making an invitation does).
    require_some_admin(&caller, "listing invitations")?;
    let list: Vec<Invite> = accounts(&state)?
        .store
        .list_invites(&caller.tenant, now_ms() / 1000)
        .await?
        .into_iter()
        .filter(|i| check_giving(&caller, &i.grants).is_ok())
        .collect();
    Ok(Json(json!({ "invites": list })))
}

/// `DELETE /v1/tenant/invites/{id}`: withdraws a pending invitation at once. Allowed to
/// whoever administers every grant it gives (a tenant admin for one that gives none).
pub async fn withdraw_invite(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    let caller = admin_caller(&state, &headers).await?;
    let acc = accounts(&state)?;
    let not_pending = || {
        ApiError::NotFound(format!(
            "no pending invitation {id:?} in this tenant (used, withdrawn or expired?)"
        ))
    };
    let invite = acc
        .store
        .invite(&caller.tenant, &id)
        .await?
        .filter(|i| i.expires_at > now_ms() / 1000)
        .ok_or_else(not_pending)?;
    check_giving(&caller, &invite.grants)?;
    // Withdrawn for good even when a registration is using it right now: if that one fails, it
    // cannot give the invitation back.
    if !acc.store.withdraw_invite(&caller.tenant, &invite).await? {
        return Err(not_pending());
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceReq {
    name: String,
    grants: Vec<Grant>,
    ttl_secs: Option<u64>,
}

/// Checks a service token's name: 1-64 characters of `A-Z a-z 0-9 . _ -`. Returns it trimmed.
pub fn check_service_name(name: &str) -> Result<&str, ApiError> {
    let name = name.trim();
    let ok = !name.is_empty() && name.len() <= 64 && crate::accounts::plain_name(name);
    if ok {
        Ok(name)
    } else {
        Err(ApiError::bad_request(
            "invalid_name",
            "a service token name is 1-64 characters of A-Z, a-z, 0-9, '.', '_' and '-'",
        ))
    }
}

/// A service token to issue (name and grants already checked).
pub struct ServiceTokenSpec<'a> {
    /// Its tenant.
    pub tenant: &'a str,
    /// Its name (`sub` is `service:<name>`).
    pub name: &'a str,
    /// What it grants.
    pub grants: Vec<Grant>,
    /// Whether it may use the cluster-wide operations.
    pub operator: bool,
    /// Its lifetime, capped to the configured maximum.
    pub ttl_secs: u64,
    /// Who issues it.
    pub created_by: &'a str,
    /// The user its admin grants rest on ([`ServiceToken::backed_by`]).
    pub backed_by: Option<Backer>,
    /// Most service tokens its tenant may have registered, this one included (`None`: no cap,
    /// for the operator's `syncflow token --service`).
    pub cap: Option<usize>,
}

/// Mints a service token and registers it in its tenant's registry (the API and
/// `syncflow token --service` both issue tokens this way). Returns the record and the token.
pub async fn issue_service_token(
    keys: &crate::auth::TokenKeys,
    store: &crate::auth::sessions::AuthStore,
    spec: ServiceTokenSpec<'_>,
    max_ttl_secs: u64,
) -> Result<(ServiceToken, String), ApiError> {
    let ttl = spec.ttl_secs.clamp(1, max_ttl_secs.max(1));
    let mut claims = issued(
        TokenKind::Service,
        &format!("service:{}", spec.name),
        spec.tenant,
        spec.grants,
        ttl,
    );
    claims.operator = spec.operator;
    let record = ServiceToken {
        id: claims.jti.clone().expect("issued with an id"),
        name: spec.name.into(),
        grants: claims.grants.clone(),
        created_by: spec.created_by.into(),
        created_at: claims.iat,
        expires_at: claims.exp,
        operator: spec.operator,
        backed_by: spec.backed_by,
    };
    if let Some(held) = store.add_service(spec.tenant, &record, spec.cap).await? {
        return Err(ApiError::Conflict {
            code: "too_many_service_tokens",
            message: format!(
                "the tenant has {held} live service tokens, the most allowed; revoke some first"
            ),
        });
    }
    Ok((record, keys.sign(claims)))
}

/// `POST /v1/tenant/service-tokens`: a long-lived token for a server-side producer, with grants
/// the caller administers; valid until it expires or is revoked.
pub async fn create_service_token(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<impl IntoResponse, ApiError> {
    let (caller, backer) = backed_admin_caller(&state, &headers).await?;
    let acc = accounts(&state)?;
    let req: ServiceReq = read_json(&state, body).await?;
    let name = check_service_name(&req.name)?;
    check_giving(&caller, &req.grants)?;
    // Drops the expired ones from the registry, so that the cap counts live tokens.
    acc.store
        .list_services(&caller.tenant, now_ms() / 1000)
        .await?;
    let spec = ServiceTokenSpec {
        tenant: &caller.tenant,
        name,
        grants: req.grants,
        operator: false,
        ttl_secs: req.ttl_secs.unwrap_or(acc.cfg.service_token_max_ttl_secs),
        created_by: &caller.sub,
        backed_by: backer,
        cap: Some(MAX_SERVICE_TOKENS),
    };
    let (record, token) = issue_service_token(
        &state.keys,
        &acc.store,
        spec,
        acc.cfg.service_token_max_ttl_secs,
    )
    .await?;
    let mut body = serde_json::to_value(&record).expect("plain struct");
    body["token"] = json!(token);
    Ok((StatusCode::CREATED, Json(body)))
}

/// `GET /v1/tenant/service-tokens`: the tenant's live service tokens (never the tokens).
pub async fn list_service_tokens(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    let caller = admin_caller(&state, &headers).await?;
    require_tenant_admin(&caller)?;
    let list = accounts(&state)?
        .store
        .list_services(&caller.tenant, now_ms() / 1000)
        .await?;
    Ok(Json(json!({ "service_tokens": list })))
}

/// `DELETE /v1/tenant/service-tokens/{id}`: revokes at once. Allowed to whoever administers
/// every grant of the token; a token without grants to tenant admins; an operator token to
/// operators.
pub async fn revoke_service_token(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    let caller = admin_caller(&state, &headers).await?;
    let acc = accounts(&state)?;
    let list = acc
        .store
        .list_services(&caller.tenant, now_ms() / 1000)
        .await?;
    let token = list
        .iter()
        .find(|t| t.id == id)
        .ok_or_else(|| ApiError::NotFound(format!("no service token {id:?} in this tenant")))?;
    may_revoke_service_token(&caller, &token.grants, token.operator)?;
    acc.store.revoke_service(&caller.tenant, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(text: &str) -> Vec<Grant> {
        crate::auth::parse_grants(text).expect("grants")
    }

    #[test]
    fn a_service_tokens_admin_is_bounded_by_what_its_user_administers_now() {
        // Still a tenant admin: nothing changes.
        let token = grants("*:a");
        assert_eq!(bounded_admin(token.clone(), &grants("*:a")), token);
        // Demoted to admin of team-*: the token administers team-* only, and reads and writes
        // everything its grant covered.
        let bounded = bounded_admin(token.clone(), &grants("team-*:a,notes:r"));
        let claims = Claims::access("s", "t", bounded, 0, 0);
        assert!(claims.administers("team-*") && claims.administers("team-1"));
        assert!(!claims.administers("*") && !claims.administers("notes"));
        assert!(claims.allows(Perm::Write, "notes") && claims.allows(Perm::Read, "x"));
        // Nothing administered: no admin left, the data access stays.
        let bounded = bounded_admin(grants("team-*:a,logs:r"), &[]);
        let claims = Claims::access("s", "t", bounded, 0, 0);
        assert!(!claims.administers("team-1"));
        assert!(claims.allows(Perm::Write, "team-1") && !claims.allows(Perm::Write, "logs"));
    }
}
