//! `processor dev-token`: a user bearer token for local use (the quick start's curl lines), signed
//! with `AUTH_JWT_SECRET` like the app's real tokens would be.
//!
//! Invariant: the token is exactly what the API accepts — HS256, `sub` = the user, `exp`, and
//! `iss`/`aud` when `AUTH_JWT_ISSUER`/`AUTH_JWT_AUDIENCE` are configured — and nothing is
//! printed but the token.

use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use secrecy::{ExposeSecret as _, SecretString};

#[derive(Debug, clap::Args)]
pub struct DevTokenArgs {
    /// The user id (`sub`).
    #[arg(long)]
    pub user: String,
    /// How long the token is valid (e.g. 30m, 1h, 7d).
    #[arg(long, default_value = "1h", value_parser = shared::config::parse_duration)]
    pub ttl: Duration,
}

#[derive(serde::Serialize)]
struct Claims<'a> {
    sub: &'a str,
    iat: i64,
    exp: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

/// Signs a token for `args.user`.
///
/// # Errors
/// When the token cannot be encoded.
pub fn token(
    args: &DevTokenArgs,
    secret: &SecretString,
    issuer: Option<&str>,
    audience: Option<&str>,
) -> Result<String, jsonwebtoken::errors::Error> {
    let now = chrono::Utc::now().timestamp();
    let ttl = i64::try_from(args.ttl.as_secs()).unwrap_or(i64::MAX);
    let claims = Claims {
        sub: &args.user,
        iat: now,
        exp: now.saturating_add(ttl),
        iss: issuer,
        aud: audience,
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.expose_secret().as_bytes()),
    )
}
