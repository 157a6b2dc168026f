//! Outbound webhooks after the Standard Webhooks convention (<https://www.standardwebhooks.com>):
//! `POST` of the message JSON with headers `webhook-id` (the message id, stable across retries),
//! `webhook-timestamp` (Unix seconds of this attempt) and `webhook-signature`
//! (`v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, keyed by the base64-decoded part of
//! `APP_WEBHOOK_SECRET` after `whsec_`).
//!
//! Invariant: only a 2xx answer counts as delivered; anything else (another status, a timeout,
//! a connection error) is a failed attempt, reported without the URL or any secret.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretSlice, SecretString};
use sha2::Sha256;

use super::Message;
use crate::config::{WebhookTarget, signing_key};

/// Why one delivery attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("HTTP {0}")]
    Status(u16),
    #[error("request failed: {0}")]
    Transport(String),
}

/// `v1,<base64 HMAC-SHA256(key, "id.timestamp.body")>`.
#[must_use]
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

/// What a receiver does: true when one of the space-separated signatures of `header` is the
/// `v1` signature of `id.timestamp.body` under `secret` (compared in constant time) and the
/// timestamp is within `tolerance` of `now`.
#[must_use]
pub fn verify(
    secret: &SecretString,
    id: &str,
    timestamp: &str,
    body: &[u8],
    header: &str,
    now: i64,
    tolerance: Duration,
) -> bool {
    let Ok(key) = signing_key(secret) else {
        return false;
    };
    let Ok(ts) = timestamp.trim().parse::<i64>() else {
        return false;
    };
    let tolerance = i64::try_from(tolerance.as_secs()).unwrap_or(i64::MAX);
    if now.abs_diff(ts) > tolerance.unsigned_abs() {
        return false;
    }
    let expected = sign(key.expose_secret(), id, ts, body);
    header.split_whitespace().any(|candidate| {
        use subtle::ConstantTimeEq as _;
        candidate.len() == expected.len()
            && bool::from(candidate.as_bytes().ct_eq(expected.as_bytes()))
    })
}

/// Sends messages to the app's endpoint.
#[derive(Debug, Clone)]
pub struct Sender {
    client: reqwest::Client,
    url: String,
    key: std::sync::Arc<SecretSlice<u8>>,
}

impl Sender {
    /// A sender for `target`, each request bounded by `timeout`.
    ///
    /// # Errors
    /// When the secret is unusable (the configuration has validated it) or the HTTP client
    /// cannot be built.
    pub fn new(target: &WebhookTarget, timeout: Duration) -> anyhow::Result<Self> {
        let key = signing_key(&target.secret)?;
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("stripe-entitlements/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            client,
            url: target.url.clone(),
            key: std::sync::Arc::new(key),
        })
    }

    /// One signed attempt.
    ///
    /// # Errors
    /// [`DeliveryError`] for anything but a 2xx answer.
    pub async fn send(&self, message: &Message) -> Result<(), DeliveryError> {
        let body = message.to_bytes();
        let id = message.id.to_string();
        let timestamp = chrono::Utc::now().timestamp();
        let signature = sign(self.key.expose_secret(), &id, timestamp, &body);
        let response = self
            .client
            .post(&self.url)
            .header("content-type", "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await
            .map_err(|e| DeliveryError::Transport(e.without_url().to_string()))?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(DeliveryError::Status(status.as_u16()))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn signatures_match_the_standard_webhooks_reference_vector() {
        // The example of the Standard Webhooks specification.
        let secret = SecretString::from("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let key = signing_key(&secret).unwrap();
        let id = "msg_p5jXN8AQM9LWM0D4loKWxJek";
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            sign(key.expose_secret(), id, 1_614_265_330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        let header = "v1a,nope v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
        let check = |body: &[u8], now: i64| {
            verify(
                &secret,
                id,
                "1614265330",
                body,
                header,
                now,
                Duration::from_secs(300),
            )
        };
        assert!(check(body, 1_614_265_400));
        assert!(!check(b"{}", 1_614_265_400), "another body");
        assert!(!check(body, 1_614_275_400), "too old");
    }

    #[test]
    fn secrets_without_prefix_or_base64_are_refused() {
        assert!(signing_key(&SecretString::from("MfKQ9r8GKYqrTwjU")).is_err());
        assert!(signing_key(&SecretString::from("whsec_***")).is_err());
        assert!(signing_key(&SecretString::from("whsec_")).is_err());
    }
}
