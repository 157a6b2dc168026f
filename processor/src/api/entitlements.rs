//! Entitlement reads: `/api/pro/entitlement`, `/api/entitlements`, `/api/access/{key}` and the
//! admin `/v1/entitlements/{userId}`.
//!
//! Invariants: process memory and Redis are read first ([`crate::local_cache`]) and Postgres
//! only on a miss, after which the cache is refilled (in the background) through the versioned
//! compare-and-set, so a reader never overwrites a newer snapshot; the status reported is the
//! read-time status of [`crate::domain::access`], so an ended period reads as `expired` even when the
//! cached or stored row still says `active`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use shared::ids::UserId;

use super::ApiState;
use super::error::ApiError;
use crate::auth::{AdminToken, AuthUser};
use crate::domain::organization::{Membership, OrganizationId, member_view};
use crate::domain::view::{
    EntitlementList, ProEntitlement, UserSnapshot, list_view, pro_view, status_of,
};
use crate::store;

/// The user's snapshot: process memory, then Redis ([`crate::local_cache`]), then Postgres on
/// a miss (refilled into Redis in the background).
///
/// # Errors
/// [`ApiError::Internal`] when Postgres cannot be read.
pub async fn load_snapshot(state: &ApiState, user: &UserId) -> Result<Arc<UserSnapshot>, ApiError> {
    if let Some(snapshot) = state.local.read(&state.cache, user).await {
        return Ok(snapshot);
    }
    let snapshot = Arc::new(read_from_postgres(state, user).await?);
    // Off the response's path: the answer is the snapshot just read either way, and the
    // compare-and-set keeps a late refill from replacing a newer entry. Bounded: with every
    // permit taken (Redis slow or away), this miss leaves the refill to a later one.
    if let Ok(permit) = Arc::clone(&state.refills).try_acquire_owned() {
        let (refiller, refill) = (state.clone(), Arc::clone(&snapshot));
        tokio::spawn(async move {
            refiller.cache.refresh(&refill).await;
            drop(permit);
        });
    }
    Ok(snapshot)
}

/// What `user` may use: their snapshot merged with those of the organisations they belong to
/// ([`member_view`]), each read as [`load_snapshot`] reads (memory first). A user in no
/// organisation costs exactly one snapshot read; the merge keeps the user's version.
///
/// # Errors
/// As [`load_snapshot`].
pub async fn load_access(state: &ApiState, user: &UserId) -> Result<Arc<UserSnapshot>, ApiError> {
    access_with(state, user, None).await
}

/// [`load_access`], with `fresh` (a snapshot just read from Postgres) standing in for the
/// cached one of its subject, the user's or an organisation's.
///
/// # Errors
/// As [`load_snapshot`].
pub async fn access_with(
    state: &ApiState,
    user: &UserId,
    fresh: Option<&Arc<UserSnapshot>>,
) -> Result<Arc<UserSnapshot>, ApiError> {
    let load = |subject: UserId| async move {
        match fresh.filter(|f| f.user_id == subject.as_str()) {
            Some(fresh) => Ok(Arc::clone(fresh)),
            None => load_snapshot(state, &subject).await,
        }
    };
    let own = load(user.clone()).await?;
    if own.organizations.is_empty() {
        return Ok(own);
    }
    let mut organizations = Vec::with_capacity(own.organizations.len());
    for membership in &own.organizations {
        let Ok(organization) = OrganizationId::parse(&membership.organization_id) else {
            continue;
        };
        organizations.push((membership, load(organization.subject()).await?));
    }
    let pairs: Vec<(&Membership, &UserSnapshot)> =
        organizations.iter().map(|(m, s)| (*m, &**s)).collect();
    Ok(Arc::new(member_view(&own, &pairs)))
}

/// The user's snapshot straight from Postgres (for callers that just wrote it).
///
/// # Errors
/// [`ApiError::Unavailable`] (503, `Retry-After`) while Postgres is unavailable,
/// [`ApiError::Internal`] when it cannot be read otherwise.
pub async fn read_from_postgres(state: &ApiState, user: &UserId) -> Result<UserSnapshot, ApiError> {
    let client = state.pool.get().await.map_err(ApiError::database)?;
    store::cached_user_snapshot(&client, user)
        .await
        .map_err(ApiError::database)
}

pub(crate) async fn pro_entitlement(
    State(state): State<ApiState>,
    AuthUser(user): AuthUser,
) -> Result<Json<ProEntitlement>, ApiError> {
    let snapshot = load_access(&state, &user).await?;
    Ok(Json(pro_view(&snapshot, Utc::now())))
}

pub(crate) async fn my_entitlements(
    State(state): State<ApiState>,
    AuthUser(user): AuthUser,
) -> Result<Json<EntitlementList>, ApiError> {
    let snapshot = load_access(&state, &user).await?;
    Ok(Json(list_view(&snapshot, Utc::now())))
}

pub(crate) async fn access(
    State(state): State<ApiState>,
    AuthUser(user): AuthUser,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    let snapshot = load_access(&state, &user).await?;
    let status = status_of(&snapshot.entitlements, &key, Utc::now());
    Ok(match status.denial_reason() {
        None => Json(serde_json::json!({"allowed": true})).into_response(),
        Some(reason) => (
            StatusCode::FORBIDDEN,
            Json(serde_json::json!({"allowed": false, "reason": reason})),
        )
            .into_response(),
    })
}

pub(crate) async fn admin_entitlements(
    State(state): State<ApiState>,
    _admin: AdminToken,
    Path(user): Path<String>,
) -> Result<Json<EntitlementList>, ApiError> {
    let user = UserId::parse(&user).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let snapshot = load_access(&state, &user).await?;
    Ok(Json(list_view(&snapshot, Utc::now())))
}
