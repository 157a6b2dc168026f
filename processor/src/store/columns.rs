//! The merged rows as Postgres arrays, one per column, for the set-based writes of
//! [`super::merge`]: what a purchase or subscription row of the domain's fold stores.

use chrono::{DateTime, Utc};
use tokio_postgres::types::Type;

use super::{Param, StoreError, opt_timestamp};
use crate::domain::events::DisputeStatus;
use crate::domain::events::SubscriptionStatus;
use crate::domain::projection::{
    DisputeClaim, DisputeFacts, PurchaseFacts, Registry, SubscriptionFacts,
};
use std::collections::BTreeMap;

/// The purchase columns of the rows to write, one array per column.
#[derive(Default)]
pub(super) struct PurchaseColumns {
    pub(super) id: Vec<i64>,
    pub(super) user_id: Vec<Option<String>>,
    pub(super) customer_id: Vec<Option<String>>,
    pub(super) product_key: Vec<Option<String>>,
    pub(super) price_id: Vec<Option<String>>,
    pub(super) checkout_session_id: Vec<Option<String>>,
    pub(super) payment_intent_id: Vec<Option<String>>,
    pub(super) charge_id: Vec<Option<String>>,
    pub(super) amount: Vec<Option<i64>>,
    pub(super) currency: Vec<Option<String>>,
    pub(super) platform_fee: Vec<Option<i64>>,
    pub(super) organization_fee: Vec<Option<i64>>,
    pub(super) creator_payout: Vec<Option<i64>>,
    pub(super) status: Vec<&'static str>,
    pub(super) paid: Vec<bool>,
    pub(super) failed: Vec<bool>,
    pub(super) fully_refunded: Vec<bool>,
    pub(super) dispute: Vec<&'static str>,
    pub(super) dispute_id: Vec<Option<String>>,
    pub(super) disputes: Vec<serde_json::Value>,
    pub(super) unknown_to_stripe: Vec<bool>,
    pub(super) invoice_id: Vec<Option<String>>,
    pub(super) subscription_id: Vec<Option<String>>,
    pub(super) purchased_at: Vec<Option<DateTime<Utc>>>,
    pub(super) refunded_at: Vec<Option<DateTime<Utc>>>,
    pub(super) refund_reason: Vec<Option<String>>,
    pub(super) refund_amount: Vec<i64>,
    pub(super) refund_id: Vec<Option<String>>,
}

impl PurchaseColumns {
    pub(super) fn push(
        &mut self,
        id: Option<i64>,
        f: &PurchaseFacts,
        registry: &Registry,
    ) -> Result<(), StoreError> {
        // The split follows the product's rule from the moment the amount is known.
        let split = registry.purchase_split(f);
        self.id.extend(id);
        self.user_id.push(f.user_id.clone());
        self.customer_id.push(f.customer_id.clone());
        self.product_key.push(f.product_key.clone());
        self.price_id.push(f.price_id.clone());
        self.checkout_session_id.push(f.checkout_session_id.clone());
        self.payment_intent_id.push(f.payment_intent_id.clone());
        self.charge_id.push(f.charge_id.clone());
        self.amount.push(f.amount_cents);
        self.currency.push(f.currency.clone());
        self.platform_fee.push(split.map(|s| s.platform_fee_cents));
        self.organization_fee
            .push(split.map(|s| s.organization_fee_cents));
        self.creator_payout
            .push(split.map(|s| s.creator_payout_cents));
        self.status.push(f.status().as_str());
        self.paid.push(f.paid);
        self.failed.push(f.failed);
        self.fully_refunded.push(f.fully_refunded);
        self.dispute.push(f.dispute().as_str());
        self.dispute_id
            .push(f.latest_dispute_id().map(str::to_owned));
        self.disputes.push(disputes_column(&f.disputes));
        self.unknown_to_stripe.push(f.unknown_to_stripe);
        self.invoice_id.push(f.invoice_id.clone());
        self.subscription_id.push(f.subscription_id.clone());
        self.purchased_at.push(opt_timestamp(f.paid_at)?);
        self.refunded_at.push(opt_timestamp(f.refunded_at)?);
        self.refund_reason
            .push(f.refund.as_ref().and_then(|r| r.reason.clone()));
        self.refund_amount
            .push(f.refund.as_ref().map_or(0, |r| r.amount_cents));
        self.refund_id
            .push(f.refund.as_ref().and_then(|r| r.refund_id.clone()));
        Ok(())
    }

    /// The 27 data columns ($1…$27), for both the insert and the update.
    pub(super) fn params(&self) -> Vec<Param<'_>> {
        vec![
            (&self.user_id, Type::TEXT_ARRAY),
            (&self.customer_id, Type::TEXT_ARRAY),
            (&self.product_key, Type::TEXT_ARRAY),
            (&self.checkout_session_id, Type::TEXT_ARRAY),
            (&self.payment_intent_id, Type::TEXT_ARRAY),
            (&self.charge_id, Type::TEXT_ARRAY),
            (&self.amount, Type::INT8_ARRAY),
            (&self.currency, Type::TEXT_ARRAY),
            (&self.platform_fee, Type::INT8_ARRAY),
            (&self.organization_fee, Type::INT8_ARRAY),
            (&self.creator_payout, Type::INT8_ARRAY),
            (&self.status, Type::TEXT_ARRAY),
            (&self.paid, Type::BOOL_ARRAY),
            (&self.failed, Type::BOOL_ARRAY),
            (&self.fully_refunded, Type::BOOL_ARRAY),
            (&self.dispute, Type::TEXT_ARRAY),
            (&self.dispute_id, Type::TEXT_ARRAY),
            (&self.purchased_at, Type::TIMESTAMPTZ_ARRAY),
            (&self.refunded_at, Type::TIMESTAMPTZ_ARRAY),
            (&self.refund_reason, Type::TEXT_ARRAY),
            (&self.refund_amount, Type::INT8_ARRAY),
            (&self.refund_id, Type::TEXT_ARRAY),
            (&self.price_id, Type::TEXT_ARRAY),
            (&self.disputes, Type::JSONB_ARRAY),
            (&self.unknown_to_stripe, Type::BOOL_ARRAY),
            (&self.invoice_id, Type::TEXT_ARRAY),
            (&self.subscription_id, Type::TEXT_ARRAY),
        ]
    }
}

/// `unnest` of the 27 purchase data columns (`$1…$27`) as `u(...)`, with the row id as `$28`
/// when `with_id`.
pub(super) fn purchase_unnest(with_id: bool) -> String {
    let (id_param, id_column) = if with_id {
        (", $28::int8[]", ", id")
    } else {
        ("", "")
    };
    format!(
        "unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
         $7::int8[], $8::text[], $9::int8[], $10::int8[], $11::int8[], $12::text[], \
         $13::bool[], $14::bool[], $15::bool[], $16::text[], $17::text[], \
         $18::timestamptz[], $19::timestamptz[], $20::text[], $21::int8[], $22::text[], \
         $23::text[], $24::jsonb[], $25::bool[], $26::text[], $27::text[]{id_param}) \
         AS u(user_id, customer_id, product_key, checkout_session_id, payment_intent_id, \
         charge_id, amount_paid_cents, currency, platform_fee_cents, organization_fee_cents, \
         creator_payout_cents, status, paid, payment_failed, fully_refunded, dispute_status, \
         dispute_id, purchased_at, refunded_at, refund_reason, refund_amount_cents, \
         stripe_refund_id, price_id, disputes, unknown_to_stripe, invoice_id, subscription_id{id_column})"
    )
}

/// The subscription rows to upsert, one array per column.
#[derive(Default)]
pub(super) struct SubscriptionColumns {
    pub(super) id: Vec<String>,
    pub(super) user_id: Vec<Option<String>>,
    pub(super) customer_id: Vec<Option<String>>,
    pub(super) product_key: Vec<Option<String>>,
    pub(super) price_id: Vec<Option<String>>,
    pub(super) price_claim_at: Vec<Option<DateTime<Utc>>>,
    pub(super) quantity: Vec<Option<i64>>,
    pub(super) status: Vec<&'static str>,
    pub(super) claim: Vec<Option<&'static str>>,
    pub(super) claim_at: Vec<Option<DateTime<Utc>>>,
    pub(super) terminal: Vec<Option<&'static str>>,
    pub(super) period_end: Vec<Option<DateTime<Utc>>>,
    pub(super) cancel_at_period_end: Vec<bool>,
    pub(super) ended_at: Vec<Option<DateTime<Utc>>>,
    pub(super) recovered_at: Vec<Option<DateTime<Utc>>>,
    /// Each row's past-due claims, as a JSON array of unix seconds (Postgres has no arrays of
    /// arrays of varying length to unnest).
    pub(super) past_due_claims: Vec<serde_json::Value>,
}

impl SubscriptionColumns {
    pub(super) fn push(&mut self, s: &SubscriptionFacts) -> Result<(), StoreError> {
        self.id.push(s.id.clone());
        self.user_id.push(s.user_id.clone());
        self.customer_id.push(s.customer_id.clone());
        self.product_key.push(s.product_key.clone());
        self.price_id
            .push(s.price.as_ref().map(|c| c.price_id.clone()));
        self.price_claim_at
            .push(opt_timestamp(s.price.as_ref().map(|c| c.at))?);
        self.quantity
            .push(s.price.as_ref().and_then(|c| c.quantity));
        self.status.push(s.status().as_str());
        self.claim.push(s.claim.map(|c| c.status.as_str()));
        self.claim_at.push(opt_timestamp(s.claim.map(|c| c.at))?);
        self.terminal
            .push(s.terminal.map(SubscriptionStatus::as_str));
        self.period_end.push(opt_timestamp(s.current_period_end)?);
        self.cancel_at_period_end.push(s.cancel_at_period_end());
        self.ended_at.push(opt_timestamp(s.ended_at)?);
        self.recovered_at.push(opt_timestamp(s.recovered_at)?);
        self.past_due_claims
            .push(s.past_due_claims.iter().copied().collect());
        Ok(())
    }
}

/// `purchases.disputes`: `{"<dispute id>": {"status", "at", "known", "knownAt"}}`.
pub(super) fn disputes_column(disputes: &BTreeMap<String, DisputeFacts>) -> serde_json::Value {
    disputes
        .iter()
        .map(|(id, d)| {
            let mut o =
                serde_json::json!({ "status": d.latest.status.as_str(), "at": d.latest.at });
            if let Some(known) = &d.known {
                o["known"] = known.status.as_str().into();
                o["knownAt"] = known.at.into();
            }
            (id.clone(), o)
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// Reads `purchases.disputes` back.
///
/// # Errors
/// [`StoreError::Corrupt`] when the value is not what [`disputes_column`] writes.
pub(super) fn disputes_from_column(
    value: &serde_json::Value,
) -> Result<BTreeMap<String, DisputeFacts>, StoreError> {
    let corrupt = || StoreError::Corrupt { column: "disputes" };
    let claim = |status: Option<&serde_json::Value>, at: Option<&serde_json::Value>| {
        Some(DisputeClaim {
            status: DisputeStatus::from_stripe(status?.as_str()?),
            at: at?.as_i64()?,
        })
    };
    value
        .as_object()
        .ok_or_else(corrupt)?
        .iter()
        .map(|(id, d)| {
            let latest = claim(d.get("status"), d.get("at")).ok_or_else(corrupt)?;
            let known = match d.get("known") {
                None => None,
                Some(_) => Some(claim(d.get("known"), d.get("knownAt")).ok_or_else(corrupt)?),
            };
            Ok((id.clone(), DisputeFacts { latest, known }))
        })
        .collect()
}
