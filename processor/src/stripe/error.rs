//! The Stripe client's error taxonomy.
//!
//! Invariant: no variant ever carries the secret key. Stripe's own error messages are scrubbed of
//! the key before they are stored (see `StripeClient`), transport errors keep only reqwest's
//! description, which names the URL and never the headers.

/// Why a Stripe call failed (after the client's own retries, where a retry was allowed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StripeError {
    /// Stripe answered with an error object that is not one of the more specific cases below.
    #[error("stripe answered {status} {error_type}{}: {message}", code.as_deref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Api {
        status: u16,
        /// `error.type`: `invalid_request_error`, `card_error`, `api_error`, …
        error_type: String,
        /// `error.code`, e.g. `resource_missing`.
        code: Option<String>,
        message: String,
        /// `error.param`: the request parameter Stripe objected to.
        param: Option<String>,
    },
    /// The `Idempotency-Key` was used before with different parameters.
    #[error("stripe refused the idempotency key: {message}")]
    IdempotencyConflict { message: String },
    /// Still rate limited (429) after the retries.
    #[error("stripe rate limit still exceeded after retries")]
    RateLimited,
    /// No answer within the request timeout, after the retries.
    #[error("stripe did not answer in time")]
    Timeout,
    /// The connection failed (refused, reset, TLS, …), after the retries.
    #[error("could not reach stripe: {message}")]
    Transport { message: String },
    /// Stripe answered, but not with the JSON this client expects.
    #[error("unexpected answer from stripe: {message}")]
    Decode { message: String },
}

impl StripeError {
    /// True when the failure says nothing about the request itself (Stripe or the network was
    /// unavailable): a caller may try again later.
    #[must_use]
    pub fn is_transient(&self) -> bool {
        match self {
            Self::RateLimited | Self::Timeout | Self::Transport { .. } => true,
            Self::Api { status, .. } => *status == 409 || *status >= 500,
            Self::IdempotencyConflict { .. } | Self::Decode { .. } => false,
        }
    }

    /// The HTTP status Stripe answered with, when it answered.
    #[must_use]
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } => Some(*status),
            Self::IdempotencyConflict { .. } => Some(400),
            Self::RateLimited => Some(429),
            Self::Timeout | Self::Transport { .. } | Self::Decode { .. } => None,
        }
    }

    /// True for `resource_missing` (e.g. a customer id that Stripe no longer knows).
    #[must_use]
    pub fn is_resource_missing(&self) -> bool {
        matches!(self, Self::Api { code: Some(code), .. } if code == "resource_missing")
    }

    /// True when Stripe does not know the `customer` the request named (deleted, or from
    /// another account or mode).
    #[must_use]
    pub fn is_missing_customer(&self) -> bool {
        self.is_resource_missing()
            && matches!(self, Self::Api { param: Some(param), .. } if param == "customer")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_errors_display_type_code_and_message() {
        let err = StripeError::Api {
            status: 404,
            error_type: "invalid_request_error".into(),
            code: Some("resource_missing".into()),
            message: "No such customer: 'cus_x'".into(),
            param: Some("customer".into()),
        };
        assert_eq!(
            err.to_string(),
            "stripe answered 404 invalid_request_error (resource_missing): No such customer: 'cus_x'"
        );
        assert!(err.is_resource_missing());
        assert!(err.is_missing_customer());
        let missing_price = StripeError::Api {
            status: 400,
            error_type: "invalid_request_error".into(),
            code: Some("resource_missing".into()),
            message: "No such price: 'price_x'".into(),
            param: Some("line_items[0][price]".into()),
        };
        assert!(missing_price.is_resource_missing());
        assert!(!missing_price.is_missing_customer());
        assert!(!err.is_transient());
        assert!(StripeError::Timeout.is_transient());
        assert_eq!(StripeError::RateLimited.status(), Some(429));
    }
}
