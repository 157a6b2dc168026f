//! `GET /api/checkout/session/{sessionId}`: the success page's answer, without waiting for the
//! webhook.
//!
//! Invariants: a caller sees only a session this service created for them (or for an
//! organisation they bill for); anyone else's, or an unknown one, is a 404. When the payer does
//! not hold what the session sells yet, the session is read from Stripe and, once paid, applied
//! as restore applies what it reads ([`super::restore::synthetic_events`] through the one apply
//! path), so the webhook that follows changes nothing and nothing is granted twice. `wait`
//! (seconds, at most [`MAX_WAIT_SECONDS`]) holds the answer until the session is applied,
//! expires, or the time is up, reading Stripe at most every [`STRIPE_EVERY`], and at most
//! [`CHECKOUT_OUTCOME`](super::limits::CHECKOUT_OUTCOME) times a minute per caller (past it,
//! or without Redis to count, the answer comes from Postgres alone).

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use chrono::Utc;
use serde_json::Value;
use shared::ids::UserId;

use super::ApiState;
use super::entitlements::{access_with, read_from_postgres};
use super::error::ApiError;
use super::organizations::payer;
use super::restore::{ObjectKind, apply_all, synthetic_events};
use crate::auth::{AuthCaller, Caller};
use crate::domain::offer::CheckoutOffer;
use crate::domain::organization::OrganizationId;
use crate::domain::view::{EntitlementItem, item_view, status_of};
use crate::store;

/// The longest `wait` a caller may ask for.
pub const MAX_WAIT_SECONDS: u64 = 10;
/// How often a waiting request reads the session from Stripe.
const STRIPE_EVERY: Duration = Duration::from_secs(2);
/// How often a waiting request looks at the payer's entitlements.
const LOOK_EVERY: Duration = Duration::from_millis(250);

/// Query of the route.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct WaitQuery {
    pub wait: Option<String>,
}

/// The answer.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionOutcome {
    pub session_id: String,
    pub product_key: String,
    /// Whom the session is for: the caller, or `org:{id}`.
    pub payer: String,
    /// `open`, `complete` or `expired` (as Stripe last said; `complete` once applied).
    pub status: String,
    /// Whether the payer now holds every entitlement the product grants.
    pub granted: bool,
    /// The caller's entitlements now (their organisations' included).
    pub entitlements: Vec<EntitlementItem>,
}

fn parse_wait(query: &WaitQuery) -> Result<Duration, ApiError> {
    match query.wait.as_deref() {
        None | Some("") => Ok(Duration::ZERO),
        Some(raw) => raw
            .parse::<u64>()
            .ok()
            .filter(|w| *w <= MAX_WAIT_SECONDS)
            .map(Duration::from_secs)
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "wait must be an integer between 0 and {MAX_WAIT_SECONDS}"
                ))
            }),
    }
}

/// Whether `caller` may see a session offered to `payer`.
async fn may_see(state: &ApiState, caller: &Caller, payer_id: &str) -> Result<bool, ApiError> {
    if payer_id == caller.user.as_str() {
        return Ok(true);
    }
    let Some(organization) = OrganizationId::of_subject(payer_id) else {
        return Ok(false);
    };
    match payer(state, caller, Some(organization.as_str())).await {
        Ok(_) => Ok(true),
        Err(ApiError::Forbidden(_)) => Ok(false),
        Err(other) => Err(other),
    }
}

pub(crate) async fn outcome(
    State(state): State<ApiState>,
    AuthCaller(caller): AuthCaller,
    Path(session_id): Path<String>,
    query: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<SessionOutcome>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let wait = parse_wait(&query)?;
    let not_found = || ApiError::NotFound("no such checkout session of yours".into());
    let offer = {
        let client = state.pool.get().await.map_err(ApiError::database)?;
        store::offers::find(&**client, &[session_id.as_str()])
            .await
            .map_err(ApiError::database)?
            .pop()
            .ok_or_else(not_found)?
    };
    if !may_see(&state, &caller, &offer.user_id).await? {
        return Err(not_found());
    }
    let payer = UserId::parse(&offer.user_id).map_err(ApiError::internal)?;
    let grants = {
        let client = state.pool.get().await.map_err(ApiError::database)?;
        crate::registry::get(&**client, &offer.product_key)
            .await
            .map_err(ApiError::internal)?
            .map(|p| p.grants)
            .unwrap_or_default()
    };
    let deadline = tokio::time::Instant::now() + wait;
    let mut status = "open".to_owned();
    let mut stripe_read: Option<tokio::time::Instant> = None;
    loop {
        let held = Arc::new(read_from_postgres(&state, &payer).await?);
        let now = Utc::now();
        let granted = !grants.is_empty()
            && grants
                .iter()
                .all(|key| status_of(&held.entitlements, key, now).is_allowed());
        if granted {
            status = "complete".into();
        } else if stripe_read.is_none_or(|at| at.elapsed() >= STRIPE_EVERY)
            // Past the caller's limit (or without Redis to count it), the page answers from
            // Postgres alone: the webhook will bring the outcome.
            && super::limits::take(&state, &super::limits::CHECKOUT_OUTCOME, &caller.user)
                .await
                .is_ok()
        {
            stripe_read = Some(tokio::time::Instant::now());
            status = read_and_apply(&state, &offer).await?;
            if status == "complete" {
                continue;
            }
        }
        if granted || status == "expired" || tokio::time::Instant::now() >= deadline {
            if granted {
                state.cache.refresh(&held).await;
            }
            let access = access_with(&state, &caller.user, Some(&held)).await?;
            return Ok(Json(SessionOutcome {
                session_id,
                product_key: offer.product_key,
                payer: offer.user_id,
                status,
                granted,
                entitlements: access
                    .entitlements
                    .iter()
                    .map(|e| item_view(e, now))
                    .collect(),
            }));
        }
        tokio::time::sleep(LOOK_EVERY.min(deadline - tokio::time::Instant::now())).await;
    }
}

/// Reads the offered session from Stripe and, when paid, applies it (its line item as offered,
/// as the worker completes it, and its subscription) through the one apply path; returns the
/// session's status as Stripe says it.
async fn read_and_apply(state: &ApiState, offer: &CheckoutOffer) -> Result<String, ApiError> {
    let session_id = offer.session_id.as_str();
    let stripe = state.stripe()?;
    // The recorded offer completes the session: no line items to expand.
    let session = stripe
        .get_object(&format!("/v1/checkout/sessions/{session_id}"), &[])
        .await?;
    let status = session["status"].as_str().unwrap_or("open").to_owned();
    let now = Utc::now().timestamp();
    let mut bodies = synthetic_events(ObjectKind::CheckoutSession, &session, now);
    if bodies.is_empty() {
        return Ok(status);
    }
    // A subscription's session grants through its subscription.
    if let (Some(subscription), Some(customer)) = (
        session["subscription"].as_str(),
        session["customer"].as_str(),
    ) {
        for object in stripe.list_subscriptions(customer).await? {
            if object["id"].as_str() == Some(subscription) {
                bodies.extend(synthetic_events(ObjectKind::Subscription, &object, now));
            }
        }
    }
    let offers = std::slice::from_ref(offer);
    let events = bodies
        .iter()
        .map(|body: &Value| {
            let event = crate::domain::events::parse(body.to_string().as_bytes())?;
            Ok(crate::complete::without_stripe(&event, offers, &[]).map_or(event, |(e, _)| e))
        })
        .collect::<Result<Vec<_>, crate::domain::events::EventError>>()
        .map_err(ApiError::internal)?;
    let applied = apply_all(state, &events).await?;
    tracing::info!(
        session = session_id,
        applied,
        "checkout session applied from the success page"
    );
    Ok(status)
}
