//! Organisations: the admin routes through which the app names an organisation's members
//! (`PUT`/`DELETE /v1/organizations/{organizationId}/members/{userId}`, `GET
//! /v1/organizations/{organizationId}`), and who may buy for one ([`payer`]).
//!
//! Invariants: membership writes are versioned by the app and land only above the stored
//! version ([`store::members`]); a stale write is a 409 that changes nothing, the same write
//! again a 200 that changes nothing. After a write, the members whose access changed have
//! fresh snapshots in the cache (and the healer repairs a cache write that did not happen).
//! A caller bills for an organisation only if their token says so (`org_id` with an `org_role`
//! of [`BILLING_ROLES`](crate::auth::BILLING_ROLES)) or they are one of its admins.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use chrono::{DateTime, Utc};
use shared::ids::UserId;

use super::ApiState;
use super::entitlements::load_snapshot;
use super::error::ApiError;
use crate::auth::{AdminToken, Caller};
use crate::domain::organization::{OrganizationId, Role};
use crate::domain::view::{EntitlementItem, item_view};
use crate::store::members::{self, MemberRow, MemberWrite, Written};

/// Whom a request of `caller` is for: the caller, or the organisation `organization` when the
/// caller may bill for it.
///
/// # Errors
/// 422 for an id that is no organisation id, 403 `forbidden` when the caller may not bill for
/// it, as [`load_snapshot`] otherwise.
pub async fn payer(
    state: &ApiState,
    caller: &Caller,
    organization: Option<&str>,
) -> Result<UserId, ApiError> {
    let Some(raw) = organization else {
        return Ok(caller.user.clone());
    };
    let organization = parse_organization(raw)?;
    if caller.billing_for.as_deref() == Some(organization.as_str()) {
        return Ok(organization.subject());
    }
    let own = load_snapshot(state, &caller.user).await?;
    let admin = own
        .organizations
        .iter()
        .any(|m| m.organization_id == organization.as_str() && m.role == Role::Admin);
    if admin {
        Ok(organization.subject())
    } else {
        Err(ApiError::Forbidden(format!(
            "you may not bill for organization {raw:?}"
        )))
    }
}

/// The optional body of `POST /api/billing/portal` and `POST /api/pro/restore`: act for this
/// organisation instead of the caller.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OrganizationBody {
    #[serde(default, deserialize_with = "shared::json::present")]
    pub organization_id: Option<String>,
}

impl OrganizationBody {
    /// An empty body is none; anything else must be this object.
    ///
    /// # Errors
    /// 400 `bad_request` for a body that is not one.
    pub fn read(body: &[u8]) -> Result<Self, ApiError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self::default());
        }
        serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(e.to_string()))
    }
}

fn parse_organization(raw: &str) -> Result<OrganizationId, ApiError> {
    OrganizationId::parse(raw).map_err(|e| ApiError::Invalid {
        field: "organizationId".into(),
        message: e.to_string(),
    })
}

fn parse_member(organization: &str, user: &str) -> Result<(OrganizationId, UserId), ApiError> {
    let organization = parse_organization(organization)?;
    let user = UserId::parse(user)
        .ok()
        .filter(|u| !crate::domain::organization::is_organization_subject(u.as_str()))
        .ok_or_else(|| ApiError::Invalid {
            field: "userId".into(),
            message: "a user id is 1-200 printable ASCII characters, not starting with org:".into(),
        })?;
    Ok((organization, user))
}

/// The body of `PUT /v1/organizations/{organizationId}/members/{userId}`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MemberBody {
    /// `member` when absent.
    #[serde(default, deserialize_with = "shared::json::present")]
    pub role: Option<Role>,
    /// The app's version of this membership; a write lands only above the stored one.
    #[serde(deserialize_with = "shared::json::integer")]
    pub version: i64,
    /// When the member joined (their place in the seat order); now when absent.
    #[serde(default, deserialize_with = "shared::json::present")]
    pub joined_at: Option<DateTime<Utc>>,
}

/// Query of `DELETE /v1/organizations/{organizationId}/members/{userId}`.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct RemoveQuery {
    pub version: Option<String>,
}

fn check_version(version: i64) -> Result<i64, ApiError> {
    if version >= 0 {
        Ok(version)
    } else {
        Err(ApiError::Invalid {
            field: "version".into(),
            message: "a version is an integer of at least 0".into(),
        })
    }
}

/// Applies a membership write and answers with the row as it stands.
async fn apply(state: &ApiState, write: MemberWrite) -> Result<Json<MemberRow>, ApiError> {
    match members::write(&state.pool, &write)
        .await
        .map_err(ApiError::database)?
    {
        Written::Applied(row, snapshots) => {
            for snapshot in &snapshots {
                state.cache.refresh(snapshot).await;
            }
            tracing::info!(organization = %row.organization_id, user_id = %row.user_id,
                removed = row.removed, version = row.version, "membership written");
            Ok(Json(row))
        }
        Written::Unchanged(row) => Ok(Json(row)),
        Written::Stale(row) => Err(ApiError::Conflict {
            code: "stale_version",
            message: format!(
                "version {} of this membership is stored; write a higher version",
                row.version
            ),
        }),
    }
}

/// `PUT /v1/organizations/{organizationId}/members/{userId}`.
pub(crate) async fn put_member(
    State(state): State<ApiState>,
    _admin: AdminToken,
    Path((organization, user)): Path<(String, String)>,
    body: Result<Json<MemberBody>, JsonRejection>,
) -> Result<Json<MemberRow>, ApiError> {
    let (organization, user) = parse_member(&organization, &user)?;
    let Json(body) = body?;
    let write = MemberWrite {
        organization,
        user,
        role: Some(body.role.unwrap_or(Role::Member)),
        version: check_version(body.version)?,
        joined_at: body.joined_at,
    };
    apply(&state, write).await
}

/// `DELETE /v1/organizations/{organizationId}/members/{userId}?version=N`.
pub(crate) async fn remove_member(
    State(state): State<ApiState>,
    _admin: AdminToken,
    Path((organization, user)): Path<(String, String)>,
    query: Result<Query<RemoveQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<MemberRow>, ApiError> {
    let (organization, user) = parse_member(&organization, &user)?;
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let version = query
        .version
        .as_deref()
        .and_then(|v| v.parse::<i64>().ok())
        .ok_or_else(|| ApiError::BadRequest("version must be an integer".into()))?;
    let write = MemberWrite {
        organization,
        user,
        role: None,
        version: check_version(version)?,
        joined_at: None,
    };
    apply(&state, write).await
}

/// `GET /v1/organizations/{organizationId}`.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OrganizationView {
    pub organization_id: String,
    /// Current members, by seat.
    pub members: Vec<MemberRow>,
    /// The organisation's own entitlements (each subscription source names its seats).
    pub entitlements: Vec<EntitlementItem>,
}

pub(crate) async fn organization(
    State(state): State<ApiState>,
    _admin: AdminToken,
    Path(organization): Path<String>,
) -> Result<Json<OrganizationView>, ApiError> {
    let organization = parse_organization(&organization)?;
    let members = {
        let client = state.pool.get().await.map_err(ApiError::database)?;
        members::members(&**client, &organization)
            .await
            .map_err(ApiError::database)?
    };
    let snapshot = load_snapshot(&state, &organization.subject()).await?;
    let now = Utc::now();
    Ok(Json(OrganizationView {
        organization_id: organization.as_str().to_owned(),
        members,
        entitlements: snapshot
            .entitlements
            .iter()
            .map(|e| item_view(e, now))
            .collect(),
    }))
}
