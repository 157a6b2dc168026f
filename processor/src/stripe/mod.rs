//! The Stripe REST client: the only code that talks to `api.stripe.com` (or the fake that
//! `STRIPE_API_BASE` points at).
//!
//! Invariants:
//! - the secret key is a `SecretString`, sent only in the `Authorization` header, never logged,
//!   never in a `Debug` or error text;
//! - every request carries the pinned `Stripe-Version`, so answers have the shapes this code and
//!   the webhook endpoint agree on;
//! - every POST carries an `Idempotency-Key`, the SAME one on each retry, so a retried create can
//!   never create twice;
//! - retries follow Stripe's rules: `Stripe-Should-Retry: true` retries, `false` never does,
//!   otherwise 409, 429, 5xx, timeouts and connection errors retry, with exponential backoff and
//!   jitter, a bounded number of times.

pub mod budget;
mod error;
pub mod form;
mod types;

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde_json::Value;
use sha2::{Digest, Sha256};
use shared::config::{ConfigError, Env};
use shared::ids::UserId;

pub use error::StripeError;
pub use form::Form;
pub use types::{
    BillingPortalSession, CheckoutMode, CheckoutSession, CheckoutSessionRequest, Customer,
    EventQuery, LineItemPrice, ListPage,
};

/// The Stripe API version this service is written against ("basil"); the webhook endpoint must
/// be configured with the same version. Overridable with `STRIPE_API_VERSION`.
pub const STRIPE_API_VERSION: &str = "2025-03-31.basil";
/// Where the real Stripe API lives.
pub const DEFAULT_API_BASE: &str = "https://api.stripe.com";
/// The largest page Stripe's list endpoints serve.
const PAGE_LIMIT: &str = "100";
/// A safety stop for list walks: 1000 pages of 100 is far beyond one customer's history.
const MAX_PAGES: usize = 1000;

/// How to reach Stripe. Built from the environment by [`StripeConfig::from_env`], or directly in
/// tests (pointing `api_base` at a fake, shortening timeouts and backoff).
#[derive(Debug, Clone)]
pub struct StripeConfig {
    /// `sk_…` or a restricted `rk_…` key. Its `Debug` prints `[REDACTED]`.
    pub secret_key: SecretString,
    /// Scheme, host and optional port, without a trailing slash.
    pub api_base: String,
    pub api_version: String,
    pub connect_timeout: Duration,
    /// Deadline of one attempt, from sending to the end of the body.
    pub request_timeout: Duration,
    /// Retries after the first attempt.
    pub max_retries: usize,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// The process' request budget (`STRIPE_MAX_REQUESTS_PER_SECOND`), shared by every clone.
    pub budget: budget::Budget,
}

impl StripeConfig {
    /// Defaults modelled on the official SDKs (two retries, 0.5 s growing to at most 5 s), with a
    /// shorter request timeout because a user is waiting on the other side of these calls.
    ///
    /// # Errors
    /// When `api_base` is not an `http(s)` URL.
    pub fn new(secret_key: SecretString, api_base: &str) -> Result<Self, ConfigError> {
        let api_base = parse_base(api_base).map_err(|e| ConfigError::new("STRIPE_API_BASE", e))?;
        Ok(Self {
            secret_key,
            api_base,
            api_version: STRIPE_API_VERSION.to_owned(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(20),
            max_retries: 2,
            min_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(5),
            budget: budget::Budget::default(),
        })
    }

    /// [`StripeConfig::from_env`] when `STRIPE_SECRET_KEY` is set, `None` otherwise.
    ///
    /// # Errors
    /// As [`StripeConfig::from_env`].
    pub fn optional_from_env(env: &Env) -> Result<Option<Self>, ConfigError> {
        env.get("STRIPE_SECRET_KEY")
            .map(|_| Self::from_env(env))
            .transpose()
    }

    /// Reads `STRIPE_SECRET_KEY` (required), `STRIPE_API_BASE`, `STRIPE_API_VERSION` and
    /// `STRIPE_MAX_REQUESTS_PER_SECOND`.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the variable that is missing or malformed.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let key = env.required("STRIPE_SECRET_KEY")?.trim();
        if !(key.starts_with("sk_") || key.starts_with("rk_")) {
            return Err(ConfigError::new(
                "STRIPE_SECRET_KEY",
                "must be a secret key starting with sk_ (or a restricted key rk_)",
            ));
        }
        let mut config = Self::new(
            SecretString::from(key.to_owned()),
            &env.string_or("STRIPE_API_BASE", DEFAULT_API_BASE),
        )?;
        if let Some(version) = env.get("STRIPE_API_VERSION") {
            config.api_version = version.trim().to_owned();
        }
        let per_second =
            env.parse_or("STRIPE_MAX_REQUESTS_PER_SECOND", budget::DEFAULT_PER_SECOND)?;
        if per_second == 0 {
            return Err(ConfigError::new(
                "STRIPE_MAX_REQUESTS_PER_SECOND",
                "must be at least 1",
            ));
        }
        config.budget = budget::Budget::new(per_second);
        Ok(config)
    }

    /// This configuration with its budget kept in the Redis at `redis_url`, one for the
    /// account, shared by every process of the service ([`budget::Budget::shared_in`]).
    ///
    /// # Errors
    /// A [`ConfigError`] for `REDIS_URL` when it is not a Redis URL.
    pub fn with_shared_budget(mut self, redis_url: &str) -> Result<Self, ConfigError> {
        self.budget = self
            .budget
            .shared_in(redis_url, &self.secret_key)
            .map_err(|e| ConfigError::new("REDIS_URL", format!("not a Redis URL: {e}")))?;
        Ok(self)
    }
}

fn parse_base(raw: &str) -> Result<String, String> {
    let url = reqwest::Url::parse(raw.trim()).map_err(|e| format!("{raw:?} is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!("{raw:?} must be an http(s) URL with a host"));
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

/// A cheap-to-clone Stripe API client (one connection pool shared by the clones).
#[derive(Clone)]
pub struct StripeClient {
    http: reqwest::Client,
    config: std::sync::Arc<StripeConfig>,
    /// Most pages a list walk reads before it fails ([`StripeClient::with_max_pages`]).
    max_pages: usize,
}

impl std::fmt::Debug for StripeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeClient")
            .field("api_base", &self.config.api_base)
            .field("api_version", &self.config.api_version)
            .field("secret_key", &"[REDACTED]")
            .finish_non_exhaustive()
    }
}

/// One attempt's failure, with the retry decision taken from the answer that caused it.
#[derive(Debug)]
struct Attempt {
    error: StripeError,
    retry: bool,
}

impl StripeClient {
    /// # Errors
    /// [`StripeError::Transport`] when the HTTP client cannot be built (TLS backend failure).
    pub fn new(config: StripeConfig) -> Result<Self, StripeError> {
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            .user_agent(concat!(
                "entitlements-processor/",
                env!("CARGO_PKG_VERSION")
            ))
            .build()
            .map_err(|e| StripeError::Transport {
                message: e.to_string(),
            })?;
        Ok(Self {
            http,
            config: std::sync::Arc::new(config),
            max_pages: MAX_PAGES,
        })
    }

    /// The same client (sharing its connections) with list walks stopped after `pages` pages:
    /// a walk that would need more fails with [`StripeError::Decode`] instead of reading on.
    /// Routes that answer a user request bound their fan-out with it.
    #[must_use]
    pub fn with_max_pages(&self, pages: usize) -> Self {
        Self {
            max_pages: pages.clamp(1, MAX_PAGES),
            ..self.clone()
        }
    }

    #[must_use]
    pub fn config(&self) -> &StripeConfig {
        &self.config
    }

    /// Creates the Stripe customer of `user_id` (with `metadata[user_id]`). The idempotency key is
    /// derived from the user id, so two concurrent first checkouts of one user create one customer.
    ///
    /// # Errors
    /// Any [`StripeError`].
    pub async fn create_customer(
        &self,
        user_id: &UserId,
        email: Option<&str>,
    ) -> Result<Customer, StripeError> {
        self.create_customer_keyed(user_id, email, &format!("customer-create-v1-{user_id}"))
            .await
    }

    /// Creates a new Stripe customer of `user_id` in place of `gone`, a customer Stripe no longer
    /// knows. The idempotency key names the replaced customer: concurrent replacements of one
    /// customer create one, while the first creation's key (kept by Stripe for at least 24 h)
    /// is not replayed with the customer that is gone.
    ///
    /// # Errors
    /// Any [`StripeError`].
    pub async fn replace_customer(
        &self,
        user_id: &UserId,
        gone: &str,
    ) -> Result<Customer, StripeError> {
        // Hashed: a 200-byte user id and a customer id would not fit Stripe's 255 characters.
        let mut hash = Sha256::new();
        for part in [user_id.as_str(), gone] {
            hash.update(part.len().to_be_bytes());
            hash.update(part.as_bytes());
        }
        let hex: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
        let key = format!("customer-replace-v1-{hex}");
        self.create_customer_keyed(user_id, None, &key).await
    }

    async fn create_customer_keyed(
        &self,
        user_id: &UserId,
        email: Option<&str>,
        key: &str,
    ) -> Result<Customer, StripeError> {
        let mut form = Form::new();
        form.push_opt("email", email)
            .push("metadata[user_id]", user_id.as_str());
        self.post("/v1/customers", &form, Some(key)).await
    }

    /// Creates a Checkout Session. `idempotency_key` (at most 255 characters) should identify the
    /// user's intent (user, product and a short time bucket) so a double click yields one session.
    ///
    /// # Errors
    /// Any [`StripeError`]; [`StripeError::IdempotencyConflict`] when the key was used with
    /// other parameters.
    pub async fn create_checkout_session(
        &self,
        request: &CheckoutSessionRequest,
        idempotency_key: &str,
    ) -> Result<CheckoutSession, StripeError> {
        self.post(
            "/v1/checkout/sessions",
            &checkout_form(request),
            Some(idempotency_key),
        )
        .await
    }

    /// Creates a billing portal session for `customer`.
    ///
    /// # Errors
    /// Any [`StripeError`]; `resource_missing` (see [`StripeError::is_resource_missing`]) when
    /// Stripe does not know the customer.
    pub async fn create_billing_portal_session(
        &self,
        customer: &str,
        return_url: &str,
        configuration: Option<&str>,
    ) -> Result<BillingPortalSession, StripeError> {
        let mut form = Form::new();
        form.push("customer", customer)
            .push("return_url", return_url)
            .push_opt("configuration", configuration);
        self.post("/v1/billing_portal/sessions", &form, None).await
    }

    /// All Checkout Sessions of `customer`, newest first, as raw objects.
    ///
    /// # Errors
    /// Any [`StripeError`].
    pub async fn list_checkout_sessions(&self, customer: &str) -> Result<Vec<Value>, StripeError> {
        self.list_by_customer("/v1/checkout/sessions", customer, &[])
            .await
    }

    /// All PaymentIntents of `customer`, newest first, as raw objects.
    ///
    /// # Errors
    /// Any [`StripeError`].
    pub async fn list_payment_intents(&self, customer: &str) -> Result<Vec<Value>, StripeError> {
        self.list_by_customer("/v1/payment_intents", customer, &[])
            .await
    }

    /// Every active Stripe Entitlements feature of `customer` (`GET
    /// /v1/entitlements/active_entitlements`, all pages; the summary event lists at most 10).
    ///
    /// # Errors
    /// Any [`StripeError`].
    pub async fn list_active_entitlements(
        &self,
        customer: &str,
    ) -> Result<Vec<Value>, StripeError> {
        self.list_by_customer("/v1/entitlements/active_entitlements", customer, &[])
            .await
    }

    /// One object as Stripe holds it now (`path`: `/v1/<collection>/<id>`), as a raw object,
    /// with the `expand` fields expanded in the same request.
    ///
    /// # Errors
    /// Any [`StripeError`] (`resource_missing` for an object Stripe does not know).
    pub async fn get_object(&self, path: &str, expand: &[&str]) -> Result<Value, StripeError> {
        let mut form = Form::new();
        for field in expand {
            form.push("expand[]", *field);
        }
        self.get(path, &form).await
    }

    /// The line items of a Checkout Session (webhook payloads never carry them).
    ///
    /// # Errors
    /// Any [`StripeError`].
    pub async fn list_checkout_line_items(&self, session: &str) -> Result<Vec<Value>, StripeError> {
        self.list_all(
            &format!("/v1/checkout/sessions/{session}/line_items"),
            &Form::new(),
        )
        .await
    }

    /// All charges of `customer` (with `refunded`, `amount_refunded`, `disputed`), as raw objects.
    ///
    /// # Errors
    /// Any [`StripeError`].
    pub async fn list_charges(&self, customer: &str) -> Result<Vec<Value>, StripeError> {
        self.list_by_customer("/v1/charges", customer, &[]).await
    }

    /// All disputes of one charge, newest first, as raw objects (`GET /v1/disputes` filters by
    /// charge or payment intent, not by customer).
    ///
    /// # Errors
    /// Any [`StripeError`].
    pub async fn list_disputes(&self, charge: &str) -> Result<Vec<Value>, StripeError> {
        let mut form = Form::new();
        form.push("charge", charge);
        self.list_all("/v1/disputes", &form).await
    }

    /// The invoice a payment paid, and the invoice's subscription: the first `InvoicePayment`
    /// of the payment (`GET /v1/invoice_payments?payment[type]=…`, by payment intent `pi_…` or
    /// charge `ch_…`), then its invoice (`GET /v1/invoices/{id}`, its subscription at
    /// `parent.subscription_details.subscription` since basil, at `subscription` before).
    /// `None` when the payment paid no invoice.
    ///
    /// # Errors
    /// Any [`StripeError`].
    pub async fn invoice_of_payment(
        &self,
        payment: &str,
    ) -> Result<Option<(String, Option<String>)>, StripeError> {
        let kind = if payment.starts_with("ch_") {
            "charge"
        } else {
            "payment_intent"
        };
        let mut form = Form::new();
        form.push("payment[type]", kind)
            .push(format!("payment[{kind}]"), payment)
            .push("limit", "1");
        let page: ListPage<Value> = self.get("/v1/invoice_payments", &form).await?;
        let Some(invoice) = page
            .data
            .iter()
            .find_map(|p| expandable_id(p.get("invoice")?))
        else {
            return Ok(None);
        };
        let found: Value = self
            .get(&format!("/v1/invoices/{invoice}"), &Form::new())
            .await?;
        let subscription = found
            .pointer("/parent/subscription_details/subscription")
            .and_then(expandable_id)
            .or_else(|| found.get("subscription").and_then(expandable_id));
        Ok(Some((invoice, subscription)))
    }

    /// All subscriptions of `customer` including canceled ones (`status=all`), as raw objects.
    ///
    /// # Errors
    /// Any [`StripeError`].
    pub async fn list_subscriptions(&self, customer: &str) -> Result<Vec<Value>, StripeError> {
        self.list_by_customer("/v1/subscriptions", customer, &[("status", "all")])
            .await
    }

    /// One page of `GET /v1/events` (newest first), for callers that report progress per page.
    ///
    /// # Errors
    /// Any [`StripeError`].
    pub async fn list_events_page(
        &self,
        query: &EventQuery,
        starting_after: Option<&str>,
    ) -> Result<ListPage<Value>, StripeError> {
        let mut form = event_form(query);
        form.push("limit", PAGE_LIMIT)
            .push_opt("starting_after", starting_after);
        self.get("/v1/events", &form).await
    }

    async fn list_by_customer(
        &self,
        path: &str,
        customer: &str,
        extra: &[(&str, &str)],
    ) -> Result<Vec<Value>, StripeError> {
        let mut form = Form::new();
        form.push("customer", customer);
        for (k, v) in extra {
            form.push(*k, *v);
        }
        self.list_all(path, &form).await
    }

    /// Walks a list endpoint with `starting_after` until `has_more` is false.
    async fn list_all(&self, path: &str, filters: &Form) -> Result<Vec<Value>, StripeError> {
        let mut all = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..self.max_pages {
            let mut form = filters.clone();
            form.push("limit", PAGE_LIMIT)
                .push_opt("starting_after", cursor.as_deref());
            let page: ListPage<Value> = self.get(path, &form).await?;
            let has_more = page.has_more;
            let last_id = page
                .data
                .last()
                .and_then(|o| o.get("id"))
                .and_then(Value::as_str)
                .map(str::to_owned);
            all.extend(page.data);
            if !has_more {
                return Ok(all);
            }
            cursor = Some(last_id.ok_or_else(|| StripeError::Decode {
                message: format!("{path}: has_more without an id on the last item"),
            })?);
        }
        Err(StripeError::Decode {
            message: format!("{path}: more than {} pages", self.max_pages),
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str, query: &Form) -> Result<T, StripeError> {
        let url = if query.is_empty() {
            format!("{}{path}", self.config.api_base)
        } else {
            format!("{}{path}?{}", self.config.api_base, query.encode())
        };
        self.send(reqwest::Method::GET, path, &url, None, None)
            .await
    }

    /// POSTs a form. Without a caller-chosen key, a random one is generated once here, so the
    /// retries below still share it.
    async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        form: &Form,
        idempotency_key: Option<&str>,
    ) -> Result<T, StripeError> {
        let key = idempotency_key
            .map(str::to_owned)
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let url = format!("{}{path}", self.config.api_base);
        self.send(
            reqwest::Method::POST,
            path,
            &url,
            Some(form.encode()),
            Some(&key),
        )
        .await
    }

    async fn send<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        url: &str,
        body: Option<String>,
        idempotency_key: Option<&str>,
    ) -> Result<T, StripeError> {
        let headers = self.headers(idempotency_key, body.is_some())?;
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.config.min_backoff)
            .with_max_delay(self.config.max_backoff)
            .with_max_times(self.config.max_retries)
            .with_jitter();
        // `backon` rather than the `backoff` crate: `backoff` is unmaintained
        // (RUSTSEC-2025-0012) and pulls in `instant` (RUSTSEC-2024-0384).
        let value = (|| self.attempt(method.clone(), url, headers.clone(), body.clone()))
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .when(|a: &Attempt| a.retry)
            .notify(|a: &Attempt, delay: Duration| {
                tracing::warn!(
                    %method,
                    path,
                    status = a.error.status(),
                    retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    error = %a.error,
                    "stripe request failed, retrying"
                );
            })
            .await
            .map_err(|a| a.error)?;
        serde_json::from_value(value).map_err(decode_error)
    }

    fn headers(
        &self,
        idempotency_key: Option<&str>,
        has_form: bool,
    ) -> Result<HeaderMap, StripeError> {
        let invalid = |what: &str| StripeError::Transport {
            message: format!("{what} is not a valid header value"),
        };
        let mut headers = HeaderMap::new();
        let mut auth = HeaderValue::from_str(&format!(
            "Bearer {}",
            self.config.secret_key.expose_secret()
        ))
        .map_err(|_| invalid("the secret key"))?;
        auth.set_sensitive(true);
        headers.insert(AUTHORIZATION, auth);
        headers.insert(
            "Stripe-Version",
            HeaderValue::from_str(&self.config.api_version)
                .map_err(|_| invalid("STRIPE_API_VERSION"))?,
        );
        if let Some(key) = idempotency_key {
            headers.insert(
                "Idempotency-Key",
                HeaderValue::from_str(key).map_err(|_| invalid("the idempotency key"))?,
            );
        }
        if has_form {
            headers.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/x-www-form-urlencoded"),
            );
        }
        Ok(headers)
    }

    async fn attempt(
        &self,
        method: reqwest::Method,
        url: &str,
        headers: HeaderMap,
        body: Option<String>,
    ) -> Result<Value, Attempt> {
        // Every attempt, retries included, counts against the process' budget.
        self.config.budget.take().await;
        let mut request = self.http.request(method, url).headers(headers);
        if let Some(body) = body {
            request = request.body(body);
        }
        let response = request.send().await.map_err(|e| transport_failure(&e))?;
        let status = response.status();
        let should_retry = response
            .headers()
            .get("Stripe-Should-Retry")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.eq_ignore_ascii_case("true"));
        let request_id = response
            .headers()
            .get("Request-Id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let bytes = response.bytes().await.map_err(|e| transport_failure(&e))?;
        tracing::debug!(
            status = status.as_u16(),
            request_id = request_id.as_deref(),
            "stripe answered"
        );
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| Attempt {
                error: decode_error(e),
                retry: false,
            });
        }
        let code = status.as_u16();
        let retry = should_retry.unwrap_or(code == 409 || code == 429 || code >= 500);
        Err(Attempt {
            error: self.api_error(code, &bytes),
            retry,
        })
    }

    fn api_error(&self, status: u16, body: &[u8]) -> StripeError {
        #[derive(serde::Deserialize)]
        struct Envelope {
            error: Body,
        }
        #[derive(serde::Deserialize)]
        struct Body {
            #[serde(rename = "type", default)]
            error_type: Option<String>,
            #[serde(default)]
            code: Option<String>,
            #[serde(default)]
            message: Option<String>,
            #[serde(default)]
            param: Option<String>,
        }
        let parsed = serde_json::from_slice::<Envelope>(body)
            .ok()
            .map(|e| e.error);
        let scrub = |s: String| self.scrub(s);
        let (error_type, code, message, param) = match parsed {
            Some(b) => (
                b.error_type.unwrap_or_else(|| "api_error".to_owned()),
                b.code,
                scrub(b.message.unwrap_or_default()),
                b.param,
            ),
            None => (
                "api_error".to_owned(),
                None,
                format!("HTTP {status} without a Stripe error body"),
                None,
            ),
        };
        if status == 429 {
            return StripeError::RateLimited;
        }
        if error_type == "idempotency_error" {
            return StripeError::IdempotencyConflict { message };
        }
        StripeError::Api {
            status,
            error_type,
            code,
            message,
            param,
        }
    }

    /// Stripe masks keys in its messages, but a fake or a proxy might not: never let the key
    /// travel on inside an error.
    fn scrub(&self, text: String) -> String {
        let key = self.config.secret_key.expose_secret();
        if key.is_empty() || !text.contains(key) {
            return text;
        }
        text.replace(key, "[REDACTED]")
    }
}

fn transport_failure(e: &reqwest::Error) -> Attempt {
    let error = if e.is_timeout() {
        StripeError::Timeout
    } else {
        // Only the cause chain, not reqwest's own text: that names the URL, whose query can
        // carry customer ids and emails.
        StripeError::Transport {
            message: error_chain(e),
        }
    };
    Attempt { error, retry: true }
}

fn error_chain(e: &reqwest::Error) -> String {
    use std::error::Error as _;
    let mut text = if e.is_connect() {
        "connection failed".to_owned()
    } else if e.is_body() || e.is_decode() {
        "reading the answer failed".to_owned()
    } else {
        "request failed".to_owned()
    };
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn decode_error(e: serde_json::Error) -> StripeError {
    StripeError::Decode {
        message: e.to_string(),
    }
}

fn checkout_form(request: &CheckoutSessionRequest) -> Form {
    let mut form = Form::new();
    form.push("mode", request.mode.as_str());
    match &request.price {
        LineItemPrice::Id(price) => {
            form.push("line_items[0][price]", price.as_str());
        }
        LineItemPrice::Data {
            currency,
            unit_amount,
            product_name,
        } => {
            form.push("line_items[0][price_data][currency]", currency.as_str())
                .push(
                    "line_items[0][price_data][unit_amount]",
                    unit_amount.to_string(),
                )
                .push(
                    "line_items[0][price_data][product_data][name]",
                    product_name.as_str(),
                );
        }
    }
    form.push("line_items[0][quantity]", request.quantity.to_string())
        .push("success_url", request.success_url.as_str())
        .push("cancel_url", request.cancel_url.as_str())
        .push("client_reference_id", request.client_reference_id.as_str())
        .push_opt("customer", request.customer.as_deref());
    let metadata = || {
        request
            .metadata
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
    };
    form.push_map("metadata", metadata());
    let carrier = match request.mode {
        CheckoutMode::Payment => "payment_intent_data[metadata]",
        CheckoutMode::Subscription => "subscription_data[metadata]",
    };
    form.push_map(carrier, metadata());
    form.push_opt("expires_at", request.expires_at.map(|t| t.to_string()));
    form
}

fn event_form(query: &EventQuery) -> Form {
    let mut form = Form::new();
    form.push_opt("created[gte]", query.created_gte.map(|t| t.to_string()));
    for t in &query.types {
        form.push("types[]", t.as_str());
    }
    form.push_opt(
        "delivery_success",
        query.delivery_success.map(|b| b.to_string()),
    );
    form
}

/// The id of an expandable field: the string, or the expanded object's `id`.
fn expandable_id(value: &Value) -> Option<String> {
    value
        .as_str()
        .or_else(|| value.get("id")?.as_str())
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn request(mode: CheckoutMode) -> CheckoutSessionRequest {
        CheckoutSessionRequest {
            mode,
            price: LineItemPrice::Id("price_1".into()),
            quantity: 1,
            success_url: "https://app.test/ok?session={CHECKOUT_SESSION_ID}".into(),
            cancel_url: "https://app.test/cancel".into(),
            client_reference_id: "u_1".into(),
            customer: Some("cus_1".into()),
            metadata: [("user_id", "u_1"), ("product_key", "pro")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            expires_at: Some(1_700_000_000),
        }
    }

    #[test]
    fn payment_checkout_copies_metadata_onto_the_payment_intent() {
        let form = checkout_form(&request(CheckoutMode::Payment));
        assert_eq!(
            form.encode(),
            "mode=payment&line_items[0][price]=price_1&line_items[0][quantity]=1\
             &success_url=https%3A%2F%2Fapp.test%2Fok%3Fsession%3D%7BCHECKOUT_SESSION_ID%7D\
             &cancel_url=https%3A%2F%2Fapp.test%2Fcancel&client_reference_id=u_1&customer=cus_1\
             &metadata[product_key]=pro&metadata[user_id]=u_1\
             &payment_intent_data[metadata][product_key]=pro&payment_intent_data[metadata][user_id]=u_1\
             &expires_at=1700000000"
        );
    }

    #[test]
    fn subscription_checkout_copies_metadata_onto_the_subscription() {
        let form = checkout_form(&request(CheckoutMode::Subscription));
        assert_eq!(
            form.get("subscription_data[metadata][user_id]"),
            Some("u_1")
        );
        assert_eq!(form.get("payment_intent_data[metadata][user_id]"), None);
    }

    #[test]
    fn event_filters_repeat_types_with_empty_brackets() {
        let form = event_form(&EventQuery {
            created_gte: Some(10),
            types: vec!["charge.refunded".into(), "invoice.paid".into()],
            delivery_success: Some(false),
        });
        assert_eq!(
            form.encode(),
            "created[gte]=10&types[]=charge.refunded&types[]=invoice.paid&delivery_success=false"
        );
    }

    #[test]
    fn error_messages_echoing_the_key_are_scrubbed() {
        let config = StripeConfig::new(
            SecretString::from("sk_test_leaky_key_42"),
            "http://127.0.0.1:1",
        )
        .unwrap();
        let client = StripeClient::new(config).unwrap();
        let body = br#"{"error":{"type":"invalid_request_error","message":"Invalid API Key provided: sk_test_leaky_key_42"}}"#;
        let err = client.api_error(401, body);
        assert!(!err.to_string().contains("sk_test_leaky_key_42"), "{err}");
        assert!(err.to_string().contains("[REDACTED]"), "{err}");
        let conflict = client.api_error(
            400,
            br#"{"error":{"type":"idempotency_error","message":"Keys for idempotent requests..."}}"#,
        );
        assert!(matches!(conflict, StripeError::IdempotencyConflict { .. }));
        let html = client.api_error(502, b"<html>bad gateway</html>");
        assert!(
            matches!(html, StripeError::Api { status: 502, .. }),
            "{html:?}"
        );
    }

    #[test]
    fn config_from_env_names_the_variable_and_redacts_the_key() {
        let err = StripeConfig::from_env(&Env::default()).unwrap_err();
        assert_eq!(err.var, "STRIPE_SECRET_KEY");
        let err = StripeConfig::from_env(&Env::from_pairs([("STRIPE_SECRET_KEY", "pk_live_x")]))
            .unwrap_err();
        assert_eq!(err.var, "STRIPE_SECRET_KEY");
        let err = StripeConfig::from_env(&Env::from_pairs([
            ("STRIPE_SECRET_KEY", "sk_test_abc"),
            ("STRIPE_API_BASE", "ftp://x"),
        ]))
        .unwrap_err();
        assert_eq!(err.var, "STRIPE_API_BASE");

        let config = StripeConfig::from_env(&Env::from_pairs([
            ("STRIPE_SECRET_KEY", "sk_test_very_secret"),
            ("STRIPE_API_BASE", "http://127.0.0.1:9999/"),
        ]))
        .unwrap();
        assert_eq!(config.api_base, "http://127.0.0.1:9999");
        assert_eq!(config.api_version, STRIPE_API_VERSION);
        assert!(!format!("{config:?}").contains("very_secret"));
        let client = StripeClient::new(config).unwrap();
        assert!(!format!("{client:?}").contains("very_secret"));

        let config = StripeConfig::from_env(&Env::from_pairs([
            ("STRIPE_SECRET_KEY", "sk_test_abc"),
            ("STRIPE_API_VERSION", "2024-06-20"),
        ]))
        .unwrap();
        assert_eq!(config.api_base, DEFAULT_API_BASE);
        assert_eq!(config.api_version, "2024-06-20");

        for bad in ["0", "-3", "fast"] {
            let err = StripeConfig::from_env(&Env::from_pairs([
                ("STRIPE_SECRET_KEY", "sk_test_abc"),
                ("STRIPE_MAX_REQUESTS_PER_SECOND", bad),
            ]))
            .unwrap_err();
            assert_eq!(err.var, "STRIPE_MAX_REQUESTS_PER_SECOND", "{bad}");
        }
    }
}
