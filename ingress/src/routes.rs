//! HTTP routes: the webhook endpoint and the health, readiness and metrics endpoints.
//!
//! Invariant: the webhook handler answers 200 only after `Publisher::publish` returned `Ok`
//! (broker ack, not returned as unroutable). Error bodies are the contract's fixed codes; they
//! never echo the signature, the secret or the payload.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use serde_json::json;
use shared::amqp::Publisher;
use shared::signature::{VerifiedWebhook, Verifier, WebhookError};
use shared::topology::{Topology, headers};
use tracing::Instrument;

use crate::Config;

/// Seconds Stripe (or any client) is asked to wait after a 503.
const RETRY_AFTER_SECS: &str = "5";

#[derive(Debug)]
struct AppState {
    verifier: Verifier,
    publisher: Publisher,
    topology: Topology,
}

/// Builds the ingress router around a running publisher. `/metrics` is on it unless
/// `INGRESS_METRICS_ADDR` moves it to its own listener. The listener's limits (request timeout,
/// in-flight cap) are added by [`shared::server::serve`].
pub fn router(config: &Config, publisher: Publisher) -> Router {
    let state = Arc::new(AppState {
        verifier: config.verifier.clone(),
        publisher,
        topology: config.topology.clone(),
    });
    let router = Router::new()
        .route(
            "/webhooks/stripe",
            post(webhook).layer(DefaultBodyLimit::max(config.max_body_bytes)),
        )
        .route(
            "/healthz",
            get(|| async { Json::ok(json!({"status": "ok"})) }),
        )
        .route("/readyz", get(readyz))
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

async fn readyz(State(state): State<Arc<AppState>>) -> Json {
    if state.publisher.is_ready() {
        Json::ok(json!({"status": "ready", "broker": "up"}))
    } else {
        Json(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "unavailable", "broker": "down"}),
        )
    }
}

fn outcome(outcome: &'static str) {
    metrics::counter!("ingress_requests_total", "outcome" => outcome).increment(1);
}

async fn webhook(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            outcome("payload_too_large");
            return Json::error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").into_response();
        }
        Err(rejection) => {
            outcome("bad_request");
            tracing::info!(error = %rejection.body_text(), "webhook body could not be read");
            return Json::error(StatusCode::BAD_REQUEST, "invalid_payload").into_response();
        }
    };
    let signature = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok());
    let hook = match state.verifier.verify(signature, body, now_unix()) {
        Ok(hook) => hook,
        Err(WebhookError::Signature(reason)) => {
            outcome("invalid_signature");
            tracing::warn!(%reason, "webhook signature refused");
            return Json::error(StatusCode::BAD_REQUEST, "invalid_signature").into_response();
        }
        Err(WebhookError::Payload(reason)) => {
            outcome("invalid_payload");
            tracing::warn!(%reason, "signed webhook body refused");
            return Json::error(StatusCode::BAD_REQUEST, "invalid_payload").into_response();
        }
    };
    let span =
        tracing::info_span!("webhook", event_id = %hook.id(), event_type = hook.event_type());
    publish(&state, hook).instrument(span).await
}

async fn publish(state: &AppState, hook: VerifiedWebhook) -> Response {
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
            outcome("accepted");
            tracing::info!("webhook accepted");
            Json::ok(json!({"received": true})).into_response()
        }
        Err(error) => {
            outcome("unavailable");
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
