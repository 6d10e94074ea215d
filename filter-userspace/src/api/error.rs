//! The API's error answer ([`ApiError`]: a status and `{"error": "..."}`), what a dataplane
//! failure becomes (logged in full, answered without internals), and the parse of a JSON body
//! into a 400 that names the problem.

use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::dataplane::DataplaneError;

/// An error answer: a status and a JSON body `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<DataplaneError> for ApiError {
    fn from(e: DataplaneError) -> Self {
        if let DataplaneError::NoPrefixMaps = e {
            return bad_request(e.to_string());
        }
        // Logged in full; the client gets no internals.
        tracing::error!(error = %e, "dataplane update failed; the policy in force is unchanged");
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the kernel maps could not be updated; the policy in force is unchanged".into(),
        )
    }
}

pub(super) fn bad_request(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

pub(super) fn parse_json<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| bad_request(format!("invalid JSON body: {e}")))
}
