//! Organisations: access that belongs to a company rather than to one user.
//!
//! An organisation is a subject of its own, `org:{id}` ([`OrganizationId::subject`]): it pays
//! (its Stripe customer is the organisation's), its purchases and subscriptions are projected
//! into its entitlements exactly as a user's are, and it is cached and announced as a user is.
//! Its members are the app's to name; each carries a seat, their place among the organisation's
//! current members by join time. A member's access is [`member_view`]: their own entitlements
//! merged with every organisation's they belong to, each organisation's sources named by it.
//!
//! Seats: a subscription of the organisation grants its keys to the members in its first
//! `quantity` seats (1 when Stripe names no quantity); a one-time purchase and a Stripe feature
//! of the organisation reach every member (a site licence). A member beyond the seats keeps
//! their place and gains the keys as soon as the quantity grows or an earlier member leaves.
//!
//! Invariant: [`member_view`] is a pure function of the snapshots and memberships, whatever
//! their order and however often one is repeated, and it adds only what a held seat grants:
//! with no organisation it is the user's own snapshot unchanged.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use shared::ids::UserId;

use super::projection::{EntitlementSource, GrantSource, better};
use super::view::{EntitlementView, UserSnapshot};
pub use super::view::{Membership, Role};

/// The prefix of an organisation's subject; user ids may not start with it.
pub const SUBJECT_PREFIX: &str = "org:";

/// Why an organisation id is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an organization id is 1-196 printable ASCII characters without spaces")]
pub struct OrganizationIdError;

/// An organisation id as the app names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OrganizationId(String);

impl OrganizationId {
    /// 1-196 printable ASCII characters without spaces (its subject is a user id of at most
    /// 200).
    ///
    /// # Errors
    /// [`OrganizationIdError`] otherwise.
    pub fn parse(raw: &str) -> Result<Self, OrganizationIdError> {
        if (1..=200 - SUBJECT_PREFIX.len()).contains(&raw.len())
            && raw.bytes().all(|b| b.is_ascii_graphic())
        {
            Ok(Self(raw.to_owned()))
        } else {
            Err(OrganizationIdError)
        }
    }

    /// The organisation of a subject id (`org:{id}`), if it is one.
    #[must_use]
    pub fn of_subject(subject: &str) -> Option<Self> {
        subject
            .strip_prefix(SUBJECT_PREFIX)
            .and_then(|id| Self::parse(id).ok())
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The subject its purchases, subscriptions, customers and entitlements belong to.
    #[must_use]
    pub fn subject(&self) -> UserId {
        UserId::parse(&format!("{SUBJECT_PREFIX}{}", self.0))
            .unwrap_or_else(|_| unreachable!("a parsed organization id makes a valid subject"))
    }
}

/// Whether `subject` names an organisation rather than a user.
#[must_use]
pub fn is_organization_subject(subject: &str) -> bool {
    subject.starts_with(SUBJECT_PREFIX)
}

/// Whether the member in `seat` holds what `source` (one of the organisation's) grants.
#[must_use]
pub fn holds(source: &GrantSource, seat: i64) -> bool {
    match source.source {
        EntitlementSource::Subscription => seat < source.quantity.unwrap_or(1),
        EntitlementSource::Purchase | EntitlementSource::StripeFeature => true,
    }
}

/// The sources of `view`: its list, or, for an entry cached before lists existed, the one
/// source its own fields name.
fn sources_of(view: &EntitlementView) -> Vec<GrantSource> {
    if view.sources.is_empty() {
        vec![GrantSource {
            source: view.source,
            source_id: view.source_id.clone(),
            status: view.status,
            expires_at: view.expires_at.map(|t| t.timestamp()),
            quantity: None,
            organization_id: None,
        }]
    } else {
        view.sources.clone()
    }
}

/// A member's access: `own` (their snapshot, whose `organizations` name their memberships)
/// merged with each `(membership, organisation snapshot)`. A key held through an organisation
/// lists its sources with `organizationId`; the best source of all decides it, as for a user's
/// own sources. The version is the user's own.
#[must_use]
pub fn member_view(
    own: &UserSnapshot,
    organizations: &[(&Membership, &UserSnapshot)],
) -> UserSnapshot {
    // key → own view (if any), and the organisations' held sources with their views' times.
    let mut added: BTreeMap<&str, Vec<(GrantSource, DateTime<Utc>)>> = BTreeMap::new();
    for (membership, organization) in organizations {
        for view in &organization.entitlements {
            for mut source in sources_of(view) {
                if holds(&source, membership.seat) {
                    source.organization_id = Some(membership.organization_id.clone());
                    added
                        .entry(view.key.as_str())
                        .or_default()
                        .push((source, view.updated_at));
                }
            }
        }
    }
    if added.is_empty() {
        return own.clone();
    }
    let mut entitlements: Vec<EntitlementView> = Vec::new();
    let own_views: BTreeMap<&str, &EntitlementView> = own
        .entitlements
        .iter()
        .map(|e| (e.key.as_str(), e))
        .collect();
    let keys: std::collections::BTreeSet<&str> =
        own_views.keys().chain(added.keys()).copied().collect();
    for key in keys {
        let mine = own_views.get(key).copied();
        let Some(theirs) = added.get(key) else {
            entitlements.extend(mine.cloned());
            continue;
        };
        let mut candidates: Vec<(GrantSource, DateTime<Utc>)> = mine
            .map(|v| {
                sources_of(v)
                    .into_iter()
                    .map(|s| (s, v.updated_at))
                    .collect()
            })
            .unwrap_or_default();
        candidates.extend(theirs.iter().cloned());
        // Best first under the projection's total order; equal sources from two paths once.
        candidates.sort_by(|(a, at), (b, bt)| better(b, a).then_with(|| bt.cmp(at)));
        candidates.dedup_by(|(a, _), (b, _)| a == b);
        let (best, updated_at) = candidates[0].clone();
        entitlements.push(EntitlementView {
            key: key.to_owned(),
            status: best.status,
            source: best.source,
            source_id: best.source_id.clone(),
            expires_at: best.expires_at.and_then(|t| DateTime::from_timestamp(t, 0)),
            updated_at,
            sources: candidates.into_iter().map(|(s, _)| s).collect(),
        });
    }
    UserSnapshot {
        user_id: own.user_id.clone(),
        version: own.version,
        entitlements,
        organizations: own.organizations.clone(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::domain::projection::EntitlementStatus;
    use crate::domain::view::status_of;
    use proptest::prelude::*;

    const KEYS: [&str; 3] = ["pro", "team", "content:1"];
    const T0: i64 = 1_900_000_000;

    fn source() -> impl Strategy<Value = GrantSource> {
        (
            prop_oneof![
                Just(EntitlementSource::Purchase),
                Just(EntitlementSource::Subscription),
                Just(EntitlementSource::StripeFeature)
            ],
            0..4_u8,
            prop_oneof![
                Just(EntitlementStatus::Active),
                Just(EntitlementStatus::PastDue),
                Just(EntitlementStatus::Suspended),
                Just(EntitlementStatus::Revoked),
                Just(EntitlementStatus::Expired)
            ],
            proptest::option::of(0..3_i64),
            proptest::option::of(0..4_i64),
        )
            .prop_map(|(source, id, status, expires, quantity)| GrantSource {
                source,
                source_id: format!("src_{id}"),
                status,
                expires_at: expires.map(|d| T0 + d * 86_400),
                quantity: (source == EntitlementSource::Subscription)
                    .then_some(quantity)
                    .flatten(),
                organization_id: None,
            })
    }

    /// A snapshot whose views are what derivation would store: best source first.
    fn snapshot(user: String) -> impl Strategy<Value = UserSnapshot> {
        proptest::collection::btree_map(
            proptest::sample::select(KEYS.to_vec()),
            proptest::collection::vec(source(), 1..3),
            0..3,
        )
        .prop_map(move |by_key| UserSnapshot {
            user_id: user.clone(),
            version: 7,
            entitlements: by_key
                .into_iter()
                .map(|(key, mut sources)| {
                    sources.sort_by(|a, b| better(b, a));
                    sources.dedup();
                    let best = sources[0].clone();
                    EntitlementView {
                        key: key.to_owned(),
                        status: best.status,
                        source: best.source,
                        source_id: best.source_id,
                        expires_at: best.expires_at.and_then(|t| DateTime::from_timestamp(t, 0)),
                        updated_at: DateTime::from_timestamp(T0, 0).unwrap(),
                        sources,
                    }
                })
                .collect(),
            organizations: Vec::new(),
        })
    }

    fn organizations() -> impl Strategy<Value = Vec<(Membership, UserSnapshot)>> {
        proptest::collection::vec((0..3_u8, 0..5_i64), 0..4).prop_flat_map(|orgs| {
            orgs.into_iter()
                .map(|(org, seat)| {
                    let id = format!("acme{org}");
                    snapshot(format!("{SUBJECT_PREFIX}{id}")).prop_map(move |s| {
                        let membership = Membership {
                            organization_id: id.clone(),
                            role: Role::Member,
                            seat,
                        };
                        (membership, s)
                    })
                })
                .collect::<Vec<_>>()
        })
    }

    fn merged(own: &UserSnapshot, orgs: &[(Membership, UserSnapshot)]) -> UserSnapshot {
        let pairs: Vec<(&Membership, &UserSnapshot)> = orgs.iter().map(|(m, s)| (m, s)).collect();
        member_view(own, &pairs)
    }

    proptest! {
        /// The merge is the union of the user's sources and the held ones of every
        /// organisation, decided by the best source: in any order of the organisations, with
        /// any repeated, and equal to the user's snapshot when no seat holds anything.
        #[test]
        fn a_member_holds_the_union_of_their_own_and_their_seats_sources(
            own in snapshot("u1".to_owned()),
            orgs in organizations(),
            rotation in 0..4_usize,
        ) {
            let view = merged(&own, &orgs);
            // Order and repetition do not matter.
            let mut turned = orgs.clone();
            let shift = rotation.min(turned.len());
            turned.rotate_left(shift);
            turned.extend(orgs.first().cloned());
            prop_assert_eq!(&merged(&own, &turned), &view);
            // Exactly the union.
            for key in KEYS {
                let mut expected: Vec<GrantSource> = own
                    .entitlements
                    .iter()
                    .filter(|e| e.key == key)
                    .flat_map(sources_of)
                    .collect();
                for (m, org) in &orgs {
                    for e in org.entitlements.iter().filter(|e| e.key == key) {
                        expected.extend(sources_of(e).into_iter().filter(|s| holds(s, m.seat)).map(
                            |mut s| {
                                s.organization_id = Some(m.organization_id.clone());
                                s
                            },
                        ));
                    }
                }
                expected.sort_by(|a, b| better(b, a));
                expected.dedup();
                let got = view.entitlements.iter().find(|e| e.key == key);
                match expected.first() {
                    None => prop_assert!(got.is_none()),
                    Some(best) => {
                        let got = got.unwrap();
                        prop_assert_eq!(&got.sources, &expected);
                        prop_assert_eq!((got.status, got.source, &got.source_id), (best.status, best.source, &best.source_id));
                    }
                }
            }
            prop_assert_eq!(view.version, own.version);
            if orgs.iter().all(|(m, org)| org.entitlements.iter().flat_map(sources_of).all(|s| !holds(&s, m.seat))) {
                prop_assert_eq!(&view, &own);
            }
        }

        /// A subscription of `quantity` seats reaches exactly the first `quantity` of any number
        /// of members, and a purchase every member.
        #[test]
        fn a_subscription_reaches_the_first_quantity_seats_and_a_purchase_everyone(
            quantity in 0..6_i64,
            members in 0..8_i64,
        ) {
            let now = DateTime::from_timestamp(T0, 0).unwrap();
            let org = |source: EntitlementSource, key: &str| UserSnapshot {
                user_id: "org:acme".into(),
                version: 1,
                entitlements: vec![EntitlementView {
                    key: key.into(),
                    status: EntitlementStatus::Active,
                    source,
                    source_id: "sub_1".into(),
                    expires_at: None,
                    updated_at: now,
                    sources: vec![GrantSource {
                        source,
                        source_id: "sub_1".into(),
                        status: EntitlementStatus::Active,
                        expires_at: None,
                        quantity: (source == EntitlementSource::Subscription).then_some(quantity),
                        organization_id: None,
                    }],
                }],
                organizations: Vec::new(),
            };
            let team = org(EntitlementSource::Subscription, "team");
            let site = org(EntitlementSource::Purchase, "pro");
            let mut with_team = 0;
            for seat in 0..members {
                let own = UserSnapshot {
                    user_id: format!("u{seat}"),
                    version: 1,
                    entitlements: Vec::new(),
                    organizations: Vec::new(),
                };
                let membership = Membership { organization_id: "acme".into(), role: Role::Member, seat };
                let view = member_view(&own, &[(&membership, &team), (&membership, &site)]);
                if status_of(&view.entitlements, "team", now).is_allowed() {
                    with_team += 1;
                    prop_assert!(seat < quantity);
                    prop_assert_eq!(view.entitlements.iter().find(|e| e.key == "team").unwrap().sources[0].organization_id.as_deref(), Some("acme"));
                }
                prop_assert!(status_of(&view.entitlements, "pro", now).is_allowed());
            }
            prop_assert_eq!(with_team, quantity.min(members));
        }
    }

    #[test]
    fn organization_ids_and_subjects() {
        let acme = OrganizationId::parse("acme").unwrap();
        assert_eq!(acme.subject().as_str(), "org:acme");
        assert_eq!(OrganizationId::of_subject("org:acme"), Some(acme));
        assert_eq!(OrganizationId::of_subject("acme"), None);
        assert!(is_organization_subject("org:acme"));
        assert!(!is_organization_subject("u_1"));
        for bad in ["", "a b", &"x".repeat(197), "é"] {
            assert!(OrganizationId::parse(bad).is_err(), "{bad:?}");
        }
        assert!(OrganizationId::parse(&"x".repeat(196)).is_ok());
    }
}
