//! Per-user limits on the routes that call Stripe: the account's rate limit is shared by every
//! caller (the worker's reads included), so one user must not be able to spend it.
//!
//! Invariants: a limit is counted in Redis, so it holds across every API process; it fails
//! closed: when Redis cannot count, the request is refused with 503 and `Retry-After` rather
//! than let through unlimited. A refused request answers 429 with `Retry-After` (the time left
//! in the window) and reaches Stripe no more.

use std::time::Duration;

use shared::ids::UserId;

use super::ApiState;
use super::error::ApiError;

/// How many calls of one route one user may make in a window.
#[derive(Debug, Clone, Copy)]
pub struct UserLimit {
    /// The route's name in the Redis key.
    pub route: &'static str,
    pub max: u64,
    pub window: Duration,
}

/// `POST /api/checkout/session`: 10 sessions a minute per user.
pub const CHECKOUT: UserLimit = UserLimit {
    route: "checkout",
    max: 10,
    window: Duration::from_secs(60),
};

/// `POST /api/billing/portal`: 10 portal sessions a minute per user.
pub const PORTAL: UserLimit = UserLimit {
    route: "portal",
    max: 10,
    window: Duration::from_secs(60),
};

/// `POST /api/pro/restore`: one every 10 s per user (a restore reads several Stripe lists).
pub const RESTORE: UserLimit = UserLimit {
    route: "restore",
    max: 1,
    window: Duration::from_secs(10),
};

/// `GET /api/checkout/session/{id}`: 30 Stripe reads of sessions a minute per user (a success
/// page polling or waiting reads every 2 s at most; past the limit it answers from Postgres).
pub const CHECKOUT_OUTCOME: UserLimit = UserLimit {
    route: "checkout_outcome",
    max: 30,
    window: Duration::from_secs(60),
};

/// Redis key of `user`'s count for `limit`.
#[must_use]
pub fn key(limit: &UserLimit, user: &UserId) -> String {
    format!("stripe_calls:v1:{}:{user}", limit.route)
}

/// Counts a call of `user` against `limit`.
///
/// # Errors
/// [`ApiError::RateLimited`] (429) past the limit, [`ApiError::Unavailable`] (503) when Redis
/// cannot count.
pub async fn take(state: &ApiState, limit: &UserLimit, user: &UserId) -> Result<(), ApiError> {
    match state
        .cache
        .count_in_window(&key(limit, user), limit.window)
        .await
    {
        Ok((count, _)) if count <= limit.max => Ok(()),
        Ok((_, left)) => {
            metrics::counter!("api_user_limited_total", "route" => limit.route).increment(1);
            Err(ApiError::RateLimited {
                retry_after: Some(left.max(Duration::from_secs(1))),
            })
        }
        Err(error) => {
            tracing::warn!(%error, route = limit.route, "user limit cannot be counted; refusing");
            Err(ApiError::Unavailable {
                retry_after: limit.window.min(Duration::from_secs(10)),
            })
        }
    }
}
