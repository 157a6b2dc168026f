//! The domain's read model: a user's entitlements as the projection derived them
//! ([`UserSnapshot`], [`EntitlementView`]), which the Redis cache stores as they are, and the
//! views the API answers and the app's messages carry, built from them at a given time.
//!
//! One entitlement, three stages: the projection derives a
//! [`projection::Entitlement`](super::projection::Entitlement) from facts; the store writes it
//! and reads it back as an [`EntitlementView`] (with the time it last changed), which the cache
//! keeps; [`list_view`]/[`item_view`] turn views into [`EntitlementItem`]s, the status a
//! client sees at a given instant.

use chrono::{DateTime, Utc};

use super::access::AccessStatus;
use super::projection::{EntitlementSource, EntitlementStatus, GrantSource};

/// A user's entitlements as cached in Redis and served by the API.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UserSnapshot {
    pub user_id: String,
    /// Bumped in every transaction that recomputes this user's entitlements; 0 if never.
    pub version: i64,
    /// Sorted by key.
    pub entitlements: Vec<EntitlementView>,
    /// The organisations the user belongs to (none for an organisation), sorted by id; the
    /// API merges their entitlements into the user's
    /// ([`member_view`](super::organization::member_view)).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub organizations: Vec<Membership>,
}

/// A member's role: an admin may buy for the organisation and open its billing portal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Member,
}

impl Role {
    /// The column spelling.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Member => "member",
        }
    }

    /// Parses the column spelling.
    #[must_use]
    pub fn from_column(raw: &str) -> Option<Self> {
        match raw {
            "admin" => Some(Self::Admin),
            "member" => Some(Self::Member),
            _ => None,
        }
    }
}

/// One organisation a user belongs to, as the user's snapshot carries it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Membership {
    pub organization_id: String,
    pub role: Role,
    /// The member's place among the organisation's members by join time, from 0.
    pub seat: i64,
}

/// One entitlement row.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EntitlementView {
    pub key: String,
    pub status: EntitlementStatus,
    pub source: EntitlementSource,
    pub source_id: String,
    /// `None` is lifetime.
    pub expires_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    /// Every source granting the key, best first (absent from entries cached before it
    /// existed).
    #[serde(default)]
    pub sources: Vec<GrantSource>,
}

/// The status of `view` at `now`.
#[must_use]
pub fn effective_status(view: &EntitlementView, now: DateTime<Utc>) -> AccessStatus {
    let stored = AccessStatus::from(view.status);
    if stored == AccessStatus::Revoked {
        return stored;
    }
    match view.expires_at {
        // A period that ends exactly now is over: Stripe's period end is exclusive.
        Some(expires_at) if expires_at <= now => AccessStatus::Expired,
        _ => stored,
    }
}

/// The status of entitlement `key` among `entitlements` at `now` (`None` when absent).
#[must_use]
pub fn status_of(entitlements: &[EntitlementView], key: &str, now: DateTime<Utc>) -> AccessStatus {
    entitlements
        .iter()
        .find(|e| e.key == key)
        .map_or(AccessStatus::None, |e| effective_status(e, now))
}

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
    /// The organisation through which a member holds this source.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub organization_id: Option<String>,
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
            organization_id: s.organization_id.clone(),
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

/// The `pro` view of a snapshot at `now`.
#[must_use]
pub fn pro_view(snapshot: &UserSnapshot, now: DateTime<Utc>) -> ProEntitlement {
    let row = snapshot.entitlements.iter().find(|e| e.key == PRO_KEY);
    let status = status_of(&snapshot.entitlements, PRO_KEY, now);
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
    let status = effective_status(e, now);
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
            organizations: Vec::new(),
        }
    }

    fn row(key: &str, status: &str, expires_at: Option<DateTime<Utc>>) -> EntitlementView {
        EntitlementView {
            key: key.into(),
            status: crate::domain::projection::EntitlementStatus::from_column(status).unwrap(),
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
