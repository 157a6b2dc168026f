//! A Stripe-shaped fake HTTP server for tests: the endpoints the service calls, Stripe's list,
//! error and idempotency behaviour, a record of every request, and injectable failures.
//!
//! It covers what `localstripe` lacks (Checkout Sessions, billing portal, disputes, paged events
//! with `types[]`) and lets tests provoke what the real API does only under stress (429, 500
//! with `Stripe-Should-Retry`, slow answers). Started in front of `localstripe`, it serves only
//! what `localstripe` lacks and forwards the rest there.
//!
//! Invariants, as in Stripe: a request without the right bearer key gets 401; a POST replayed
//! with the same `Idempotency-Key` and the same parameters gets the first answer again (with
//! `Idempotent-Replayed: true`), with other parameters a 400 `idempotency_error`; only successful
//! answers are remembered for replay; injected failures are remembered neither.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// A failure the fake answers with instead of serving the next request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// 429 `rate_limit` (no `Stripe-Should-Retry` header: the status alone says retry).
    RateLimited,
    /// 500 `api_error` with `Stripe-Should-Retry: true`.
    ServerErrorShouldRetry,
    /// 500 `api_error` with `Stripe-Should-Retry: false` (a retry would not help).
    ServerErrorShouldNotRetry,
    /// 400 `invalid_request_error` with `Stripe-Should-Retry: false`.
    BadRequest,
    /// 409 `lock_timeout` without the header (retryable by status).
    Conflict,
    /// 401 `authentication_error`: a revoked or mistyped key.
    Unauthorized,
    /// Serve the request normally, but only after this delay.
    Slow(Duration),
}

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    /// The query string exactly as sent (brackets and percent-escapes included).
    pub raw_query: String,
    /// The body exactly as sent.
    pub raw_body: String,
    /// Decoded parameters, in wire order: the query's for GET, the form body's for POST.
    pub params: Vec<(String, String)>,
    /// Header names lower-cased.
    pub headers: HashMap<String, String>,
}

impl RecordedRequest {
    /// The first parameter named `key` (e.g. `metadata[user_id]`).
    pub fn param(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of a repeated parameter (e.g. `types[]`).
    pub fn params_named(&self, key: &str) -> Vec<&str> {
        self.params
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    pub fn idempotency_key(&self) -> Option<&str> {
        self.header("idempotency-key")
    }
}

/// The fake's object collections, for seeding and inspection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Collection {
    Customers,
    CheckoutSessions,
    PaymentIntents,
    Charges,
    Subscriptions,
    Disputes,
    Events,
    BillingPortalSessions,
    /// Stripe Entitlements' active entitlements; seed them with a `customer` member (the
    /// fake filters on it; Stripe's objects do not carry it).
    ActiveEntitlements,
    /// Line items of the Checkout Sessions the fake created, with a `session` member.
    CheckoutLineItems,
    /// `InvoicePayment`s (`{invoice, payment: {type, payment_intent | charge}}`).
    InvoicePayments,
    Invoices,
    /// v2 events (`GET /v2/core/events/{id}`), as a generation failure's.
    V2Events,
}

#[derive(Default)]
struct Inner {
    /// How long every answer waits (0 unless set).
    latency: Duration,
    /// The price of the one line item of any session the fake does not hold (as a Payment
    /// Link's or the Dashboard's); unset, such a session is `resource_missing`.
    unknown_session_price: Option<String>,
    requests: Vec<RecordedRequest>,
    faults: VecDeque<Fault>,
    /// key → (fingerprint of method, path and body; status; answer)
    idempotency: HashMap<String, (String, StatusCode, Value)>,
    objects: HashMap<Collection, Vec<Value>>,
    max_page_size: Option<usize>,
    counter: u64,
    /// In front of another implementation, customers live there: any id is taken as known.
    customers_upstream: bool,
}

struct Shared {
    secret_key: String,
    inner: Mutex<Inner>,
    /// In front of another Stripe implementation (`localstripe`): every request this fake does
    /// not serve itself ([`SERVED_IN_FRONT`]) is forwarded there.
    upstream: Option<(String, reqwest::Client)>,
}

/// The endpoints the fake serves itself in front of `localstripe`, which lacks them (`None`:
/// every method). localstripe lists payment intents, but not by customer.
const SERVED_IN_FRONT: [(Option<&str>, &str); 5] = [
    (None, "/v1/checkout/sessions"),
    (None, "/v1/entitlements/active_entitlements"),
    (None, "/v1/billing_portal/sessions"),
    (None, "/v1/disputes"),
    (Some("GET"), "/v1/payment_intents"),
];

fn served_in_front(method: &str, path: &str) -> bool {
    SERVED_IN_FRONT
        .iter()
        .any(|(m, p)| *p == path && m.is_none_or(|m| m == method))
}

/// A running fake. Dropping it stops the server.
pub struct FakeStripe {
    base_url: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeStripe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeStripe {
    /// Starts a fake on 127.0.0.1 with a random port and a random `sk_test_…` key.
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// Starts a fake in front of the Stripe implementation at `upstream` (`localstripe`, which
    /// accepts any `sk_…` key): Checkout Sessions, billing portal sessions, disputes and the
    /// payment intent list are served here, every other request is forwarded there with its method, path, query, body
    /// and headers, and its answer returned as it came.
    pub async fn start_in_front_of(upstream: &str) -> Self {
        Self::start_with(Some(upstream.trim_end_matches('/').to_owned())).await
    }

    async fn start_with(upstream: Option<String>) -> Self {
        let shared = Arc::new(Shared {
            secret_key: format!("sk_test_fake_{}", uuid::Uuid::new_v4().simple()),
            inner: Mutex::new(Inner {
                customers_upstream: upstream.is_some(),
                ..Inner::default()
            }),
            upstream: upstream.map(|url| (url, reqwest::Client::new())),
        });
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            base_url: format!("http://{addr}"),
            shared,
            task,
        }
    }

    /// `http://127.0.0.1:<port>`, for `STRIPE_API_BASE`.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The only key the fake accepts, for `STRIPE_SECRET_KEY`.
    pub fn secret_key(&self) -> &str {
        &self.shared.secret_key
    }

    /// A client configuration pointing at the fake, with test-sized timeouts and backoff.
    pub fn client_config(&self) -> processor::stripe::StripeConfig {
        let mut config = processor::stripe::StripeConfig::new(
            secrecy::SecretString::from(self.secret_key().to_owned()),
            self.base_url(),
        )
        .unwrap();
        config.connect_timeout = Duration::from_secs(2);
        config.request_timeout = Duration::from_secs(2);
        config.max_retries = 2;
        config.min_backoff = Duration::from_millis(10);
        config.max_backoff = Duration::from_millis(50);
        config
    }

    /// Answers the next `n` requests with `fault` (after any faults already queued).
    pub fn inject(&self, fault: Fault, n: usize) {
        let mut inner = self.lock();
        for _ in 0..n {
            inner.faults.push_back(fault.clone());
        }
    }

    /// Answers the line items of any session the fake does not hold with one item at `price`,
    /// as for sessions created elsewhere (a Payment Link, the Dashboard).
    pub fn sell_unknown_sessions_at(&self, price: &str) {
        self.lock().unknown_session_price = Some(price.to_owned());
    }

    /// Drops the faults not served yet.
    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// Makes every answer wait `latency` first, as Stripe's round trip does (100–400 ms from a
    /// data centre).
    pub fn set_latency(&self, latency: Duration) {
        self.lock().latency = latency;
    }

    /// Caps the page size of list answers, to exercise pagination with few objects.
    pub fn set_max_page_size(&self, n: usize) {
        self.lock().max_page_size = Some(n.max(1));
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.lock().requests.clone()
    }

    /// The requests to `path` (any method).
    pub fn requests_to(&self, path: &str) -> Vec<RecordedRequest> {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    /// Adds an object (it should carry an `id`; list filters read `customer`, `status`,
    /// `created`, `type`, `email`).
    pub fn seed(&self, collection: Collection, object: Value) {
        self.lock()
            .objects
            .entry(collection)
            .or_default()
            .push(object);
    }

    /// Replaces the object of the same `id` (as Stripe changes an object's state).
    pub fn update(&self, collection: Collection, object: Value) {
        let mut inner = self.lock();
        let objects = inner.objects.entry(collection).or_default();
        let slot = objects
            .iter_mut()
            .find(|o| o["id"] == object["id"])
            .expect("update of an object that was never seeded");
        *slot = object;
    }

    /// Adds a customer `cus_…` with `metadata[user_id]` and returns its id.
    pub fn seed_customer(&self, user_id: &str, email: Option<&str>) -> String {
        let id = format!("cus_{}", self.next_number());
        self.seed_customer_with_id(&id, user_id, email);
        id
    }

    /// Adds the customer `id` with `metadata[user_id]`.
    pub fn seed_customer_with_id(&self, id: &str, user_id: &str, email: Option<&str>) {
        self.seed(
            Collection::Customers,
            json!({"id": id, "object": "customer", "email": email,
                   "metadata": {"user_id": user_id}, "created": now()}),
        );
    }

    /// The objects of a collection, in insertion order.
    pub fn objects(&self, collection: Collection) -> Vec<Value> {
        self.lock()
            .objects
            .get(&collection)
            .cloned()
            .unwrap_or_default()
    }

    fn next_number(&self) -> u64 {
        let mut inner = self.lock();
        inner.counter += 1;
        inner.counter
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.shared.inner.lock().unwrap()
    }
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Decodes `application/x-www-form-urlencoded` text into ordered pairs.
fn decode_form(raw: &str) -> Vec<(String, String)> {
    fn unescape(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < bytes.len() => {
                    let hex = |c: u8| char::from(c).to_digit(16);
                    match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                        (Some(hi), Some(lo)) => {
                            out.push(u8::try_from(hi * 16 + lo).unwrap());
                            i += 2;
                        }
                        _ => out.push(b'%'),
                    }
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    raw.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (unescape(k), unescape(v))
        })
        .collect()
}

fn stripe_error(
    status: StatusCode,
    error_type: &str,
    code: Option<&str>,
    message: &str,
    param: Option<&str>,
) -> (StatusCode, Value) {
    (
        status,
        json!({"error": {"type": error_type, "code": code, "message": message, "param": param}}),
    )
}

fn fault_response(fault: &Fault) -> Response {
    let (status, should_retry, body) = match fault {
        Fault::RateLimited => (
            StatusCode::TOO_MANY_REQUESTS,
            None,
            stripe_error(
                StatusCode::TOO_MANY_REQUESTS,
                "invalid_request_error",
                Some("rate_limit"),
                "Too many requests hit the API too quickly.",
                None,
            )
            .1,
        ),
        Fault::ServerErrorShouldRetry | Fault::ServerErrorShouldNotRetry => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Some(matches!(fault, Fault::ServerErrorShouldRetry)),
            stripe_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "api_error",
                None,
                "Something went wrong on Stripe's end.",
                None,
            )
            .1,
        ),
        Fault::Unauthorized => (
            StatusCode::UNAUTHORIZED,
            None,
            stripe_error(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                None,
                "Invalid API Key provided: sk_test_****",
                None,
            )
            .1,
        ),
        Fault::BadRequest => (
            StatusCode::BAD_REQUEST,
            Some(false),
            stripe_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("parameter_invalid"),
                "Invalid request (injected).",
                None,
            )
            .1,
        ),
        Fault::Conflict => (
            StatusCode::CONFLICT,
            None,
            stripe_error(
                StatusCode::CONFLICT,
                "invalid_request_error",
                Some("lock_timeout"),
                "This object cannot be accessed right now because another API request or Stripe process is currently accessing it.",
                None,
            )
            .1,
        ),
        Fault::Slow(_) => unreachable!("slow answers are served normally"),
    };
    let mut response = (status, axum::Json(body)).into_response();
    if let Some(retry) = should_retry {
        response.headers_mut().insert(
            "Stripe-Should-Retry",
            if retry { "true" } else { "false" }.parse().unwrap(),
        );
    }
    response
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let raw_query = uri.query().unwrap_or("").to_owned();
    let raw_body = String::from_utf8_lossy(&body).into_owned();
    let params = if method == Method::GET {
        decode_form(&raw_query)
    } else {
        decode_form(&raw_body)
    };
    let request = RecordedRequest {
        method: method.to_string(),
        path: uri.path().to_owned(),
        raw_query,
        raw_body,
        params,
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_ascii_lowercase(),
                    v.to_str().unwrap_or("").to_owned(),
                )
            })
            .collect(),
    };
    let (fault, latency) = {
        let mut inner = shared.inner.lock().unwrap();
        inner.requests.push(request.clone());
        (inner.faults.pop_front(), inner.latency)
    };
    // Stripe's API from a data centre: every answer takes its round trip.
    tokio::time::sleep(latency).await;
    match fault {
        Some(Fault::Slow(delay)) => tokio::time::sleep(delay).await,
        Some(fault) => return fault_response(&fault),
        None => {}
    }

    if request.header("authorization") != Some(&format!("Bearer {}", shared.secret_key)) {
        let (status, body) = stripe_error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            None,
            "Invalid API Key provided.",
            None,
        );
        return (status, axum::Json(body)).into_response();
    }

    if let Some((upstream, http)) = &shared.upstream
        && !served_in_front(&request.method, &request.path)
    {
        return forward(upstream, http, method, &uri, &headers, body).await;
    }

    let mut inner = shared.inner.lock().unwrap();
    let idempotency = if request.method == "POST" {
        request.idempotency_key().map(|key| {
            let fingerprint = format!("{} {} {}", request.method, request.path, request.raw_body);
            (key.to_owned(), fingerprint)
        })
    } else {
        None
    };
    if let Some((key, fingerprint)) = &idempotency
        && let Some((seen, status, body)) = inner.idempotency.get(key)
    {
        if seen == fingerprint {
            let mut response = (*status, axum::Json(body.clone())).into_response();
            response
                .headers_mut()
                .insert("Idempotent-Replayed", "true".parse().unwrap());
            return response;
        }
        let (status, body) = stripe_error(
            StatusCode::BAD_REQUEST,
            "idempotency_error",
            None,
            &format!(
                "Keys for idempotent requests can only be used with the same parameters they were first used with. Try using a key other than '{key}' if you meant to execute a different request."
            ),
            None,
        );
        return (status, axum::Json(body)).into_response();
    }

    let (status, body) = route(&mut inner, &request);
    if let Some((key, fingerprint)) = idempotency
        && status.is_success()
    {
        inner
            .idempotency
            .insert(key, (fingerprint, status, body.clone()));
    }
    (status, axum::Json(body)).into_response()
}

/// Sends the request on to `upstream` and returns its answer unchanged.
async fn forward(
    upstream: &str,
    http: &reqwest::Client,
    method: Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    let target = format!(
        "{upstream}{}",
        uri.path_and_query().map_or("/", |pq| pq.as_str())
    );
    let mut request = http.request(method, target).body(body);
    for name in [
        "authorization",
        "content-type",
        "idempotency-key",
        "stripe-version",
    ] {
        if let Some(value) = headers.get(name) {
            request = request.header(name, value);
        }
    }
    match request.send().await {
        Ok(answer) => {
            let status = answer.status();
            let content_type = answer.headers().get("content-type").cloned();
            let bytes = answer.bytes().await.unwrap_or_default();
            let mut response = (status, bytes).into_response();
            if let Some(content_type) = content_type {
                response.headers_mut().insert("content-type", content_type);
            }
            response
        }
        Err(error) => (
            StatusCode::BAD_GATEWAY,
            format!("upstream {upstream} unreachable: {error}"),
        )
            .into_response(),
    }
}

/// The collection, object name and id of a `GET /v1/<collection>/<id>` the fake answers.
fn retrievable(path: &str) -> Option<(Collection, &'static str, &str)> {
    let (prefix, id) = path.rsplit_once('/')?;
    let (collection, what) = match prefix {
        "/v1/checkout/sessions" => (Collection::CheckoutSessions, "checkout.session"),
        "/v1/payment_intents" => (Collection::PaymentIntents, "payment_intent"),
        "/v1/charges" => (Collection::Charges, "charge"),
        "/v1/disputes" => (Collection::Disputes, "dispute"),
        "/v1/invoices" => (Collection::Invoices, "invoice"),
        "/v1/invoice_payments" => (Collection::InvoicePayments, "invoice_payment"),
        "/v1/subscriptions" => (Collection::Subscriptions, "subscription"),
        "/v2/core/events" => (Collection::V2Events, "event"),
        _ => return None,
    };
    (!id.is_empty()).then_some((collection, what, id))
}

fn route(inner: &mut Inner, req: &RecordedRequest) -> (StatusCode, Value) {
    match (req.method.as_str(), req.path.as_str()) {
        ("POST", "/v1/customers") => create_customer(inner, req),
        ("GET", "/v1/customers") => list(inner, req, Collection::Customers, |o, r| {
            r.param("email")
                .is_none_or(|e| o["email"].as_str() == Some(e))
        }),
        ("POST", "/v1/checkout/sessions") => create_checkout_session(inner, req),
        ("GET", "/v1/checkout/sessions") => {
            list(inner, req, Collection::CheckoutSessions, by_customer)
        }
        ("GET", path)
            if path.starts_with("/v1/checkout/sessions/") && path.ends_with("/line_items") =>
        {
            let session = path
                .trim_start_matches("/v1/checkout/sessions/")
                .trim_end_matches("/line_items")
                .to_owned();
            let known = inner
                .objects
                .get(&Collection::CheckoutSessions)
                .is_some_and(|all| all.iter().any(|s| s["id"] == session.as_str()));
            if let (false, Some(price)) = (known, inner.unknown_session_price.clone()) {
                let item = json!({ "id": format!("li_{session}"), "object": "item",
                    "price": { "id": price, "object": "price" }, "quantity": 1 });
                return (
                    StatusCode::OK,
                    json!({ "object": "list", "data": [item], "has_more": false,
                            "url": format!("/v1/checkout/sessions/{session}/line_items") }),
                );
            }
            if !known {
                return stripe_error(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    Some("resource_missing"),
                    &format!("No such checkout.session: '{session}'"),
                    Some("id"),
                );
            }
            list(inner, req, Collection::CheckoutLineItems, move |o, _| {
                o["session"] == session.as_str()
            })
        }
        ("POST", "/v1/billing_portal/sessions") => create_portal_session(inner, req),
        ("GET", "/v1/payment_intents") => list(inner, req, Collection::PaymentIntents, by_customer),
        ("GET", "/v1/charges") => list(inner, req, Collection::Charges, by_customer),
        ("GET", "/v1/entitlements/active_entitlements") => {
            if req.param("customer").is_none() {
                return missing("customer");
            }
            list(inner, req, Collection::ActiveEntitlements, by_customer)
        }
        ("GET", "/v1/subscriptions") => list(inner, req, Collection::Subscriptions, |o, r| {
            let status = o["status"].as_str().unwrap_or("");
            let status_ok = match r.param("status") {
                Some("all") => true,
                Some(wanted) => status == wanted,
                // As Stripe: without a status filter, canceled subscriptions are left out.
                None => !matches!(status, "canceled" | "incomplete_expired"),
            };
            status_ok && by_customer(o, r)
        }),
        ("GET", "/v1/disputes") => list(inner, req, Collection::Disputes, |o, r| {
            let matches = |field: &str| {
                r.param(field)
                    .is_none_or(|wanted| o[field].as_str() == Some(wanted))
            };
            matches("charge") && matches("payment_intent")
        }),
        ("GET", "/v1/invoice_payments") => list(inner, req, Collection::InvoicePayments, |o, r| {
            let payment = &o["payment"];
            let kind = r.param("payment[type]").unwrap_or("payment_intent");
            payment["type"].as_str() == Some(kind)
                && r.param(&format!("payment[{kind}]"))
                    .is_some_and(|id| payment[kind].as_str() == Some(id))
        }),
        ("GET", path) if retrievable(path).is_some() => {
            let (collection, what, id) = retrievable(path).unwrap_or_else(|| unreachable!());
            let found = inner
                .objects
                .get(&collection)
                .and_then(|all| all.iter().find(|o| o["id"].as_str() == Some(id)).cloned());
            match found {
                Some(mut object) => {
                    // As Stripe: `expand[]=line_items` embeds a session's line items.
                    if collection == Collection::CheckoutSessions
                        && req.params_named("expand[]").contains(&"line_items")
                    {
                        let items: Vec<Value> = inner
                            .objects
                            .get(&Collection::CheckoutLineItems)
                            .map(|all| all.iter().filter(|i| i["session"] == id).cloned().collect())
                            .unwrap_or_default();
                        object["line_items"] =
                            json!({"object": "list", "data": items, "has_more": false});
                    }
                    (StatusCode::OK, object)
                }
                None => stripe_error(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    Some("resource_missing"),
                    &format!("No such {what}: '{id}'"),
                    Some("id"),
                ),
            }
        }
        ("DELETE", path) if path.starts_with("/v1/customers/") => {
            delete_customer(inner, &path["/v1/customers/".len()..])
        }
        ("GET", "/v1/events") => list(inner, req, Collection::Events, |o, r| {
            let created = o["created"].as_i64().unwrap_or(0);
            let gte_ok = r
                .param("created[gte]")
                .and_then(|v| v.parse::<i64>().ok())
                .is_none_or(|gte| created >= gte);
            let types = r.params_named("types[]");
            let ty = o["type"].as_str().unwrap_or("");
            let type_ok = (types.is_empty() || types.contains(&ty))
                && r.param("type").is_none_or(|t| t == ty);
            gte_ok && type_ok
        }),
        (method, path) => stripe_error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            None,
            &format!("Unrecognized request URL ({method}: {path})."),
            None,
        ),
    }
}

fn by_customer(object: &Value, req: &RecordedRequest) -> bool {
    req.param("customer")
        .is_none_or(|c| object["customer"].as_str() == Some(c))
}

/// `prefix[...]` parameters as a JSON object (one level deep, as metadata is).
fn sub_map(req: &RecordedRequest, prefix: &str) -> Value {
    let open = format!("{prefix}[");
    let map: serde_json::Map<String, Value> = req
        .params
        .iter()
        .filter_map(|(k, v)| {
            let rest = k.strip_prefix(&open)?.strip_suffix(']')?;
            (!rest.contains('[')).then(|| (rest.to_owned(), Value::String(v.clone())))
        })
        .collect();
    Value::Object(map)
}

fn missing(param: &str) -> (StatusCode, Value) {
    stripe_error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        Some("parameter_missing"),
        &format!("Missing required param: {param}."),
        Some(param),
    )
}

fn no_such_customer(id: &str) -> (StatusCode, Value) {
    stripe_error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        Some("resource_missing"),
        &format!("No such customer: '{id}'"),
        Some("customer"),
    )
}

fn customer_exists(inner: &Inner, id: &str) -> bool {
    inner.customers_upstream
        || inner
            .objects
            .get(&Collection::Customers)
            .is_some_and(|cs| cs.iter().any(|c| c["id"].as_str() == Some(id)))
}

fn next_id(inner: &mut Inner, prefix: &str) -> String {
    inner.counter += 1;
    format!("{prefix}_{}", inner.counter)
}

fn create_customer(inner: &mut Inner, req: &RecordedRequest) -> (StatusCode, Value) {
    let id = next_id(inner, "cus");
    let customer = json!({
        "id": id, "object": "customer", "email": req.param("email"),
        "metadata": sub_map(req, "metadata"), "created": now(), "livemode": false,
    });
    inner
        .objects
        .entry(Collection::Customers)
        .or_default()
        .push(customer.clone());
    (StatusCode::OK, customer)
}

/// As Stripe: the customer is gone for good; requests naming it get `resource_missing`.
fn delete_customer(inner: &mut Inner, id: &str) -> (StatusCode, Value) {
    let customers = inner.objects.entry(Collection::Customers).or_default();
    let before = customers.len();
    customers.retain(|c| c["id"].as_str() != Some(id));
    if customers.len() == before {
        return no_such_customer(id);
    }
    (
        StatusCode::OK,
        json!({"id": id, "object": "customer", "deleted": true}),
    )
}

fn create_checkout_session(inner: &mut Inner, req: &RecordedRequest) -> (StatusCode, Value) {
    for required in ["mode", "success_url"] {
        if req.param(required).is_none() {
            return missing(required);
        }
    }
    // A line item is a price, or `price_data` with a currency and an amount (as Stripe).
    let price_data = (
        req.param("line_items[0][price_data][currency]"),
        req.param("line_items[0][price_data][unit_amount]")
            .and_then(|a| a.parse::<i64>().ok()),
    );
    if req.param("line_items[0][price]").is_none() && price_data.1.is_none() {
        return missing("line_items[0][price]");
    }
    if price_data.1.is_some() && price_data.0.is_none() {
        return missing("line_items[0][price_data][currency]");
    }
    let mode = req.param("mode").unwrap_or_default();
    if !matches!(mode, "payment" | "subscription" | "setup") {
        return stripe_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some("parameter_invalid_string"),
            &format!("Invalid mode: {mode}"),
            Some("mode"),
        );
    }
    if let Some(customer) = req.param("customer")
        && !customer_exists(inner, customer)
    {
        return no_such_customer(customer);
    }
    let created = now();
    let expires_at = match req.param("expires_at") {
        None => created + 86_400,
        Some(raw) => match raw.parse::<i64>() {
            Ok(t) if t >= created + 1_800 - 5 && t <= created + 86_400 + 5 => t,
            _ => {
                return stripe_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    Some("parameter_invalid_integer"),
                    "The `expires_at` timestamp must be between 30 minutes and 24 hours from Checkout Session creation.",
                    Some("expires_at"),
                );
            }
        },
    };
    let id = next_id(inner, "cs_test");
    let session = json!({
        "id": id,
        "object": "checkout.session",
        "url": format!("https://checkout.stripe.com/c/pay/{id}"),
        "mode": mode,
        "status": "open",
        "payment_status": "unpaid",
        "customer": req.param("customer"),
        "client_reference_id": req.param("client_reference_id"),
        "metadata": sub_map(req, "metadata"),
        "success_url": req.param("success_url"),
        "cancel_url": req.param("cancel_url"),
        "created": created,
        "expires_at": expires_at,
        "payment_intent": null,
        "subscription": null,
        "livemode": false,
        "amount_total": price_data.1,
        "currency": price_data.0,
    });
    inner
        .objects
        .entry(Collection::CheckoutSessions)
        .or_default()
        .push(session.clone());
    let price = match req.param("line_items[0][price]") {
        Some(price) => json!({ "id": price, "object": "price" }),
        None => json!({ "id": next_id(inner, "price_adhoc"), "object": "price",
            "unit_amount": price_data.1, "currency": price_data.0 }),
    };
    let line_item = json!({ "id": next_id(inner, "li"), "object": "item", "session": id,
        "price": price, "quantity": 1 });
    inner
        .objects
        .entry(Collection::CheckoutLineItems)
        .or_default()
        .push(line_item);
    (StatusCode::OK, session)
}

fn create_portal_session(inner: &mut Inner, req: &RecordedRequest) -> (StatusCode, Value) {
    let Some(customer) = req.param("customer") else {
        return missing("customer");
    };
    if !customer_exists(inner, customer) {
        return no_such_customer(customer);
    }
    let id = next_id(inner, "bps");
    let session = json!({
        "id": id,
        "object": "billing_portal.session",
        "customer": customer,
        "return_url": req.param("return_url"),
        "configuration": req.param("configuration").unwrap_or("bpc_default"),
        "url": format!("https://billing.stripe.com/p/session/test_{id}"),
        "created": now(),
        "livemode": false,
    });
    inner
        .objects
        .entry(Collection::BillingPortalSessions)
        .or_default()
        .push(session.clone());
    (StatusCode::OK, session)
}

/// A Stripe list answer: newest first, `limit` (default 10, at most 100), `starting_after`.
fn list(
    inner: &Inner,
    req: &RecordedRequest,
    collection: Collection,
    keep: impl Fn(&Value, &RecordedRequest) -> bool,
) -> (StatusCode, Value) {
    let limit = match req.param("limit").map(str::parse::<usize>) {
        None => 10,
        Some(Ok(n)) if (1..=100).contains(&n) => n,
        Some(_) => {
            return stripe_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("parameter_invalid_integer"),
                "Invalid limit: must be between 1 and 100",
                Some("limit"),
            );
        }
    };
    let limit = inner.max_page_size.map_or(limit, |cap| limit.min(cap));
    if let Some(customer) = req.param("customer")
        && !customer_exists(inner, customer)
    {
        return no_such_customer(customer);
    }
    // Newest first; among equal `created`, the later inserted first (as Stripe orders).
    let mut matching: Vec<Value> = inner
        .objects
        .get(&collection)
        .map(|objects| {
            objects
                .iter()
                .rev()
                .filter(|o| keep(o, req))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    matching.sort_by_key(|o| std::cmp::Reverse(o["created"].as_i64().unwrap_or(0)));
    let start = match req.param("starting_after") {
        None => 0,
        Some(cursor) => match matching
            .iter()
            .position(|o| o["id"].as_str() == Some(cursor))
        {
            Some(i) => i + 1,
            None => {
                return stripe_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    Some("resource_missing"),
                    &format!("No such object: '{cursor}'"),
                    Some("starting_after"),
                );
            }
        },
    };
    let rest = &matching[start.min(matching.len())..];
    let page: Vec<Value> = rest.iter().take(limit).cloned().collect();
    (
        StatusCode::OK,
        json!({"object": "list", "url": req.path, "has_more": rest.len() > page.len(), "data": page}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_decoding_handles_brackets_escapes_and_plus() {
        let pairs = decode_form("a=1&metadata%5Buser_id%5D=u%201&types[]=x+y&empty=&flag");
        assert_eq!(
            pairs,
            vec![
                ("a".into(), "1".into()),
                ("metadata[user_id]".into(), "u 1".into()),
                ("types[]".into(), "x y".into()),
                ("empty".into(), String::new()),
                ("flag".into(), String::new()),
            ]
        );
    }
}
