//! Helpers shared by the API's system tests: the API router on port 0 over a fresh database,
//! the machine's Redis and (optionally) the Stripe fake; tokens; seeded state.

use std::sync::Arc;
use std::time::Duration;

use crate::db::TestDb;
use crate::stripe_fake::FakeStripe;
use crate::{redis_url, unique};
use deadpool_postgres::Pool;
use jsonwebtoken::{EncodingKey, Header};
use processor::api::{ApiConfig, ApiState, ReturnUrls};
use processor::cache::{Cache, entitlements_key};
use processor::catalog::Catalog;
use processor::config::Config;
use processor::domain::events;
use processor::local_cache::LocalCache;
use processor::store;
use secrecy::SecretString;
use serde_json::{Value, json};
use shared::config::Env;
use shared::samples::{Sample, event};

pub const SECRET: &str = "test-secret-of-at-least-thirty-two-bytes!";
pub const ADMIN_TOKEN: &str = "admin-token-for-tests";
pub const SUCCESS_URL: &str = "https://app.example/checkout/success";
pub const CANCEL_URL: &str = "https://app.example/checkout/cancel";
pub const PORTAL_RETURN_URL: &str = "https://app.example/account";

/// A running API over its own database.
pub struct Api {
    pub base: String,
    pub db: Arc<TestDb>,
    pub pool: Pool,
    pub cache: Cache,
    /// The server's own process-memory cache.
    pub local: LocalCache,
    pub http: reqwest::Client,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Api {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The catalog of the tests: `pro` (one-time, `price_pro`) and `team` (subscription).
pub fn catalog() -> Catalog {
    let file = "[products.team]\nprice = \"price_team\"\nmode = \"subscription\"\nentitlement = \"team\"\n";
    Catalog::from_sources(Some("price_pro"), Some(("catalog.toml", file))).unwrap()
}

impl Api {
    pub async fn start(stripe: Option<&FakeStripe>) -> Self {
        Self::start_with_redis(stripe, &redis_url()).await
    }

    /// [`Api::start`] with its cache (and restore's rate limit) on `redis`, which may be a
    /// server that is down.
    pub async fn start_with_redis(stripe: Option<&FakeStripe>, redis: &str) -> Self {
        Self::start_with(stripe, redis, None).await
    }

    /// [`Api::start_with_redis`] reaching Postgres through `postgres` (`host:port`, e.g. a
    /// chaos proxy) instead of directly, with a short database timeout.
    pub async fn start_with(
        stripe: Option<&FakeStripe>,
        redis: &str,
        postgres: Option<&str>,
    ) -> Self {
        shared::telemetry::init_tracing(shared::telemetry::LogFormat::Pretty, "warn");
        let db = Arc::new(TestDb::create().await);
        Self::serve(db, stripe, redis, postgres).await
    }

    /// Another API server over this one's database, with Redis at `redis` and its own Redis
    /// connections and process-memory cache: to the caches, a second API process.
    pub async fn beside(&self, redis: &str) -> Self {
        Self::serve(Arc::clone(&self.db), None, redis, None).await
    }

    /// [`Api::beside`] with Stripe answered by `stripe`.
    pub async fn beside_with_stripe(&self, stripe: &FakeStripe) -> Self {
        Self::serve(Arc::clone(&self.db), Some(stripe), &redis_url(), None).await
    }

    async fn serve(
        db: Arc<TestDb>,
        stripe: Option<&FakeStripe>,
        redis: &str,
        postgres: Option<&str>,
    ) -> Self {
        let url = match postgres {
            Some(host) => format!("postgres://postgres@{host}/{}", db.name),
            None => db.url.clone(),
        };
        let env = Env::from_pairs([
            ("DATABASE_URL", url.as_str()),
            ("REDIS_URL", redis),
            ("AMQP_URL", crate::amqp_url().as_str()),
        ]);
        let mut config = Config::from_env(&env).unwrap();
        // Tests share the machine's Redis: their entries expire soon.
        config.entitlement_cache_ttl = Duration::from_secs(600);
        if postgres.is_some() {
            config.db_timeout = Duration::from_secs(1);
        }
        let pool = processor::db::pool(&config).unwrap();
        processor::db::prepare(&config, &pool).await.unwrap();
        // The catalog's products in the registry, as start-up writes them.
        processor::registry::sync_config(&pool, &catalog())
            .await
            .unwrap();
        let cache = Cache::new(&config).unwrap();
        let mut api = ApiConfig::with_jwt_secret(SECRET);
        api.auth.admin_token = Some(SecretString::from(ADMIN_TOKEN.to_owned()));
        api.stripe = stripe.map(FakeStripe::client_config);
        api.urls = ReturnUrls {
            checkout_success: Some(SUCCESS_URL.into()),
            checkout_cancel: Some(CANCEL_URL.into()),
            portal_return: Some(PORTAL_RETURN_URL.into()),
            portal_configuration: None,
        };
        let state = ApiState::new(api, pool.clone(), cache.clone()).unwrap();
        let local = state.local.clone();
        let router = processor::api::router(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Self {
            base,
            db,
            pool,
            cache,
            local,
            http: reqwest::Client::new(),
            task,
        }
    }

    /// The status of `user`'s entitlement `key` from `GET /api/entitlements` (`none` without one).
    pub async fn status_of(&self, user: &str, key: &str) -> String {
        let (status, body) = self.get("/api/entitlements", user).await;
        assert_eq!(status, 200, "{body}");
        body["entitlements"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["key"] == key)
            .map_or_else(
                || "none".to_owned(),
                |e| e["status"].as_str().unwrap().to_owned(),
            )
    }

    /// GET with a user token; returns status and JSON body.
    pub async fn get(&self, path: &str, user: &str) -> (u16, Value) {
        self.send(reqwest::Method::GET, path, Some(&token(user)), None)
            .await
    }

    pub async fn post(&self, path: &str, user: &str, body: Option<Value>) -> (u16, Value) {
        self.send(reqwest::Method::POST, path, Some(&token(user)), body)
            .await
    }

    /// `POST /api/checkout/session` for `product` as `user`.
    pub async fn checkout(&self, user: &str, product: &str) -> (u16, Value) {
        self.post(
            "/api/checkout/session",
            user,
            Some(json!({ "productKey": product })),
        )
        .await
    }

    /// `POST /api/pro/restore` as `user`, after clearing the user's 10 s rate limit (which
    /// stands in for waiting it out).
    pub async fn restore_again(&self, user: &str) -> (u16, Value) {
        let user_id = shared::ids::UserId::parse(user).unwrap();
        self.forget(&processor::api::restore::rate_limit_key(&user_id))
            .await;
        self.post("/api/pro/restore", user, None).await
    }

    /// Any request with an optional raw `Authorization` value.
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        authorization: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(auth) = authorization {
            request = request.header("authorization", auth);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, json)
    }

    /// Applies a Stripe-shaped event through the processor's own projection and commits.
    pub async fn apply(&self, body: &Value) {
        let event = events::parse(body.to_string().as_bytes()).unwrap();
        let outcomes = store::apply_and_commit(&self.pool, &[&event])
            .await
            .unwrap();
        assert!(
            matches!(outcomes[0], store::Outcome::Applied(_)),
            "{outcomes:?}"
        );
    }

    /// Applies the sample event `event_type` of `sample` under a fresh event id.
    pub async fn apply_sample(&self, event_type: &str, sample: &Sample<'_>) {
        self.apply(&event(&unique("evt"), event_type, sample)).await;
    }

    /// A completed one-time checkout of `product` by `user`.
    pub async fn buy(&self, user: &str, product: &str) -> String {
        let object = unique("o");
        let sample = Sample {
            user,
            product,
            object: &object,
            amount: 4900,
            created: chrono::Utc::now().timestamp(),
            subscription: false,
        };
        self.apply(&event(
            &unique("evt"),
            "checkout.session.completed",
            &sample,
        ))
        .await;
        object
    }

    /// The raw cached snapshot of `user`, if any.
    pub async fn cached(&self, user: &str) -> Option<Value> {
        let client = redis::Client::open(redis_url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let raw: Option<String> = redis::cmd("HGET")
            .arg(entitlements_key(user))
            .arg("d")
            .query_async(&mut conn)
            .await
            .unwrap();
        raw.map(|r| serde_json::from_str(&r).unwrap())
    }

    /// Deletes a Redis key (lets a test skip a rate limit's window instead of sleeping it out).
    pub async fn forget(&self, key: &str) {
        let client = redis::Client::open(redis_url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let _: i64 = redis::cmd("DEL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
    }

    /// Maps a Stripe customer to `user` as a previous checkout would have.
    pub async fn map_customer(&self, customer: &str, user: &str) {
        let client = self.pool.get().await.unwrap();
        client
            .execute(
                "INSERT INTO customers (customer_id, user_id) VALUES ($1, $2)
                 ON CONFLICT (customer_id) DO NOTHING",
                &[&customer, &user],
            )
            .await
            .unwrap();
    }

    pub async fn count(&self, sql: &str) -> i64 {
        let client = self.pool.get().await.unwrap();
        client.query_one(sql, &[]).await.unwrap().get(0)
    }
}

/// A valid HS256 token for `user`.
pub fn token(user: &str) -> String {
    format!(
        "Bearer {}",
        sign(&json!({"sub": user, "exp": exp(600)}), SECRET)
    )
}

pub fn sign(claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::default(),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

pub fn exp(in_seconds: i64) -> i64 {
    chrono::Utc::now().timestamp() + in_seconds
}
