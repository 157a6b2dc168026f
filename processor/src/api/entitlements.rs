//! Entitlement reads: `/api/pro/entitlement`, `/api/entitlements`, `/api/access/{key}` and the
//! admin `/v1/entitlements/{userId}`.
//!
//! Invariants: process memory and Redis are read first ([`crate::local_cache`]) and Postgres
//! only on a miss, after which the cache is refilled (in the background) through the versioned
//! compare-and-set, so a reader never overwrites a newer snapshot; the status reported is the
//! read-time status of [`crate::access`], so an ended period reads as `expired` even when the
//! cached or stored row still says `active`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use shared::ids::UserId;

use super::ApiState;
use super::error::ApiError;
use crate::access::{self, AccessStatus};
use crate::auth::{AdminToken, AuthUser};
use crate::projection::{EntitlementSource, EntitlementStatus};
use crate::store::{self, EntitlementView, UserSnapshot};

/// The entitlement key `/api/pro/entitlement` reports.
pub const PRO_KEY: &str = "pro";

/// `GET /api/pro/entitlement`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProEntitlement {
    pub user_id: String,
    pub is_pro: bool,
    pub status: AccessStatus,
    pub source: Option<EntitlementSource>,
    pub expires_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
    /// Every source granting `pro`, best first (`source` is the first one's); left out when
    /// there is none, so the contract's shape is unchanged for users without `pro`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<SourceItem>,
}

/// One source granting an entitlement: a purchase or a subscription (with its seats).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceItem {
    pub source: EntitlementSource,
    pub source_id: String,
    /// The status this source alone gives (not clock-adjusted).
    pub status: EntitlementStatus,
    pub expires_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantity: Option<i64>,
}

fn source_items(view: Option<&EntitlementView>) -> Vec<SourceItem> {
    view.map(|v| v.sources.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|s| SourceItem {
            source: s.source,
            source_id: s.source_id.clone(),
            status: s.status,
            expires_at: s.expires_at.and_then(|t| DateTime::from_timestamp(t, 0)),
            quantity: s.quantity,
        })
        .collect()
}

/// One entry of `GET /api/entitlements`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EntitlementItem {
    pub key: String,
    pub status: AccessStatus,
    pub active: bool,
    pub source: EntitlementSource,
    pub expires_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    /// Every source granting the key, best first (`source` is the first one's).
    pub sources: Vec<SourceItem>,
}

/// `GET /api/entitlements` and `GET /v1/entitlements/{userId}`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EntitlementList {
    pub user_id: String,
    pub entitlements: Vec<EntitlementItem>,
}

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
            refiller.cache.refill(&refill).await;
            drop(permit);
        });
    }
    Ok(snapshot)
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

/// The `pro` view of a snapshot at `now`.
#[must_use]
pub fn pro_view(snapshot: &UserSnapshot, now: DateTime<Utc>) -> ProEntitlement {
    let row = snapshot.entitlements.iter().find(|e| e.key == PRO_KEY);
    let status = access::status_of(&snapshot.entitlements, PRO_KEY, now);
    ProEntitlement {
        user_id: snapshot.user_id.clone(),
        is_pro: status.is_allowed(),
        status,
        source: row.map(|r| r.source.contract()),
        expires_at: row.and_then(|r| r.expires_at),
        updated_at: row.map(|r| r.updated_at),
        sources: source_items(row),
    }
}

/// Every entitlement of a snapshot at `now`.
#[must_use]
pub fn list_view(snapshot: &UserSnapshot, now: DateTime<Utc>) -> EntitlementList {
    EntitlementList {
        user_id: snapshot.user_id.clone(),
        entitlements: snapshot
            .entitlements
            .iter()
            .map(|e| item_view(e, now))
            .collect(),
    }
}

/// One entitlement as `GET /api/entitlements` lists it, at `now`.
#[must_use]
pub fn item_view(e: &EntitlementView, now: DateTime<Utc>) -> EntitlementItem {
    let status = access::effective_status(e, now);
    EntitlementItem {
        key: e.key.clone(),
        status,
        active: status.is_allowed(),
        source: e.source.contract(),
        expires_at: e.expires_at,
        updated_at: e.updated_at,
        sources: source_items(Some(e)),
    }
}

pub(crate) async fn pro_entitlement(
    State(state): State<ApiState>,
    AuthUser(user): AuthUser,
) -> Result<Json<ProEntitlement>, ApiError> {
    let snapshot = load_snapshot(&state, &user).await?;
    Ok(Json(pro_view(&snapshot, Utc::now())))
}

pub(crate) async fn my_entitlements(
    State(state): State<ApiState>,
    AuthUser(user): AuthUser,
) -> Result<Json<EntitlementList>, ApiError> {
    let snapshot = load_snapshot(&state, &user).await?;
    Ok(Json(list_view(&snapshot, Utc::now())))
}

pub(crate) async fn access(
    State(state): State<ApiState>,
    AuthUser(user): AuthUser,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    let snapshot = load_snapshot(&state, &user).await?;
    let status = access::status_of(&snapshot.entitlements, &key, Utc::now());
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
    let snapshot = load_snapshot(&state, &user).await?;
    Ok(Json(list_view(&snapshot, Utc::now())))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use chrono::Duration;

    fn snapshot(entitlements: Vec<EntitlementView>) -> UserSnapshot {
        UserSnapshot {
            user_id: "u1".into(),
            version: 3,
            entitlements,
        }
    }

    fn row(key: &str, status: &str, expires_at: Option<DateTime<Utc>>) -> EntitlementView {
        EntitlementView {
            key: key.into(),
            status: crate::projection::EntitlementStatus::from_column(status).unwrap(),
            source: EntitlementSource::Purchase,
            source_id: "cs_1".into(),
            expires_at,
            updated_at: Utc::now(),
            sources: Vec::new(),
        }
    }

    #[test]
    fn pro_view_of_a_user_without_entitlements_is_none() {
        let view = serde_json::to_value(pro_view(&snapshot(vec![]), Utc::now())).unwrap();
        assert_eq!(
            view,
            serde_json::json!({"userId": "u1", "isPro": false, "status": "none",
                               "source": null, "expiresAt": null, "updatedAt": null})
        );
    }

    #[test]
    fn pro_view_reports_grace_as_pro_and_an_ended_period_as_expired() {
        let now = Utc::now();
        let grace = snapshot(vec![row("pro", "past_due", Some(now + Duration::days(2)))]);
        let view = pro_view(&grace, now);
        assert!(view.is_pro);
        assert_eq!(view.status, AccessStatus::PastDue);
        let ended = snapshot(vec![row("pro", "active", Some(now - Duration::hours(1)))]);
        let view = pro_view(&ended, now);
        assert!(!view.is_pro);
        assert_eq!(view.status, AccessStatus::Expired);
    }

    #[test]
    fn list_view_uses_camel_case_and_read_time_status() {
        let now = Utc::now();
        let list = list_view(
            &snapshot(vec![
                row("pro", "active", None),
                row("team", "active", Some(now - Duration::seconds(5))),
            ]),
            now,
        );
        let json = serde_json::to_value(&list).unwrap();
        assert_eq!(json["userId"], "u1");
        assert_eq!(json["entitlements"][0]["status"], "active");
        assert_eq!(json["entitlements"][0]["active"], true);
        assert_eq!(
            json["entitlements"][0]["expiresAt"],
            serde_json::Value::Null
        );
        assert_eq!(json["entitlements"][1]["status"], "expired");
        assert_eq!(json["entitlements"][1]["active"], false);
        assert!(json["entitlements"][1]["updatedAt"].is_string());
    }
}
