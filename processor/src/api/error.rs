//! The API's one error type and its HTTP rendering.
//!
//! Invariants: each variant has a stable `error` code that clients may branch on; the cause of a
//! 5xx is logged once, here, when the response is built, and is never sent to the client.

use std::time::Duration;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::auth::AuthError;
use crate::stripe::StripeError;

type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything an API route can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Missing, malformed, expired or wrongly signed credentials.
    #[error("{0}")]
    Unauthorized(String),
    /// The resource does not exist, or belongs to another user (never 403: that would confirm
    /// that it exists).
    #[error("{0}")]
    NotFound(String),
    /// The caller may not act for what they named (an organisation they do not bill for).
    #[error("{0}")]
    Forbidden(String),
    /// The user already holds what they are trying to buy.
    #[error("you already have this entitlement")]
    AlreadyEntitled,
    /// The user has no Stripe customer yet (never bought anything).
    #[error("no billing account exists for this user")]
    NoBillingAccount,
    /// Too many requests; `retry_after` becomes a `Retry-After` header.
    #[error("too many requests, try again later")]
    RateLimited { retry_after: Option<Duration> },
    /// The product key is not in the catalog.
    #[error("unknown product {0:?}")]
    UnknownProduct(String),
    /// The request is malformed (bad JSON, bad query parameter, …).
    #[error("{0}")]
    BadRequest(String),
    /// The request body is larger than `API_MAX_BODY_BYTES`.
    #[error("the request body is too large")]
    PayloadTooLarge,
    /// A dependency the route must not run without (e.g. Redis for restore's rate limit) is
    /// down; `retry_after` becomes a `Retry-After` header.
    #[error("temporarily unavailable, try again later")]
    Unavailable { retry_after: Duration },
    /// Stripe failed or could not be reached; the cause is logged, the client gets a generic text.
    #[error("the payment provider is unavailable, try again later")]
    StripeUnavailable(#[source] StripeError),
    /// A request field fails validation (422 `validation_failed`, with `field`).
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// The product is free: there is nothing to check out (422 `free_product`).
    #[error("product {0:?} is free; there is nothing to pay")]
    FreeProduct(String),
    /// The change would break what existing customers rely on (409, with its own code).
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    /// A feature this deployment has not configured (e.g. no Stripe key or no return URLs).
    #[error("this feature is not configured")]
    NotConfigured(&'static str),
    /// Anything else; the cause is logged, the client gets a generic text.
    #[error("internal error")]
    Internal(#[source] Cause),
}

/// `Retry-After` of a 503 answered while Postgres is unavailable.
pub const DATABASE_RETRY_AFTER: Duration = Duration::from_secs(5);

impl ApiError {
    /// Wraps any error as an internal error (500).
    pub fn internal(cause: impl Into<Cause>) -> Self {
        Self::Internal(cause.into())
    }

    /// A database failure: 503 with `Retry-After` while Postgres is unavailable (the store's
    /// one taxonomy decides), else an internal error.
    pub fn database(error: impl Into<crate::store::StoreError>) -> Self {
        let error = error.into();
        if error.failure() == crate::store::Failure::Unavailable {
            tracing::warn!(%error, "database unavailable");
            Self::Unavailable {
                retry_after: DATABASE_RETRY_AFTER,
            }
        } else {
            Self::internal(error)
        }
    }

    /// The stable machine-readable code sent as `error`.
    #[must_use]
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unauthorized(_) => "unauthorized",
            Self::NotFound(_) => "not_found",
            Self::Forbidden(_) => "forbidden",
            Self::AlreadyEntitled => "already_entitled",
            Self::NoBillingAccount => "no_billing_account",
            Self::RateLimited { .. } => "rate_limited",
            Self::UnknownProduct(_) => "unknown_product",
            Self::BadRequest(_) => "bad_request",
            Self::PayloadTooLarge => "payload_too_large",
            Self::Unavailable { .. } => "unavailable",
            Self::StripeUnavailable(_) => "stripe_unavailable",
            Self::NotConfigured(_) => "not_configured",
            Self::Invalid { .. } => "validation_failed",
            Self::FreeProduct(_) => "free_product",
            Self::Conflict { code, .. } => code,
            Self::Internal(_) => "internal",
        }
    }

    #[must_use]
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) | Self::NoBillingAccount | Self::UnknownProduct(_) => {
                StatusCode::NOT_FOUND
            }
            Self::AlreadyEntitled | Self::Conflict { .. } => StatusCode::CONFLICT,
            Self::Invalid { .. } | Self::FreeProduct(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::StripeUnavailable(_) => StatusCode::BAD_GATEWAY,
            Self::NotConfigured(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<StripeError> for ApiError {
    fn from(e: StripeError) -> Self {
        Self::StripeUnavailable(e)
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            // Admin routes hide when no admin token is configured.
            AuthError::AdminDisabled => Self::NotFound(e.to_string()),
            _ => Self::Unauthorized(e.to_string()),
        }
    }
}

/// The authentication extractors reject with [`AuthError`]; it answers as the API error it
/// becomes.
impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        ApiError::from(self).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Self::PayloadTooLarge
        } else {
            Self::BadRequest(rejection.body_text())
        }
    }
}

/// The JSON body of every error answer.
#[derive(Debug, serde::Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: String,
    /// The request field a validation error is about.
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // The Display of the 5xx variants is the generic text; the cause goes to the log only.
        match &self {
            Self::StripeUnavailable(cause) => {
                tracing::error!(error = %cause, stripe_status = cause.status(), "stripe call failed");
            }
            Self::Internal(cause) => tracing::error!(error = %cause, "internal error"),
            Self::NotConfigured(what) => tracing::warn!(missing = what, "feature not configured"),
            _ => {}
        }
        let status = self.status();
        let body = ErrorBody {
            error: self.code(),
            message: self.to_string(),
            field: match &self {
                Self::Invalid { field, .. } => Some(field.as_str()),
                _ => None,
            },
        };
        let mut response = (status, Json(body)).into_response();
        if let Self::RateLimited {
            retry_after: Some(after),
        }
        | Self::Unavailable { retry_after: after } = &self
        {
            // Whole seconds, rounded up, at least 1.
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            if let Ok(value) = HeaderValue::from_str(&secs.max(1).to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
        }
        response
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    async fn render(err: ApiError) -> (StatusCode, serde_json::Value, Option<String>) {
        let response = err.into_response();
        let status = response.status();
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap().to_owned());
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        (status, serde_json::from_slice(&bytes).unwrap(), retry_after)
    }

    #[tokio::test]
    async fn every_variant_has_its_status_and_stable_code() {
        let cases = [
            (
                ApiError::Unauthorized("token expired".into()),
                401,
                "unauthorized",
            ),
            (
                ApiError::NotFound("no such purchase".into()),
                404,
                "not_found",
            ),
            (ApiError::AlreadyEntitled, 409, "already_entitled"),
            (ApiError::NoBillingAccount, 404, "no_billing_account"),
            (
                ApiError::RateLimited { retry_after: None },
                429,
                "rate_limited",
            ),
            (
                ApiError::UnknownProduct("gold".into()),
                404,
                "unknown_product",
            ),
            (ApiError::BadRequest("bad json".into()), 400, "bad_request"),
            (ApiError::PayloadTooLarge, 413, "payload_too_large"),
            (
                ApiError::Unavailable {
                    retry_after: Duration::from_secs(5),
                },
                503,
                "unavailable",
            ),
            (
                ApiError::StripeUnavailable(StripeError::Timeout),
                502,
                "stripe_unavailable",
            ),
            (
                ApiError::NotConfigured("STRIPE_SECRET_KEY"),
                503,
                "not_configured",
            ),
            (ApiError::internal("boom"), 500, "internal"),
        ];
        for (err, status, code) in cases {
            let (got_status, body, _) = render(err).await;
            assert_eq!(got_status.as_u16(), status, "{code}");
            assert_eq!(body["error"], code);
            assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
            assert_eq!(body.as_object().unwrap().len(), 2, "{body}");
        }
    }

    #[tokio::test]
    async fn server_errors_never_send_their_cause() {
        let (_, body, _) = render(ApiError::internal(
            "database password rejected for db.internal",
        ))
        .await;
        assert_eq!(body["message"], "internal error");
        let stripe = StripeError::Api {
            status: 500,
            error_type: "api_error".into(),
            code: None,
            message: "secret internals".into(),
            param: None,
        };
        let (status, body, _) = render(stripe.into()).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert!(!body.to_string().contains("secret internals"));
    }

    #[tokio::test]
    async fn rate_limited_answers_carry_retry_after_in_whole_seconds() {
        let err = ApiError::RateLimited {
            retry_after: Some(Duration::from_millis(7_200)),
        };
        let (_, _, retry_after) = render(err).await;
        assert_eq!(retry_after.as_deref(), Some("8"));
        let err = ApiError::Unavailable {
            retry_after: Duration::from_secs(5),
        };
        let (_, _, retry_after) = render(err).await;
        assert_eq!(retry_after.as_deref(), Some("5"));
    }

    #[tokio::test]
    async fn authentication_errors_answer_401_except_a_disabled_admin_route() {
        for e in [
            AuthError::Missing,
            AuthError::Expired,
            AuthError::NotYetValid,
            AuthError::BadAdminToken,
        ] {
            let (status, body, _) = render(e.into()).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED);
            assert_eq!(body["error"], "unauthorized");
        }
        let (status, body, _) = render(AuthError::AdminDisabled.into()).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["error"], "not_found");
    }
}
