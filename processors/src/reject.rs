//! Why a write was refused: a machine-readable code plus a human sentence.

use serde::{Deserialize, Serialize};

/// Machine-readable reasons a write is rejected (the `reason` field of `data.rejected`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectCode {
    /// The record is not valid JSON, or not a JSON object.
    MalformedJson,
    /// The event's schema version `v` is missing or not supported.
    UnsupportedVersion,
    /// A required field is missing or has the wrong type.
    InvalidEvent,
    /// Tenant, bucket or document id breaks the naming rules.
    InvalidId,
    /// The record key does not match the event's `tenant/bucket`.
    KeyMismatch,
    /// The document or patch is larger than the configured limit.
    TooLarge,
    /// Objects are nested deeper than the configured limit.
    TooDeep,
    /// The document has more fields (leaves) than the configured limit.
    TooManyFields,
    /// A field name breaks the key rules (empty, `.`, leading `$`, NUL, too long).
    InvalidFieldName,
    /// A value cannot be stored (for example an array inside an array).
    InvalidValue,
}

impl RejectCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectCode::MalformedJson => "malformed_json",
            RejectCode::UnsupportedVersion => "unsupported_version",
            RejectCode::InvalidEvent => "invalid_event",
            RejectCode::InvalidId => "invalid_id",
            RejectCode::KeyMismatch => "key_mismatch",
            RejectCode::TooLarge => "too_large",
            RejectCode::TooDeep => "too_deep",
            RejectCode::TooManyFields => "too_many_fields",
            RejectCode::InvalidFieldName => "invalid_field_name",
            RejectCode::InvalidValue => "invalid_value",
        }
    }
}

/// A refused write: the code and a sentence saying exactly what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{} ({message})", code.as_str())]
pub struct Rejection {
    /// Machine-readable reason.
    pub code: RejectCode,
    /// What is wrong, for people.
    pub message: String,
}

impl Rejection {
    /// A rejection with the given code and message.
    pub fn new(code: RejectCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}
