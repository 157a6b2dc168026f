//! Request parameters and typed answers of the Stripe endpoints the service calls.
//!
//! Invariant: answers carry only the fields the service acts on; objects that the projection
//! re-reads (restore, reconcile) stay `serde_json::Value` so nothing is lost in between.

use std::collections::BTreeMap;

use serde::Deserialize;

pub use crate::domain::events::CheckoutMode;

/// Parameters of `POST /v1/checkout/sessions`.
///
/// `metadata` is sent three ways so every later event can be linked to the user: on the session
/// (`metadata[…]`) and on the object Checkout creates (`payment_intent_data[metadata][…]` in
/// payment mode, `subscription_data[metadata][…]` in subscription mode), because Stripe does not
/// copy session metadata onto them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckoutSessionRequest {
    pub mode: CheckoutMode,
    pub price: LineItemPrice,
    pub quantity: u32,
    /// May contain the literal `{CHECKOUT_SESSION_ID}`, which Stripe substitutes.
    pub success_url: String,
    pub cancel_url: String,
    /// The application's user id.
    pub client_reference_id: String,
    /// An existing Stripe customer (`cus_…`).
    pub customer: Option<String>,
    /// Metadata keys and values, sent in key order.
    pub metadata: BTreeMap<String, String>,
    /// Unix seconds; Stripe accepts 30 minutes to 24 hours ahead.
    pub expires_at: Option<i64>,
}

/// What the one line item of a Checkout Session costs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineItemPrice {
    /// A Stripe price (`line_items[0][price]`).
    Id(String),
    /// An ad-hoc price (`line_items[0][price_data][…]`): registered items sold at their own
    /// amount, with no Stripe price object behind them.
    Data {
        currency: String,
        unit_amount: i64,
        product_name: String,
    },
}

/// The part of a Checkout Session the API hands back to the user.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CheckoutSession {
    pub id: String,
    /// Absent once the session is complete or expired.
    pub url: Option<String>,
    pub expires_at: i64,
}

/// A billing portal session: a short-lived URL.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BillingPortalSession {
    pub id: String,
    pub url: String,
}

/// A Stripe customer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Customer {
    pub id: String,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// One page of a Stripe list answer.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ListPage<T> {
    pub data: Vec<T>,
    pub has_more: bool,
}

/// Filters of `GET /v1/events`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EventQuery {
    /// Only events created at or after this unix time (`created[gte]`).
    pub created_gte: Option<i64>,
    /// Only these event types (`types[]`); empty means all.
    pub types: Vec<String>,
    /// `delivery_success=false` lists only events whose webhook delivery has not succeeded.
    pub delivery_success: Option<bool>,
}
