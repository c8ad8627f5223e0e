//! REST handlers: writes become `data.changed` events; reads come from the MongoDB view.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use processors::limits::check_bucket;
use processors::{Hlc, Write, WriteOp};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::auth::{AuthError, Claims, Perm};
use crate::error::ApiError;
use crate::AppState;

/// The REST routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route(
            "/v1/buckets/{bucket}/docs/{id}",
            get(get_doc)
                .put(put_doc)
                .patch(patch_doc)
                .delete(delete_doc),
        )
        .layer(axum::extract::DefaultBodyLimit::max(
            state.limits.max_doc_bytes.saturating_mul(2).max(64 * 1024),
        ))
        .with_state(state)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Verifies the bearer token and the grant for `perm` on `bucket`.
fn authorize(
    state: &AppState,
    headers: &HeaderMap,
    perm: Perm,
    bucket: &str,
) -> Result<Claims, ApiError> {
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(AuthError::Missing)
        .map_err(|e| ApiError::Unauthorized(e.to_string()))?;
    let claims = state
        .keys
        .verify(token.trim())
        .map_err(|e| ApiError::Unauthorized(e.to_string()))?;
    check_bucket(bucket).map_err(ApiError::from)?;
    if !claims.allows(perm, bucket) {
        let what = match perm {
            Perm::Read => "read",
            Perm::Write => "write",
            Perm::Admin => "admin",
        };
        return Err(ApiError::Forbidden(format!(
            "the token does not grant {what} on bucket {bucket:?}"
        )));
    }
    Ok(claims)
}

/// Query parameters of writes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteParams {
    /// The document version the writer last saw (enables stale-write conflict reports).
    pub base_version: Option<u64>,
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
    headers: &HeaderMap,
    bucket: String,
    doc_id: String,
    params: WriteParams,
    op: WriteOp,
) -> Result<impl IntoResponse, ApiError> {
    let claims = authorize(state, headers, Perm::Write, &bucket)?;
    state.limits.check_doc_id(&doc_id)?;
    match &op {
        WriteOp::Set { doc } => state.limits.check_body(doc)?,
        WriteOp::Patch { patch } => state.limits.check_body(patch)?,
        WriteOp::Delete => {}
    }
    let device_id = match header_str(headers, "x-device-id")? {
        Some(d) if !d.is_empty() && d.len() <= 256 => d.to_owned(),
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_header",
                "X-Device-Id must be 1-256 characters",
            ))
        }
        None => format!("api:{}", claims.sub),
    };
    let hlc = {
        let client = match header_str(headers, "x-hlc")? {
            Some(text) => Some(
                text.parse::<Hlc>()
                    .map_err(|e| ApiError::bad_request("invalid_header", format!("X-HLC: {e}")))?,
            ),
            None => None,
        };
        let mut clock = state.clock.lock().unwrap_or_else(|p| p.into_inner());
        match client {
            Some(h) => {
                clock.observe(h, now_ms());
                h
            }
            None => clock.tick(now_ms()),
        }
    };
    let write = Write {
        v: processors::write::WRITE_FORMAT_VERSION,
        event_id: uuid::Uuid::now_v7().to_string(),
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
    state
        .sink
        .send(&key, &payload)
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    tracing::debug!(event_id = %write.event_id, bucket = %key, doc = %write.doc_id, "write accepted");
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"event_id": write.event_id, "hlc": hlc.to_string()})),
    ))
}

async fn put_doc(
    State(state): State<AppState>,
    Path((bucket, id)): Path<(String, String)>,
    Query(params): Query<WriteParams>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    authorize(&state, &headers, Perm::Write, &bucket)?;
    let doc = parse_body(&body)?;
    submit(&state, &headers, bucket, id, params, WriteOp::Set { doc }).await
}

async fn patch_doc(
    State(state): State<AppState>,
    Path((bucket, id)): Path<(String, String)>,
    Query(params): Query<WriteParams>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    authorize(&state, &headers, Perm::Write, &bucket)?;
    let patch = parse_body(&body)?;
    submit(
        &state,
        &headers,
        bucket,
        id,
        params,
        WriteOp::Patch { patch },
    )
    .await
}

async fn delete_doc(
    State(state): State<AppState>,
    Path((bucket, id)): Path<(String, String)>,
    Query(params): Query<WriteParams>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    submit(&state, &headers, bucket, id, params, WriteOp::Delete).await
}

async fn get_doc(
    State(state): State<AppState>,
    Path((bucket, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    let claims = authorize(&state, &headers, Perm::Read, &bucket)?;
    state.limits.check_doc_id(&id)?;
    let found = state
        .reader
        .get(&claims.tenant, &bucket, &id)
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
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
