//! Typed Stripe events: the raw queue body parsed once, at the edge, into the few shapes the
//! projection understands. `wire` holds Stripe's JSON as serde derives read it; this module
//! turns it into the domain's types and decides which fields are required.
//!
//! Invariant: a body that is not JSON, lacks the envelope (`id`, `type`, `created`) or lacks a
//! field the projection cannot do without (the object id, a dispute's status…) is a permanent
//! [`EventError`]; every event type the projection does not use becomes [`EventKind::Unhandled`]
//! without reading its payload. Both the pre-2025-03-31 shapes and the "basil" shapes are
//! read (`current_period_end` on the subscription or on its items; the invoice's subscription
//! at `subscription` or `parent.subscription_details.subscription`), newest first. Checked
//! against Stripe's published objects in `processor/tests/stripe_fixtures.rs`.

use shared::ids::{StripeEventId, UserId};

mod dispute;
mod thin;
mod types;
mod wire;

use thin::thin_kind;
pub use thin::{GENERATION_FAILURE_RESOLVED, ThinEvent, missed_event};
pub use types::{HANDLED_TYPES, type_label};

pub use dispute::DisputeStatus;

/// One Stripe event, envelope plus the typed part the projection uses.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub id: StripeEventId,
    pub event_type: String,
    /// Unix seconds; Stripe's only ordering signal (several events often share a second).
    pub created: i64,
    pub kind: EventKind,
    /// Where the event comes from: its mode and Connect account.
    pub origin: Origin,
}

/// The mode and account an event says it comes from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origin {
    /// `livemode`; `None` when the payload does not say.
    pub livemode: Option<bool>,
    /// The Connect `account`; `None` for the platform's own events.
    pub account: Option<String>,
}

impl Event {
    /// Who the event most likely concerns: the application user when the payload names one,
    /// else the Stripe customer. A routing hint for spreading work; correctness never depends
    /// on it.
    #[must_use]
    pub fn routing_hint(&self) -> Option<&str> {
        let (user, customer) = match &self.kind {
            EventKind::CheckoutSessionCompleted(o)
            | EventKind::CheckoutSessionAsyncPaymentSucceeded(o)
            | EventKind::CheckoutSessionAsyncPaymentFailed(o)
            | EventKind::CheckoutSessionExpired(o) => (&o.user_id, &o.customer),
            EventKind::PaymentIntentSucceeded(o) => (&o.user_id, &o.customer),
            EventKind::ChargeRefunded(o) => (&o.user_id, &o.customer),
            EventKind::InvoicePaid(o) | EventKind::InvoicePaymentFailed(o) => {
                (&o.user_id, &o.customer)
            }
            EventKind::SubscriptionCreated(o)
            | EventKind::SubscriptionUpdated(o)
            | EventKind::SubscriptionDeleted(o) => (&o.user_id, &o.customer),
            EventKind::FeatureSummaryUpdated(o) => return Some(o.customer.as_str()),
            EventKind::ChargeDispute(_)
            | EventKind::InvoicePaymentPaid(_)
            | EventKind::Thin(_)
            | EventKind::GenerationFailureResolved
            | EventKind::Unhandled => return None,
        };
        user.as_ref().map(UserId::as_str).or(customer.as_deref())
    }
}

impl Event {
    /// The session of a paid checkout (`checkout.session.completed` or
    /// `async_payment_succeeded`): the events whose line items decide what is granted.
    #[must_use]
    pub fn paid_session(&self) -> Option<&CheckoutSession> {
        match &self.kind {
            EventKind::CheckoutSessionCompleted(s)
            | EventKind::CheckoutSessionAsyncPaymentSucceeded(s) => Some(s),
            _ => None,
        }
    }

    /// This event with `session` in place of its paid checkout's session; any other event
    /// unchanged.
    #[must_use]
    pub fn with_paid_session(self, session: CheckoutSession) -> Self {
        let kind = match self.kind {
            EventKind::CheckoutSessionCompleted(_) => EventKind::CheckoutSessionCompleted(session),
            EventKind::CheckoutSessionAsyncPaymentSucceeded(_) => {
                EventKind::CheckoutSessionAsyncPaymentSucceeded(session)
            }
            other => other,
        };
        Self { kind, ..self }
    }
}

/// The event types the projection acts on.
#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    CheckoutSessionCompleted(CheckoutSession),
    CheckoutSessionAsyncPaymentSucceeded(CheckoutSession),
    CheckoutSessionAsyncPaymentFailed(CheckoutSession),
    CheckoutSessionExpired(CheckoutSession),
    PaymentIntentSucceeded(PaymentIntent),
    ChargeRefunded(Charge),
    /// `charge.dispute.created`, `.updated`, `.closed`, `.funds_withdrawn` and
    /// `.funds_reinstated`: each carries the dispute with its status at that moment.
    ChargeDispute(Dispute),
    InvoicePaid(Invoice),
    InvoicePaymentFailed(Invoice),
    /// `invoice_payment.paid`: links a payment to its invoice (and so a dispute or refund of
    /// the payment to the invoice's subscription).
    InvoicePaymentPaid(InvoicePayment),
    SubscriptionCreated(Subscription),
    SubscriptionUpdated(Subscription),
    SubscriptionDeleted(Subscription),
    /// `entitlements.active_entitlement_summary.updated`: this customer's Stripe features
    /// changed.
    FeatureSummaryUpdated(FeatureSummary),
    /// A thin event (`object: "v2.core.event"`) of a handled v1 type (`v1.<type>`): its object
    /// is read from Stripe before it is applied as its snapshot twin would be
    /// ([`crate::complete`]).
    Thin(ThinEvent),
    /// `v2.core.health.event_generation_failure.resolved`: Stripe failed to generate an event
    /// (it is in no list of events) and says which; the event is read
    /// (`GET /v2/core/events/{id}`, its `data.impact`) and the object it names applied as the
    /// missing event's twin ([`missed_event`]).
    GenerationFailureResolved,
    /// Any other type: acknowledged and ignored.
    Unhandled,
}

/// `checkout.session.*`'s `data.object`.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckoutSession {
    pub id: String,
    /// `None`: `setup` or a mode this code does not know.
    pub mode: Option<CheckoutMode>,
    pub payment_status: CheckoutPaymentStatus,
    pub customer: Option<String>,
    pub payment_intent: Option<String>,
    pub subscription: Option<String>,
    /// The Payment Link it was opened from (`plink_…`).
    pub payment_link: Option<String>,
    /// `client_reference_id`, else `metadata.user_id`.
    pub user_id: Option<UserId>,
    /// `metadata.product_key`.
    pub product_key: Option<String>,
    /// The first line item's price, when the payload carries `line_items` (expanded).
    pub price_id: Option<String>,
    /// Whether what the session charges is known: the payload carried its line items, or they
    /// were completed from this service's own offer or from Stripe (`price_id` may still be
    /// `None` then: an ad-hoc `price_data` price known by amount and currency).
    pub line_items_known: bool,
    /// Stripe answered `resource_missing` for the session (another account or mode): nothing
    /// it says can be checked, so it grants nothing.
    pub unknown_to_stripe: bool,
    pub amount_total: Option<i64>,
    pub currency: Option<String>,
    /// `after_expiration.recovery.url` (only on expired sessions with recovery enabled).
    pub recovery_url: Option<String>,
}

impl CheckoutSession {
    /// Whether what the session charges is still to be learned (a `setup` session, or one of a
    /// mode this code does not know, charges nothing).
    #[must_use]
    pub fn line_items_missing(&self) -> bool {
        !self.line_items_known && self.mode.is_some()
    }
}

/// Checkout `mode`: a one-time payment or a subscription (a product's mode, and a session's
/// unless it is `setup` or a mode this code does not know, which never grant anything).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckoutMode {
    Payment,
    Subscription,
}

impl CheckoutMode {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Payment => "payment",
            Self::Subscription => "subscription",
        }
    }

    /// Parses Stripe's (and the columns') spelling; `None` for `setup` or any other mode.
    #[must_use]
    pub fn from_stripe(raw: &str) -> Option<Self> {
        match raw {
            "payment" => Some(Self::Payment),
            "subscription" => Some(Self::Subscription),
            _ => None,
        }
    }
}

impl std::fmt::Display for CheckoutMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Checkout `payment_status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckoutPaymentStatus {
    Paid,
    Unpaid,
    NoPaymentRequired,
}

/// `payment_intent.*`'s `data.object`.
#[derive(Debug, Clone, PartialEq)]
pub struct PaymentIntent {
    pub id: String,
    pub customer: Option<String>,
    /// `amount_received`, else `amount`.
    pub amount: Option<i64>,
    pub currency: Option<String>,
    /// `metadata.user_id` (set through Checkout's `payment_intent_data[metadata]`).
    pub user_id: Option<UserId>,
    /// `metadata.product_key`.
    pub product_key: Option<String>,
}

/// `charge.*`'s `data.object`.
#[derive(Debug, Clone, PartialEq)]
pub struct Charge {
    pub id: String,
    pub payment_intent: Option<String>,
    pub customer: Option<String>,
    pub amount: i64,
    pub amount_refunded: i64,
    /// True only when the charge is fully refunded.
    pub refunded: bool,
    pub currency: Option<String>,
    /// The newest refund in `refunds.data`, when Stripe included the list.
    pub latest_refund: Option<Refund>,
    pub user_id: Option<UserId>,
    pub product_key: Option<String>,
    /// The invoice it paid (`invoice`, before basil; since basil a charge no longer names it).
    pub invoice: Option<String>,
}

impl Charge {
    /// Stripe sets `refunded` only on a full refund; `amount_refunded >= amount` covers shapes
    /// where the flag is missing.
    #[must_use]
    pub fn is_fully_refunded(&self) -> bool {
        self.refunded || (self.amount > 0 && self.amount_refunded >= self.amount)
    }
}

/// One refund of a charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refund {
    pub id: String,
    pub reason: Option<String>,
}

/// `charge.dispute.*`'s `data.object`.
#[derive(Debug, Clone, PartialEq)]
pub struct Dispute {
    pub id: String,
    pub charge: Option<String>,
    pub payment_intent: Option<String>,
    pub status: DisputeStatus,
    /// What the disputed payment paid, when it is a subscription's: a dispute names only its
    /// charge and payment intent, so this is learnt from Stripe's invoice payments
    /// ([`Dispute::with_invoice`]) when nothing this service holds ties the payment yet.
    pub paid_for: PaidFor,
}

/// Whether a disputed payment is known to have paid an invoice.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum PaidFor {
    /// Not looked up: the payment may be a subscription's that nothing ties yet.
    #[default]
    Unknown,
    /// Known: this service holds the payment as a purchase or an invoice's, or Stripe said it
    /// paid no invoice.
    Settled,
    /// Stripe said it paid this invoice of this subscription.
    Invoice {
        invoice: String,
        subscription: Option<String>,
    },
}

impl Dispute {
    /// True while the disputed payment may be a subscription's that nothing ties yet.
    #[must_use]
    pub fn needs_invoice(&self) -> bool {
        self.paid_for == PaidFor::Unknown
    }

    /// The dispute with what its payment paid settled.
    #[must_use]
    pub fn with_invoice(mut self, paid_for: PaidFor) -> Self {
        self.paid_for = paid_for;
        self
    }

    /// The payment's id to look it up by: its payment intent, else its charge.
    #[must_use]
    pub fn payment(&self) -> Option<&str> {
        self.payment_intent.as_deref().or(self.charge.as_deref())
    }
}

/// `invoice.*`'s `data.object`.
#[derive(Debug, Clone, PartialEq)]
pub struct Invoice {
    pub id: String,
    pub customer: Option<String>,
    /// `parent.subscription_details.subscription` (basil), else `subscription`.
    pub subscription: Option<String>,
    pub billing_reason: Option<String>,
    /// The latest `lines.data[].period.end`: the end of the period this invoice pays for.
    pub period_end: Option<i64>,
    pub amount_paid: Option<i64>,
    pub currency: Option<String>,
    /// The payment that paid it: `payment_intent` / `charge` before basil, else its first
    /// expanded `payments` entry (a basil invoice names its payments only through
    /// `InvoicePayment`s).
    pub payment_intent: Option<String>,
    pub charge: Option<String>,
    /// From the subscription metadata copied onto the invoice (`subscription_details.metadata`).
    pub user_id: Option<UserId>,
    pub product_key: Option<String>,
}

/// `invoice_payment.paid`'s `data.object`: which payment paid which invoice.
#[derive(Debug, Clone, PartialEq)]
pub struct InvoicePayment {
    pub id: String,
    pub invoice: String,
    pub payment_intent: Option<String>,
    pub charge: Option<String>,
    pub amount_paid: Option<i64>,
    pub currency: Option<String>,
}

/// `customer.subscription.*`'s `data.object`.
#[derive(Debug, Clone, PartialEq)]
pub struct Subscription {
    pub id: String,
    pub customer: Option<String>,
    pub status: SubscriptionStatus,
    /// The latest `items.data[].current_period_end` (basil), else `current_period_end`.
    pub current_period_end: Option<i64>,
    pub cancel_at_period_end: bool,
    /// `ended_at`, else `canceled_at` when the subscription is over.
    pub ended_at: Option<i64>,
    pub user_id: Option<UserId>,
    pub product_key: Option<String>,
    /// The first item's price (`items.data[0].price.id`, or `plan.id` in pre-2018 shapes).
    pub price_id: Option<String>,
    /// The first item's quantity (seats).
    pub quantity: Option<i64>,
}

/// `entitlements.active_entitlement_summary`'s features, by `lookup_key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureSummary {
    pub customer: String,
    /// Sorted, deduplicated.
    pub lookup_keys: Vec<String>,
    /// False when the event's list was cut short (`has_more`, Stripe lists at most 10): the
    /// complete list must be read from `GET /v1/entitlements/active_entitlements`.
    pub complete: bool,
}

impl FeatureSummary {
    /// The summary with `lookup_keys` as the complete list.
    #[must_use]
    pub fn completed(mut self, mut lookup_keys: Vec<String>) -> Self {
        lookup_keys.sort();
        lookup_keys.dedup();
        self.lookup_keys = lookup_keys;
        self.complete = true;
        self
    }
}

/// Stripe's subscription statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SubscriptionStatus {
    Incomplete,
    Trialing,
    Active,
    PastDue,
    Unpaid,
    Paused,
    IncompleteExpired,
    Canceled,
}

impl SubscriptionStatus {
    /// Stripe's spelling.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Incomplete => "incomplete",
            Self::Trialing => "trialing",
            Self::Active => "active",
            Self::PastDue => "past_due",
            Self::Unpaid => "unpaid",
            Self::Paused => "paused",
            Self::IncompleteExpired => "incomplete_expired",
            Self::Canceled => "canceled",
        }
    }

    /// Parses Stripe's spelling.
    #[must_use]
    pub fn from_stripe(raw: &str) -> Option<Self> {
        Some(match raw {
            "incomplete" => Self::Incomplete,
            "trialing" => Self::Trialing,
            "active" => Self::Active,
            "past_due" => Self::PastDue,
            "unpaid" => Self::Unpaid,
            "paused" => Self::Paused,
            "incomplete_expired" => Self::IncompleteExpired,
            "canceled" => Self::Canceled,
            _ => return None,
        })
    }

    /// Statuses a subscription never leaves.
    #[must_use]
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Canceled | Self::IncompleteExpired)
    }
}

/// Why a body can never be projected (dead-letter it; retrying cannot help).
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("body is not JSON: {0}")]
    NotJson(#[from] serde_json::Error),
    #[error("missing or invalid required field `{0}`")]
    MissingField(&'static str),
    #[error("invalid value in field `{field}`")]
    InvalidField { field: &'static str },
}

/// Parses a raw Stripe event body.
///
/// # Errors
/// [`EventError`] when the body is not a JSON object with the event envelope, or when a handled
/// event type lacks a field the projection requires.
pub fn parse(body: &[u8]) -> Result<Event, EventError> {
    let envelope: wire::Envelope = serde_json::from_slice(body).map_err(|e| {
        if e.is_data() {
            // JSON, but not an object.
            EventError::MissingField("id")
        } else {
            EventError::NotJson(e)
        }
    })?;
    let id = envelope.id.get().ok_or(EventError::MissingField("id"))?;
    let id = StripeEventId::parse(&id).map_err(|_| EventError::InvalidField { field: "id" })?;
    let event_type = envelope
        .event_type
        .get()
        .ok_or(EventError::MissingField("type"))?;
    let created = match envelope.created.get() {
        Some(wire::Created::Unix(seconds)) => seconds,
        Some(wire::Created::Text(text)) => chrono::DateTime::parse_from_rfc3339(&text)
            .map_err(|_| EventError::InvalidField { field: "created" })?
            .timestamp(),
        None => return Err(EventError::MissingField("created")),
    };
    let thin = envelope.object.get().as_deref() == Some("v2.core.event");
    let origin = Origin {
        livemode: envelope.livemode.get(),
        account: if thin {
            envelope.context.text()
        } else {
            envelope.account.text()
        },
    };
    if thin {
        return Ok(Event {
            kind: thin_kind(&event_type, envelope.related_object.get())?,
            id,
            event_type,
            created,
            origin,
        });
    }
    let kind = match event_type.as_str() {
        "checkout.session.completed" => {
            EventKind::CheckoutSessionCompleted(checkout_session(object(body)?)?)
        }
        "checkout.session.async_payment_succeeded" => {
            EventKind::CheckoutSessionAsyncPaymentSucceeded(checkout_session(object(body)?)?)
        }
        "checkout.session.async_payment_failed" => {
            EventKind::CheckoutSessionAsyncPaymentFailed(checkout_session(object(body)?)?)
        }
        "checkout.session.expired" => {
            EventKind::CheckoutSessionExpired(checkout_session(object(body)?)?)
        }
        "payment_intent.succeeded" => {
            EventKind::PaymentIntentSucceeded(payment_intent(object(body)?)?)
        }
        "charge.refunded" => EventKind::ChargeRefunded(charge(object(body)?)?),
        "charge.dispute.created"
        | "charge.dispute.updated"
        | "charge.dispute.closed"
        | "charge.dispute.funds_withdrawn"
        | "charge.dispute.funds_reinstated" => EventKind::ChargeDispute(dispute(object(body)?)?),
        "invoice.paid" => EventKind::InvoicePaid(invoice(object(body)?)?),
        "invoice.payment_failed" => EventKind::InvoicePaymentFailed(invoice(object(body)?)?),
        "invoice_payment.paid" => EventKind::InvoicePaymentPaid(invoice_payment(object(body)?)?),
        "customer.subscription.created" => {
            EventKind::SubscriptionCreated(subscription(object(body)?)?)
        }
        "customer.subscription.updated" => {
            EventKind::SubscriptionUpdated(subscription(object(body)?)?)
        }
        "customer.subscription.deleted" => {
            EventKind::SubscriptionDeleted(subscription(object(body)?)?)
        }
        "entitlements.active_entitlement_summary.updated" => {
            EventKind::FeatureSummaryUpdated(feature_summary(object(body)?)?)
        }
        _ => EventKind::Unhandled,
    };
    Ok(Event {
        id,
        event_type,
        created,
        kind,
        origin,
    })
}

/// `data.object` read as `T` (a second pass over the body, taken only for handled types).
fn object<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, EventError> {
    serde_json::from_slice::<wire::Body<T>>(body)
        .map(|b| b.data.object)
        .map_err(|_| EventError::MissingField("data.object"))
}

fn required(value: wire::Maybe<String>, field: &'static str) -> Result<String, EventError> {
    value.text().ok_or(EventError::MissingField(field))
}

fn user_id(raw: Option<String>, field: &'static str) -> Result<Option<UserId>, EventError> {
    raw.map(|raw| UserId::parse(&raw).map_err(|_| EventError::InvalidField { field }))
        .transpose()
}

fn checkout_session(obj: wire::CheckoutSession) -> Result<CheckoutSession, EventError> {
    let id = required(obj.id, "id")?;
    let mode = match obj.mode.get() {
        Some(raw) => CheckoutMode::from_stripe(&raw),
        None => return Err(EventError::MissingField("mode")),
    };
    let payment_status = match obj.payment_status.get().as_deref() {
        Some("paid") => CheckoutPaymentStatus::Paid,
        Some("unpaid") => CheckoutPaymentStatus::Unpaid,
        Some("no_payment_required") => CheckoutPaymentStatus::NoPaymentRequired,
        Some(_) => {
            return Err(EventError::InvalidField {
                field: "payment_status",
            });
        }
        None => return Err(EventError::MissingField("payment_status")),
    };
    let user = match obj.client_reference_id.text() {
        Some(raw) => user_id(Some(raw), "client_reference_id")?,
        None => user_id(obj.metadata.user_id(), "metadata.user_id")?,
    };
    Ok(CheckoutSession {
        id,
        mode,
        payment_status,
        customer: obj.customer.id(),
        payment_intent: obj.payment_intent.id(),
        subscription: obj.subscription.id(),
        payment_link: obj.payment_link.id(),
        user_id: user,
        product_key: obj.metadata.product_key(),
        line_items_known: obj.line_items.as_ref().is_some(),
        unknown_to_stripe: false,
        price_id: obj.line_items.items().next().and_then(wire::Item::price_id),
        amount_total: obj.amount_total.get(),
        currency: obj.currency.text(),
        recovery_url: obj
            .after_expiration
            .get()
            .and_then(|a| a.recovery.get())
            .and_then(|r| r.url.text()),
    })
}

fn payment_intent(obj: wire::PaymentIntent) -> Result<PaymentIntent, EventError> {
    Ok(PaymentIntent {
        id: required(obj.id, "id")?,
        customer: obj.customer.id(),
        amount: obj
            .amount_received
            .get()
            .filter(|a| *a > 0)
            .or(obj.amount.get()),
        currency: obj.currency.text(),
        user_id: user_id(obj.metadata.user_id(), "metadata.user_id")?,
        product_key: obj.metadata.product_key(),
    })
}

fn charge(obj: wire::Charge) -> Result<Charge, EventError> {
    let amount = obj.amount.get().ok_or(EventError::MissingField("amount"))?;
    let amount_refunded = obj
        .amount_refunded
        .get()
        .ok_or(EventError::MissingField("amount_refunded"))?;
    // Refund lists are newest first; take the highest `created` in case they are not.
    let latest_refund = obj
        .refunds
        .items()
        .filter_map(|r| Some((r.created.get().unwrap_or(0), r.id.text()?, r.reason.text())))
        .max_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)))
        .map(|(_, id, reason)| Refund { id, reason });
    Ok(Charge {
        id: required(obj.id, "id")?,
        payment_intent: obj.payment_intent.id(),
        customer: obj.customer.id(),
        amount,
        amount_refunded,
        refunded: obj.refunded.get().unwrap_or(false),
        currency: obj.currency.text(),
        latest_refund,
        user_id: user_id(obj.metadata.user_id(), "metadata.user_id")?,
        product_key: obj.metadata.product_key(),
        invoice: obj.invoice.id(),
    })
}

fn dispute(obj: wire::Dispute) -> Result<Dispute, EventError> {
    let status = match obj.status.text() {
        Some(raw) => DisputeStatus::from_stripe(&raw),
        None => return Err(EventError::MissingField("status")),
    };
    let charge = obj.charge.id();
    let payment_intent = obj.payment_intent.id();
    if charge.is_none() && payment_intent.is_none() {
        return Err(EventError::MissingField("charge"));
    }
    Ok(Dispute {
        id: required(obj.id, "id")?,
        charge,
        payment_intent,
        status,
        paid_for: PaidFor::Unknown,
    })
}

fn invoice(obj: wire::Invoice) -> Result<Invoice, EventError> {
    // The payment that paid it, when basil's `payments` list was expanded.
    let paid_by = obj
        .payments
        .items()
        .find_map(|p| p.payment.get())
        .unwrap_or_default();
    // Newest shape first: basil moved the subscription under `parent`.
    let details_new = obj.parent.get().and_then(|p| p.subscription_details.get());
    let details_old = obj.subscription_details.get();
    let meta = |key: fn(&wire::Maybe<wire::Metadata>) -> Option<String>| {
        details_new
            .as_ref()
            .and_then(|d| key(&d.metadata))
            .or_else(|| details_old.as_ref().and_then(|d| key(&d.metadata)))
    };
    let user = meta(wire::Maybe::user_id);
    let product_key = meta(wire::Maybe::product_key);
    let subscription = details_new
        .and_then(|d| d.subscription.id())
        .or_else(|| obj.subscription.id());
    Ok(Invoice {
        id: required(obj.id, "id")?,
        customer: obj.customer.id(),
        subscription,
        billing_reason: obj.billing_reason.text(),
        period_end: obj
            .lines
            .items()
            .filter_map(|line| line.period.get()?.end.get())
            .max(),
        user_id: user_id(user, "subscription_details.metadata.user_id")?,
        product_key,
        amount_paid: obj.amount_paid.get(),
        currency: obj.currency.text(),
        payment_intent: obj.payment_intent.id().or(paid_by.payment_intent.id()),
        charge: obj.charge.id().or(paid_by.charge.id()),
    })
}

fn invoice_payment(obj: wire::InvoicePayment) -> Result<InvoicePayment, EventError> {
    let payment = obj.payment.get().unwrap_or_default();
    let payment_intent = payment.payment_intent.id();
    let charge = payment.charge.id();
    if payment_intent.is_none() && charge.is_none() {
        return Err(EventError::MissingField("payment.payment_intent"));
    }
    Ok(InvoicePayment {
        id: required(obj.id, "id")?,
        invoice: obj
            .invoice
            .id()
            .ok_or(EventError::MissingField("invoice"))?,
        payment_intent,
        charge,
        amount_paid: obj.amount_paid.get(),
        currency: obj.currency.text(),
    })
}

fn feature_summary(obj: wire::FeatureSummary) -> Result<FeatureSummary, EventError> {
    let customer = obj
        .customer
        .id()
        .ok_or(EventError::MissingField("customer"))?;
    let list = obj
        .entitlements
        .ok_or(EventError::MissingField("entitlements"))?;
    let has_more = list.as_ref().and_then(|l| l.has_more.0).unwrap_or(false);
    let lookup_keys = list.items().filter_map(|e| e.lookup_key.text()).collect();
    Ok(FeatureSummary {
        customer,
        lookup_keys: Vec::new(),
        complete: false,
    }
    .completed(lookup_keys)
    .with_complete(!has_more))
}

impl FeatureSummary {
    fn with_complete(mut self, complete: bool) -> Self {
        self.complete = complete;
        self
    }
}

fn subscription(obj: wire::Subscription) -> Result<Subscription, EventError> {
    let raw_status = obj.status.get().ok_or(EventError::MissingField("status"))?;
    let status = SubscriptionStatus::from_stripe(&raw_status)
        .ok_or(EventError::InvalidField { field: "status" })?;
    let items: Vec<wire::Item> = obj.items.items().collect();
    // Newest shape first: basil moved the period onto the items.
    let current_period_end = items
        .iter()
        .filter_map(|item| item.current_period_end.0)
        .max()
        .or(obj.current_period_end.get());
    let ended_at = obj.ended_at.get().or_else(|| {
        status
            .is_terminal()
            .then(|| obj.canceled_at.get())
            .flatten()
    });
    let first = items.into_iter().next();
    let quantity = first.as_ref().and_then(|item| item.quantity.0);
    let price_id = first.and_then(wire::Item::price_id);
    Ok(Subscription {
        id: required(obj.id, "id")?,
        customer: obj.customer.id(),
        status,
        current_period_end,
        cancel_at_period_end: obj.cancel_at_period_end.get().unwrap_or(false),
        ended_at,
        user_id: user_id(obj.metadata.user_id(), "metadata.user_id")?,
        product_key: obj.metadata.product_key(),
        price_id,
        quantity,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn envelope(event_type: &str, object: &Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "id": "evt_1", "object": "event", "type": event_type, "created": 1_700_000_000,
            "api_version": "2025-03-31.basil", "livemode": false,
            "data": { "object": object }, "pending_webhooks": 1,
            "request": { "id": null, "idempotency_key": null }
        }))
        .unwrap()
    }

    fn parsed(event_type: &str, object: &Value) -> EventKind {
        let event = parse(&envelope(event_type, object)).unwrap();
        assert_eq!(event.event_type, event_type);
        assert_eq!(event.created, 1_700_000_000);
        assert_eq!(event.id.as_str(), "evt_1");
        event.kind
    }

    #[test]
    fn paid_checkout_session_reads_link_product_and_payment_intent() {
        let kind = parsed(
            "checkout.session.completed",
            &json!({
                "id": "cs_1", "object": "checkout.session", "mode": "payment",
                "payment_status": "paid", "status": "complete", "customer": "cus_1",
                "payment_intent": "pi_1", "subscription": null, "client_reference_id": "user_1",
                "metadata": { "product_key": "pro", "user_id": "user_1" },
                "amount_total": 4900, "currency": "usd", "after_expiration": null
            }),
        );
        let EventKind::CheckoutSessionCompleted(s) = kind else {
            panic!("wrong kind {kind:?}")
        };
        assert_eq!(s.mode, Some(CheckoutMode::Payment));
        assert_eq!(s.payment_status, CheckoutPaymentStatus::Paid);
        assert_eq!(s.user_id.unwrap().as_str(), "user_1");
        assert_eq!(s.payment_intent.as_deref(), Some("pi_1"));
        assert_eq!(s.customer.as_deref(), Some("cus_1"));
        assert_eq!(s.product_key.as_deref(), Some("pro"));
        assert_eq!(s.amount_total, Some(4900));
    }

    #[test]
    fn checkout_session_falls_back_to_metadata_user_and_reads_subscription_mode() {
        for (event_type, status) in [
            ("checkout.session.async_payment_succeeded", "paid"),
            ("checkout.session.async_payment_failed", "unpaid"),
            ("checkout.session.completed", "no_payment_required"),
        ] {
            let kind = parsed(
                event_type,
                &json!({
                    "id": "cs_2", "mode": "subscription", "payment_status": status,
                    "customer": { "id": "cus_2", "object": "customer" },
                    "subscription": "sub_2", "payment_intent": null,
                    "client_reference_id": null, "metadata": { "user_id": "user_2" }
                }),
            );
            let s = match kind {
                EventKind::CheckoutSessionCompleted(s)
                | EventKind::CheckoutSessionAsyncPaymentSucceeded(s)
                | EventKind::CheckoutSessionAsyncPaymentFailed(s) => s,
                other => panic!("wrong kind {other:?}"),
            };
            assert_eq!(s.mode, Some(CheckoutMode::Subscription));
            assert_eq!(s.user_id.unwrap().as_str(), "user_2");
            assert_eq!(s.customer.as_deref(), Some("cus_2"));
            assert_eq!(s.subscription.as_deref(), Some("sub_2"));
            assert_eq!(s.product_key, None);
        }
    }

    #[test]
    fn expired_checkout_session_carries_the_recovery_url() {
        let kind = parsed(
            "checkout.session.expired",
            &json!({
                "id": "cs_3", "mode": "payment", "payment_status": "unpaid", "status": "expired",
                "client_reference_id": "user_3",
                "after_expiration": { "recovery": { "enabled": true,
                    "url": "https://buy.stripe.com/r/live_abc" } }
            }),
        );
        let EventKind::CheckoutSessionExpired(s) = kind else {
            panic!("wrong kind")
        };
        assert_eq!(
            s.recovery_url.as_deref(),
            Some("https://buy.stripe.com/r/live_abc")
        );
    }

    #[test]
    fn payment_intent_reads_metadata_and_received_amount() {
        let kind = parsed(
            "payment_intent.succeeded",
            &json!({
                "id": "pi_4", "object": "payment_intent", "amount": 4900,
                "amount_received": 4900, "currency": "eur", "customer": "cus_4",
                "metadata": { "user_id": "user_4", "product_key": "pro" }
            }),
        );
        let EventKind::PaymentIntentSucceeded(pi) = kind else {
            panic!("wrong kind")
        };
        assert_eq!(pi.amount, Some(4900));
        assert_eq!(pi.user_id.unwrap().as_str(), "user_4");
        assert_eq!(pi.product_key.as_deref(), Some("pro"));
    }

    #[test]
    fn charge_refunded_tells_full_from_partial_refunds() {
        let full = json!({
            "id": "ch_5", "object": "charge", "amount": 4900, "amount_refunded": 4900,
            "refunded": true, "payment_intent": "pi_5", "customer": "cus_5", "currency": "usd",
            "refunds": { "object": "list", "data": [
                { "id": "re_old", "created": 10, "reason": null },
                { "id": "re_new", "created": 20, "reason": "requested_by_customer" }
            ] }
        });
        let EventKind::ChargeRefunded(c) = parsed("charge.refunded", &full) else {
            panic!("wrong kind")
        };
        assert!(c.is_fully_refunded());
        let refund = c.latest_refund.unwrap();
        assert_eq!(refund.id, "re_new");
        assert_eq!(refund.reason.as_deref(), Some("requested_by_customer"));

        // Newer API versions leave `refunds` out unless expanded, and the flag may be absent.
        let partial = json!({ "id": "ch_5", "amount": 4900, "amount_refunded": 1000,
            "refunded": false, "payment_intent": "pi_5" });
        let EventKind::ChargeRefunded(c) = parsed("charge.refunded", &partial) else {
            panic!("wrong kind")
        };
        assert!(!c.is_fully_refunded());
        assert_eq!(c.latest_refund, None);
        let flagless = json!({ "id": "ch_5", "amount": 4900, "amount_refunded": 4900 });
        let EventKind::ChargeRefunded(c) = parsed("charge.refunded", &flagless) else {
            panic!("wrong kind")
        };
        assert!(c.is_fully_refunded());
    }

    #[test]
    fn every_dispute_event_reads_its_status_as_stripe_spells_it_and_keeps_unknown_ones() {
        for (event_type, raw, expected) in [
            (
                "charge.dispute.created",
                "needs_response",
                DisputeStatus::NeedsResponse,
            ),
            (
                "charge.dispute.created",
                "warning_needs_response",
                DisputeStatus::WarningNeedsResponse,
            ),
            (
                "charge.dispute.updated",
                "warning_under_review",
                DisputeStatus::WarningUnderReview,
            ),
            (
                "charge.dispute.updated",
                "under_review",
                DisputeStatus::UnderReview,
            ),
            (
                "charge.dispute.funds_withdrawn",
                "needs_response",
                DisputeStatus::NeedsResponse,
            ),
            ("charge.dispute.funds_reinstated", "won", DisputeStatus::Won),
            ("charge.dispute.closed", "won", DisputeStatus::Won),
            ("charge.dispute.closed", "lost", DisputeStatus::Lost),
            (
                "charge.dispute.closed",
                "warning_closed",
                DisputeStatus::WarningClosed,
            ),
            (
                "charge.dispute.closed",
                "prevented",
                DisputeStatus::Prevented,
            ),
            (
                "charge.dispute.updated",
                "escalated_to_arbitration",
                DisputeStatus::Unknown("escalated_to_arbitration".into()),
            ),
        ] {
            let kind = parsed(
                event_type,
                &json!({ "id": "dp_6", "object": "dispute", "charge": "ch_6",
                    "payment_intent": "pi_6", "status": raw, "amount": 4900 }),
            );
            let EventKind::ChargeDispute(d) = kind else {
                panic!("wrong kind {kind:?}")
            };
            assert_eq!(d.status, expected);
            assert_eq!(d.status.as_str(), raw);
            assert_eq!(d.charge.as_deref(), Some("ch_6"));
            assert_eq!(d.payment_intent.as_deref(), Some("pi_6"));
        }
    }

    #[test]
    fn invoice_reads_subscription_from_old_and_basil_shapes() {
        let old = json!({
            "id": "in_7", "object": "invoice", "customer": "cus_7", "subscription": "sub_old",
            "billing_reason": "subscription_cycle",
            "subscription_details": { "metadata": { "user_id": "user_7" } },
            "lines": { "data": [ { "period": { "start": 1, "end": 1_702_592_000 } } ] }
        });
        let EventKind::InvoicePaid(inv) = parsed("invoice.paid", &old) else {
            panic!("wrong kind")
        };
        assert_eq!(inv.subscription.as_deref(), Some("sub_old"));
        assert_eq!(inv.period_end, Some(1_702_592_000));
        assert_eq!(inv.user_id.unwrap().as_str(), "user_7");

        let basil = json!({
            "id": "in_8", "object": "invoice", "customer": "cus_8",
            "billing_reason": "subscription_create",
            "parent": { "type": "subscription_details", "subscription_details": {
                "subscription": "sub_new", "metadata": { "product_key": "team" } } },
            "lines": { "data": [ { "period": { "start": 1, "end": 5 } },
                                 { "period": { "start": 1, "end": 9 } } ] }
        });
        let EventKind::InvoicePaymentFailed(inv) = parsed("invoice.payment_failed", &basil) else {
            panic!("wrong kind")
        };
        assert_eq!(inv.subscription.as_deref(), Some("sub_new"));
        assert_eq!(inv.product_key.as_deref(), Some("team"));
        assert_eq!(inv.billing_reason.as_deref(), Some("subscription_create"));
        assert_eq!(inv.period_end, Some(9));
    }

    #[test]
    fn subscription_reads_period_end_from_old_and_basil_shapes() {
        let old = json!({ "id": "sub_9", "object": "subscription", "customer": "cus_9",
            "status": "past_due", "current_period_end": 1_702_592_000,
            "cancel_at_period_end": true, "metadata": { "user_id": "user_9" } });
        let EventKind::SubscriptionUpdated(s) = parsed("customer.subscription.updated", &old)
        else {
            panic!("wrong kind")
        };
        assert_eq!(s.status, SubscriptionStatus::PastDue);
        assert_eq!(s.current_period_end, Some(1_702_592_000));
        assert!(s.cancel_at_period_end);

        let basil = json!({ "id": "sub_9", "customer": "cus_9", "status": "canceled",
            "ended_at": null, "canceled_at": 1_700_000_500,
            "items": { "data": [ { "current_period_end": 1_702_000_000 } ] } });
        let EventKind::SubscriptionDeleted(s) = parsed("customer.subscription.deleted", &basil)
        else {
            panic!("wrong kind")
        };
        assert_eq!(s.status, SubscriptionStatus::Canceled);
        assert_eq!(s.current_period_end, Some(1_702_000_000));
        assert_eq!(s.ended_at, Some(1_700_000_500));
        let both = json!({ "id": "sub_9", "status": "active", "current_period_end": 5,
            "items": { "data": [ { "current_period_end": 7 }, { "current_period_end": 6 } ] } });
        let EventKind::SubscriptionUpdated(s) = parsed("customer.subscription.updated", &both)
        else {
            panic!("wrong kind")
        };
        assert_eq!(
            s.current_period_end,
            Some(7),
            "the newest shape is read first"
        );
        assert!(matches!(
            parsed(
                "customer.subscription.created",
                &json!({ "id": "sub_9", "status": "trialing" })
            ),
            EventKind::SubscriptionCreated(_)
        ));
    }

    #[test]
    fn a_feature_summary_reads_its_lookup_keys_and_whether_the_list_was_cut() {
        let data: Vec<Value> = (0..10)
            .map(|i| {
                json!({ "id": format!("ent_{i}"), "object": "entitlements.active_entitlement",
                "feature": format!("feat_{i}"), "lookup_key": format!("f{i}") })
            })
            .collect();
        let kind = parsed(
            "entitlements.active_entitlement_summary.updated",
            &json!({ "object": "entitlements.active_entitlement_summary", "customer": "cus_1",
                "entitlements": { "object": "list", "data": data, "has_more": true } }),
        );
        let EventKind::FeatureSummaryUpdated(summary) = kind else {
            panic!("wrong kind")
        };
        assert_eq!(summary.customer, "cus_1");
        assert_eq!(summary.lookup_keys.len(), 10);
        assert!(!summary.complete);
        let done = summary.completed(vec!["b".into(), "a".into(), "a".into()]);
        assert_eq!(done.lookup_keys, ["a", "b"]);
        assert!(done.complete);
    }

    #[test]
    fn the_handled_types_are_exactly_those_parsed_and_label_everything_else_other() {
        for event_type in HANDLED_TYPES {
            let body = format!(r#"{{"id":"evt_t","type":"{event_type}","created":1}}"#);
            // Handled: the missing object is an error, never `Unhandled`.
            assert!(parse(body.as_bytes()).is_err(), "{event_type} is parsed");
            assert_eq!(type_label(event_type), event_type);
        }
        for other in ["customer.created", "X1Z", "", "charge.dispute"] {
            assert_eq!(type_label(other), "other");
        }
    }

    #[test]
    fn other_event_types_are_unhandled_whatever_their_payload() {
        assert_eq!(
            parsed("customer.created", &json!({ "id": "cus_1" })),
            EventKind::Unhandled
        );
        let body = br#"{"id":"evt_x","type":"product.updated","created":1}"#;
        assert_eq!(parse(body).unwrap().kind, EventKind::Unhandled);
    }

    #[test]
    fn bodies_without_envelope_or_required_fields_are_permanent_errors() {
        assert!(matches!(parse(b"not json"), Err(EventError::NotJson(_))));
        assert!(matches!(
            parse(br#"{"type":"charge.refunded","created":1}"#),
            Err(EventError::MissingField("id"))
        ));
        assert!(matches!(
            parse(br#"{"id":"evt_1","created":1}"#),
            Err(EventError::MissingField("type"))
        ));
        assert!(matches!(
            parse(br#"{"id":"evt_1","type":"invoice.paid"}"#),
            Err(EventError::MissingField("created"))
        ));
        assert!(matches!(
            parse(br#"{"id":"evt_1","type":"invoice.paid","created":1,"data":{}}"#),
            Err(EventError::MissingField("data.object"))
        ));
        let missing = [
            (
                "checkout.session.completed",
                json!({ "mode": "payment", "payment_status": "paid" }),
                "id",
            ),
            (
                "checkout.session.completed",
                json!({ "id": "cs_1", "payment_status": "paid" }),
                "mode",
            ),
            (
                "charge.refunded",
                json!({ "id": "ch_1", "amount": 1 }),
                "amount_refunded",
            ),
            (
                "charge.dispute.closed",
                json!({ "id": "dp_1", "charge": "ch_1" }),
                "status",
            ),
            (
                "charge.dispute.created",
                json!({ "id": "dp_1", "status": "needs_response" }),
                "charge",
            ),
            (
                "customer.subscription.updated",
                json!({ "id": "sub_1" }),
                "status",
            ),
            ("invoice.paid", json!({ "customer": "cus_1" }), "id"),
            ("payment_intent.succeeded", json!({ "amount": 1 }), "id"),
        ];
        for (event_type, object, field) in missing {
            match parse(&envelope(event_type, &object)) {
                Err(EventError::MissingField(f)) => assert_eq!(f, field, "{event_type}"),
                other => panic!("{event_type}: expected missing {field}, got {other:?}"),
            }
        }
        let bad_user = json!({ "id": "cs_1", "mode": "payment", "payment_status": "paid",
            "client_reference_id": "has space" });
        assert!(matches!(
            parse(&envelope("checkout.session.completed", &bad_user)),
            Err(EventError::InvalidField { .. })
        ));
        let bad_status = json!({ "id": "sub_1", "status": "sleeping" });
        assert!(matches!(
            parse(&envelope("customer.subscription.updated", &bad_status)),
            Err(EventError::InvalidField { field: "status" })
        ));
    }
}

#[cfg(test)]
mod routing_hint_tests {
    use super::*;
    use shared::samples::{self, Sample};

    fn sample_event(event_type: &str, user: &str) -> Event {
        let sample = Sample {
            user,
            product: "pro",
            object: "hint",
            amount: 100,
            created: 1_700_000_000,
            subscription: false,
        };
        let body = samples::event("evt_hint", event_type, &sample).to_string();
        parse(body.as_bytes()).unwrap()
    }

    #[test]
    fn events_route_by_their_user_else_their_customer_else_not_at_all() {
        let checkout = sample_event("checkout.session.completed", "u_hint");
        assert_eq!(checkout.routing_hint(), Some("u_hint"));
        let refund = sample_event("charge.refunded", "u_hint");
        assert_eq!(refund.routing_hint(), Some("u_hint"));
        let dispute = sample_event("charge.dispute.created", "u_hint");
        assert_eq!(dispute.routing_hint(), None);
        let ignored = sample_event("customer.updated", "u_hint");
        assert_eq!(ignored.routing_hint(), None);
    }

    #[test]
    fn a_thin_event_of_a_v1_type_names_its_twin_and_the_object_to_read() {
        // The shape of an event destination's thin event (`v2.core.event`).
        let body = br#"{"id": "evt_test_65R9Ijk8dJz2Lwbn6RX16ScS1b5eSQa9rgfVdGqJ0pA",
            "object": "v2.core.event", "type": "v1.customer.subscription.updated",
            "livemode": false, "created": "2026-09-30T06:20:52.246Z", "context": "acct_1",
            "reason": {"type": "request", "request": {"id": "req_1", "idempotency_key": null}},
            "related_object": {"id": "sub_1QxYz", "type": "subscription",
                               "url": "/v1/subscriptions/sub_1QxYz"}}"#;
        let event = parse(body).unwrap();
        assert_eq!(event.created, 1_790_749_252);
        assert_eq!(event.origin.account.as_deref(), Some("acct_1"));
        let EventKind::Thin(thin) = &event.kind else {
            panic!("{:?}", event.kind)
        };
        assert_eq!(thin.snapshot_type, "customer.subscription.updated");
        assert_eq!(
            thin.object_path().as_deref(),
            Some("/v1/subscriptions/sub_1QxYz")
        );
        assert_eq!(
            type_label(&event.event_type),
            "customer.subscription.updated"
        );
        // v2 events, and v1 types the projection does not use, are acknowledged and ignored.
        for ignored in ["v2.billing.meter_event.created", "v1.customer.updated"] {
            let body = format!(
                r#"{{"id": "evt_2", "object": "v2.core.event", "type": "{ignored}",
                     "created": "2026-09-30T06:20:52Z", "related_object": null}}"#
            );
            assert_eq!(parse(body.as_bytes()).unwrap().kind, EventKind::Unhandled);
        }
        // The path is built from the type and an id of letters, digits and `_`, never the url.
        let injected = std::str::from_utf8(body).unwrap().replace(
            "\"sub_1QxYz\", \"type\"",
            "\"../../v1/customers\", \"type\"",
        );
        assert!(matches!(
            parse(injected.as_bytes()),
            Err(EventError::InvalidField {
                field: "related_object.id"
            })
        ));
        let other = std::str::from_utf8(body)
            .unwrap()
            .replace("\"subscription\",", "\"billing.meter\",");
        let EventKind::Thin(thin) = parse(other.as_bytes()).unwrap().kind else {
            panic!("a thin event")
        };
        assert_eq!(thin.object_path(), None);
        // A generation failure is read before anything is known of it; its v2 event names the
        // missed event (with or without `v1.`) and its object.
        let failure = br#"{"id": "evt_h", "object": "v2.core.event",
            "type": "v2.core.health.event_generation_failure.resolved",
            "created": "2026-12-05T04:00:00Z", "related_object": null}"#;
        assert_eq!(
            parse(failure).unwrap().kind,
            EventKind::GenerationFailureResolved
        );
        let impact = |event_type: &str| {
            format!(
                r#"{{"id": "evt_h", "data": {{"impact": {{"event_type": "{event_type}",
                   "related_object": {{"id": "pi_1", "type": "payment_intent"}}}}}}}}"#
            )
        };
        for named in ["payment_intent.succeeded", "v1.payment_intent.succeeded"] {
            let EventKind::Thin(missed) = missed_event(impact(named).as_bytes()).unwrap() else {
                panic!("a twin to read")
            };
            assert_eq!(
                missed.object_path().as_deref(),
                Some("/v1/payment_intents/pi_1")
            );
        }
        assert_eq!(
            missed_event(impact("customer.created").as_bytes()).unwrap(),
            EventKind::Unhandled
        );
        assert!(missed_event(b"{}").is_err());
        let undated = std::str::from_utf8(body)
            .unwrap()
            .replace("2026-09-30T06:20:52.246Z", "soon");
        assert!(parse(undated.as_bytes()).is_err());
    }
}
