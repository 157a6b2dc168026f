//! HTTP routes: the webhook endpoint and the health, readiness and metrics endpoints.
//!
//! Invariant: the webhook handler answers 200 only after [`Publish::publish`] returned `Ok`
//! (for the service's `Publisher`: broker ack, not returned as unroutable). Error bodies are the
//! contract's fixed codes; they never echo the signature, the secret or the payload.
//!
//! The accepted path does per request only what the contract needs: no copy of the header map
//! or of the body, metric handles registered once, the request's span and its fields built only
//! when the log filter enables them, and a fixed 200 body.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use metrics::Counter;
use serde_json::json;
use shared::signature::{VerifiedWebhook, Verifier, WebhookError};
use shared::topology::{Topology, headers};
use tracing::Instrument;

use crate::Config;
use crate::publish::Publish;

/// Seconds Stripe (or any client) is asked to wait after a 503.
const RETRY_AFTER_SECS: &str = "5";

/// The 200 body of an accepted webhook, as `axum::Json` would serialize `{"received": true}`.
const RECEIVED: &[u8] = br#"{"received":true}"#;

#[derive(Debug)]
struct AppState<P> {
    verifier: Verifier,
    publisher: P,
    topology: Topology,
    outcomes: Outcomes,
}

/// `ingress_requests_total{outcome}`, one handle per outcome, registered when the router is
/// built (so every outcome is exported from the start, at 0).
#[derive(Debug)]
struct Outcomes {
    accepted: Counter,
    unavailable: Counter,
    invalid_signature: Counter,
    invalid_payload: Counter,
    payload_too_large: Counter,
    bad_request: Counter,
}

impl Outcomes {
    fn register() -> Self {
        // The handles are kept, so the process recorder must exist before they are taken.
        let _ = shared::telemetry::metrics_handle();
        let counter = |outcome: &'static str| metrics::counter!("ingress_requests_total", "outcome" => outcome);
        Self {
            accepted: counter("accepted"),
            unavailable: counter("unavailable"),
            invalid_signature: counter("invalid_signature"),
            invalid_payload: counter("invalid_payload"),
            payload_too_large: counter("payload_too_large"),
            bad_request: counter("bad_request"),
        }
    }
}

/// Builds the ingress router around a running publisher (the service's is
/// `shared::amqp::Publisher`). `/metrics` is on it unless `INGRESS_METRICS_ADDR` moves it to its
/// own listener. The listener's limits (request timeout, in-flight cap) are added by
/// [`shared::server::serve`].
pub fn router<P: Publish>(config: &Config, publisher: P) -> Router {
    let state = Arc::new(AppState {
        verifier: config.verifier.clone(),
        publisher,
        topology: config.topology.clone(),
        outcomes: Outcomes::register(),
    });
    let router = Router::new()
        .route(
            "/webhooks/stripe",
            post(webhook::<P>).layer(DefaultBodyLimit::max(config.max_body_bytes)),
        )
        .route(
            "/healthz",
            get(|| async { Json::ok(json!({"status": "ok"})) }),
        )
        .route("/readyz", get(readyz::<P>))
        .with_state(state);
    if config.metrics_addr.is_some() {
        router
    } else {
        router.merge(shared::server::metrics_router())
    }
}

/// A JSON response with a status; small enough not to need axum's `Json` wrapper semantics.
struct Json(StatusCode, serde_json::Value);

impl Json {
    fn ok(value: serde_json::Value) -> Self {
        Self(StatusCode::OK, value)
    }
    fn error(status: StatusCode, code: &str) -> Self {
        Self(status, json!({ "error": code }))
    }
}

impl IntoResponse for Json {
    fn into_response(self) -> Response {
        (self.0, axum::Json(self.1)).into_response()
    }
}

async fn readyz<P: Publish>(State(state): State<Arc<AppState<P>>>) -> Json {
    if state.publisher.is_ready() {
        Json::ok(json!({"status": "ready", "broker": "up"}))
    } else {
        Json(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "unavailable", "broker": "down"}),
        )
    }
}

async fn webhook<P: Publish>(
    State(state): State<Arc<AppState<P>>>,
    mut request: Request,
) -> Response {
    let outcomes = &state.outcomes;
    // Taken out of the request rather than copying the whole header map.
    let signature = request.headers_mut().remove("stripe-signature");
    let body = match Bytes::from_request(request, &()).await {
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            outcomes.payload_too_large.increment(1);
            return Json::error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").into_response();
        }
        Err(rejection) => {
            outcomes.bad_request.increment(1);
            tracing::info!(error = %rejection.body_text(), "webhook body could not be read");
            return Json::error(StatusCode::BAD_REQUEST, "invalid_payload").into_response();
        }
    };
    let signature = signature.as_ref().and_then(|v| v.to_str().ok());
    let hook = match state.verifier.verify(signature, body, now_unix()) {
        Ok(hook) => hook,
        Err(WebhookError::Signature(reason)) => {
            outcomes.invalid_signature.increment(1);
            tracing::warn!(%reason, "webhook signature refused");
            return Json::error(StatusCode::BAD_REQUEST, "invalid_signature").into_response();
        }
        Err(WebhookError::Payload(reason)) => {
            outcomes.invalid_payload.increment(1);
            tracing::warn!(%reason, "signed webhook body refused");
            return Json::error(StatusCode::BAD_REQUEST, "invalid_payload").into_response();
        }
    };
    let span =
        tracing::info_span!("webhook", event_id = %hook.id(), event_type = hook.event_type());
    publish(&state, hook).instrument(span).await
}

async fn publish<P: Publish>(state: &AppState<P>, hook: VerifiedWebhook) -> Response {
    match state
        .publisher
        .publish(
            state.topology.exchange(),
            hook.event_type(),
            hook.body(),
            properties(&hook),
        )
        .await
    {
        Ok(()) => {
            state.outcomes.accepted.increment(1);
            // Debug, not info: at thousands of webhooks a second a line each is a cost of its
            // own; the counter above says how many were accepted.
            tracing::debug!("webhook accepted");
            (
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                Bytes::from_static(RECEIVED),
            )
                .into_response()
        }
        Err(error) => {
            state.outcomes.unavailable.increment(1);
            tracing::error!(%error, "webhook not stored; asking Stripe to retry");
            let mut response =
                Json::error(StatusCode::SERVICE_UNAVAILABLE, "unavailable").into_response();
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECS),
            );
            response
        }
    }
}

/// The contract's message properties: `message_id` = event id, `type` = event type,
/// `timestamp` = event `created`, header `received_at`. Persistence is set by the publisher.
fn properties(hook: &VerifiedWebhook) -> BasicProperties {
    let mut table = FieldTable::default();
    table.insert(
        headers::RECEIVED_AT.into(),
        AMQPValue::LongString(chrono::Utc::now().to_rfc3339().into()),
    );
    let mut props = BasicProperties::default()
        .with_message_id(hook.id().as_str().into())
        .with_type(hook.event_type().into())
        .with_content_type("application/json".into())
        .with_headers(table);
    if let Some(created) = hook.created().and_then(|c| u64::try_from(c).ok()) {
        props = props.with_timestamp(created);
    }
    props
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
