//! The entitlement API served by `processor` (see CONTRACT.md, "Entitlement API").
//!
//! Invariants: every failure leaves through [`error::ApiError`], so clients only ever see
//! `{"error":"<stable_code>","message":"…"}` and 5xx bodies never carry internals; every user
//! route takes its user from the verified bearer token ([`crate::auth::AuthUser`]) and never from
//! the request, so no route reads or acts on another user's data; the route table
//! ([`routes`]) is the single list both the router and the OpenAPI document are checked against.
//!
//! Direction: the API is on top; the views it answers are the domain's
//! ([`crate::domain::view`], also the cache's format and the app's message bodies), so nothing
//! below needs to import it.

pub mod checkout;
pub mod customers;
pub mod entitlements;
pub mod error;
pub mod limits;
pub mod openapi;
pub mod organizations;
pub mod products;
pub mod purchases;
pub mod restore;
pub mod success;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRef, MatchedPath, Request};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{MethodRouter, get, post};
use deadpool_postgres::Pool;
use secrecy::SecretString;
use shared::config::{ConfigError, Env};

use crate::auth::{AuthConfig, Authenticator};
use crate::cache::Cache;
use crate::config::Config;
use crate::local_cache::{self, LocalCache};
use crate::stripe::{StripeClient, StripeConfig, StripeError};

/// Where Stripe sends the user back to; server-controlled, never taken from a request.
#[derive(Debug, Clone, Default)]
pub struct ReturnUrls {
    /// `CHECKOUT_SUCCESS_URL`
    pub checkout_success: Option<String>,
    /// `CHECKOUT_CANCEL_URL`
    pub checkout_cancel: Option<String>,
    /// `BILLING_PORTAL_RETURN_URL`
    pub portal_return: Option<String>,
    /// `STRIPE_BILLING_PORTAL_CONFIGURATION_ID`
    pub portal_configuration: Option<String>,
}

/// Default `API_MAX_BODY_BYTES`: the API's bodies are a few dozen bytes of JSON.
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 * 1024;

/// Everything the API needs besides Postgres and Redis.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub auth: AuthConfig,
    /// `API_MAX_BODY_BYTES`: larger request bodies get 413 `payload_too_large`.
    pub max_body_bytes: usize,
    /// `None` without `STRIPE_SECRET_KEY`: reads work, the Stripe routes answer 503.
    pub stripe: Option<StripeConfig>,
    pub urls: ReturnUrls,
    /// `ENTITLEMENT_LOCAL_CACHE_ENTRIES`: snapshots kept in process memory (`0`: none).
    pub local_cache_entries: usize,
}

impl ApiConfig {
    /// Reads `AUTH_JWT_*`, `ADMIN_API_TOKEN`, `API_MAX_BODY_BYTES` and the return URLs; the
    /// Stripe settings come from `config`, which read them.
    ///
    /// `AUTH_JWT_SECRET` is required (the API cannot serve a single user route without it);
    /// `STRIPE_SECRET_KEY` and the return URLs are optional so a read-only deployment works.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the variable that is missing or malformed.
    pub fn from_env(env: &Env, config: &Config) -> Result<Self, ConfigError> {
        let auth = AuthConfig::from_env(env)?;
        let max_body_bytes = env.parse_or("API_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES)?;
        if max_body_bytes == 0 {
            return Err(ConfigError::new("API_MAX_BODY_BYTES", "must be positive"));
        }
        let local_cache_entries = env.parse_or(
            "ENTITLEMENT_LOCAL_CACHE_ENTRIES",
            local_cache::DEFAULT_ENTRIES,
        )?;
        let opt = |var: &str| {
            env.get(var)
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
        };
        Ok(Self {
            auth,
            max_body_bytes,
            stripe: config.stripe.clone(),
            urls: ReturnUrls {
                checkout_success: opt("CHECKOUT_SUCCESS_URL"),
                checkout_cancel: opt("CHECKOUT_CANCEL_URL"),
                portal_return: opt("BILLING_PORTAL_RETURN_URL"),
                portal_configuration: opt("STRIPE_BILLING_PORTAL_CONFIGURATION_ID"),
            },
            local_cache_entries,
        })
    }

    /// A configuration with only the JWT secret set (tests and read-only deployments).
    #[must_use]
    pub fn with_jwt_secret(secret: &str) -> Self {
        Self {
            auth: AuthConfig::with_secret(SecretString::from(secret.to_owned())),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            stripe: None,
            urls: ReturnUrls::default(),
            local_cache_entries: local_cache::DEFAULT_ENTRIES,
        }
    }
}

/// The router state of the API routes: one shared allocation, so the per-request clone axum
/// makes is one reference count (the parts themselves hold strings, e.g. the Redis client's
/// address).
#[derive(Debug, Clone)]
pub struct ApiState(Arc<ApiParts>);

/// What [`ApiState`] shares.
#[derive(Debug)]
pub struct ApiParts {
    pub pool: Pool,
    pub cache: Cache,
    /// Entitlement snapshots in process memory, in front of `cache`.
    pub local: LocalCache,
    pub auth: Authenticator,
    pub stripe: Option<StripeClient>,
    pub urls: ReturnUrls,
    pub max_body_bytes: usize,
    /// Cache refills running after their answers; a miss finding none free skips its refill
    /// (the next miss refills), so a slow Redis cannot pile tasks up.
    pub refills: Arc<tokio::sync::Semaphore>,
}

/// Most cache refills in flight at once.
pub const MAX_REFILLS_IN_FLIGHT: usize = 256;

impl std::ops::Deref for ApiState {
    type Target = ApiParts;

    fn deref(&self) -> &ApiParts {
        &self.0
    }
}

impl ApiState {
    /// Builds the state and starts the in-process entitlement cache (call within a Tokio
    /// runtime).
    ///
    /// # Errors
    /// [`StripeError::Transport`] when the Stripe HTTP client cannot be built.
    pub fn new(config: ApiConfig, pool: Pool, cache: Cache) -> Result<Self, StripeError> {
        // Every request of the API is user-triggered: it takes from the users' share of the
        // account's budget first, so the worker's reads always find the rest.
        let stripe = config
            .stripe
            .map(|mut stripe| {
                stripe.budget = stripe.budget.for_users();
                StripeClient::new(stripe)
            })
            .transpose()?;
        let local = LocalCache::start(&cache, config.local_cache_entries);
        Ok(Self(Arc::new(ApiParts {
            pool,
            cache,
            local,
            auth: Authenticator::new(&config.auth),
            stripe,
            urls: config.urls,
            max_body_bytes: config.max_body_bytes,
            refills: Arc::new(tokio::sync::Semaphore::new(MAX_REFILLS_IN_FLIGHT)),
        })))
    }

    /// The Stripe client, or 503 `not_configured` without `STRIPE_SECRET_KEY`.
    pub(crate) fn stripe(&self) -> Result<&StripeClient, error::ApiError> {
        self.stripe
            .as_ref()
            .ok_or(error::ApiError::NotConfigured("STRIPE_SECRET_KEY"))
    }
}

impl FromRef<ApiState> for Authenticator {
    fn from_ref(state: &ApiState) -> Self {
        state.auth.clone()
    }
}

/// One row of the route table.
#[derive(Debug)]
pub struct Route {
    pub method: Method,
    /// axum's path syntax (`{param}`), which is also OpenAPI's.
    pub path: &'static str,
    handler: MethodRouter<ApiState>,
}

/// Every API route. The router is built from this table and the OpenAPI test compares it with
/// the document.
#[must_use]
pub fn routes() -> Vec<Route> {
    let route = |method: Method, path, handler| Route {
        method,
        path,
        handler,
    };
    vec![
        route(
            Method::GET,
            "/api/pro/entitlement",
            get(entitlements::pro_entitlement),
        ),
        route(
            Method::GET,
            "/api/entitlements",
            get(entitlements::my_entitlements),
        ),
        route(
            Method::GET,
            "/api/access/{entitlementKey}",
            get(entitlements::access),
        ),
        route(
            Method::GET,
            "/v1/entitlements/{userId}",
            get(entitlements::admin_entitlements),
        ),
        route(Method::GET, "/api/purchases", get(purchases::list)),
        route(Method::GET, "/api/purchases/{id}", get(purchases::one)),
        route(
            Method::POST,
            "/api/checkout/session",
            post(checkout::create_session),
        ),
        route(
            Method::GET,
            "/api/checkout/session/{sessionId}",
            get(success::outcome),
        ),
        route(Method::POST, "/api/billing/portal", post(checkout::portal)),
        route(Method::POST, "/api/pro/restore", post(restore::restore)),
        route(
            Method::PUT,
            "/v1/products/{key}",
            axum::routing::put(products::put),
        ),
        route(Method::GET, "/v1/products/{key}", get(products::get)),
        route(
            Method::DELETE,
            "/v1/products/{key}",
            axum::routing::delete(products::unpublish),
        ),
        route(Method::GET, "/v1/products", get(products::list)),
        route(
            Method::GET,
            "/v1/payments/unmatched",
            get(products::unmatched),
        ),
        route(
            Method::GET,
            "/v1/payments/duplicates",
            get(purchases::duplicates),
        ),
        route(
            Method::PUT,
            "/v1/organizations/{organizationId}/members/{userId}",
            axum::routing::put(organizations::put_member),
        ),
        route(
            Method::DELETE,
            "/v1/organizations/{organizationId}/members/{userId}",
            axum::routing::delete(organizations::remove_member),
        ),
        route(
            Method::GET,
            "/v1/organizations/{organizationId}",
            get(organizations::organization),
        ),
        route(Method::GET, "/openapi.json", get(openapi::serve_document)),
    ]
}

/// The API router, with per-route request counters and latency histograms and the body limit
/// (`API_MAX_BODY_BYTES`). The listener's own limits are added by [`shared::server::serve`].
pub fn router(state: ApiState) -> Router {
    routes()
        .into_iter()
        .fold(Router::new(), |router, r| router.route(r.path, r.handler))
        .layer(DefaultBodyLimit::max(state.max_body_bytes))
        .layer(axum::middleware::from_fn(record_metrics))
        .with_state(state)
}

/// `api_requests_total{route,method,status}` and `api_request_duration_seconds{route,method}`,
/// labelled by the route template (never the raw path, which carries user ids) and a method
/// of a closed set ([`shared::telemetry::method_label`]).
async fn record_metrics(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = shared::telemetry::method_label(request.method());
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("api_requests_total", "route" => route.clone(), "method" => method, "status" => status)
        .increment(1);
    metrics::histogram!("api_request_duration_seconds", "route" => route, "method" => method)
        .record(started.elapsed().as_secs_f64());
    response
}
