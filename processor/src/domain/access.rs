//! Read-time entitlement status: what a stored entitlement means *now*.
//!
//! Invariant: a stored status never lapses by itself (no event may ever say so), so every reader
//! goes through [`effective_status`](super::view::effective_status): an entitlement whose
//! `expires_at` is not in the future reads as `expired` even while the row still says `active`
//! or `past_due`; `revoked` always stays `revoked`. Only `active` and `past_due` (the payment
//! grace period) grant access. Pure: the clock is a parameter.

use crate::domain::projection::EntitlementStatus;

/// The status of one entitlement as the API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessStatus {
    Active,
    /// A subscription payment failed; access continues during Stripe's retries.
    PastDue,
    /// A dispute is open on the purchase.
    Suspended,
    /// Refunded, lost dispute, or a subscription that ended.
    Revoked,
    /// The paid-for period is over.
    Expired,
    /// The user never had this entitlement.
    None,
}

impl From<EntitlementStatus> for AccessStatus {
    fn from(status: EntitlementStatus) -> Self {
        match status {
            EntitlementStatus::Active => Self::Active,
            EntitlementStatus::PastDue => Self::PastDue,
            EntitlementStatus::Suspended => Self::Suspended,
            EntitlementStatus::Revoked => Self::Revoked,
            EntitlementStatus::Expired => Self::Expired,
        }
    }
}

impl AccessStatus {
    /// The wire text (`active`, `past_due`, …): the stored spelling, or `none`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => EntitlementStatus::Active.as_str(),
            Self::PastDue => EntitlementStatus::PastDue.as_str(),
            Self::Suspended => EntitlementStatus::Suspended.as_str(),
            Self::Revoked => EntitlementStatus::Revoked.as_str(),
            Self::Expired => EntitlementStatus::Expired.as_str(),
            Self::None => "none",
        }
    }

    /// Whether this status grants access.
    #[must_use]
    pub fn is_allowed(self) -> bool {
        matches!(self, Self::Active | Self::PastDue)
    }

    /// Why access is refused (`none|expired|revoked|suspended`), or `None` when it is allowed.
    #[must_use]
    pub fn denial_reason(self) -> Option<&'static str> {
        (!self.is_allowed()).then(|| self.as_str())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::domain::view::{EntitlementView, effective_status, status_of};
    use chrono::Duration;
    use chrono::{DateTime, Utc};

    fn view(status: &str, expires_at: Option<DateTime<Utc>>) -> EntitlementView {
        EntitlementView {
            key: "pro".into(),
            status: EntitlementStatus::from_column(status).unwrap(),
            source: crate::domain::projection::EntitlementSource::Subscription,
            source_id: "sub_1".into(),
            expires_at,
            updated_at: Utc::now(),
            sources: Vec::new(),
        }
    }

    #[test]
    fn lifetime_entitlements_never_expire() {
        let now = Utc::now();
        assert_eq!(
            effective_status(&view("active", None), now + Duration::days(36_500)),
            AccessStatus::Active
        );
    }

    #[test]
    fn an_ended_period_reads_as_expired_before_any_event_says_so() {
        let now = Utc::now();
        let ended = Some(now - Duration::seconds(1));
        for stored in ["active", "past_due", "suspended", "expired"] {
            let status = effective_status(&view(stored, ended), now);
            assert_eq!(status, AccessStatus::Expired, "{stored}");
            assert_eq!(status.denial_reason(), Some("expired"));
        }
        assert_eq!(
            effective_status(&view("active", Some(now)), now),
            AccessStatus::Expired
        );
    }

    #[test]
    fn a_running_period_keeps_the_stored_status() {
        let now = Utc::now();
        let later = Some(now + Duration::days(3));
        assert_eq!(
            effective_status(&view("active", later), now),
            AccessStatus::Active
        );
        assert_eq!(
            effective_status(&view("past_due", later), now),
            AccessStatus::PastDue
        );
        assert_eq!(
            effective_status(&view("suspended", later), now),
            AccessStatus::Suspended
        );
    }

    #[test]
    fn revoked_stays_revoked_whatever_the_clock_says() {
        let now = Utc::now();
        for expires in [
            None,
            Some(now - Duration::days(1)),
            Some(now + Duration::days(1)),
        ] {
            assert_eq!(
                effective_status(&view("revoked", expires), now),
                AccessStatus::Revoked
            );
        }
    }

    #[test]
    fn only_active_and_grace_are_allowed() {
        let allowed: Vec<_> = [
            AccessStatus::Active,
            AccessStatus::PastDue,
            AccessStatus::Suspended,
            AccessStatus::Revoked,
            AccessStatus::Expired,
            AccessStatus::None,
        ]
        .into_iter()
        .filter(|s| s.is_allowed())
        .collect();
        assert_eq!(allowed, [AccessStatus::Active, AccessStatus::PastDue]);
        assert_eq!(AccessStatus::None.denial_reason(), Some("none"));
        assert_eq!(AccessStatus::Suspended.denial_reason(), Some("suspended"));
        assert_eq!(AccessStatus::Revoked.denial_reason(), Some("revoked"));
    }

    #[test]
    fn unknown_stored_text_and_missing_keys_grant_nothing() {
        let now = Utc::now();
        // A status of a newer writer's vocabulary is not a status this reader serves.
        let mut cached = serde_json::to_value(view("active", None)).unwrap();
        cached["status"] = "frozen".into();
        assert!(serde_json::from_value::<EntitlementView>(cached).is_err());
        assert_eq!(status_of(&[], "pro", now), AccessStatus::None);
        assert_eq!(
            status_of(&[view("active", None)], "pro", now),
            AccessStatus::Active
        );
        assert_eq!(
            status_of(&[view("active", None)], "team", now),
            AccessStatus::None
        );
    }

    #[test]
    fn wire_texts_match_the_contract() {
        for (status, text) in [
            (AccessStatus::Active, "active"),
            (AccessStatus::PastDue, "past_due"),
            (AccessStatus::None, "none"),
        ] {
            assert_eq!(status.as_str(), text);
            assert_eq!(serde_json::to_value(status).unwrap(), text);
        }
    }
}
