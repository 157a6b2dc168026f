//! Stripe's JSON as serde reads it: the envelope and the parts of each object the projection
//! uses, derived field by field from Stripe's API reference.
//!
//! Invariant: reading a JSON object into one of these shapes never fails. A field that is
//! absent, `null` or of another type reads as empty ([`Maybe`]), so an optional field Stripe
//! adds, drops or reshapes between API versions never makes an event unreadable; which fields
//! are required is decided by the conversions in the parent module, which name the field.

use serde::Deserialize;
use serde::de::{Deserializer, IgnoredAny};

/// A field kept when it has the expected shape and read as `None` otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Maybe<T>(pub(super) Option<T>);

impl<T> Default for Maybe<T> {
    fn default() -> Self {
        Self(None)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Maybe<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either<T> {
            Expected(T),
            Other(IgnoredAny),
        }
        Ok(Self(match Either::<T>::deserialize(deserializer)? {
            Either::Expected(value) => Some(value),
            Either::Other(_) => None,
        }))
    }
}

impl<T> Maybe<T> {
    pub(super) fn get(self) -> Option<T> {
        self.0
    }

    pub(super) fn as_ref(&self) -> Option<&T> {
        self.0.as_ref()
    }
}

impl Maybe<String> {
    /// The string unless it is empty (Stripe sends `""` for some unset fields).
    pub(super) fn text(self) -> Option<String> {
        self.0.filter(|s| !s.is_empty())
    }
}

/// An expandable field: an object's id, or the object itself in its place.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(super) enum Expandable {
    Id(String),
    Object { id: String },
}

impl Maybe<Expandable> {
    /// The id, whichever of the two shapes carried it, unless it is empty.
    pub(super) fn id(self) -> Option<String> {
        let id = match self.0? {
            Expandable::Id(id) | Expandable::Object { id } => id,
        };
        (!id.is_empty()).then_some(id)
    }
}

/// The envelope of every event (`data` is read on a second pass, by type).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Envelope {
    pub id: Maybe<String>,
    #[serde(rename = "type")]
    pub event_type: Maybe<String>,
    pub created: Maybe<Created>,
    pub livemode: Maybe<bool>,
    /// The Connect account the event comes from (absent for the platform's own).
    pub account: Maybe<String>,
    /// `v2.core.event` for a thin event; `event` for a snapshot event.
    pub object: Maybe<String>,
    /// A thin event's object, to be read from the API.
    pub related_object: Maybe<RelatedObject>,
    /// A thin event's Connect account.
    pub context: Maybe<String>,
}

/// An event's `created`: unix seconds in snapshot events, RFC 3339 text in thin ones.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum Created {
    Unix(i64),
    Text(String),
}

/// A thin event's `related_object` (its `url` is not used: the path is built from the type).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RelatedObject {
    pub id: Maybe<String>,
    #[serde(rename = "type")]
    pub object_type: Maybe<String>,
}

/// `{"data": {"object": T}}`, the rest of the envelope skipped.
#[derive(Debug, Deserialize)]
pub(super) struct Body<T> {
    pub data: Data<T>,
}

#[derive(Debug, Deserialize)]
pub(super) struct Data<T> {
    pub object: T,
}

/// A Stripe list (`{"object":"list","data":[…],"has_more":…}`).
#[derive(Debug, Deserialize)]
pub(super) struct List<T> {
    #[serde(default = "Vec::new")]
    pub data: Vec<Maybe<T>>,
    #[serde(default)]
    pub has_more: Maybe<bool>,
}

impl<T> Maybe<List<T>> {
    /// The list's well-formed elements, in order.
    pub(super) fn items(self) -> impl Iterator<Item = T> {
        self.0
            .into_iter()
            .flat_map(|list| list.data.into_iter().filter_map(Maybe::get))
    }
}

/// The metadata keys this service writes.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Metadata {
    pub user_id: Maybe<String>,
    pub product_key: Maybe<String>,
}

impl Maybe<Metadata> {
    pub(super) fn user_id(&self) -> Option<String> {
        self.as_ref().and_then(|m| m.user_id.clone().text())
    }

    pub(super) fn product_key(&self) -> Option<String> {
        self.as_ref().and_then(|m| m.product_key.clone().text())
    }
}

/// A line item or a subscription item: its price (id or object), else the legacy `plan`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Item {
    pub price: Maybe<Expandable>,
    pub plan: Maybe<Expandable>,
    pub quantity: Maybe<i64>,
    /// Subscription items since basil.
    pub current_period_end: Maybe<i64>,
}

impl Item {
    pub(super) fn price_id(self) -> Option<String> {
        self.price.id().or_else(|| self.plan.id())
    }
}

/// `checkout.session`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct CheckoutSession {
    pub id: Maybe<String>,
    pub mode: Maybe<String>,
    pub payment_status: Maybe<String>,
    pub customer: Maybe<Expandable>,
    pub payment_intent: Maybe<Expandable>,
    pub subscription: Maybe<Expandable>,
    /// The Payment Link the session was opened from (`plink_…`), if any.
    pub payment_link: Maybe<Expandable>,
    pub client_reference_id: Maybe<String>,
    pub metadata: Maybe<Metadata>,
    /// Present only when the event was fetched with `expand[]=line_items`.
    pub line_items: Maybe<List<Item>>,
    pub amount_total: Maybe<i64>,
    pub currency: Maybe<String>,
    pub after_expiration: Maybe<AfterExpiration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct AfterExpiration {
    pub recovery: Maybe<Recovery>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Recovery {
    pub url: Maybe<String>,
}

/// `payment_intent`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct PaymentIntent {
    pub id: Maybe<String>,
    pub customer: Maybe<Expandable>,
    pub amount: Maybe<i64>,
    pub amount_received: Maybe<i64>,
    pub currency: Maybe<String>,
    pub metadata: Maybe<Metadata>,
}

/// `charge`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Charge {
    pub id: Maybe<String>,
    pub payment_intent: Maybe<Expandable>,
    pub customer: Maybe<Expandable>,
    pub amount: Maybe<i64>,
    pub amount_refunded: Maybe<i64>,
    pub refunded: Maybe<bool>,
    pub currency: Maybe<String>,
    /// Included (newest first) on charges delivered in events.
    pub refunds: Maybe<List<Refund>>,
    pub metadata: Maybe<Metadata>,
    /// Before basil: the invoice the charge paid.
    pub invoice: Maybe<Expandable>,
}

/// `refund`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Refund {
    pub id: Maybe<String>,
    pub created: Maybe<i64>,
    pub reason: Maybe<String>,
}

/// `dispute`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Dispute {
    pub id: Maybe<String>,
    pub charge: Maybe<Expandable>,
    pub payment_intent: Maybe<Expandable>,
    pub status: Maybe<String>,
}

/// `invoice`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Invoice {
    pub id: Maybe<String>,
    pub customer: Maybe<Expandable>,
    /// Before basil.
    pub subscription: Maybe<Expandable>,
    /// Before basil: the subscription's metadata copied onto the invoice.
    pub subscription_details: Maybe<SubscriptionDetails>,
    /// Since basil: `parent.subscription_details`.
    pub parent: Maybe<InvoiceParent>,
    pub billing_reason: Maybe<String>,
    pub lines: Maybe<List<InvoiceLine>>,
    pub amount_paid: Maybe<i64>,
    pub currency: Maybe<String>,
    /// Before basil: the payment that paid it.
    pub payment_intent: Maybe<Expandable>,
    pub charge: Maybe<Expandable>,
    /// Since basil, when expanded: its `InvoicePayment`s.
    pub payments: Maybe<List<InvoicePayment>>,
}

/// `invoice_payment` (basil): the link between an invoice and a payment.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct InvoicePayment {
    pub id: Maybe<String>,
    pub invoice: Maybe<Expandable>,
    pub payment: Maybe<PaymentRef>,
    pub status: Maybe<String>,
    pub amount_paid: Maybe<i64>,
    pub currency: Maybe<String>,
}

/// `invoice_payment.payment`: `{type, payment_intent | charge}`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct PaymentRef {
    pub payment_intent: Maybe<Expandable>,
    pub charge: Maybe<Expandable>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct InvoiceParent {
    pub subscription_details: Maybe<SubscriptionDetails>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct SubscriptionDetails {
    pub subscription: Maybe<Expandable>,
    pub metadata: Maybe<Metadata>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct InvoiceLine {
    pub period: Maybe<Period>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Period {
    pub end: Maybe<i64>,
}

/// `subscription`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Subscription {
    pub id: Maybe<String>,
    pub customer: Maybe<Expandable>,
    pub status: Maybe<String>,
    /// Before basil (since basil it is on each item).
    pub current_period_end: Maybe<i64>,
    pub cancel_at_period_end: Maybe<bool>,
    pub ended_at: Maybe<i64>,
    pub canceled_at: Maybe<i64>,
    pub metadata: Maybe<Metadata>,
    pub items: Maybe<List<Item>>,
}

/// `entitlements.active_entitlement_summary`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct FeatureSummary {
    pub customer: Maybe<Expandable>,
    /// Required: `None` when absent, `Some` of an empty list when of another shape.
    pub entitlements: Option<Maybe<List<ActiveEntitlement>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct ActiveEntitlement {
    pub lookup_key: Maybe<String>,
}
