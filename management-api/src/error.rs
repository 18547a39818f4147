//! API errors and their JSON form, `{"error": {"code": N, "message": "..."}}`, with OWT's
//! numeric codes so OWT clients that switch on them keep working.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};

/// Everything a management API request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Missing or wrong credentials (401, code 1101).
    #[error("{0}")]
    Unauthorized(String),
    /// Unknown room (404, code 1003).
    #[error("Room not found: {0}")]
    RoomNotFound(String),
    /// Unknown stream (404, code 1004).
    #[error("Stream not found: {0}")]
    StreamNotFound(String),
    /// Unknown participant (404, code 1005).
    #[error("Participant not found: {0}")]
    ParticipantNotFound(String),
    /// Unknown route (404, code 1001).
    #[error("Resource not found: {0}")]
    NotFound(String),
    /// Invalid body or parameter (400, code 1201); the message names the field.
    #[error("{0}")]
    BadRequest(String),
    /// Body larger than allowed (413, code 1202).
    #[error("{0}")]
    TooLarge(String),
    /// Conflicts with existing state (409, code 1203).
    #[error("{0}")]
    Conflict(String),
    /// Server-side failure (500, code 2001).
    #[error("{0}")]
    Internal(String),
    /// Something the request needs is unreachable for now, e.g. the cluster's NATS (503, code 2002).
    #[error("{0}")]
    Unavailable(String),
    /// An OWT route Tessera does not serve (501, code 1301): the message says what instead.
    #[error("{0}")]
    NotServed(String),
}

impl ApiError {
    /// OWT's numeric error code (Tessera adds 1202, 1203 and 1301 for 413, 409 and 501).
    pub fn code(&self) -> u32 {
        match self {
            ApiError::Unauthorized(_) => 1101,
            ApiError::NotFound(_) => 1001,
            ApiError::RoomNotFound(_) => 1003,
            ApiError::StreamNotFound(_) => 1004,
            ApiError::ParticipantNotFound(_) => 1005,
            ApiError::BadRequest(_) => 1201,
            ApiError::TooLarge(_) => 1202,
            ApiError::Conflict(_) => 1203,
            ApiError::Internal(_) => 2001,
            ApiError::Unavailable(_) => 2002,
            ApiError::NotServed(_) => 1301,
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::RoomNotFound(_) | ApiError::StreamNotFound(_) | ApiError::ParticipantNotFound(_) | ApiError::NotFound(_) => {
                StatusCode::NOT_FOUND
            }
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::NotServed(_) => StatusCode::NOT_IMPLEMENTED,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut res = HttpResponse::build(self.status_code());
        if matches!(self, ApiError::Unauthorized(_)) {
            res.insert_header(("WWW-Authenticate", "Bearer, MAuth realm=\"tessera\""));
        }
        res.json(serde_json::json!({"error": {"code": self.code(), "message": self.to_string()}}))
    }
}

impl From<tessera_core::StoreError> for ApiError {
    fn from(e: tessera_core::StoreError) -> Self {
        use tessera_core::StoreError as S;
        match e {
            S::NotFound(id) => ApiError::RoomNotFound(id),
            S::Conflict(m) => ApiError::Conflict(m),
            S::Unavailable(m) => ApiError::Unavailable(m),
            other => {
                tracing::error!(error = ?other.to_string(), "room store failure");
                ApiError::Internal(other.to_string())
            }
        }
    }
}

impl From<tessera_core::RoomError> for ApiError {
    fn from(e: tessera_core::RoomError) -> Self {
        ApiError::BadRequest(format!("Invalid room option: {e}"))
    }
}

impl From<tessera_core::ControlError> for ApiError {
    fn from(e: tessera_core::ControlError) -> Self {
        use tessera_core::ControlError as C;
        match e {
            C::ParticipantNotFound(id) => ApiError::ParticipantNotFound(id),
            C::StreamNotFound(id) => ApiError::StreamNotFound(id),
            C::BadRequest(m) => ApiError::BadRequest(m),
            C::Failed(m) => ApiError::Internal(m),
            C::Unavailable(m) => ApiError::Unavailable(m),
        }
    }
}
