//! The fold of a batch: stored rows and the facts of fresh events joined into the rows to
//! write, without I/O. The store reads the rows, calls these functions and writes the result
//! (`store/merge.rs`).
//!
//! Invariant: a row only ever holds the join of the facts that share one of its Stripe ids, so
//! the rows after a batch are the connected components (by shared checkout session, payment
//! intent, charge or invoice id) of the stored rows and the batch's facts, each folded with
//! [`PurchaseFacts::merge`], in any order; subscriptions and a customer's features are grouped
//! by id the same way. Any grouping or order of events gives the same rows.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::message::Notice;
use super::offer::CheckoutOffer;
use super::projection::{
    AbandonedCheckout, FeatureFacts, PurchaseFacts, Registry, SubscriptionFacts,
};

/// One purchase row to write: the stored row it updates (`None`: a new row) and its facts.
#[derive(Debug, Clone, PartialEq)]
pub struct PurchaseWrite {
    pub id: Option<i64>,
    pub facts: PurchaseFacts,
}

/// Where a purchase node of [`purchases`] comes from.
enum Origin {
    /// A stored row, by id.
    Stored(i64),
    /// A delta, by its event's index in the batch.
    Event(usize),
}

/// The merged purchase rows, and the stored rows folded into another one (to delete).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Purchases {
    pub writes: Vec<PurchaseWrite>,
    pub deletes: Vec<i64>,
}

/// Folds the stored rows and the deltas into connected components by shared Stripe ids.
///
/// `stored`: the rows sharing an id with a delta, by row id; `deltas`: each fresh event's facts,
/// by its index in the batch; `owners`: customer → user. Each event's entry of `users` gains the
/// users of the rows it touched.
#[must_use]
pub fn purchases(
    stored: Vec<(i64, PurchaseFacts)>,
    deltas: &[(usize, &PurchaseFacts)],
    owners: &HashMap<String, String>,
    users: &mut [BTreeSet<String>],
) -> Purchases {
    // Nodes: the stored rows, then the deltas.
    let mut nodes: Vec<(Origin, PurchaseFacts)> = Vec::with_capacity(stored.len() + deltas.len());
    for (id, facts) in stored {
        nodes.push((Origin::Stored(id), facts));
    }
    for (event, delta) in deltas {
        nodes.push((Origin::Event(*event), (*delta).clone()));
    }
    let mut parent: Vec<usize> = (0..nodes.len()).collect();
    fn root(parent: &mut [usize], mut n: usize) -> usize {
        while parent[n] != n {
            parent[n] = parent[parent[n]];
            n = parent[n];
        }
        n
    }
    let mut seen: HashMap<(u8, &str), usize> = HashMap::new();
    for (n, (_, facts)) in nodes.iter().enumerate() {
        for (column, id) in [
            (0, &facts.checkout_session_id),
            (1, &facts.payment_intent_id),
            (2, &facts.charge_id),
            (3, &facts.invoice_id),
        ] {
            let Some(id) = id else { continue };
            match seen.get(&(column, id.as_str())) {
                Some(&other) => {
                    let (a, b) = (root(&mut parent, n), root(&mut parent, other));
                    parent[a.max(b)] = a.min(b);
                }
                None => {
                    seen.insert((column, id.as_str()), n);
                }
            }
        }
    }
    let mut components: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for n in 0..nodes.len() {
        let r = root(&mut parent, n);
        components.entry(r).or_default().push(n);
    }
    let mut out = Purchases {
        writes: Vec::with_capacity(components.len()),
        deletes: Vec::new(),
    };
    for members in components.values() {
        let mut stored_ids: Vec<i64> = Vec::new();
        let mut concerned: BTreeSet<String> = BTreeSet::new();
        let mut events = Vec::new();
        for &n in members {
            match &nodes[n] {
                (Origin::Stored(id), facts) => {
                    stored_ids.push(*id);
                    concerned.extend(facts.user_id.clone());
                }
                (Origin::Event(event), _) => events.push(*event),
            }
        }
        // A component is never empty.
        let Some(mut merged) = members
            .iter()
            .map(|&n| nodes[n].1.clone())
            .reduce(PurchaseFacts::merge)
        else {
            continue;
        };
        resolve_user(
            &mut merged.user_id,
            merged.customer_id.as_ref(),
            owners,
            concerned,
            &events,
            users,
        );
        stored_ids.sort_unstable();
        out.deletes.extend(stored_ids.iter().skip(1));
        out.writes.push(PurchaseWrite {
            id: stored_ids.first().copied(),
            facts: merged,
        });
    }
    out
}

/// Gives a merged row without a user its customer's user, and charges the row's users (`concerned`:
/// those of the stored rows it folds, and its own) to each of its `events`.
fn resolve_user(
    user: &mut Option<String>,
    customer: Option<&String>,
    owners: &HashMap<String, String>,
    mut concerned: BTreeSet<String>,
    events: &[usize],
    users: &mut [BTreeSet<String>],
) {
    if user.is_none() {
        *user = customer.and_then(|c| owners.get(c).cloned());
    }
    concerned.extend(user.clone());
    for &event in events {
        users[event].extend(concerned.iter().cloned());
    }
}

/// Folds each subscription's stored row and deltas.
#[must_use]
pub fn subscriptions(
    stored: Vec<SubscriptionFacts>,
    deltas: &[(usize, &SubscriptionFacts)],
    owners: &HashMap<String, String>,
    users: &mut [BTreeSet<String>],
) -> Vec<SubscriptionFacts> {
    let keyed = Keyed {
        key: |s: &SubscriptionFacts| s.id.clone(),
        merge: SubscriptionFacts::merge,
        owner: subscription_owner,
    };
    keyed.fold(stored, deltas, owners, users)
}

/// Folds each customer's stored Stripe feature row with its deltas; the row takes the
/// customer's user.
#[must_use]
pub fn features(
    stored: Vec<FeatureFacts>,
    deltas: &[(usize, &FeatureFacts)],
    owners: &HashMap<String, String>,
    users: &mut [BTreeSet<String>],
) -> Vec<FeatureFacts> {
    let keyed = Keyed {
        key: |f: &FeatureFacts| f.customer_id.clone(),
        merge: FeatureFacts::merge,
        owner: feature_owner,
    };
    keyed.fold(stored, deltas, owners, users)
}

fn subscription_owner(s: &mut SubscriptionFacts) -> (&mut Option<String>, Option<String>) {
    (&mut s.user_id, s.customer_id.clone())
}

fn feature_owner(f: &mut FeatureFacts) -> (&mut Option<String>, Option<String>) {
    (&mut f.user_id, Some(f.customer_id.clone()))
}

/// Rows keyed by one Stripe id (a subscription, a customer's features): how to key, join and
/// attribute them.
struct Keyed<T> {
    key: fn(&T) -> String,
    merge: fn(T, T) -> T,
    /// The row's user (to fill) and customer.
    owner: fn(&mut T) -> (&mut Option<String>, Option<String>),
}

impl<T: Clone> Keyed<T> {
    /// Groups the deltas by key, each group folded into the stored row of the same key (read
    /// for exactly these keys); a merged row without a user takes its customer's, and its
    /// users are charged to its events.
    fn fold(
        &self,
        stored: Vec<T>,
        deltas: &[(usize, &T)],
        owners: &HashMap<String, String>,
        users: &mut [BTreeSet<String>],
    ) -> Vec<T> {
        let mut grouped: BTreeMap<String, (Vec<usize>, T)> = stored
            .into_iter()
            .map(|row| ((self.key)(&row), (Vec::new(), row)))
            .collect();
        for (event, delta) in deltas {
            let (events, merged) = grouped
                .entry((self.key)(delta))
                .or_insert_with(|| (Vec::new(), (*delta).clone()));
            events.push(*event);
            *merged = (self.merge)(merged.clone(), (*delta).clone());
        }
        grouped
            .into_values()
            .map(|(events, mut merged)| {
                let (user, customer) = (self.owner)(&mut merged);
                let concerned: BTreeSet<String> = user.iter().cloned().collect();
                resolve_user(user, customer.as_ref(), owners, concerned, &events, users);
                merged
            })
            .collect()
    }
}

/// The `checkout_abandoned` notice of each abandoned checkout this service offered: a session
/// it created (its recorded offer among `offers`: that user and product), or one whose
/// metadata names a registered product and whose user is known (named by the session, or its customer's). A
/// Payment Link's session (no product of ours, a `client_reference_id` anyone can set) gets
/// none. At most one per session (the notice's dedupe key).
#[must_use]
pub fn abandoned_notices(
    abandoned: &[&AbandonedCheckout],
    owners: &HashMap<String, String>,
    offers: &[CheckoutOffer],
    registry: &Registry,
) -> Vec<Notice> {
    abandoned
        .iter()
        .filter_map(|a| {
            if let Some(offer) = offers.iter().find(|o| o.session_id == a.session_id) {
                return Some(Notice::abandoned(
                    a,
                    offer.user_id.clone(),
                    &offer.product_key,
                ));
            }
            let product = registry.get(a.product_key.as_deref()?)?;
            let user = match &a.user_id {
                Some(user) => user.as_str().to_owned(),
                None => owners.get(a.customer_id.as_ref()?)?.clone(),
            };
            Some(Notice::abandoned(a, user, &product.key))
        })
        .collect()
}
