//! What this service offered at a checkout it created, and what that says about the session's
//! completion without asking Stripe.
//!
//! Invariant: an offer completes only its own session (same id, same mode, the same user when
//! the event names one); anything else is left to be read from Stripe. What it fills in is
//! exactly what the session was created to charge, so the projection resolves it against the
//! registry as it would the line items Stripe reports.

use super::events::{CheckoutMode, CheckoutSession};

/// One Checkout Session this service created (a `checkout_offers` row).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckoutOffer {
    pub session_id: String,
    pub user_id: String,
    pub product_key: String,
    pub mode: CheckoutMode,
    pub price: OfferedPrice,
}

/// What the session's one line item charges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OfferedPrice {
    /// A Stripe price (`line_items[0][price]`).
    Stripe(String),
    /// An ad-hoc `price_data` price: no Stripe price id to compare, the amount decides.
    Amount { amount_cents: i64, currency: String },
}

impl CheckoutOffer {
    /// `session` with its line item as offered, when the session is this offer's; `None`
    /// otherwise.
    #[must_use]
    pub fn complete(&self, session: &CheckoutSession) -> Option<CheckoutSession> {
        let own = session.id == self.session_id
            && session.mode == Some(self.mode)
            && session
                .user_id
                .as_ref()
                .is_none_or(|u| u.as_str() == self.user_id);
        own.then(|| CheckoutSession {
            price_id: match &self.price {
                OfferedPrice::Stripe(price) => Some(price.clone()),
                OfferedPrice::Amount { .. } => session.price_id.clone(),
            },
            line_items_known: true,
            ..session.clone()
        })
    }
}

/// The price a Payment Link sells, learned from the first of its sessions read from Stripe. A
/// link's line items cannot change price (an update may change only quantities), so it stands
/// for every later session of the link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkPrice {
    pub payment_link: String,
    pub price_id: String,
}

impl LinkPrice {
    /// `session` with this price as its line item's, when it was opened from this link.
    #[must_use]
    pub fn complete(&self, session: &CheckoutSession) -> Option<CheckoutSession> {
        (session.payment_link.as_deref() == Some(self.payment_link.as_str())).then(|| {
            CheckoutSession {
                price_id: Some(self.price_id.clone()),
                line_items_known: true,
                ..session.clone()
            }
        })
    }

    /// What `session`, once its line items were read, teaches about its Payment Link.
    #[must_use]
    pub fn learned_from(session: &CheckoutSession) -> Option<Self> {
        match (
            &session.payment_link,
            &session.price_id,
            session.line_items_known,
        ) {
            (Some(link), Some(price), true) => Some(Self {
                payment_link: link.clone(),
                price_id: price.clone(),
            }),
            _ => None,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::domain::events::{self, EventKind};
    use shared::samples::{self, Sample};

    fn session(user: &str, object: &str) -> CheckoutSession {
        let sample = Sample {
            user,
            product: "pro",
            object,
            amount: 4900,
            created: 1_700_000_000,
            subscription: false,
        };
        let body = samples::event("evt_offer", "checkout.session.completed", &sample).to_string();
        match events::parse(body.as_bytes()).unwrap().kind {
            EventKind::CheckoutSessionCompleted(s) => s,
            other => panic!("{other:?}"),
        }
    }

    fn offer(s: &CheckoutSession, user: &str, price: OfferedPrice) -> CheckoutOffer {
        CheckoutOffer {
            session_id: s.id.clone(),
            user_id: user.into(),
            product_key: "pro".into(),
            mode: CheckoutMode::Payment,
            price,
        }
    }

    #[test]
    fn an_offer_fills_in_its_own_sessions_line_item_and_nothing_else() {
        let s = session("u_1", "o1");
        assert!(!s.line_items_known, "webhooks carry no line items");
        let priced = offer(&s, "u_1", OfferedPrice::Stripe("price_pro".into()))
            .complete(&s)
            .unwrap();
        assert_eq!(priced.price_id.as_deref(), Some("price_pro"));
        assert!(priced.line_items_known);
        assert_eq!(
            (priced.amount_total, &priced.user_id),
            (s.amount_total, &s.user_id)
        );

        let by_amount = OfferedPrice::Amount {
            amount_cents: 4900,
            currency: "usd".into(),
        };
        let ad_hoc = offer(&s, "u_1", by_amount.clone()).complete(&s).unwrap();
        assert_eq!(
            ad_hoc.price_id, None,
            "the amount decides, as for price_data"
        );
        assert!(ad_hoc.line_items_known);

        // Another user's, another session's, another mode's offer completes nothing.
        assert!(offer(&s, "u_2", by_amount.clone()).complete(&s).is_none());
        let other = session("u_1", "o2");
        assert!(
            offer(&other, "u_1", by_amount.clone())
                .complete(&s)
                .is_none()
        );
        let mut subscription = offer(&s, "u_1", by_amount);
        subscription.mode = CheckoutMode::Subscription;
        assert!(subscription.complete(&s).is_none());
    }

    #[test]
    fn a_links_price_completes_its_sessions_once_learned() {
        let mut s = session("u_1", "l1");
        assert_eq!(LinkPrice::learned_from(&s), None, "nothing read yet");
        s.payment_link = Some("plink_1".into());
        let link = LinkPrice {
            payment_link: "plink_1".into(),
            price_id: "price_pro".into(),
        };
        let completed = link.complete(&s).unwrap();
        assert_eq!(completed.price_id.as_deref(), Some("price_pro"));
        assert!(completed.line_items_known);
        assert_eq!(LinkPrice::learned_from(&completed), Some(link.clone()));
        let mut other = s.clone();
        other.payment_link = Some("plink_2".into());
        assert!(link.complete(&other).is_none());
        other.payment_link = None;
        assert!(link.complete(&other).is_none());
    }
}
