//! REST handlers: writes become `data.changed` events; reads come from the MongoDB view.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use processors::limits::check_bucket;
use processors::{Hlc, Write, WriteOp};
use serde_json::{json, Map, Value};

use crate::auth::{AuthError, Claims, Perm, TokenKind};
use crate::error::ApiError;
use crate::{now_ms, AppState};

/// The REST routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/openapi.json", get(openapi))
        .route(
            "/status",
            get(|State(state): State<AppState>| async move { Json((state.status)()) }),
        )
        .route("/v1/buckets/{bucket}/docs", get(list_docs))
        .route("/v1/buckets/{bucket}/changes", get(changes))
        .route("/v1/subscribe", get(crate::ws::ws_handler))
        .route("/v1/checkpoints", get(checkpoints))
        .route("/v1/buckets", get(crate::admin::list_buckets))
        .route("/v1/auth/register", post(crate::accounts::register))
        .route("/v1/auth/login", post(crate::accounts::login))
        .route("/v1/auth/refresh", post(crate::accounts::refresh))
        .route("/v1/auth/logout", post(crate::accounts::logout))
        .route("/v1/auth/me", get(crate::accounts::me))
        .route("/v1/tenant/users", get(crate::admin::list_users))
        .route(
            "/v1/tenant/users/{username}/grants",
            put(crate::admin::set_grants),
        )
        .route(
            "/v1/tenant/users/{username}/sessions",
            delete(crate::admin::end_sessions),
        )
        .route(
            "/v1/tenant/invites",
            get(crate::admin::list_invites).post(crate::admin::create_invite),
        )
        .route(
            "/v1/tenant/invites/{id}",
            delete(crate::admin::withdraw_invite),
        )
        .route(
            "/v1/tenant/service-tokens",
            get(crate::admin::list_service_tokens).post(crate::admin::create_service_token),
        )
        .route(
            "/v1/tenant/service-tokens/{id}",
            delete(crate::admin::revoke_service_token),
        )
        .route(
            "/v1/buckets/{bucket}/docs/{id}",
            get(get_doc)
                .put(put_doc)
                .patch(patch_doc)
                .delete(delete_doc),
        )
        .layer(axum::middleware::map_response(json_errors))
        .with_state(state)
}

/// The most bytes of a document write's body read: twice the largest document (the limit itself
/// is checked on the parsed write, with its reason), at least 64 KiB. (Every handler reads its
/// body with [`read_body`], under its own limit: no body extractor is left for axum's default
/// limit to apply to.)
fn body_limit(limits: &processors::Limits) -> usize {
    limits.max_doc_bytes.saturating_mul(2).max(64 * 1024)
}

/// A request's body, at most `limit` bytes and arriving within `state.body_deadline` in all (a
/// body trickled a byte at a time within the idle timeout would otherwise hold its connection
/// for good). Handlers that need a token read it after checking the token, so a request
/// without a valid one costs no buffering.
pub(crate) async fn read_body(
    state: &AppState,
    body: axum::body::Body,
    limit: usize,
) -> Result<Bytes, ApiError> {
    let read = axum::body::to_bytes(body, limit);
    match tokio::time::timeout(state.body_deadline, read).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Err(_) => Err(ApiError::Timeout(format!(
            "the request body did not arrive within {} s (api.idle_timeout_secs)",
            state.body_deadline.as_secs()
        ))),
        Ok(Err(e)) => {
            let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(c) = cause {
                if c.is::<http_body_util::LengthLimitError>() {
                    return Err(ApiError::TooLarge(format!(
                        "the request body is over {limit} bytes"
                    )));
                }
                cause = c.source();
            }
            if e.to_string().ends_with(BODY_TIMED_OUT) {
                return Err(ApiError::Timeout(
                    "the request body stopped arriving (api.idle_timeout_secs)".into(),
                ));
            }
            Err(ApiError::bad_request(
                "bad_request",
                format!("the request body could not be read: {e}"),
            ))
        }
    }
}

/// How `tower_http::timeout::TimeoutError` reads (it cannot be made outside the crate to
/// compare with; the server's body-timeout test fails if this changes).
const BODY_TIMED_OUT: &str = "data was not received within the designated timeout";

/// Client errors that axum answers itself, in plain text or with no body (a path segment that
/// is not valid UTF-8, an unknown route, a wrong method, a body over the size limit), in the
/// API's JSON error shape, keeping their status and headers (`Allow`, …).
async fn json_errors(response: axum::response::Response) -> axum::response::Response {
    use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
    let status = response.status();
    let is_json = response
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !status.is_client_error() || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_default();
    let mut message = String::from_utf8_lossy(&text).trim().to_string();
    let mut status = status;
    // The body timeout (`server`'s `RequestBodyTimeoutLayer`) reaches the body's reader as an
    // error like any other, which axum answers with 400; it is the client's delay, so 408.
    if status == StatusCode::BAD_REQUEST && message.ends_with(BODY_TIMED_OUT) {
        status = StatusCode::REQUEST_TIMEOUT;
        message = "the request body stopped arriving (api.idle_timeout_secs)".into();
    }
    if message.is_empty() {
        message = status
            .canonical_reason()
            .unwrap_or("refused")
            .to_lowercase();
    }
    let code = match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::REQUEST_TIMEOUT => "timeout",
        _ => "bad_request",
    };
    let mut out = (
        status,
        Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response();
    for (name, value) in &parts.headers {
        if name != CONTENT_TYPE && name != CONTENT_LENGTH {
            out.headers_mut().append(name.clone(), value.clone());
        }
    }
    *out.extensions_mut() = parts.extensions;
    out
}

/// `GET /v1/checkpoints`: the complete checkpoints, oldest first (operator tokens only).
async fn checkpoints(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    if !verified(&state, &headers).await?.operator {
        return Err(ApiError::Forbidden(
            "listing checkpoints needs an operator token".into(),
        ));
    }
    let list = state.checkpoints.as_ref().ok_or_else(|| {
        ApiError::Unavailable("this node is not configured with a checkpoint directory".into())
    })?;
    let checkpoints = list().map_err(|e| ApiError::backend("the checkpoint directory", e))?;
    Ok(Json(json!({ "checkpoints": checkpoints })))
}

/// Verifies an access or service token: signature, claims, and that its session or registration
/// still lives (the same check for REST and WebSocket).
pub async fn authenticate(state: &AppState, token: &str) -> Result<Claims, AuthError> {
    let claims = state.keys.verify(token)?;
    let session_bound = claims.sid.is_some() || claims.typ == TokenKind::Service;
    if session_bound {
        match &state.accounts {
            Some(acc) => acc.store.check_live(&claims).await?,
            None => {
                return Err(AuthError::Unavailable(
                    "this node cannot check sessions (no Redis configured)".into(),
                ))
            }
        }
    }
    Ok(claims)
}

/// The token of an `Authorization: Bearer <token>` header (the scheme's case does not matter,
/// as RFC 9110 says).
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// The claims of the request's bearer token (401 when missing or invalid).
pub async fn verified(state: &AppState, headers: &HeaderMap) -> Result<Claims, ApiError> {
    let token = bearer(headers).ok_or(AuthError::Missing)?;
    Ok(authenticate(state, token).await?)
}

/// Verifies the bearer token and the grant for `perm` on `bucket`.
async fn authorize(
    state: &AppState,
    headers: &HeaderMap,
    perm: Perm,
    bucket: &str,
) -> Result<Claims, ApiError> {
    let claims = verified(state, headers).await?;
    check_bucket(bucket).map_err(ApiError::from)?;
    if !claims.allows(perm, bucket) {
        return Err(ApiError::Forbidden(format!(
            "the token does not grant {} on bucket {bucket:?}",
            perm.as_str()
        )));
    }
    Ok(claims)
}

/// Query parameters of writes.
#[derive(Debug)]
pub struct WriteParams {
    /// The document version the writer last saw (enables stale-write conflict reports).
    pub base_version: Option<u64>,
    /// `applied`: answer only once the view holds the write (read-your-writes).
    pub wait: Option<String>,
}

/// The write's query parameters, each refused with a JSON `invalid_parameter` and a reason (read
/// after the token is checked, so a bad token is a 401 whatever the query says).
fn write_params(
    query: &std::collections::HashMap<String, String>,
) -> Result<WriteParams, ApiError> {
    params(query, &["base_version", "wait"])?;
    let base_version = query
        .get("base_version")
        .map(|v| {
            v.parse::<u64>().map_err(|_| {
                ApiError::bad_request(
                    "invalid_parameter",
                    format!("base_version must be a non-negative integer, got {v:?}"),
                )
            })
        })
        .transpose()?;
    Ok(WriteParams {
        base_version,
        wait: query.get("wait").cloned(),
    })
}

fn parse_body(body: &Bytes) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::bad_request(
            "malformed_json",
            "the body must be a JSON object",
        )),
        Err(e) => Err(ApiError::bad_request(
            "malformed_json",
            format!("the body is not valid JSON: {e}"),
        )),
    }
}

/// Header `name` (`X-Device-Id`, `X-Event-Id`) when given, checked as the resolver checks a
/// write's ids: a write answered 202 must not be refused there.
fn write_id_header(headers: &HeaderMap, name: &str) -> Result<Option<String>, ApiError> {
    // Any UTF-8, as in a write sent to Kafka (`HeaderValue::to_str` takes visible ASCII only).
    let Some(value) = headers.get(name.to_ascii_lowercase()) else {
        return Ok(None);
    };
    let id = std::str::from_utf8(value.as_bytes())
        .map_err(|_| ApiError::bad_request("invalid_header", format!("{name} is not UTF-8")))?;
    processors::limits::check_write_id(name, id)
        .map_err(|r| ApiError::bad_request("invalid_header", r.message))?;
    Ok(Some(id.to_owned()))
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(Some)
            .map_err(|_| ApiError::bad_request("invalid_header", format!("{name} is not ASCII"))),
    }
}

/// Builds, checks and sends one write; answers 202 with the event id once Kafka acknowledged it.
async fn submit(
    state: &AppState,
    claims: Claims,
    headers: &HeaderMap,
    bucket: String,
    doc_id: String,
    query: &std::collections::HashMap<String, String>,
    op: WriteOp,
) -> Result<impl IntoResponse, ApiError> {
    let params = write_params(query)?;
    let wait_applied = match params.wait.as_deref() {
        None => false,
        Some("applied") => true,
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_parameter",
                format!("wait={other:?} is not supported; use wait=applied"),
            ))
        }
    };
    state.limits.check_doc_id(&doc_id)?;
    match &op {
        WriteOp::Set { doc } => state.limits.check_body(doc)?,
        WriteOp::Patch { patch } => state.limits.check_body(patch)?,
        WriteOp::Delete => {}
    }
    let device_id = match write_id_header(headers, "X-Device-Id")? {
        Some(d) => d,
        None => {
            let id = format!("api:{}", claims.sub);
            processors::limits::check_write_id("device_id", &id).map_err(|_| {
                ApiError::bad_request(
                    "invalid_header",
                    "the token's subject does not make a device id (api:<sub> must be 1-256 bytes without control characters): send X-Device-Id",
                )
            })?;
            id
        }
    };
    let client_hlc = match header_str(headers, "x-hlc")? {
        Some(text) => Some(
            text.parse::<Hlc>()
                .map_err(|e| ApiError::bad_request("invalid_header", format!("X-HLC: {e}")))?,
        ),
        None => None,
    };
    // A client's own event id (with its X-HLC and X-Device-Id) makes a retry of the same write a
    // retransmission, which the resolver applies at most once: after a 503 from Kafka the write
    // may have been stored all the same.
    let event_id = match write_id_header(headers, "X-Event-Id")? {
        Some(id) => id,
        None => uuid::Uuid::now_v7().to_string(),
    };
    // Charged only for a write that is sent: a refused one (400) writes nothing.
    if let Some(limiter) = &state.limiter {
        limiter
            .check(crate::ratelimit::Action::Write, &claims.tenant, &claims.sub)
            .await
            .map_err(ApiError::limited)?;
    }
    let hlc = state.clocks.stamp(&claims.tenant, client_hlc, now_ms());
    let write = Write {
        v: processors::write::WRITE_FORMAT_VERSION,
        event_id,
        tenant: claims.tenant.clone(),
        bucket,
        doc_id,
        device_id,
        hlc: Some(hlc),
        base_version: params.base_version,
        op,
    };
    let payload = serde_json::to_vec(&write).map_err(|e| {
        ApiError::bad_request("malformed_json", format!("cannot encode the write: {e}"))
    })?;
    let key = write.bucket_key().to_string();
    // Only the ids are needed from here on: the document (as values, several times the size of
    // its JSON) is not held while Kafka and the view are waited for.
    let write = Write {
        op: WriteOp::Delete,
        ..write
    };
    let pending = match (wait_applied, &state.applied) {
        (false, _) => None,
        (true, None) => {
            return Err(ApiError::Unavailable(
                "wait=applied needs Redis, which this node has not configured".into(),
            ))
        }
        (true, Some(watch)) => Some(
            watch
                .subscribe(&write.tenant, &write.bucket)
                .await
                .map_err(|e| ApiError::backend("Redis (for wait=applied)", e))?,
        ),
    };
    let sent = state.sink.send(&key, &payload).await;
    drop(payload);
    sent.map_err(|e| {
        tracing::warn!(error = %e, bucket = %key, "Kafka did not confirm a write");
        ApiError::Unavailable(
            "the write log (Kafka) did not confirm the write; it may still have been stored: retry with the same X-Event-Id, X-HLC and X-Device-Id to apply it at most once".into(),
        )
    })?;
    tracing::debug!(event_id = %write.event_id, bucket = %key, doc = %write.doc_id, "write accepted");
    let mut body = json!({"event_id": write.event_id, "hlc": hlc.to_string()});
    let Some(pending) = pending else {
        return Ok((StatusCode::ACCEPTED, Json(body)));
    };
    match pending
        .wait(
            crate::applied::WriteRef {
                doc_id: &write.doc_id,
                device_id: &write.device_id,
                event_id: &write.event_id,
            },
            state.reader.as_ref(),
            &write.tenant,
            &write.bucket,
        )
        .await
    {
        Some(event) => {
            body["applied"] = json!(true);
            body["version"] = json!(event.version);
            body["seq"] = json!(event.seq);
            body["deleted"] = json!(event.deleted);
            Ok((StatusCode::OK, Json(body)))
        }
        None => {
            body["applied"] = json!(false);
            body["message"] = json!("accepted, but no applied change was announced in time: the write may have changed nothing visible, or the pipeline is behind");
            Ok((StatusCode::ACCEPTED, Json(body)))
        }
    }
}

async fn put_doc(
    State(state): State<AppState>,
    Path((bucket, id)): Path<(String, String)>,
    Query(query): Query<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<impl IntoResponse, ApiError> {
    // The token is checked before the body is read: a bad token is a 401 whatever the body
    // says, and costs the server no buffering.
    let claims = authorize(&state, &headers, Perm::Write, &bucket).await?;
    let doc = parse_body(&read_body(&state, body, body_limit(&state.limits)).await?)?;
    submit(
        &state,
        claims,
        &headers,
        bucket,
        id,
        &query,
        WriteOp::Set { doc },
    )
    .await
}

async fn patch_doc(
    State(state): State<AppState>,
    Path((bucket, id)): Path<(String, String)>,
    Query(query): Query<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<impl IntoResponse, ApiError> {
    let claims = authorize(&state, &headers, Perm::Write, &bucket).await?;
    let patch = parse_body(&read_body(&state, body, body_limit(&state.limits)).await?)?;
    submit(
        &state,
        claims,
        &headers,
        bucket,
        id,
        &query,
        WriteOp::Patch { patch },
    )
    .await
}

async fn delete_doc(
    State(state): State<AppState>,
    Path((bucket, id)): Path<(String, String)>,
    Query(query): Query<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    let claims = authorize(&state, &headers, Perm::Write, &bucket).await?;
    submit(
        &state,
        claims,
        &headers,
        bucket,
        id,
        &query,
        WriteOp::Delete,
    )
    .await
}

async fn get_doc(
    State(state): State<AppState>,
    Path((bucket, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    let claims = authorize(&state, &headers, Perm::Read, &bucket).await?;
    state.limits.check_doc_id(&id)?;
    let found = state.reader.get(&claims.tenant, &bucket, &id).await?;
    match found {
        Some(d) if !d.deleted => Ok(Json(json!({
            "bucket": d.bucket,
            "id": d.doc_id,
            "version": d.version,
            "seq": d.seq,
            "hlc": d.hlc,
            "doc": d.doc,
        }))),
        _ => Err(ApiError::NotFound(format!(
            "no document {id:?} in bucket {bucket:?}"
        ))),
    }
}

async fn openapi() -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        include_str!("../openapi.json"),
    )
}

/// A position in a bucket's change feed: `<epoch>.<seq>`, or `<epoch>.<seq>.<horizon>` in a read
/// from the start that has not yet passed the tombstone horizon it began under.
///
/// A cursor below the bucket's tombstone horizon is normally stale: deletes after it may have
/// been swept. A read from the start is the exception: the tombstones swept before it began
/// belong to documents it never saw, so its cursors stay good for as long as the horizon has not
/// moved past the one it began under (without that, a bucket whose horizon lay past the first
/// page could never be read from the start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// The bucket's epoch when the cursor was issued.
    pub epoch: i64,
    /// Every change up to this sequence number was delivered.
    pub seq: i64,
    /// The tombstone horizon under which the read from the start began, while `seq` is below it.
    pub began_under: Option<i64>,
}

impl Cursor {
    /// A cursor at `seq` of epoch `epoch`.
    pub fn new(epoch: i64, seq: i64) -> Self {
        Self {
            epoch,
            seq,
            began_under: None,
        }
    }

    /// A cursor at `seq` of a read that began under horizon `began_under` (0: not from the
    /// start); the horizon is kept only while `seq` is below it.
    pub fn within(epoch: i64, seq: i64, began_under: i64) -> Self {
        Self {
            epoch,
            seq,
            began_under: (seq < began_under).then_some(began_under),
        }
    }

    /// Whether a read from this cursor could lack deletes now that the bucket's tombstone horizon
    /// is `horizon`: tombstones after what its reader accounted for were swept (or it names a
    /// horizon the bucket never reached, which no cursor of this API does).
    pub fn stale_under(&self, horizon: i64) -> bool {
        self.seq.max(self.began_under.unwrap_or(0)) < horizon
            || self.began_under.is_some_and(|h| h > horizon)
    }
}

/// The horizon a read from the start begins under, given the bucket's metadata read before its
/// first page: its horizon, if every change up to it is already in the view. While a projector's
/// batch is being written, a tombstone it inserted first may have been swept (raising the
/// horizon) before the same batch's other documents are written, deletes among them: a read
/// beginning then could meet those documents before their delete, with nothing swept after its
/// start to tell it. Then 0: its cursors are plain, and a sweep past them asks for a resync.
pub fn began_under(meta: &crate::view::BucketMeta) -> i64 {
    if meta.horizon_seq <= meta.projected_seq {
        meta.horizon_seq
    } else {
        0
    }
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.began_under {
            None => write!(f, "{}.{}", self.epoch, self.seq),
            Some(h) => write!(f, "{}.{}.{h}", self.epoch, self.seq),
        }
    }
}

impl std::str::FromStr for Cursor {
    type Err = ApiError;
    fn from_str(s: &str) -> Result<Self, ApiError> {
        let bad = || {
            ApiError::bad_request(
                "invalid_cursor",
                format!(
                    "cursor {:?} is not one this API issued (\"<epoch>.<seq>\" or \"<epoch>.<seq>.<horizon>\")",
                    s.chars().take(40).collect::<String>()
                ),
            )
        };
        let digits =
            |t: &str| !t.is_empty() && t.len() <= 18 && t.bytes().all(|b| b.is_ascii_digit());
        let mut parts = s.split('.');
        let mut number = || -> Result<Option<i64>, ApiError> {
            match parts.next() {
                None => Ok(None),
                Some(t) if digits(t) => t.parse().map(Some).map_err(|_| bad()),
                Some(_) => Err(bad()),
            }
        };
        let (epoch, seq, began) = (number()?, number()?, number()?);
        match (epoch, seq, parts.next()) {
            (Some(epoch), Some(seq), None) => Ok(Cursor {
                epoch,
                seq,
                began_under: began.filter(|&h| seq < h),
            }),
            _ => Err(bad()),
        }
    }
}

/// Reads the allowed query parameters; anything else is a 400.
pub(crate) fn params(
    query: &std::collections::HashMap<String, String>,
    allowed: &[&str],
) -> Result<(), ApiError> {
    match query.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(ApiError::bad_request(
            "invalid_parameter",
            format!(
                "unknown query parameter {k:?}; allowed: {}",
                allowed.join(", ")
            ),
        )),
        None => Ok(()),
    }
}

pub(crate) fn page_limit(state: &AppState, raw: Option<&String>) -> Result<usize, ApiError> {
    match raw {
        None => Ok(state.pages.default.min(state.pages.max)),
        Some(text) => match whole_number(text) {
            Some(n) if n >= 1 => Ok(usize::try_from(n)
                .unwrap_or(usize::MAX)
                .min(state.pages.max)),
            _ => Err(ApiError::bad_request(
                "invalid_limit",
                format!(
                    "limit must be a whole number from 1 (pages are capped at {})",
                    state.pages.max
                ),
            )),
        },
    }
}

/// `text` as a whole number, one too large for a `u64` as `u64::MAX` (a limit past any page is
/// capped like any other); `None` when it is not one.
fn whole_number(text: &str) -> Option<u64> {
    match text.parse::<u64>() {
        Ok(n) => Some(n),
        Err(_) if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) => Some(u64::MAX),
        Err(_) => None,
    }
}

async fn known_bucket(
    state: &AppState,
    tenant: &str,
    bucket: &str,
) -> Result<crate::view::BucketMeta, ApiError> {
    state
        .reader
        .bucket_meta(tenant, bucket)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no bucket {bucket:?}")))
}

/// A view document as the API shows it (tombstones without `doc`).
pub fn doc_json(d: &crate::view::ViewDoc) -> Value {
    let mut out = json!({"id": d.doc_id, "version": d.version, "seq": d.seq, "hlc": d.hlc});
    if d.deleted {
        out["deleted"] = json!(true);
    } else {
        out["doc"] = Value::Object(d.doc.clone());
    }
    out
}

async fn list_docs(
    State(state): State<AppState>,
    Path(bucket): Path<String>,
    Query(query): Query<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    let claims = authorize(&state, &headers, Perm::Read, &bucket).await?;
    params(&query, &["after", "limit"])?;
    let limit = page_limit(&state, query.get("limit"))?;
    // An empty `after` is no `after`, as in the bucket listing.
    let after = query
        .get("after")
        .map(String::as_str)
        .filter(|a| !a.is_empty());
    if let Some(after) = after {
        state.limits.check_doc_id(after)?;
    }
    known_bucket(&state, &claims.tenant, &bucket).await?;
    let page = state
        .reader
        .list(&claims.tenant, &bucket, after, limit)
        .await?;
    let next = page
        .more
        .then(|| page.docs.last().map(|d| d.doc_id.clone()))
        .flatten();
    Ok(Json(json!({
        "bucket": bucket,
        "docs": page.docs.iter().map(doc_json).collect::<Vec<_>>(),
        "next": next,
    })))
}

async fn changes(
    State(state): State<AppState>,
    Path(bucket): Path<String>,
    Query(query): Query<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    let claims = authorize(&state, &headers, Perm::Read, &bucket).await?;
    params(&query, &["since", "limit"])?;
    let limit = page_limit(&state, query.get("limit"))?;
    let since = query
        .get("since")
        .map(|s| s.parse::<Cursor>())
        .transpose()?;
    let meta = known_bucket(&state, &claims.tenant, &bucket).await?;
    let (from, began_under) = match since {
        None => (0, self::began_under(&meta)),
        Some(c) if c.epoch != meta.epoch => {
            return Err(ApiError::ResyncRequired(format!(
                "cursor {c} belongs to epoch {}, the bucket is at epoch {}: read the bucket again from the start",
                c.epoch, meta.epoch
            )))
        }
        Some(c) if c.stale_under(meta.horizon_seq) => {
            return Err(ApiError::ResyncRequired(format!(
                "cursor {c} is outside the retained history (tombstones before sequence {} were swept): read the bucket again from the start",
                meta.horizon_seq
            )))
        }
        Some(c) if c.seq > meta.projected_seq => {
            // A live (WebSocket) cursor runs ahead of the view by the changes being written:
            // nothing to read yet, come back with the same cursor. Only a cursor past every
            // change announced for the bucket is not one this server gave out.
            let announced = match &state.hub {
                Some(hub) => hub.announced(&claims.tenant, &bucket).await,
                None => Some(meta.projected_seq),
            };
            if announced.is_some_and(|a| c.seq > a) {
                return Err(ApiError::ResyncRequired(format!(
                    "cursor {c} is past every change of this bucket (sequence {}): read the bucket again from the start",
                    announced.unwrap_or_default()
                )));
            }
            return Ok(Json(json!({
                "bucket": bucket,
                "changes": [],
                "next": c.to_string(),
                "more": false,
            })));
        }
        Some(c) => (c.seq, c.began_under.unwrap_or(0)),
    };
    let crate::view::DocPage { docs, more } = state
        .reader
        .changes(&claims.tenant, &bucket, from, meta.projected_seq, limit)
        .await?;
    // A tombstone sweep between the two reads may have removed deletes this page should hold
    // (it raises the horizon first, so reading it again after the page tells).
    if from > 0 {
        let now = known_bucket(&state, &claims.tenant, &bucket).await?;
        if now.horizon_seq > from.max(began_under) {
            return Err(ApiError::ResyncRequired(format!(
                "tombstones after cursor {from} were swept while this page was read (horizon {}): read the bucket again from the start",
                now.horizon_seq
            )));
        }
    }
    let next_seq = if more {
        docs.last().map_or(from, |d| d.seq)
    } else {
        meta.projected_seq
    };
    Ok(Json(json!({
        "bucket": bucket,
        "changes": docs.iter().map(doc_json).collect::<Vec<_>>(),
        "next": Cursor::within(meta.epoch, next_seq, began_under).to_string(),
        "more": more,
    })))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use futures::future::BoxFuture;

    use super::*;
    use crate::view::{BucketMeta, DocPage, DocReader, ViewDoc, ViewError};

    /// A bucket whose tombstone horizon moves to `swept` after its first metadata read, as when
    /// the sweeper runs while a request reads its page (whose tombstones are then gone).
    pub(crate) struct Sweeping {
        metas: AtomicUsize,
        swept: i64,
        /// How long a listing takes.
        pub(crate) list_delay: std::time::Duration,
    }

    impl Sweeping {
        pub(crate) fn to(swept: i64) -> Self {
            Self {
                metas: AtomicUsize::new(0),
                swept,
                list_delay: std::time::Duration::ZERO,
            }
        }
    }

    impl DocReader for Sweeping {
        fn get<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
            _: &'a str,
        ) -> BoxFuture<'a, Result<Option<ViewDoc>, ViewError>> {
            Box::pin(async { Ok(None) })
        }
        fn bucket_meta<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
        ) -> BoxFuture<'a, Result<Option<BucketMeta>, ViewError>> {
            let first = self.metas.fetch_add(1, Ordering::SeqCst) == 0;
            let horizon_seq = if first { 0 } else { self.swept };
            Box::pin(async move {
                Ok(Some(BucketMeta {
                    projected_seq: 50,
                    horizon_seq,
                    epoch: 1,
                }))
            })
        }
        fn bucket_names<'a>(
            &'a self,
            _: &'a str,
            _: Option<&'a str>,
            _: usize,
            _: Option<&'a [String]>,
        ) -> BoxFuture<'a, Result<Vec<String>, ViewError>> {
            Box::pin(async { Ok(Vec::new()) })
        }
        fn list<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
            _: Option<&'a str>,
            _: usize,
        ) -> BoxFuture<'a, Result<DocPage, ViewError>> {
            Box::pin(async {
                tokio::time::sleep(self.list_delay).await;
                Ok(DocPage {
                    docs: Vec::new(),
                    more: false,
                })
            })
        }
        fn changes<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
            _: i64,
            _: i64,
            _: usize,
        ) -> BoxFuture<'a, Result<DocPage, ViewError>> {
            Box::pin(async {
                Ok(DocPage {
                    docs: Vec::new(),
                    more: false,
                })
            })
        }
    }

    struct NoSink;

    impl crate::sink::WriteSink for NoSink {
        fn send<'a>(
            &'a self,
            _: &'a str,
            _: &'a [u8],
        ) -> BoxFuture<'a, Result<(), crate::sink::SinkError>> {
            Box::pin(async { Ok(()) })
        }
    }

    /// An API state over `reader` alone (no Redis, no accounts: development tokens).
    pub(crate) fn state(reader: impl DocReader) -> AppState {
        let auth = crate::auth::AuthConfig {
            jwt_secret: "0123456789abcdef0123456789abcdef".into(),
            ..Default::default()
        };
        AppState {
            keys: crate::auth::TokenKeys::new(&auth).unwrap(),
            sink: Arc::new(NoSink),
            reader: Arc::new(reader),
            limits: processors::Limits::default(),
            clocks: Default::default(),
            pages: crate::PageLimits::from(&crate::ApiConfig::default()),
            body_deadline: crate::ApiConfig::default().server_limits().idle_timeout,
            hub: None,
            ws: crate::ws::WsConfig::default(),
            connections: Default::default(),
            applied: None,
            checkpoints: None,
            accounts: None,
            limiter: None,
            status: Arc::new(|| json!({})),
        }
    }

    /// A development token of tenant `acme` with `grants` (like `b:r`), signed with `st`'s key.
    pub(crate) fn token(st: &AppState, grants: &str) -> String {
        let grants = crate::auth::parse_grants(grants).unwrap();
        st.keys.mint("t", "acme", grants, now_ms() / 1000, 60)
    }

    async fn read_changes(swept: i64, since: &str) -> Result<(), ApiError> {
        let st = state(Sweeping::to(swept));
        let token = token(&st, "b:r");
        let mut headers = HeaderMap::new();
        headers.insert(
            axum::http::header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        let query = [("since".to_string(), since.to_string())].into();
        changes(State(st), Path("b".into()), Query(query), headers)
            .await
            .map(|_| ())
    }

    #[tokio::test]
    async fn errors_axum_answers_itself_are_json_too() {
        use tower::ServiceExt;
        let st = state(Sweeping::to(0));
        let token = token(&st, "*:rw");
        let app = router(st);
        for (method, uri, status, code) in [
            ("GET", "/v1/buckets/%FF/docs/a", 400, "bad_request"),
            ("GET", "/v1/nothing-here", 404, "not_found"),
            ("POST", "/v1/buckets/b/docs/a", 405, "method_not_allowed"),
        ] {
            let request = axum::http::Request::builder()
                .method(method)
                .uri(uri)
                .header("authorization", format!("Bearer {token}"))
                .body(axum::body::Body::empty())
                .unwrap();
            let response = app.clone().oneshot(request).await.unwrap();
            assert_eq!(response.status().as_u16(), status, "{method} {uri}");
            let body = axum::body::to_bytes(response.into_body(), 1 << 16)
                .await
                .unwrap();
            let body: Value = serde_json::from_slice(&body).expect("a JSON body");
            assert_eq!(body["error"]["code"], code, "{method} {uri}: {body}");
            assert!(
                body["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()),
                "{body}"
            );
        }
    }

    /// Keeps what it is sent.
    #[derive(Default)]
    struct Recording(Mutex<Vec<Vec<u8>>>);

    impl crate::sink::WriteSink for Arc<Recording> {
        fn send<'a>(
            &'a self,
            _: &'a str,
            payload: &'a [u8],
        ) -> BoxFuture<'a, Result<(), crate::sink::SinkError>> {
            self.0.lock().unwrap().push(payload.to_vec());
            Box::pin(async { Ok(()) })
        }
    }

    #[tokio::test]
    async fn a_client_may_name_its_write_so_that_a_retry_is_the_same_write() {
        use tower::ServiceExt;
        let sent = Arc::new(Recording::default());
        let mut st = state(Sweeping::to(0));
        st.sink = Arc::new(sent.clone());
        let token = token(&st, "b:rw");
        let app = router(st);
        let put = |event_id: Option<&str>| {
            let mut request = axum::http::Request::builder()
                .method("PUT")
                .uri("/v1/buckets/b/docs/a")
                .header("authorization", format!("Bearer {token}"))
                .header("content-type", "application/json")
                .header("x-hlc", "1800000000000:3")
                .header("x-device-id", "phone");
            if let Some(id) = event_id {
                request = request.header("x-event-id", id);
            }
            request.body(axum::body::Body::from(r#"{"x":1}"#)).unwrap()
        };
        for _ in 0..2 {
            let response = app.clone().oneshot(put(Some("w-1"))).await.unwrap();
            assert_eq!(response.status().as_u16(), 202);
        }
        let response = app.clone().oneshot(put(None)).await.unwrap();
        assert_eq!(response.status().as_u16(), 202);
        let response = app.clone().oneshot(put(Some("a\tb"))).await.unwrap();
        assert_eq!(response.status().as_u16(), 400);
        let sent: Vec<Value> = (sent.0.lock().unwrap().iter())
            .map(|p| serde_json::from_slice(p).unwrap())
            .collect();
        assert_eq!(sent.len(), 3, "the refused one was not sent");
        // The retry is the same write, byte for byte; without a name, each is another write.
        assert_eq!(sent[0], sent[1]);
        assert_eq!(sent[0]["event_id"], "w-1");
        assert_ne!(sent[2]["event_id"], "w-1");
    }

    #[test]
    fn a_page_limit_is_any_whole_number_from_one_capped() {
        let st = state(Sweeping::to(0));
        let limit = |text: &str| page_limit(&st, Some(&text.to_string())).ok();
        assert_eq!(limit("1"), Some(1));
        assert_eq!(limit("18446744073709551615"), Some(st.pages.max));
        assert_eq!(limit("99999999999999999999999"), Some(st.pages.max));
        for refused in ["0", "000", "-1", "", "1.5", "ten", "1e3", " 5"] {
            assert_eq!(limit(refused), None, "{refused:?}");
        }
        assert_eq!(
            page_limit(&st, None).ok(),
            Some(st.pages.default.min(st.pages.max))
        );
    }

    #[tokio::test]
    async fn listing_a_bucket_takes_an_empty_after_and_a_huge_limit() {
        use tower::ServiceExt;
        let st = state(Sweeping::to(0));
        let token = token(&st, "b:r");
        let app = router(st);
        for query in ["after=", "after=&limit=99999999999999999999", "limit=5"] {
            let request = axum::http::Request::builder()
                .uri(format!("/v1/buckets/b/docs?{query}"))
                .header("authorization", format!("Bearer {token}"))
                .body(axum::body::Body::empty())
                .unwrap();
            let response = app.clone().oneshot(request).await.unwrap();
            assert_eq!(response.status().as_u16(), 200, "{query}");
        }
    }

    #[tokio::test]
    async fn a_device_id_the_resolver_would_refuse_is_refused_here() {
        use tower::ServiceExt;
        let st = state(Sweeping::to(0));
        let token = token(&st, "b:rw");
        let app = router(st);
        let long = "d".repeat(257);
        for (device, status, why) in [
            (Some("phone-1".as_bytes()), 202, ""),
            (None, 202, ""),
            (Some("téléphone".as_bytes()), 202, ""),
            (Some(b"\xfftel".as_slice()), 400, "not UTF-8"),
            (Some(b"a\tb".as_slice()), 400, "control characters"),
            (Some(long.as_bytes()), 400, "control characters"),
            (Some(b"".as_slice()), 400, "control characters"),
        ] {
            let mut request = axum::http::Request::builder()
                .method("PUT")
                .uri("/v1/buckets/b/docs/a")
                .header("authorization", format!("Bearer {token}"))
                .header("content-type", "application/json");
            if let Some(d) = device {
                let value = axum::http::HeaderValue::from_bytes(d).unwrap();
                request = request.header("x-device-id", value);
            }
            let request = request.body(axum::body::Body::from(r#"{"x":1}"#)).unwrap();
            let response = app.clone().oneshot(request).await.unwrap();
            assert_eq!(response.status().as_u16(), status, "{device:?}");
            if status == 400 {
                let body = axum::body::to_bytes(response.into_body(), 1 << 16)
                    .await
                    .unwrap();
                let body: Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(body["error"]["code"], "invalid_header", "{body}");
                assert!(
                    body["error"]["message"]
                        .as_str()
                        .is_some_and(|m| m.contains(why)),
                    "{body}"
                );
            }
        }
    }

    #[test]
    fn a_cursor_of_a_read_from_the_start_keeps_its_horizon_until_it_passes_it() {
        let c: Cursor = "1.6.9".parse().unwrap();
        assert_eq!(c, Cursor::within(1, 6, 9));
        assert_eq!(c.to_string(), "1.6.9");
        // Good while the horizon stays where the read began; stale once it moves on.
        assert!(!c.stale_under(9));
        assert!(c.stale_under(10));
        // A horizon the bucket never reached is not one this API gave out.
        assert!("1.6.12".parse::<Cursor>().unwrap().stale_under(9));
        // Past its horizon the cursor is a plain one again.
        assert_eq!(Cursor::within(1, 9, 9).to_string(), "1.9");
        assert_eq!("1.9.9".parse::<Cursor>().unwrap(), Cursor::new(1, 9));
        let plain: Cursor = "3.42".parse().unwrap();
        assert_eq!(plain, Cursor::new(3, 42));
        assert!(plain.stale_under(43) && !plain.stale_under(42));
        for bad in [
            "", "1", "1.", ".1", "1.2.", "1.2.3.4", "1.x", "1.2.y", "-1.2",
        ] {
            assert!(bad.parse::<Cursor>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        let with = |value: &str| {
            let mut h = HeaderMap::new();
            h.insert(axum::http::header::AUTHORIZATION, value.parse().unwrap());
            bearer(&h).map(str::to_owned)
        };
        for value in ["Bearer abc", "bearer abc", "BEARER  abc "] {
            assert_eq!(with(value).as_deref(), Some("abc"), "{value}");
        }
        for value in ["Basic abc", "Bearerabc", "abc"] {
            assert_eq!(with(value), None, "{value}");
        }
        assert_eq!(bearer(&HeaderMap::new()), None);
    }

    #[tokio::test]
    async fn a_page_read_while_tombstones_are_swept_asks_for_a_resync() {
        let swept = read_changes(20, "1.10").await;
        assert!(
            matches!(&swept, Err(ApiError::ResyncRequired(m)) if m.contains("swept while")),
            "{swept:?}"
        );
        // The same read with no sweep, or one that swept only what the cursor had passed.
        read_changes(0, "1.10").await.unwrap();
        read_changes(10, "1.10").await.unwrap();
    }

    /// The message types a WebSocket subscription to `b` from cursor `1.10` receives up to its
    /// first complete page, on a bucket swept to `swept` while the catch-up read its pages.
    async fn ws_catch_up(swept: i64) -> Vec<String> {
        let messages = ws_until_complete(Sweeping::to(swept), Some("1.10")).await;
        let kind = |m: &Value| m["type"].as_str().unwrap_or_default().to_owned();
        messages.iter().map(kind).collect()
    }

    /// The messages a WebSocket subscription to `b` (from `cursor`) over `reader` receives up to
    /// its first complete page (at most 10 s between two).
    async fn ws_until_complete(reader: impl DocReader, cursor: Option<&str>) -> Vec<Value> {
        use futures::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};
        let mut st = state(reader);
        // Nothing listens on port 1: the hub keeps retrying, and cannot read announced marks.
        st.hub = Some(
            crate::fanout::Hub::start(
                "redis://127.0.0.1:1/",
                "t:",
                crate::fanout::HubQueues::counts(8, 64),
            )
            .unwrap(),
        );
        let token = token(&st, "b:r");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, router(st)).await });
        let mut req = format!("ws://{addr}/v1/subscribe")
            .into_client_request()
            .unwrap();
        let bearer = format!("Bearer {token}").parse().unwrap();
        req.headers_mut().insert("authorization", bearer);
        let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        let subscribe = json!({"type": "subscribe", "bucket": "b", "cursor": cursor});
        ws.send(Message::Text(subscribe.to_string().into()))
            .await
            .unwrap();
        let mut messages = Vec::new();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let msg = match tokio::time::timeout_at(deadline, ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => serde_json::from_str::<Value>(&t).unwrap(),
                Ok(Some(Ok(_))) => continue,
                other => panic!(
                    "no complete page: {other:?} after {} messages",
                    messages.len()
                ),
            };
            let complete = msg["type"] == "docs" && msg["complete"] == true;
            messages.push(msg);
            if complete {
                server.abort();
                return messages;
            }
        }
    }

    /// A bucket of 300 documents at sequence numbers 1 to 300 (the watermark), each of which
    /// changes again right after any read returns it, as in a bucket written as fast as it is
    /// read.
    struct Churning {
        docs: Mutex<Vec<ViewDoc>>,
    }

    impl Churning {
        fn new() -> Self {
            let doc = |n: i64| ViewDoc {
                id: format!("b/d{n}"),
                bucket: "b".into(),
                doc_id: format!("d{n}"),
                doc: serde_json::Map::new(),
                version: 1,
                seq: n,
                hlc: String::new(),
                deleted: false,
                deleted_at_ms: None,
            };
            Churning {
                docs: Mutex::new((1..=300).map(doc).collect()),
            }
        }

        /// The documents `pick` selects, as they are now; each then changes.
        fn read(&self, pick: impl Fn(&ViewDoc) -> bool) -> Vec<ViewDoc> {
            let mut docs = self.docs.lock().unwrap();
            let mut next = docs.iter().map(|d| d.seq).max().unwrap_or(0);
            let mut out = Vec::new();
            for d in docs.iter_mut().filter(|d| pick(d)) {
                out.push(d.clone());
                next += 1;
                (d.seq, d.version) = (next, d.version + 1);
            }
            out.sort_by_key(|d| d.seq);
            out
        }
    }

    impl DocReader for Churning {
        fn get<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
            doc_id: &'a str,
        ) -> BoxFuture<'a, Result<Option<ViewDoc>, ViewError>> {
            Box::pin(async move { Ok(self.read(|d| d.doc_id == doc_id).pop()) })
        }
        fn bucket_meta<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
        ) -> BoxFuture<'a, Result<Option<BucketMeta>, ViewError>> {
            Box::pin(async {
                Ok(Some(BucketMeta {
                    projected_seq: 300,
                    horizon_seq: 0,
                    epoch: 1,
                }))
            })
        }
        fn bucket_names<'a>(
            &'a self,
            _: &'a str,
            _: Option<&'a str>,
            _: usize,
            _: Option<&'a [String]>,
        ) -> BoxFuture<'a, Result<Vec<String>, ViewError>> {
            Box::pin(async { Ok(vec!["b".into()]) })
        }
        fn list<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
            _: Option<&'a str>,
            _: usize,
        ) -> BoxFuture<'a, Result<DocPage, ViewError>> {
            Box::pin(async {
                Ok(DocPage {
                    docs: Vec::new(),
                    more: false,
                })
            })
        }
        fn changes<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
            since: i64,
            upto: i64,
            limit: usize,
        ) -> BoxFuture<'a, Result<DocPage, ViewError>> {
            Box::pin(async move {
                let mut page = self.read(|d| d.seq > since && d.seq <= upto);
                // Only the page read changes: the ones after it were not returned.
                let unread = page.split_off(limit.min(page.len()));
                let mut docs = self.docs.lock().unwrap();
                for u in &unread {
                    if let Some(d) = docs.iter_mut().find(|d| d.doc_id == u.doc_id) {
                        (d.seq, d.version) = (u.seq, u.version);
                    }
                }
                let more = page.len() == limit;
                Ok(DocPage { docs: page, more })
            })
        }
    }

    #[tokio::test]
    async fn a_snapshot_of_a_bucket_that_keeps_changing_completes_with_every_document() {
        let messages = ws_until_complete(Churning::new(), None).await;
        let mut seen = std::collections::BTreeSet::new();
        for m in messages.iter().filter(|m| m["type"] == "docs") {
            for d in m["docs"].as_array().unwrap() {
                seen.insert(d["id"].as_str().unwrap().to_owned());
            }
        }
        assert_eq!(seen.len(), 300, "{} messages", messages.len());
        let last = messages.last().unwrap();
        assert_eq!(last["cursor"], "1.300", "{last}");
    }

    #[tokio::test]
    async fn a_websocket_catch_up_during_a_sweep_resets_and_sends_a_full_snapshot() {
        let kinds = ws_catch_up(20).await;
        let reset = kinds.iter().position(|k| k == "reset");
        assert!(reset.is_some(), "no reset: {kinds:?}");
        assert_eq!(kinds.last().map(String::as_str), Some("docs"), "{kinds:?}");
        // No sweep, or one that swept only what the cursor had passed: no reset.
        for swept in [0, 10] {
            let kinds = ws_catch_up(swept).await;
            assert!(!kinds.iter().any(|k| k == "reset"), "{swept}: {kinds:?}");
        }
    }

    /// The routes `router` declares, read from this file's source: `(path, method)` pairs.
    fn declared_routes() -> std::collections::BTreeSet<(String, String)> {
        let src = include_str!("routes.rs");
        let body = src
            .split_once("pub fn router(")
            .and_then(|(_, rest)| rest.split_once(".layer("))
            .map(|(body, _)| body)
            .expect("the router function");
        let mut routes = std::collections::BTreeSet::new();
        for call in body.split(".route(").skip(1) {
            let path = call.split('"').nth(1).expect("a path literal");
            // Methods are `get(…)` first, then `.put(…)` and so on: a method name right after
            // whitespace, a comma or a dot, followed by `(`.
            let rest = &call[call.find(path).expect("the path") + path.len()..];
            let mut found = false;
            for method in ["get", "post", "put", "patch", "delete"] {
                let at = |prefix: &str| rest.contains(&format!("{prefix}{method}("));
                if at(".") || at(" ") || at("\n") {
                    routes.insert((path.to_owned(), method.to_owned()));
                    found = true;
                }
            }
            assert!(found, "no method found for {path}");
        }
        routes
    }

    /// openapi.json describes exactly the routes the router serves, method by method.
    #[test]
    fn the_openapi_document_matches_the_routes() {
        let spec: Value = serde_json::from_str(include_str!("../openapi.json")).expect("JSON");
        let mut described = std::collections::BTreeSet::new();
        for (path, ops) in spec["paths"].as_object().expect("paths") {
            for method in ops.as_object().expect("operations").keys() {
                described.insert((path.clone(), method.clone()));
            }
        }
        let declared = declared_routes();
        assert!(declared.len() > 20, "the source parse found {declared:?}");
        let undocumented: Vec<_> = declared.difference(&described).collect();
        let unrouted: Vec<_> = described.difference(&declared).collect();
        assert!(
            undocumented.is_empty() && unrouted.is_empty(),
            "routed but not in openapi.json: {undocumented:?}; in openapi.json but not routed: {unrouted:?}"
        );
    }
}
