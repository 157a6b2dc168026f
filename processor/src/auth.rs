//! Who is calling: user bearer tokens (HS256 JWTs, `sub` = user id) and the admin token.
//!
//! Invariants:
//! - only HS256 is accepted: `alg: none`, other HMAC sizes and asymmetric algorithms are refused
//!   before any claim is trusted; `exp` is required; `nbf`, when present, is honoured (a token
//!   is refused until then, with the same leeway as `exp`); `iss`/`aud` are checked when
//!   configured, and `AUTH_JWT_REQUIRE_AUDIENCE` refuses to start without an audience; with
//!   `AUTH_JWT_MAX_LIFETIME`, `iat` is required and `exp - iat` bounded; the skew tolerated is
//!   `AUTH_JWT_LEEWAY`;
//! - a route that takes [`AuthUser`] only ever sees the user id of a token that passed all of
//!   that, so it cannot act for anyone else;
//! - the admin token is compared in constant time (over SHA-256 digests, so neither content nor
//!   length leaks through timing);
//! - with no `ADMIN_API_TOKEN` configured, admin routes answer 404 as if they did not exist,
//!   rather than 401, which would invite guessing a token that can never match;
//! - secrets and tokens are never logged and never appear in `Debug`.
//!
//! This module sits below the HTTP API: it fails with its own [`AuthError`], which the API's
//! error type wraps (`crate::api::error`), never the other way round.

use std::sync::Arc;

use axum::extract::FromRef;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use shared::config::{ConfigError, Env};
use shared::ids::UserId;
use subtle::ConstantTimeEq;

/// Clock skew tolerated on `exp` (and `nbf` when present) unless `AUTH_JWT_LEEWAY` says
/// otherwise, in seconds.
pub const DEFAULT_LEEWAY_SECONDS: u64 = 30;

/// Authentication settings of the API.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// `AUTH_JWT_SECRET`: the HS256 key (its raw UTF-8 bytes).
    pub jwt_secret: SecretString,
    /// `AUTH_JWT_ISSUER`: when set, tokens must carry exactly this `iss`.
    pub issuer: Option<String>,
    /// `AUTH_JWT_AUDIENCE`: when set, tokens must carry this `aud`. Required when
    /// `AUTH_JWT_REQUIRE_AUDIENCE` is true.
    pub audience: Option<String>,
    /// `ADMIN_API_TOKEN`: when unset, admin routes answer 404.
    pub admin_token: Option<SecretString>,
    /// `AUTH_JWT_MAX_LIFETIME`: when set, tokens must carry `iat`, and `exp - iat` may not
    /// exceed it (a token minted to live for a year is refused, whoever signed it).
    pub max_lifetime: Option<u64>,
    /// `AUTH_JWT_LEEWAY`: the clock skew tolerated on `exp`, `nbf` and `iat`, in seconds.
    pub leeway: u64,
}

impl AuthConfig {
    /// Settings with `jwt_secret` and every other setting at its default.
    #[must_use]
    pub fn with_secret(jwt_secret: SecretString) -> Self {
        Self {
            jwt_secret,
            issuer: None,
            audience: None,
            admin_token: None,
            max_lifetime: None,
            leeway: DEFAULT_LEEWAY_SECONDS,
        }
    }
}

impl AuthConfig {
    /// # Errors
    /// A [`ConfigError`] naming `AUTH_JWT_SECRET` when it is missing or shorter than 32 bytes
    /// (an HS256 key shorter than the hash invites brute force), `AUTH_JWT_REQUIRE_AUDIENCE` when
    /// it is not a boolean, and `AUTH_JWT_AUDIENCE` when it is required but unset.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let secret = env.required("AUTH_JWT_SECRET")?;
        if secret.len() < 32 {
            return Err(ConfigError::new(
                "AUTH_JWT_SECRET",
                "must be at least 32 bytes long",
            ));
        }
        shared::secrets::check("AUTH_JWT_SECRET", secret)?;
        let admin_token = env.secret("ADMIN_API_TOKEN");
        if let Some(token) = &admin_token {
            shared::secrets::check("ADMIN_API_TOKEN", token.expose_secret())?;
        }
        let audience = env.get("AUTH_JWT_AUDIENCE").map(|s| s.trim().to_owned());
        // A shared signing key may also sign tokens meant for other services; requiring an
        // audience is how a deployment makes sure only tokens minted for this one are taken.
        if env.parse_or("AUTH_JWT_REQUIRE_AUDIENCE", false)? && audience.is_none() {
            return Err(ConfigError::new(
                "AUTH_JWT_AUDIENCE",
                "is required because AUTH_JWT_REQUIRE_AUDIENCE is true",
            ));
        }
        let seconds = |var: &str| -> Result<Option<u64>, ConfigError> {
            env.get(var)
                .filter(|raw| !raw.trim().is_empty())
                .map(|raw| {
                    shared::config::parse_duration(raw)
                        .map(|d| d.as_secs())
                        .map_err(|e| ConfigError::new(var, e))
                })
                .transpose()
        };
        let max_lifetime = seconds("AUTH_JWT_MAX_LIFETIME")?;
        if max_lifetime == Some(0) {
            return Err(ConfigError::new(
                "AUTH_JWT_MAX_LIFETIME",
                "must be positive",
            ));
        }
        let leeway = seconds("AUTH_JWT_LEEWAY")?.unwrap_or(DEFAULT_LEEWAY_SECONDS);
        if leeway > 600 {
            return Err(ConfigError::new(
                "AUTH_JWT_LEEWAY",
                "must be at most 10m (clocks that far apart are a fault to fix)",
            ));
        }
        Ok(Self {
            jwt_secret: SecretString::from(secret.to_owned()),
            issuer: env.get("AUTH_JWT_ISSUER").map(|s| s.trim().to_owned()),
            audience,
            admin_token,
            max_lifetime,
            leeway,
        })
    }
}

/// Why credentials were refused. The text is safe to show to the caller. The API answers 401
/// for every variant but [`AuthError::AdminDisabled`], which is a 404.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("malformed bearer token")]
    Malformed,
    #[error("token has expired")]
    Expired,
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token algorithm is not allowed")]
    Algorithm,
    #[error("token claims are invalid")]
    Claims,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("invalid admin token")]
    BadAdminToken,
    /// No `ADMIN_API_TOKEN` is configured: admin routes do not exist.
    #[error("not found")]
    AdminDisabled,
}

#[derive(Debug, serde::Deserialize)]
struct Claims {
    // Optional here so a token without `sub` reads as bad claims, not as malformed JSON.
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    exp: Option<u64>,
    #[serde(default)]
    iat: Option<u64>,
    /// The organisation the app says the user acts for, and their role in it (`org_role`
    /// `admin`, `owner` or `billing` may buy for it and open its billing portal).
    #[serde(default)]
    org_id: Option<String>,
    #[serde(default)]
    org_role: Option<String>,
}

/// A verified user token: its subject and the organisation it names, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub user: UserId,
    /// `org_id` when `org_role` is one that may buy for it (`admin`, `owner`, `billing`).
    pub billing_for: Option<String>,
}

/// The `org_role` values that may buy for the organisation and open its portal.
pub const BILLING_ROLES: [&str; 3] = ["admin", "owner", "billing"];

/// Verifies user tokens and the admin token. Cheap to clone; put it in the router state and let
/// the state implement `FromRef` for it.
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Inner>,
}

struct Inner {
    key: DecodingKey,
    validation: Validation,
    admin_digest: Option<[u8; 32]>,
    max_lifetime: Option<u64>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("issuer", &self.inner.validation.iss)
            .field("audience", &self.inner.validation.aud)
            .field("admin_token_configured", &self.inner.admin_digest.is_some())
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    #[must_use]
    pub fn new(config: &AuthConfig) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = config.leeway;
        // jsonwebtoken leaves `nbf` unchecked by default; it is checked when the token has one.
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if config.max_lifetime.is_some() {
            required.push("iat");
        }
        if let Some(iss) = &config.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        match &config.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            // Without a configured audience there is nothing to compare an `aud` claim with;
            // the library would otherwise refuse every token that carries one.
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        Self {
            inner: Arc::new(Inner {
                key: DecodingKey::from_secret(config.jwt_secret.expose_secret().as_bytes()),
                validation,
                admin_digest: config
                    .admin_token
                    .as_ref()
                    .map(|t| digest(t.expose_secret())),
                max_lifetime: config.max_lifetime,
            }),
        }
    }

    /// Verifies an HS256 token and returns its subject.
    ///
    /// # Errors
    /// An [`AuthError`] saying why the token is refused.
    pub fn verify(&self, token: &str) -> Result<UserId, AuthError> {
        self.verify_caller(token).map(|caller| caller.user)
    }

    /// Verifies an HS256 token and returns its subject and organisation claims. A subject
    /// shaped as an organisation's (`org:…`) is refused: no token speaks as one.
    ///
    /// # Errors
    /// An [`AuthError`] saying why the token is refused.
    pub fn verify_caller(&self, token: &str) -> Result<Caller, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.inner.key, &self.inner.validation)
            .map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => AuthError::Algorithm,
            ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            ErrorKind::InvalidIssuer
            | ErrorKind::InvalidAudience
            | ErrorKind::InvalidSubject
            | ErrorKind::MissingRequiredClaim(_) => AuthError::Claims,
            _ => AuthError::Malformed,
        })?;
        if let Some(max) = self.inner.max_lifetime {
            let (Some(exp), Some(iat)) = (data.claims.exp, data.claims.iat) else {
                return Err(AuthError::Claims);
            };
            let now = jsonwebtoken::get_current_timestamp();
            // Minted in the future (beyond the skew), or to live longer than allowed.
            if iat > now.saturating_add(self.inner.validation.leeway)
                || exp.saturating_sub(iat) > max
            {
                return Err(AuthError::Claims);
            }
        }
        let sub = data.claims.sub.ok_or(AuthError::Claims)?;
        if crate::domain::organization::is_organization_subject(&sub) {
            return Err(AuthError::Claims);
        }
        let user = UserId::parse(&sub).map_err(|_| AuthError::Claims)?;
        let billing_for = data.claims.org_id.filter(|_| {
            data.claims
                .org_role
                .as_deref()
                .is_some_and(|role| BILLING_ROLES.contains(&role))
        });
        Ok(Caller { user, billing_for })
    }

    /// Checks an `Authorization` header value as a user bearer token.
    ///
    /// # Errors
    /// An [`AuthError`]; [`AuthError::Missing`] when there is no header.
    pub fn verify_header(&self, header: Option<&str>) -> Result<UserId, AuthError> {
        self.verify(bearer(header)?)
    }

    /// Checks an `Authorization` header value against `ADMIN_API_TOKEN`.
    ///
    /// # Errors
    /// [`AuthError::AdminDisabled`] when no admin token is configured, another [`AuthError`]
    /// when the header is missing or does not match.
    pub fn verify_admin_header(&self, header: Option<&str>) -> Result<(), AuthError> {
        let Some(expected) = &self.inner.admin_digest else {
            return Err(AuthError::AdminDisabled);
        };
        let presented = bearer(header)?;
        if bool::from(digest(presented).ct_eq(expected)) {
            Ok(())
        } else {
            Err(AuthError::BadAdminToken)
        }
    }
}

fn digest(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

fn bearer(header: Option<&str>) -> Result<&str, AuthError> {
    let header = header.ok_or(AuthError::Missing)?;
    let (scheme, token) = header.split_once(' ').ok_or(AuthError::Malformed)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(AuthError::Malformed);
    }
    Ok(token)
}

fn authorization(parts: &Parts) -> Result<Option<&str>, AuthError> {
    parts
        .headers
        .get(AUTHORIZATION)
        .map(|v| v.to_str().map_err(|_| AuthError::Malformed))
        .transpose()
}

/// The authenticated user of a request. Rejects with 401
/// `{"error":"unauthorized","message":"…"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthUser(pub UserId);

impl<S> axum::extract::FromRequestParts<S> for AuthUser
where
    S: Send + Sync,
    Authenticator: FromRef<S>,
{
    type Rejection = AuthError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let AuthCaller(caller) = AuthCaller::from_request_parts(parts, state).await?;
        Ok(Self(caller.user))
    }
}

/// The authenticated caller of a request, with their organisation claims. Rejects as
/// [`AuthUser`] does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthCaller(pub Caller);

impl<S> axum::extract::FromRequestParts<S> for AuthCaller
where
    S: Send + Sync,
    Authenticator: FromRef<S>,
{
    type Rejection = AuthError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let auth = Authenticator::from_ref(state);
        let caller = bearer(authorization(parts)?)
            .and_then(|token| auth.verify_caller(token))
            .inspect_err(|e| tracing::debug!(reason = %e, "bearer token refused"))?;
        Ok(Self(caller))
    }
}

/// Proof that the request carried `ADMIN_API_TOKEN`. Rejects with 401 on a missing or wrong
/// token, and with 404 when no admin token is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminToken;

impl<S> axum::extract::FromRequestParts<S> for AdminToken
where
    S: Send + Sync,
    Authenticator: FromRef<S>,
{
    type Rejection = AuthError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let auth = Authenticator::from_ref(state);
        let header = authorization(parts)?;
        auth.verify_admin_header(header)?;
        Ok(Self)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use axum::extract::FromRequestParts;
    use axum::http::{Request, StatusCode};
    use axum::response::IntoResponse;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    const SECRET: &str = "0123456789abcdef0123456789abcdef-test";

    fn config() -> AuthConfig {
        AuthConfig {
            admin_token: Some(SecretString::from("admin-token-1")),
            ..AuthConfig::with_secret(SecretString::from(SECRET))
        }
    }

    fn now() -> i64 {
        chrono::Utc::now().timestamp()
    }

    fn token(claims: &serde_json::Value) -> String {
        token_with(Algorithm::HS256, SECRET, claims)
    }

    fn token_with(alg: Algorithm, secret: &str, claims: &serde_json::Value) -> String {
        encode(
            &Header::new(alg),
            claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn b64(v: &serde_json::Value) -> String {
        use base64_url::encode;
        encode(&v.to_string())
    }

    /// Minimal unpadded base64url, enough to forge headers in tests.
    mod base64_url {
        pub(super) fn encode(text: &str) -> String {
            const ALPHABET: &[u8; 64] =
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
            let bytes = text.as_bytes();
            let mut out = String::new();
            for chunk in bytes.chunks(3) {
                let n = chunk
                    .iter()
                    .enumerate()
                    .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
                for i in 0..=chunk.len() {
                    out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
                }
            }
            out
        }
    }

    #[test]
    fn a_valid_token_yields_its_subject() {
        let auth = Authenticator::new(&config());
        let t = token(&json!({"sub": "user_42", "exp": now() + 600}));
        assert_eq!(auth.verify(&t).unwrap().as_str(), "user_42");
        let header = format!("Bearer {t}");
        assert_eq!(
            auth.verify_header(Some(&header)).unwrap().as_str(),
            "user_42"
        );
    }

    #[test]
    fn missing_and_malformed_tokens_are_refused() {
        let auth = Authenticator::new(&config());
        assert_eq!(auth.verify_header(None), Err(AuthError::Missing));
        assert_eq!(
            auth.verify_header(Some("Bearer")),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            auth.verify_header(Some("Bearer ")),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            auth.verify_header(Some("Basic dXNlcjpwdw==")),
            Err(AuthError::Malformed)
        );
        assert_eq!(auth.verify("not.a.jwt"), Err(AuthError::Malformed));
        assert_eq!(auth.verify("garbage"), Err(AuthError::Malformed));
    }

    #[test]
    fn an_expired_token_is_refused() {
        let auth = Authenticator::new(&config());
        let t = token(&json!({"sub": "u", "exp": now() - 3600}));
        assert_eq!(auth.verify(&t), Err(AuthError::Expired));
    }

    #[test]
    fn a_token_without_exp_or_sub_is_refused() {
        let auth = Authenticator::new(&config());
        assert_eq!(
            auth.verify(&token(&json!({"sub": "u"}))),
            Err(AuthError::Claims)
        );
        assert_eq!(
            auth.verify(&token(&json!({"exp": now() + 600}))),
            Err(AuthError::Claims)
        );
        let blank_sub = token(&json!({"sub": "a b", "exp": now() + 600}));
        assert_eq!(auth.verify(&blank_sub), Err(AuthError::Claims));
    }

    #[test]
    fn a_token_signed_with_another_key_is_refused() {
        let auth = Authenticator::new(&config());
        let t = token_with(
            Algorithm::HS256,
            "another-secret-another-secret-another",
            &json!({"sub": "u", "exp": now() + 600}),
        );
        assert_eq!(auth.verify(&t), Err(AuthError::BadSignature));
    }

    #[test]
    fn alg_none_and_other_algorithms_are_refused() {
        let auth = Authenticator::new(&config());
        let claims = json!({"sub": "u", "exp": now() + 600});
        for header in [json!({"alg": "none", "typ": "JWT"}), json!({"alg": "None"})] {
            let unsigned = format!("{}.{}.", b64(&header), b64(&claims));
            assert!(auth.verify(&unsigned).is_err(), "{header}");
        }
        // Same secret, other HMAC size: still refused, only HS256 is allowed.
        let hs512 = token_with(Algorithm::HS512, SECRET, &claims);
        assert_eq!(auth.verify(&hs512), Err(AuthError::Algorithm));
        // A valid HS256 signature under a header that claims another algorithm.
        let valid = token(&claims);
        let (_, rest) = valid.split_once('.').unwrap();
        let swapped = format!("{}.{rest}", b64(&json!({"alg": "HS384", "typ": "JWT"})));
        assert!(auth.verify(&swapped).is_err());
    }

    #[test]
    fn issuer_and_audience_are_enforced_when_configured() {
        let mut cfg = config();
        cfg.issuer = Some("https://auth.app.test".into());
        cfg.audience = Some("entitlements".into());
        let auth = Authenticator::new(&cfg);
        let exp = now() + 600;
        let good =
            json!({"sub": "u", "exp": exp, "iss": "https://auth.app.test", "aud": "entitlements"});
        assert!(auth.verify(&token(&good)).is_ok());
        let cases = [
            json!({"sub": "u", "exp": exp, "iss": "https://evil.test", "aud": "entitlements"}),
            json!({"sub": "u", "exp": exp, "iss": "https://auth.app.test", "aud": "other"}),
            json!({"sub": "u", "exp": exp, "aud": "entitlements"}),
            json!({"sub": "u", "exp": exp, "iss": "https://auth.app.test"}),
        ];
        for claims in cases {
            assert_eq!(
                auth.verify(&token(&claims)),
                Err(AuthError::Claims),
                "{claims}"
            );
        }
        // Without configured audience, a token carrying one is still accepted.
        let plain = Authenticator::new(&config());
        assert!(plain.verify(&token(&good)).is_ok());
    }

    #[test]
    fn a_token_is_refused_before_its_nbf_and_accepted_after() {
        let auth = Authenticator::new(&config());
        let exp = now() + 3600;
        let early = token(&json!({"sub": "u", "exp": exp, "nbf": now() + 600}));
        assert_eq!(auth.verify(&early), Err(AuthError::NotYetValid));
        // Inside the leeway, as for `exp`.
        let skewed = token(&json!({"sub": "u", "exp": exp, "nbf": now() + 10}));
        assert!(auth.verify(&skewed).is_ok());
        let ready = token(&json!({"sub": "u", "exp": exp, "nbf": now() - 60}));
        assert!(auth.verify(&ready).is_ok());
        // `nbf` stays optional.
        assert!(
            auth.verify(&token(&json!({"sub": "u", "exp": exp})))
                .is_ok()
        );
    }

    #[test]
    fn an_audience_can_be_required_at_start_up() {
        let base = [
            ("AUTH_JWT_SECRET", SECRET),
            ("AUTH_JWT_REQUIRE_AUDIENCE", "true"),
        ];
        let err = AuthConfig::from_env(&Env::from_pairs(base)).unwrap_err();
        assert_eq!(err.var, "AUTH_JWT_AUDIENCE");
        let bad = [
            ("AUTH_JWT_SECRET", SECRET),
            ("AUTH_JWT_REQUIRE_AUDIENCE", "maybe"),
        ];
        let err = AuthConfig::from_env(&Env::from_pairs(bad)).unwrap_err();
        assert_eq!(err.var, "AUTH_JWT_REQUIRE_AUDIENCE");
        let cfg = AuthConfig::from_env(&Env::from_pairs([
            ("AUTH_JWT_SECRET", SECRET),
            ("AUTH_JWT_REQUIRE_AUDIENCE", "true"),
            ("AUTH_JWT_AUDIENCE", "entitlements"),
        ]))
        .unwrap();
        let auth = Authenticator::new(&cfg);
        let exp = now() + 600;
        assert!(
            auth.verify(&token(
                &json!({"sub": "u", "exp": exp, "aud": "entitlements"})
            ))
            .is_ok()
        );
        for claims in [
            json!({"sub": "u", "exp": exp}),
            json!({"sub": "u", "exp": exp, "aud": "billing"}),
        ] {
            assert_eq!(
                auth.verify(&token(&claims)),
                Err(AuthError::Claims),
                "{claims}"
            );
        }
    }

    #[test]
    fn config_requires_a_long_enough_secret() {
        let err = AuthConfig::from_env(&Env::default()).unwrap_err();
        assert_eq!(err.var, "AUTH_JWT_SECRET");
        let err =
            AuthConfig::from_env(&Env::from_pairs([("AUTH_JWT_SECRET", "short")])).unwrap_err();
        assert_eq!(err.var, "AUTH_JWT_SECRET");
        let admin = "q7Zr2kX9mB4tYw1LpN8sVd0cHe6JuAf3";
        let err = AuthConfig::from_env(&Env::from_pairs([
            ("AUTH_JWT_SECRET", SECRET),
            ("ADMIN_API_TOKEN", "adm"),
        ]))
        .unwrap_err();
        assert_eq!(err.var, "ADMIN_API_TOKEN", "too short to be a token");
        let cfg = AuthConfig::from_env(&Env::from_pairs([
            ("AUTH_JWT_SECRET", SECRET),
            ("AUTH_JWT_ISSUER", "iss"),
            ("ADMIN_API_TOKEN", admin),
        ]))
        .unwrap();
        assert_eq!(cfg.issuer.as_deref(), Some("iss"));
        assert!(cfg.audience.is_none());
        let auth = Authenticator::new(&cfg);
        let shown = format!("{cfg:?} {auth:?}");
        assert!(!shown.contains(SECRET) && !shown.contains(admin), "{shown}");
    }

    /// Runs one extractor on a request carrying `auth`, rendering a rejection as axum would.
    async fn call(cfg: &AuthConfig, admin: bool, auth: Option<&str>) -> (StatusCode, String) {
        let mut req = Request::get("/");
        if let Some(a) = auth {
            req = req.header(AUTHORIZATION, a);
        }
        let (mut parts, ()) = req.body(()).unwrap().into_parts();
        let state = Authenticator::new(cfg);
        let response = if admin {
            match AdminToken::from_request_parts(&mut parts, &state).await {
                Ok(AdminToken) => "ok".into_response(),
                Err(e) => e.into_response(),
            }
        } else {
            match AuthUser::from_request_parts(&mut parts, &state).await {
                Ok(AuthUser(user)) => user.to_string().into_response(),
                Err(e) => e.into_response(),
            }
        };
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn the_user_extractor_answers_401_with_the_error_body() {
        let cfg = config();
        let good = format!(
            "Bearer {}",
            token(&json!({"sub": "u_7", "exp": now() + 600}))
        );
        assert_eq!(
            call(&cfg, false, Some(&good)).await,
            (StatusCode::OK, "u_7".into())
        );

        let expired = format!(
            "Bearer {}",
            token(&json!({"sub": "u_7", "exp": now() - 3600}))
        );
        for header in [None, Some("Bearer x.y.z"), Some(expired.as_str())] {
            let (status, body) = call(&cfg, false, header).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED);
            let body: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(body["error"], "unauthorized");
            assert!(body["message"].is_string());
        }
    }

    #[tokio::test]
    async fn the_admin_extractor_compares_the_token_and_hides_when_unconfigured() {
        let cfg = config();
        assert_eq!(
            call(&cfg, true, Some("Bearer admin-token-1")).await.0,
            StatusCode::OK
        );
        for header in [
            None,
            Some("Bearer admin-token-2"),
            Some("Bearer admin-token-1x"),
            Some("admin-token-1"),
        ] {
            assert_eq!(
                call(&cfg, true, header).await.0,
                StatusCode::UNAUTHORIZED,
                "{header:?}"
            );
        }
        // A user token is not an admin token.
        let user = format!("Bearer {}", token(&json!({"sub": "u", "exp": now() + 600})));
        assert_eq!(
            call(&cfg, true, Some(&user)).await.0,
            StatusCode::UNAUTHORIZED
        );

        let mut unconfigured = config();
        unconfigured.admin_token = None;
        let (status, body) = call(&unconfigured, true, Some("Bearer admin-token-1")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(body.contains("not_found"));
    }

    #[test]
    fn a_maximum_lifetime_needs_iat_and_refuses_longer_or_future_tokens() {
        let env = Env::from_pairs([
            ("AUTH_JWT_SECRET", SECRET),
            ("AUTH_JWT_MAX_LIFETIME", "1h"),
            ("AUTH_JWT_LEEWAY", "5s"),
        ]);
        let config = AuthConfig::from_env(&env).unwrap();
        assert_eq!((config.max_lifetime, config.leeway), (Some(3600), 5));
        let auth = Authenticator::new(&config);
        let token = |claims: serde_json::Value| token(&claims);
        let t = now();
        assert!(
            auth.verify(&token(json!({"sub": "u1", "iat": t, "exp": t + 3600})))
                .is_ok()
        );
        for (what, claims) in [
            ("without iat", json!({"sub": "u1", "exp": t + 60})),
            (
                "living a day",
                json!({"sub": "u1", "iat": t, "exp": t + 86_400}),
            ),
            (
                "minted in the future",
                json!({"sub": "u1", "iat": t + 600, "exp": t + 900}),
            ),
        ] {
            assert_eq!(
                auth.verify(&token(claims)),
                Err(AuthError::Claims),
                "{what}"
            );
        }
        // The leeway is the configured one: 10 s late is past a 5 s skew.
        assert_eq!(
            auth.verify(&token(json!({"sub": "u1", "iat": t - 100, "exp": t - 10}))),
            Err(AuthError::Expired)
        );
        for (var, bad) in [
            ("AUTH_JWT_MAX_LIFETIME", "0s"),
            ("AUTH_JWT_MAX_LIFETIME", "soon"),
            ("AUTH_JWT_LEEWAY", "1h"),
        ] {
            let env = Env::from_pairs([("AUTH_JWT_SECRET", SECRET), (var, bad)]);
            let err = AuthConfig::from_env(&env).unwrap_err();
            assert!(err.to_string().contains(var), "{err}");
        }
    }
}
