//! The processor's typed configuration, read once at start-up from [`shared::config::Env`].
//!
//! Invariant: every variable is read once, by the type of the concern it belongs to, and a bad
//! value fails fast with a [`ConfigError`] naming the variable (exit code 2):
//! - [`Config`]: what every subcommand shares (stores, broker, topology, worker and listener
//!   tuning, the outbox relay), with the Stripe client settings ([`StripeConfig`], optional) and
//!   the configured products ([`Catalog`]) that the worker, the API and the operator commands
//!   all use;
//! - [`crate::api::ApiConfig`] (`AUTH_JWT_*`, `ADMIN_API_TOKEN`, `API_MAX_BODY_BYTES`, return
//!   URLs): only `run` and `api`, which refuse to start without `AUTH_JWT_SECRET`, and
//!   [`crate::auth::AuthConfig`] alone for `dev-token`.
//!
//! Secrets are [`SecretString`]s and `Debug` never prints them or URL passwords.

use crate::domain::scope::{Scope, StripeMode};
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use secrecy::{ExposeSecret, SecretSlice, SecretString};
use shared::config::{ConfigError, Env};
use shared::server::{ServerLimits, optional_addr};
use shared::telemetry::LogFormat;
use shared::topology::Topology;

use crate::catalog::Catalog;
use crate::domain::projection::{RefundPolicy, SubscriptionPolicy};
use crate::stripe::StripeConfig;

pub use shared::amqp::DEFAULT_AMQP_URL;
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/entitlements";
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
pub const DEFAULT_API_ADDR: &str = "127.0.0.1:8081";
/// Default `API_REQUEST_TIMEOUT`: restore reads several Stripe lists with retries, so longer
/// than ingress' 15 s.
pub const DEFAULT_API_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything the processor's subcommands read from the environment.
///
/// The tuning fields after `api_addr` have no variable of their own in the contract; they are
/// public so tests (and embedding programs) can shorten them.
#[derive(Clone)]
pub struct Config {
    pub amqp_url: String,
    pub database_url: String,
    pub redis_url: String,
    /// `ENTITLEMENT_CACHE_TTL_SECONDS`.
    pub entitlement_cache_ttl: Duration,
    /// `DEDUPE_TTL_SECONDS`: how long a `done` marker lives.
    pub dedupe_ttl: Duration,
    /// `PROCESSOR_PREFETCH`: unacked deliveries per consumer.
    pub prefetch: u16,
    /// Queue names and `RETRY_DELAYS`. Tests replace it with their own isolated topology.
    pub topology: Topology,
    pub log_format: LogFormat,
    pub api_addr: SocketAddr,
    /// Limits of the `API_ADDR` listener (`API_HEADER_READ_TIMEOUT`, `API_REQUEST_TIMEOUT`,
    /// `API_MAX_CONNECTIONS`, `API_MAX_IN_FLIGHT`).
    pub api_limits: ServerLimits,
    /// `PROCESSOR_METRICS_ADDR`: when set, `/metrics` is served there instead of on `API_ADDR`.
    pub metrics_addr: Option<SocketAddr>,

    /// `STRIPE_SECRET_KEY`, `STRIPE_API_BASE`, `STRIPE_API_VERSION`; `None` without a key (the
    /// worker then completes nothing from Stripe, the API's Stripe routes answer 503 and
    /// `reconcile` refuses to run).
    pub stripe: Option<StripeConfig>,
    /// `STRIPE_MODE` (or the key's prefix) and `STRIPE_ACCOUNTS`: the events that are this
    /// service's ([`Scope`]).
    pub scope: Scope,
    /// `STRIPE_PRICE_PRO_LIFETIME` and `CATALOG_FILE`: the configured products.
    pub catalog: Catalog,
    /// `SUBSCRIPTION_REFUND_POLICY` and `SUBSCRIPTION_GRACE`: how subscriptions answer for
    /// their payments, written beside the products at start-up.
    pub subscription_policy: SubscriptionPolicy,

    /// Most deliveries processed in one Postgres transaction.
    pub batch_size: usize,
    /// Batches processed concurrently, each on its own connection; deliveries are spread over
    /// them by user.
    pub lanes: usize,
    /// How long a batch waits for more ready deliveries after the first one.
    pub batch_wait: Duration,
    /// Lifetime of a `processing` dedupe claim: how long a crashed worker can delay an event.
    pub claim_ttl: Duration,
    /// How long shutdown waits for the in-flight batch.
    pub shutdown_grace: Duration,
    /// How long a pool checkout, connect or recycle may take.
    pub db_timeout: Duration,
    /// Largest number of Postgres connections.
    pub db_pool_size: usize,
    /// How long a confirmed publish (retry, dead-letter) may wait for its confirm.
    pub publish_confirm_timeout: Duration,
    /// How often queue depths are sampled for metrics.
    pub queue_depth_interval: Duration,
    /// An event retried more than this many times is logged at ERROR and counted
    /// (`events_attempts_over_threshold_total`), ahead of its dead-lettering.
    pub attempts_alert_threshold: u32,
    /// The outbox relay's channels and tuning.
    pub outbox: OutboxConfig,
}

/// The outbox relay ([`crate::outbox`]): which channels deliver, and how.
#[derive(Debug, Clone)]
pub struct OutboxConfig {
    /// `OUTBOX_AMQP` (`on`/`off`, default on): publish to `<AMQP_TOPOLOGY_BASE>.out`.
    pub amqp: bool,
    /// `APP_WEBHOOK_URL` and `APP_WEBHOOK_SECRET`; `None` (no URL) turns webhooks off.
    pub webhook: Option<WebhookTarget>,
    /// `OUTBOX_POLL_INTERVAL` (default `200ms`): how often an idle relay looks for new rows.
    pub poll_interval: Duration,
    /// `OUTBOX_BATCH_SIZE` (default 256): rows one relay pass reads per channel.
    pub batch_size: u32,
    /// `APP_WEBHOOK_RETRY_DELAYS` (default `5s,5m,30m,2h,5h,10h,10h`): the wait after each
    /// failed attempt; after the last, the row is marked failed (attempts = delays + 1).
    pub webhook_retry_delays: Vec<Duration>,
    /// `APP_WEBHOOK_TIMEOUT` (default `10s`): how long one webhook request may take.
    pub webhook_timeout: Duration,
    /// Webhook requests in flight at once (each to a different user).
    pub webhook_concurrency: usize,
    /// `OUTBOX_RETENTION` (default `7d`): delivered rows older than this are deleted; failed
    /// webhook rows are kept until replayed.
    pub retention: Duration,
}

/// Where signed webhooks go.
#[derive(Clone)]
pub struct WebhookTarget {
    pub url: String,
    /// `whsec_<base64 key>`; validated at start-up.
    pub secret: SecretString,
}

impl fmt::Debug for WebhookTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookTarget")
            .field("url", &redact_url(&self.url))
            .finish_non_exhaustive()
    }
}

impl OutboxConfig {
    /// The default webhook retry schedule (Standard Webhooks' suggestion, after the first try).
    pub const DEFAULT_WEBHOOK_RETRY_DELAYS: &str = "5s,5m,30m,2h,5h,10h,10h";

    /// Reads the relay's variables.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the first unusable variable (a URL without secret, a secret
    /// without the `whsec_` prefix or not base64, a malformed duration).
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let amqp = match env
            .get("OUTBOX_AMQP")
            .map(|v| v.trim().to_ascii_lowercase())
        {
            None => true,
            Some(v) if matches!(v.as_str(), "on" | "true" | "1" | "yes") => true,
            Some(v) if matches!(v.as_str(), "off" | "false" | "0" | "no") => false,
            Some(_) => return Err(ConfigError::new("OUTBOX_AMQP", "must be on or off")),
        };
        let webhook = match opt(env, "APP_WEBHOOK_URL") {
            None => None,
            Some(url) => {
                if !url.starts_with("http://") && !url.starts_with("https://") {
                    return Err(ConfigError::new(
                        "APP_WEBHOOK_URL",
                        "must start with http:// or https://",
                    ));
                }
                let secret = env.secret("APP_WEBHOOK_SECRET").ok_or_else(|| {
                    ConfigError::new(
                        "APP_WEBHOOK_SECRET",
                        "is required when APP_WEBHOOK_URL is set",
                    )
                })?;
                signing_key(&secret)
                    .map_err(|e| ConfigError::new("APP_WEBHOOK_SECRET", e.to_string()))?;
                shared::secrets::check("APP_WEBHOOK_SECRET", secret.expose_secret())?;
                Some(WebhookTarget { url, secret })
            }
        };
        let raw_delays = env.string_or(
            "APP_WEBHOOK_RETRY_DELAYS",
            Self::DEFAULT_WEBHOOK_RETRY_DELAYS,
        );
        let webhook_retry_delays = shared::config::parse_duration_list(&raw_delays)
            .map_err(|e| ConfigError::new("APP_WEBHOOK_RETRY_DELAYS", e))?;
        let batch_size: u32 = env.parse_or("OUTBOX_BATCH_SIZE", 256)?;
        if batch_size == 0 {
            return Err(ConfigError::new("OUTBOX_BATCH_SIZE", "must be at least 1"));
        }
        let poll_interval = env.duration_or("OUTBOX_POLL_INTERVAL", Duration::from_millis(200))?;
        if poll_interval.is_zero() {
            return Err(ConfigError::new("OUTBOX_POLL_INTERVAL", "must be positive"));
        }
        Ok(Self {
            amqp,
            webhook,
            poll_interval,
            batch_size,
            webhook_retry_delays,
            webhook_timeout: env.duration_or("APP_WEBHOOK_TIMEOUT", Duration::from_secs(10))?,
            webhook_concurrency: 16,
            retention: env.duration_or("OUTBOX_RETENTION", Duration::from_secs(7 * 86_400))?,
        })
    }

    /// Attempts a webhook row gets before it is marked failed.
    #[must_use]
    pub fn webhook_max_attempts(&self) -> i32 {
        i32::try_from(self.webhook_retry_delays.len()).map_or(i32::MAX, |n| n.saturating_add(1))
    }
}

impl Config {
    /// Reads and validates the processor's variables.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the first variable that is set but unusable.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let prefetch: u16 = env.parse_or("PROCESSOR_PREFETCH", 64)?;
        if prefetch == 0 {
            return Err(ConfigError::new("PROCESSOR_PREFETCH", "must be at least 1"));
        }
        let entitlement_cache_ttl = positive_secs(env, "ENTITLEMENT_CACHE_TTL_SECONDS", 3600)?;
        let dedupe_ttl = positive_secs(env, "DEDUPE_TTL_SECONDS", 259_200)?;
        let api_addr = env.parse_or(
            "API_ADDR",
            DEFAULT_API_ADDR
                .parse()
                .map_err(|_| ConfigError::new("API_ADDR", "bad built-in default"))?,
        )?;
        let amqp_url = env.string_or("AMQP_URL", DEFAULT_AMQP_URL);
        if !amqp_url.starts_with("amqp://") && !amqp_url.starts_with("amqps://") {
            return Err(ConfigError::new(
                "AMQP_URL",
                "must start with amqp:// or amqps://",
            ));
        }
        let database_url = env.string_or("DATABASE_URL", DEFAULT_DATABASE_URL);
        database_url
            .parse::<tokio_postgres::Config>()
            .map_err(|e| ConfigError::new("DATABASE_URL", format!("not a Postgres URL: {e}")))?;
        let redis_url = env.string_or("REDIS_URL", DEFAULT_REDIS_URL);
        crate::redis_link::client(redis_url.as_str())
            .map_err(|e| ConfigError::new("REDIS_URL", format!("not a Redis URL: {e}")))?;

        // One Stripe budget for the account, in the Redis every process uses.
        let stripe = StripeConfig::optional_from_env(env)?
            .map(|stripe| stripe.with_shared_budget(&redis_url))
            .transpose()?;
        let scope = scope_from_env(env, stripe.as_ref())?;

        let topology = Topology::from_env(env)?;
        if topology.retry_delays().is_empty() {
            return Err(ConfigError::new("RETRY_DELAYS", "needs at least one delay"));
        }

        Ok(Self {
            amqp_url,
            database_url,
            redis_url,
            entitlement_cache_ttl,
            dedupe_ttl,
            prefetch,
            topology,
            log_format: env.parse_or("LOG_FORMAT", LogFormat::Pretty)?,
            api_addr,
            api_limits: ServerLimits::from_env(
                env,
                "API",
                &ServerLimits::with_request_timeout(DEFAULT_API_REQUEST_TIMEOUT),
            )?,
            metrics_addr: optional_addr(env, "PROCESSOR_METRICS_ADDR")?,
            stripe,
            scope,
            catalog: Catalog::from_env(env)?,
            subscription_policy: subscription_policy_from_env(env)?,
            batch_size: usize::from(prefetch).min(64),
            // A set-based batch costs about the same few round trips at 8 events as at 64, so
            // lanes get full batches: one lane per 64 prefetched deliveries, at most 8
            // (`bench/processor.sh`, 30,000 events: prefetch 64 with 8 lanes of ~8 events
            // 0.58× pgbench, with 1 lane of 64 0.88×; prefetch 256 with 4 lanes 1.77×). But
            // never fewer than two, so a purchase does not wait behind a whole batch in
            // progress: at the default prefetch of 64, one lane gave paid → Pro p99 143 ms at
            // 1,000 webhooks/s, two lanes 39 ms, draining within the one lane's range
            // (`bench/e2e.sh`, `bench/processor.sh`, BENCHMARKS.md "Measured together").
            lanes: lanes_for(prefetch),
            batch_wait: Duration::from_millis(3),
            claim_ttl: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(20),
            db_timeout: Duration::from_secs(5),
            db_pool_size: 8,
            publish_confirm_timeout: Duration::from_secs(5),
            queue_depth_interval: Duration::from_secs(10),
            attempts_alert_threshold: 3,
            outbox: OutboxConfig::from_env(env)?,
        })
    }
}

/// `SUBSCRIPTION_REFUND_POLICY` (`end_access`, the default, or `keep_until_period_end`) and
/// `SUBSCRIPTION_GRACE` (`period`, the default: a past-due subscription keeps access until the
/// end of its period; or a duration such as `0s` or `3d`: that long after it fell past due).
fn subscription_policy_from_env(env: &Env) -> Result<SubscriptionPolicy, ConfigError> {
    let refund = match env.get("SUBSCRIPTION_REFUND_POLICY") {
        None | Some("") => RefundPolicy::default(),
        Some(raw) => RefundPolicy::parse(raw.trim()).ok_or_else(|| {
            ConfigError::new(
                "SUBSCRIPTION_REFUND_POLICY",
                "must be end_access or keep_until_period_end",
            )
        })?,
    };
    let past_due_grace = match env.get("SUBSCRIPTION_GRACE").map(str::trim) {
        None | Some("" | "period") => None,
        Some(raw) => {
            let grace = shared::config::parse_duration(raw)
                .map_err(|e| ConfigError::new("SUBSCRIPTION_GRACE", format!("{e}, or period")))?;
            Some(i64::try_from(grace.as_secs()).map_err(|_| {
                ConfigError::new("SUBSCRIPTION_GRACE", "is longer than anyone can wait")
            })?)
        }
    };
    Ok(SubscriptionPolicy {
        refund,
        past_due_grace,
    })
}

/// The events this service takes: the mode of `STRIPE_SECRET_KEY`, or `STRIPE_MODE` (`live` or
/// `test`) when there is no key (both must agree when both are set), and the Connect accounts
/// of `STRIPE_ACCOUNTS` (comma-separated `acct_…`).
fn scope_from_env(env: &Env, stripe: Option<&StripeConfig>) -> Result<Scope, ConfigError> {
    use secrecy::ExposeSecret as _;
    let keyed = stripe.and_then(|s| StripeMode::of_key(s.secret_key.expose_secret()));
    let set = match opt(env, "STRIPE_MODE").filter(|raw| !raw.is_empty()) {
        None => None,
        Some(raw) => Some(StripeMode::parse(&raw).ok_or_else(|| {
            ConfigError::new("STRIPE_MODE", format!("{raw:?} is neither live nor test"))
        })?),
    };
    if let (Some(keyed), Some(set)) = (keyed, set)
        && keyed != set
    {
        return Err(ConfigError::new(
            "STRIPE_MODE",
            format!(
                "says {} but STRIPE_SECRET_KEY is a {} key",
                set.as_str(),
                keyed.as_str()
            ),
        ));
    }
    let mut accounts = Vec::new();
    for raw in opt(env, "STRIPE_ACCOUNTS").unwrap_or_default().split(',') {
        let account = raw.trim();
        if account.is_empty() {
            continue;
        }
        let valid = account.strip_prefix("acct_").is_some_and(|rest| {
            !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric())
        });
        if !valid {
            return Err(ConfigError::new(
                "STRIPE_ACCOUNTS",
                format!("{account:?} is not a Stripe account id (acct_…)"),
            ));
        }
        accounts.push(account.to_owned());
    }
    Ok(Scope {
        mode: keyed.or(set),
        accounts,
    })
}

/// Batch lanes for a prefetch window: one per 64 deliveries, at least two (while the window
/// holds two deliveries) and at most 8.
#[must_use]
pub fn lanes_for(prefetch: u16) -> usize {
    usize::from(prefetch / 64)
        .clamp(2, 8)
        .min(usize::from(prefetch).max(1))
}

fn opt(env: &Env, var: &str) -> Option<String> {
    env.get(var).map(|v| v.trim().to_owned())
}

fn positive_secs(env: &Env, var: &str, default: u64) -> Result<Duration, ConfigError> {
    let secs: u64 = env.parse_or(var, default)?;
    if secs == 0 {
        return Err(ConfigError::new(
            var,
            "must be a positive number of seconds",
        ));
    }
    Ok(Duration::from_secs(secs))
}

/// `scheme://user:***@host/...`: keeps the user and host, hides a password.
#[must_use]
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
    let redacted_authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => authority.to_owned(),
    };
    if rest.contains('/') {
        format!("{scheme}://{redacted_authority}/{path}")
    } else {
        format!("{scheme}://{redacted_authority}")
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("amqp_url", &redact_url(&self.amqp_url))
            .field("database_url", &redact_url(&self.database_url))
            .field("redis_url", &redact_url(&self.redis_url))
            .field("entitlement_cache_ttl", &self.entitlement_cache_ttl)
            .field("dedupe_ttl", &self.dedupe_ttl)
            .field("prefetch", &self.prefetch)
            .field("topology", &self.topology)
            .field("log_format", &self.log_format)
            .field("api_addr", &self.api_addr)
            .field("api_limits", &self.api_limits)
            .field("metrics_addr", &self.metrics_addr)
            .field("stripe", &self.stripe)
            .field("catalog", &self.catalog)
            .field("subscription_policy", &self.subscription_policy)
            .field("batch_size", &self.batch_size)
            .field("lanes", &self.lanes)
            .field("claim_ttl", &self.claim_ttl)
            .field("outbox", &self.outbox)
            .finish_non_exhaustive()
    }
}

/// The prefix of a Standard Webhooks secret.
pub const SECRET_PREFIX: &str = "whsec_";

/// Why a webhook secret is unusable.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("must start with {SECRET_PREFIX}")]
    Prefix,
    #[error("the part after {SECRET_PREFIX} must be base64")]
    Base64,
    #[error("the key after {SECRET_PREFIX} is empty")]
    Empty,
}

/// The HMAC key of a `whsec_<base64>` secret.
///
/// # Errors
/// A [`SecretError`] when the prefix is missing or the rest is not non-empty base64.
pub fn signing_key(secret: &SecretString) -> Result<SecretSlice<u8>, SecretError> {
    let encoded = secret
        .expose_secret()
        .trim()
        .strip_prefix(SECRET_PREFIX)
        .ok_or(SecretError::Prefix)?;
    let key = STANDARD.decode(encoded).map_err(|_| SecretError::Base64)?;
    if key.is_empty() {
        return Err(SecretError::Empty);
    }
    Ok(SecretSlice::from(key))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_contract() {
        let config = Config::from_env(&Env::default()).unwrap();
        assert_eq!(config.amqp_url, DEFAULT_AMQP_URL);
        assert_eq!(config.database_url, DEFAULT_DATABASE_URL);
        assert_eq!(config.redis_url, DEFAULT_REDIS_URL);
        assert_eq!(config.entitlement_cache_ttl, Duration::from_secs(3600));
        assert_eq!(config.dedupe_ttl, Duration::from_secs(259_200));
        assert_eq!(config.prefetch, 64);
        assert_eq!(config.topology, Topology::default());
        assert_eq!(config.api_addr.port(), 8081);
        assert!(config.stripe.is_none());
        assert!(config.catalog.is_empty());
        assert_eq!(
            config.api_limits.request_timeout,
            DEFAULT_API_REQUEST_TIMEOUT
        );
        assert_eq!(
            config.api_limits.header_read_timeout,
            Duration::from_secs(10)
        );
        assert_eq!(config.metrics_addr, None);
    }

    #[test]
    fn the_mode_served_is_the_keys_or_stripe_mode_and_both_must_agree() {
        let scope = |pairs: &[(&str, &str)]| {
            Config::from_env(&Env::from_pairs(pairs.iter().copied())).map(|c| c.scope)
        };
        assert_eq!(
            scope(&[]).unwrap(),
            Scope::default(),
            "both modes without either"
        );
        let live = scope(&[("STRIPE_SECRET_KEY", "sk_live_abc")]).unwrap();
        assert_eq!(live.mode, Some(StripeMode::Live));
        let test = scope(&[("STRIPE_MODE", "test")]).unwrap();
        assert_eq!(test.mode, Some(StripeMode::Test));
        let err = scope(&[
            ("STRIPE_SECRET_KEY", "sk_live_abc"),
            ("STRIPE_MODE", "test"),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("STRIPE_MODE"), "{err}");
        assert!(scope(&[("STRIPE_MODE", "prod")]).is_err());
        let accounts = scope(&[("STRIPE_ACCOUNTS", "acct_1A, acct_2B")]).unwrap();
        assert_eq!(accounts.accounts, ["acct_1A", "acct_2B"]);
        let err = scope(&[("STRIPE_ACCOUNTS", "acct_1A,cus_2")]).unwrap_err();
        assert!(err.to_string().contains("STRIPE_ACCOUNTS"), "{err}");
    }

    #[test]
    fn unusable_values_name_their_variable() {
        for (var, value) in [
            ("PROCESSOR_PREFETCH", "0"),
            ("PROCESSOR_PREFETCH", "lots"),
            ("DEDUPE_TTL_SECONDS", "-1"),
            ("ENTITLEMENT_CACHE_TTL_SECONDS", "0"),
            ("RETRY_DELAYS", "5s,never"),
            ("LOG_FORMAT", "xml"),
            ("API_ADDR", "localhost"),
            ("AMQP_URL", "http://broker"),
            ("REDIS_URL", "tcp://nowhere"),
            ("API_MAX_CONNECTIONS", "0"),
            ("API_REQUEST_TIMEOUT", "forever"),
            ("PROCESSOR_METRICS_ADDR", "metrics"),
            ("OUTBOX_AMQP", "maybe"),
            ("OUTBOX_POLL_INTERVAL", "0s"),
            ("APP_WEBHOOK_URL", "ftp://app"),
            ("APP_WEBHOOK_RETRY_DELAYS", "5s,later"),
            ("STRIPE_SECRET_KEY", "pk_live_1"),
            ("CATALOG_FILE", "/nonexistent/catalog.toml"),
        ] {
            let err = Config::from_env(&Env::from_pairs([(var, value)])).unwrap_err();
            assert_eq!(err.var, var, "{value:?} for {var}");
        }
        let env = Env::from_pairs([
            ("STRIPE_SECRET_KEY", "sk_test_1"),
            ("STRIPE_API_BASE", "ftp://stripe"),
        ]);
        assert_eq!(Config::from_env(&env).unwrap_err().var, "STRIPE_API_BASE");
    }

    #[test]
    fn debug_output_hides_secrets_and_url_passwords() {
        let env = Env::from_pairs([
            (
                "DATABASE_URL",
                "postgres://app:hunter2@db:5432/entitlements",
            ),
            ("STRIPE_SECRET_KEY", "sk_test_verysecret"),
        ]);
        let shown = format!("{:?}", Config::from_env(&env).unwrap());
        assert!(!shown.contains("hunter2"));
        assert!(!shown.contains("verysecret"));
        assert!(shown.contains("postgres://app:***@db:5432/entitlements"));
    }

    #[test]
    fn a_webhook_url_needs_a_whsec_secret() {
        let url = ("APP_WEBHOOK_URL", "https://app.example/hooks");
        let err = Config::from_env(&Env::from_pairs([url])).unwrap_err();
        assert_eq!(err.var, "APP_WEBHOOK_SECRET");
        for bad in ["plain", "whsec_%%%"] {
            let err =
                Config::from_env(&Env::from_pairs([url, ("APP_WEBHOOK_SECRET", bad)])).unwrap_err();
            assert_eq!(err.var, "APP_WEBHOOK_SECRET", "{bad}");
        }
        let env = Env::from_pairs([url, ("APP_WEBHOOK_SECRET", "whsec_c2VjcmV0LWtleQ==")]);
        let config = Config::from_env(&env).unwrap();
        assert!(config.outbox.amqp);
        assert_eq!(config.outbox.webhook_max_attempts(), 8);
        assert!(!format!("{config:?}").contains("c2VjcmV0"));
    }

    #[test]
    fn lanes_follow_the_prefetch_window() {
        assert_eq!(lanes_for(1), 1);
        assert_eq!(lanes_for(2), 2);
        assert_eq!(lanes_for(64), 2);
        assert_eq!(lanes_for(127), 2);
        assert_eq!(lanes_for(256), 4);
        assert_eq!(lanes_for(512), 8);
        assert_eq!(lanes_for(u16::MAX), 8);
    }

    #[test]
    fn the_subscription_policy_is_read_and_a_bad_value_names_its_variable() {
        let base = [("DATABASE_URL", "postgres://postgres@127.0.0.1/x")];
        let config = Config::from_env(&Env::from_pairs(base)).unwrap();
        assert_eq!(config.subscription_policy, SubscriptionPolicy::default());
        assert_eq!(config.subscription_policy.refund, RefundPolicy::EndAccess);
        assert_eq!(config.subscription_policy.past_due_grace, None);
        let env = Env::from_pairs([
            ("SUBSCRIPTION_REFUND_POLICY", "keep_until_period_end"),
            ("SUBSCRIPTION_GRACE", "3d"),
        ]);
        let policy = Config::from_env(&env).unwrap().subscription_policy;
        assert_eq!(policy.refund, RefundPolicy::KeepUntilPeriodEnd);
        assert_eq!(policy.past_due_grace, Some(3 * 86_400));
        let zero = Env::from_pairs([("SUBSCRIPTION_GRACE", "0s")]);
        assert_eq!(
            Config::from_env(&zero)
                .unwrap()
                .subscription_policy
                .past_due_grace,
            Some(0)
        );
        for (var, bad) in [
            ("SUBSCRIPTION_REFUND_POLICY", "sometimes"),
            ("SUBSCRIPTION_GRACE", "a while"),
        ] {
            let err = Config::from_env(&Env::from_pairs([(var, bad)])).unwrap_err();
            assert!(err.to_string().contains(var), "{err}");
        }
    }
}
