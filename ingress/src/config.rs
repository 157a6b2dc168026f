//! The ingress configuration, read once from the environment and validated.
//!
//! Invariant: a `Config` holds at least one non-blank webhook secret and a positive tolerance;
//! anything else fails at start-up naming the variable.

use std::net::SocketAddr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use shared::config::{ConfigError, Env};
use shared::server::{ServerLimits, optional_addr};
use shared::signature::Verifier;
use shared::telemetry::LogFormat;
use shared::topology::Topology;

/// Default `AMQP_URL` of the contract.
pub use shared::amqp::DEFAULT_AMQP_URL;

/// How long a publish may wait for the broker's confirm before the request gets 503.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

/// Upper bound on a whole request by default (`INGRESS_REQUEST_TIMEOUT`), so a client that
/// trickles its body cannot hold a task forever.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Everything ingress needs.
#[derive(Debug, Clone)]
pub struct Config {
    pub addr: SocketAddr,
    pub amqp_url: String,
    pub verifier: Verifier,
    pub max_body_bytes: usize,
    pub topology: Topology,
    pub confirm_timeout: Duration,
    pub log_format: LogFormat,
    /// The listener's limits (`INGRESS_HEADER_READ_TIMEOUT`, `INGRESS_REQUEST_TIMEOUT`,
    /// `INGRESS_MAX_CONNECTIONS`, `INGRESS_MAX_IN_FLIGHT`).
    pub limits: ServerLimits,
    /// `INGRESS_METRICS_ADDR`: when set, `/metrics` is served there instead of on `addr`.
    pub metrics_addr: Option<SocketAddr>,
}

impl Config {
    /// # Errors
    /// A [`ConfigError`] naming the first variable that is missing or invalid.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let addr = env.parse_or("INGRESS_ADDR", SocketAddr::from(([127, 0, 0, 1], 8080)))?;
        let secrets: Vec<SecretString> = env
            .required("STRIPE_WEBHOOK_SECRET")?
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| SecretString::from(s.to_owned()))
            .collect();
        if secrets.is_empty() {
            return Err(ConfigError::new(
                "STRIPE_WEBHOOK_SECRET",
                "holds no secret (expected whsec_…, comma-separated during rotation)",
            ));
        }
        for secret in &secrets {
            shared::secrets::check_webhook_secret("STRIPE_WEBHOOK_SECRET", secret.expose_secret())?;
        }
        let tolerance_var = if env.get("STRIPE_WEBHOOK_TOLERANCE_SECONDS").is_none()
            && env.get("BILLING_WEBHOOK_TOLERANCE_SECONDS").is_some()
        {
            "BILLING_WEBHOOK_TOLERANCE_SECONDS"
        } else {
            "STRIPE_WEBHOOK_TOLERANCE_SECONDS"
        };
        let tolerance: u64 = env.parse_or(tolerance_var, 300)?;
        if tolerance == 0 {
            return Err(ConfigError::new(tolerance_var, "must be at least 1 second"));
        }
        let max_body_bytes: usize = env.parse_or("INGRESS_MAX_BODY_BYTES", 1_048_576)?;
        if max_body_bytes == 0 {
            return Err(ConfigError::new(
                "INGRESS_MAX_BODY_BYTES",
                "must be positive",
            ));
        }
        Ok(Self {
            addr,
            amqp_url: env.string_or("AMQP_URL", DEFAULT_AMQP_URL),
            verifier: Verifier::new(secrets, Some(tolerance)),
            max_body_bytes,
            topology: Topology::from_env(env)?,
            confirm_timeout: CONFIRM_TIMEOUT,
            log_format: env.parse_or("LOG_FORMAT", LogFormat::Pretty)?,
            limits: ServerLimits::from_env(
                env,
                "INGRESS",
                &ServerLimits::with_request_timeout(DEFAULT_REQUEST_TIMEOUT),
            )?,
            metrics_addr: optional_addr(env, "INGRESS_METRICS_ADDR")?,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    /// Signing secrets shaped as Stripe issues them.
    const SECRET_A: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SECRET_B: &str = "whsec_4f1c9a7e02b85d3c6e91a0f47b2d8c53b1d90e6a";

    use super::*;

    #[test]
    fn missing_secret_is_named() {
        let err = Config::from_env(&Env::default()).unwrap_err();
        assert_eq!(err.var, "STRIPE_WEBHOOK_SECRET");
        let err =
            Config::from_env(&Env::from_pairs([("STRIPE_WEBHOOK_SECRET", " , ")])).unwrap_err();
        assert_eq!(err.var, "STRIPE_WEBHOOK_SECRET");
    }

    #[test]
    fn defaults_follow_the_contract() {
        let c = Config::from_env(&Env::from_pairs([(
            "STRIPE_WEBHOOK_SECRET",
            format!("{SECRET_A},{SECRET_B}").as_str(),
        )]))
        .unwrap();
        assert_eq!(c.addr.to_string(), "127.0.0.1:8080");
        assert_eq!(c.max_body_bytes, 1_048_576);
        assert_eq!(c.amqp_url, DEFAULT_AMQP_URL);
        assert_eq!(c.topology.exchange(), "stripe.events");
        assert_eq!(c.limits.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.limits.request_timeout, DEFAULT_REQUEST_TIMEOUT);
        assert_eq!(
            (c.limits.max_connections, c.limits.max_in_flight),
            (1024, 256)
        );
        assert_eq!(c.metrics_addr, None);
    }

    #[test]
    fn listener_limits_and_the_metrics_address_are_read_and_named() {
        let c = Config::from_env(&Env::from_pairs([
            ("STRIPE_WEBHOOK_SECRET", SECRET_A),
            ("INGRESS_MAX_CONNECTIONS", "64"),
            ("INGRESS_METRICS_ADDR", "127.0.0.1:9180"),
        ]))
        .unwrap();
        assert_eq!(c.limits.max_connections, 64);
        assert_eq!(c.metrics_addr.map(|a| a.port()), Some(9180));
        let env = Env::from_pairs([
            ("STRIPE_WEBHOOK_SECRET", SECRET_A),
            ("INGRESS_HEADER_READ_TIMEOUT", "0s"),
        ]);
        assert_eq!(
            Config::from_env(&env).unwrap_err().var,
            "INGRESS_HEADER_READ_TIMEOUT"
        );
    }

    #[test]
    fn tolerance_alias_and_bad_values_are_named() {
        let env = Env::from_pairs([
            ("STRIPE_WEBHOOK_SECRET", SECRET_A),
            ("BILLING_WEBHOOK_TOLERANCE_SECONDS", "soon"),
        ]);
        assert_eq!(
            Config::from_env(&env).unwrap_err().var,
            "BILLING_WEBHOOK_TOLERANCE_SECONDS"
        );
        let env = Env::from_pairs([
            ("STRIPE_WEBHOOK_SECRET", SECRET_A),
            ("INGRESS_ADDR", "not an address"),
        ]);
        assert_eq!(Config::from_env(&env).unwrap_err().var, "INGRESS_ADDR");
    }
}
