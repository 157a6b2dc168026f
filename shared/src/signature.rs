//! Stripe webhook signature verification.
//!
//! Invariant: a [`VerifiedWebhook`] exists only for a body whose `Stripe-Signature` carries a
//! `v1` HMAC-SHA256 that matches one of the configured secrets, with a timestamp inside the
//! tolerance window in both directions, and whose body is a JSON object with a string `id` and
//! `type`. Nothing else can construct one.
//!
//! The scheme (see `shared/STRIPE.md`): the signed message is `"{t}.{raw body}"`, the key is the
//! whole `whsec_…` string as bytes, and the header may carry several `v1` values during a secret
//! roll. Every `v1` is tried against every secret; comparison is constant time.
//! The clock is a parameter so the function stays pure.
//!
//! Cost invariant: the work a request causes does not depend on what its header holds. The
//! header is refused unread beyond [`MAX_HEADER_BYTES`] and beyond [`MAX_V1_CANDIDATES`] `v1`
//! items; the timestamp is checked before any MAC is computed; the MAC of the body is computed
//! once per configured secret (never once per candidate), and each candidate that is exactly 64
//! hex characters is compared with those digests in constant time. So a request costs at most one
//! pass over the body per secret, however many `v1` items it carries (a 1 MiB body takes a few
//! milliseconds, short enough to stay on the async worker threads).

use bytes::Bytes;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::ids::StripeEventId;

type HmacSha256 = Hmac<Sha256>;

/// Longest `Stripe-Signature` header read. Stripe sends `t`, one `v1` per active secret (two
/// during a roll) and in test mode a `v0`: about 70 bytes each, so 4 KiB leaves ample room.
pub const MAX_HEADER_BYTES: usize = 4096;

/// Most `v1` items a header may carry (Stripe sends one per active secret).
pub const MAX_V1_CANDIDATES: usize = 8;

/// Length of a `v1` signature: hex of a SHA-256 HMAC.
const V1_HEX_LEN: usize = 64;

/// Why a signature was refused. The variants are for logs and tests; clients only ever see
/// `invalid_signature`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("no Stripe-Signature header")]
    MissingHeader,
    #[error("Stripe-Signature header has no valid timestamp")]
    NoTimestamp,
    #[error("Stripe-Signature header has no v1 signature")]
    NoV1Signature,
    #[error("no v1 signature matches a configured secret")]
    NoMatch,
    #[error("timestamp is older than the tolerance")]
    TooOld,
    #[error("timestamp is further in the future than the tolerance")]
    TooNew,
    #[error("no webhook secret is configured")]
    NoSecret,
    #[error("Stripe-Signature header is longer than {MAX_HEADER_BYTES} bytes")]
    HeaderTooLong,
    #[error("Stripe-Signature header carries more than {MAX_V1_CANDIDATES} v1 signatures")]
    TooManySignatures,
}

/// Why a correctly signed body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("body is not a JSON object")]
    NotAnObject,
    #[error("event has no string `id`")]
    MissingId,
    #[error("event has no string `type`")]
    MissingType,
}

/// Either refusal, in the order they are checked: signature first, then payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    #[error(transparent)]
    Signature(#[from] SignatureError),
    #[error(transparent)]
    Payload(#[from] PayloadError),
}

/// The configured signing secrets (several during a rotation) and the timestamp tolerance.
#[derive(Debug, Clone)]
pub struct Verifier {
    secrets: Vec<SecretString>,
    tolerance_secs: Option<u64>,
}

impl Verifier {
    /// `tolerance_secs = None` turns the timestamp check off (as the SDKs allow); production
    /// configuration always sets it.
    #[must_use]
    pub fn new(secrets: Vec<SecretString>, tolerance_secs: Option<u64>) -> Self {
        let secrets = secrets
            .into_iter()
            .filter(|s| !s.expose_secret().trim().is_empty())
            .collect();
        Self {
            secrets,
            tolerance_secs,
        }
    }

    /// Checks the signature only.
    ///
    /// # Errors
    /// A [`SignatureError`] naming the first reason the header fails.
    pub fn verify_signature(
        &self,
        header: Option<&str>,
        body: &[u8],
        now_unix: i64,
    ) -> Result<(), SignatureError> {
        if self.secrets.is_empty() {
            return Err(SignatureError::NoSecret);
        }
        let header = header.ok_or(SignatureError::MissingHeader)?;
        let parsed = ParsedHeader::parse(header)?;
        let timestamp = parsed.timestamp;
        // The window first: a stale or future header costs no MAC at all.
        if let Some(tolerance) = self.tolerance_secs {
            let tolerance = i64::try_from(tolerance).unwrap_or(i64::MAX);
            if now_unix.saturating_sub(timestamp) > tolerance {
                return Err(SignatureError::TooOld);
            }
            if timestamp.saturating_sub(now_unix) > tolerance {
                return Err(SignatureError::TooNew);
            }
        }
        let mut matched = false;
        for secret in &self.secrets {
            let expected = mac_for(secret.expose_secret(), timestamp, body)
                .finalize()
                .into_bytes();
            for candidate in &parsed.v1 {
                // Every pair is compared (no early exit) so timing says nothing about which matched.
                matched |= bool::from(candidate.ct_eq(expected.as_slice()));
            }
        }
        if matched {
            Ok(())
        } else {
            Err(SignatureError::NoMatch)
        }
    }

    /// Checks the signature, then that the body is an event envelope.
    ///
    /// # Errors
    /// [`WebhookError::Signature`] if the signature fails, [`WebhookError::Payload`] if the
    /// signed body is not a JSON object with string `id` and `type`.
    pub fn verify(
        &self,
        header: Option<&str>,
        body: Bytes,
        now_unix: i64,
    ) -> Result<VerifiedWebhook, WebhookError> {
        self.verify_signature(header, &body, now_unix)?;
        Ok(VerifiedWebhook::from_signed_body(body)?)
    }
}

fn mac_for(secret: &str, timestamp: i64, body: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    #[allow(clippy::expect_used)]
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// Computes the `v1` signature for `body` at `timestamp`, lower-case hex.
#[must_use]
pub fn compute_v1(secret: &str, timestamp: i64, body: &[u8]) -> String {
    hex::encode(mac_for(secret, timestamp, body).finalize().into_bytes())
}

/// Builds a complete `Stripe-Signature` header value, as Stripe (and the SDKs' test helpers) do.
#[must_use]
pub fn signature_header(secret: &str, timestamp: i64, body: &[u8]) -> String {
    format!("t={timestamp},v1={}", compute_v1(secret, timestamp, body))
}

#[derive(Debug)]
struct ParsedHeader {
    timestamp: i64,
    /// The decoded `v1` values that are exactly 64 hex characters; others can never match and
    /// are dropped (but still count towards [`MAX_V1_CANDIDATES`]).
    v1: Vec<[u8; 32]>,
}

impl ParsedHeader {
    fn parse(header: &str) -> Result<Self, SignatureError> {
        if header.len() > MAX_HEADER_BYTES {
            return Err(SignatureError::HeaderTooLong);
        }
        let mut timestamp = None;
        let mut v1 = Vec::new();
        let mut v1_items = 0usize;
        for item in header.split(',') {
            let Some((key, value)) = item.trim().split_once('=') else {
                continue;
            };
            match key {
                // The first `t` wins, as in the official SDKs.
                "t" if timestamp.is_none() => {
                    timestamp = Some(
                        value
                            .parse::<i64>()
                            .map_err(|_| SignatureError::NoTimestamp)?,
                    );
                }
                "v1" => {
                    v1_items += 1;
                    if v1_items > MAX_V1_CANDIDATES {
                        return Err(SignatureError::TooManySignatures);
                    }
                    let mut decoded = [0u8; 32];
                    if value.len() == V1_HEX_LEN
                        && hex::decode_to_slice(value, &mut decoded).is_ok()
                    {
                        v1.push(decoded);
                    }
                }
                // v0 (test mode) and any future scheme are ignored.
                _ => {}
            }
        }
        let timestamp = timestamp.ok_or(SignatureError::NoTimestamp)?;
        if v1_items == 0 {
            return Err(SignatureError::NoV1Signature);
        }
        Ok(Self { timestamp, v1 })
    }
}

/// A webhook body whose signature has been verified, with the envelope fields read from it.
/// The body is kept byte for byte: it is what gets published.
#[derive(Debug, Clone)]
pub struct VerifiedWebhook {
    body: Bytes,
    id: StripeEventId,
    event_type: String,
    created: Option<i64>,
}

/// Only the envelope fields; everything else (notably `data`) is skipped without building a tree.
#[derive(serde::Deserialize)]
struct Envelope<'a> {
    #[serde(borrow, default)]
    id: Option<JsonScalar<'a>>,
    #[serde(rename = "type", borrow, default)]
    event_type: Option<JsonScalar<'a>>,
    #[serde(borrow, default)]
    created: Option<JsonScalar<'a>>,
}

/// An envelope field: a string, an integer, or anything else (kept only as "something else").
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum JsonScalar<'a> {
    Str(std::borrow::Cow<'a, str>),
    Int(i64),
    Other(serde::de::IgnoredAny),
}

impl JsonScalar<'_> {
    fn as_str(&self) -> Option<&str> {
        match self {
            Self::Str(s) => Some(s),
            Self::Int(_) | Self::Other(_) => None,
        }
    }

    fn as_i64(&self) -> Option<i64> {
        match self {
            Self::Int(n) => Some(*n),
            Self::Str(_) | Self::Other(_) => None,
        }
    }
}

impl VerifiedWebhook {
    fn from_signed_body(body: Bytes) -> Result<Self, PayloadError> {
        // serde would also accept a JSON array for a struct; the contract wants an object.
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(PayloadError::NotAnObject);
        }
        let envelope: Envelope<'_> =
            serde_json::from_slice(&body).map_err(|_| PayloadError::NotAnObject)?;
        let id = envelope
            .id
            .as_ref()
            .and_then(JsonScalar::as_str)
            .and_then(|id| StripeEventId::parse(id).ok())
            .ok_or(PayloadError::MissingId)?;
        let event_type = envelope
            .event_type
            .as_ref()
            .and_then(JsonScalar::as_str)
            // The type becomes an AMQP short string (routing key and `type` property).
            .filter(|t| !t.is_empty() && t.len() <= 255 && t.bytes().all(|b| b.is_ascii_graphic()))
            .ok_or(PayloadError::MissingType)?
            .to_owned();
        let created = envelope.created.as_ref().and_then(JsonScalar::as_i64);
        Ok(Self {
            body,
            id,
            event_type,
            created,
        })
    }

    #[must_use]
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    #[must_use]
    pub fn id(&self) -> &StripeEventId {
        &self.id
    }

    #[must_use]
    pub fn event_type(&self) -> &str {
        &self.event_type
    }

    /// The event's `created` (unix seconds), when the body carries one.
    #[must_use]
    pub fn created(&self) -> Option<i64> {
        self.created
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SECRET: &str = "whsec_test_secret";
    const BODY: &[u8] = br#"{"id":"evt_test_webhook","object":"event"}"#;
    const T: i64 = 1_700_000_000;
    const VECTOR_SIG: &str = "d95c6b7477fbd7e9f90b1b0ef5f9c7ac25abca5382460e0d988c2b2a5b71b990";

    fn verifier(secrets: &[&str], tolerance: Option<u64>) -> Verifier {
        Verifier::new(
            secrets
                .iter()
                .map(|s| SecretString::from(s.to_string()))
                .collect(),
            tolerance,
        )
    }

    fn event_body(id: &str) -> Bytes {
        Bytes::from(format!(
            r#"{{"id":"{id}","object":"event","type":"checkout.session.completed","created":{T}}}"#
        ))
    }

    #[test]
    fn test_vector_matches_the_documented_signature() {
        assert_eq!(compute_v1(SECRET, T, BODY), VECTOR_SIG);
        let header = format!("t={T},v1={VECTOR_SIG}");
        assert_eq!(signature_header(SECRET, T, BODY), header);
        assert_eq!(
            verifier(&[SECRET], Some(300)).verify_signature(Some(&header), BODY, T),
            Ok(())
        );
    }

    #[test]
    fn valid_header_is_accepted() {
        let body = event_body("evt_1");
        let header = signature_header(SECRET, T, &body);
        let hook = verifier(&[SECRET], Some(300))
            .verify(Some(&header), body.clone(), T + 10)
            .unwrap();
        assert_eq!(hook.id().as_str(), "evt_1");
        assert_eq!(hook.event_type(), "checkout.session.completed");
        assert_eq!(hook.created(), Some(T));
        let odd = Bytes::from_static(br#"{"id":"evt_2","type":"x.y","created":"yesterday","data":{"object":[1,{"a":null}]}}"#);
        let header = signature_header(SECRET, T, &odd);
        let odd = verifier(&[SECRET], Some(300))
            .verify(Some(&header), odd, T)
            .unwrap();
        assert_eq!((odd.id().as_str(), odd.created()), ("evt_2", None));
        assert_eq!(hook.body(), &body);
    }

    #[test]
    fn a_valid_v1_among_bad_ones_is_accepted() {
        let header = format!("{},v1=bad_signature", signature_header(SECRET, T, BODY));
        assert_eq!(
            verifier(&[SECRET], Some(300)).verify_signature(Some(&header), BODY, T),
            Ok(())
        );
        let header = format!("t={T},v1=bad_signature,v1={VECTOR_SIG}");
        assert_eq!(
            verifier(&[SECRET], Some(300)).verify_signature(Some(&header), BODY, T),
            Ok(())
        );
    }

    #[test]
    fn unparsable_headers_are_rejected() {
        let v = verifier(&[SECRET], Some(300));
        assert_eq!(
            v.verify_signature(Some("bad_header"), BODY, T),
            Err(SignatureError::NoTimestamp)
        );
        assert_eq!(
            v.verify_signature(Some("this is not a signature header at all"), BODY, T),
            Err(SignatureError::NoTimestamp)
        );
    }

    #[test]
    fn only_a_v0_signature_is_rejected() {
        let v0 = compute_v1(SECRET, T, BODY);
        let header = format!("t={T},v0={v0}");
        assert_eq!(
            verifier(&[SECRET], Some(300)).verify_signature(Some(&header), BODY, T),
            Err(SignatureError::NoV1Signature)
        );
    }

    #[test]
    fn v0_next_to_a_valid_v1_is_ignored() {
        let header = format!(
            "t={T},v1={VECTOR_SIG},v0=6ffbb59b2300aae63f272406069a9788598b792a944a07aba816edb039989a39"
        );
        assert_eq!(
            verifier(&[SECRET], Some(300)).verify_signature(Some(&header), BODY, T),
            Ok(())
        );
    }

    #[test]
    fn wrong_signature_is_rejected() {
        let header = signature_header("whsec_other", T, BODY);
        assert_eq!(
            verifier(&[SECRET], Some(300)).verify_signature(Some(&header), BODY, T),
            Err(SignatureError::NoMatch)
        );
        // Right secret, tampered body.
        let header = signature_header(SECRET, T, BODY);
        assert_eq!(
            verifier(&[SECRET], Some(300)).verify_signature(Some(&header), b"{}", T),
            Err(SignatureError::NoMatch)
        );
    }

    #[test]
    fn webhook_with_stale_timestamp_is_rejected() {
        let header = signature_header(SECRET, T, BODY);
        assert_eq!(
            verifier(&[SECRET], Some(300)).verify_signature(Some(&header), BODY, T + 301),
            Err(SignatureError::TooOld)
        );
        assert_eq!(
            verifier(&[SECRET], Some(300)).verify_signature(Some(&header), BODY, T + 300),
            Ok(())
        );
    }

    #[test]
    fn old_timestamp_is_accepted_when_tolerance_is_off() {
        let header = signature_header(SECRET, T, BODY);
        assert_eq!(
            verifier(&[SECRET], None).verify_signature(Some(&header), BODY, T + 10 * 365 * 86_400),
            Ok(())
        );
    }

    #[test]
    fn future_timestamp_beyond_tolerance_is_rejected() {
        let header = signature_header(SECRET, T, BODY);
        assert_eq!(
            verifier(&[SECRET], Some(300)).verify_signature(Some(&header), BODY, T - 301),
            Err(SignatureError::TooNew)
        );
        assert_eq!(
            verifier(&[SECRET], Some(300)).verify_signature(Some(&header), BODY, T - 300),
            Ok(())
        );
    }

    #[test]
    fn empty_or_missing_header_is_rejected() {
        let v = verifier(&[SECRET], Some(300));
        assert_eq!(
            v.verify_signature(Some(""), BODY, T),
            Err(SignatureError::NoTimestamp)
        );
        assert_eq!(
            v.verify_signature(None, BODY, T),
            Err(SignatureError::MissingHeader)
        );
    }

    #[test]
    fn blank_secret_is_rejected() {
        let header = signature_header("", T, BODY);
        assert_eq!(
            verifier(&[""], Some(300)).verify_signature(Some(&header), BODY, T),
            Err(SignatureError::NoSecret)
        );
        assert_eq!(
            verifier(&[], Some(300)).verify_signature(Some(&header), BODY, T),
            Err(SignatureError::NoSecret)
        );
    }

    #[test]
    fn non_json_body_with_valid_signature_fails_at_parse_not_at_verify() {
        let body = Bytes::from_static(b"this is not json");
        let header = signature_header(SECRET, T, &body);
        let v = verifier(&[SECRET], Some(300));
        assert_eq!(v.verify_signature(Some(&header), &body, T), Ok(()));
        assert_eq!(
            v.verify(Some(&header), body, T).unwrap_err(),
            WebhookError::Payload(PayloadError::NotAnObject)
        );
    }

    #[test]
    fn signed_body_without_id_or_type_is_an_invalid_payload() {
        let v = verifier(&[SECRET], Some(300));
        for (body, expected) in [
            (r#"[1,2]"#, PayloadError::NotAnObject),
            (r#"{"type":"x"}"#, PayloadError::MissingId),
            (r#"{"id":7,"type":"x"}"#, PayloadError::MissingId),
            (r#"{"id":"evt_1"}"#, PayloadError::MissingType),
            (r#"{"id":"evt_1","type":null}"#, PayloadError::MissingType),
            (r#"{"id":"evt_1","type":"a b"}"#, PayloadError::MissingType),
            (
                r#"{"id":"evt_1","id":"evt_2","type":"x"}"#,
                PayloadError::NotAnObject,
            ),
        ] {
            let body = Bytes::from(body);
            let header = signature_header(SECRET, T, &body);
            assert_eq!(
                v.verify(Some(&header), body, T).unwrap_err(),
                WebhookError::Payload(expected)
            );
        }
    }

    #[test]
    fn non_numeric_timestamp_is_rejected() {
        let header = format!("t=abc,v1={VECTOR_SIG}");
        assert_eq!(
            verifier(&[SECRET], Some(300)).verify_signature(Some(&header), BODY, T),
            Err(SignatureError::NoTimestamp)
        );
    }

    #[test]
    fn old_and_new_secret_are_both_accepted_during_rotation() {
        let v = verifier(&["whsec_old", "whsec_new"], Some(300));
        for secret in ["whsec_old", "whsec_new"] {
            let header = signature_header(secret, T, BODY);
            assert_eq!(v.verify_signature(Some(&header), BODY, T), Ok(()));
        }
        // Stripe's own roll: one v1 per active secret in a single header.
        let header = format!(
            "t={T},v1={},v1={}",
            compute_v1("whsec_old", T, BODY),
            compute_v1("whsec_new", T, BODY)
        );
        assert_eq!(v.verify_signature(Some(&header), BODY, T), Ok(()));
        let retired = signature_header("whsec_retired", T, BODY);
        assert_eq!(
            v.verify_signature(Some(&retired), BODY, T),
            Err(SignatureError::NoMatch)
        );
    }

    #[test]
    fn an_overlong_header_is_refused_before_it_is_read() {
        let v = verifier(&[SECRET], Some(300));
        // The attack seen from outside: `t=<now>,` and 40,000 empty `v1=` items.
        let bomb = format!("t={T},{}", "v1=,".repeat(40_000));
        assert_eq!(
            v.verify_signature(Some(&bomb), BODY, T),
            Err(SignatureError::HeaderTooLong)
        );
        let padded = format!(
            "{},{}",
            signature_header(SECRET, T, BODY),
            "x".repeat(MAX_HEADER_BYTES)
        );
        assert_eq!(
            v.verify_signature(Some(&padded), BODY, T),
            Err(SignatureError::HeaderTooLong)
        );
    }

    #[test]
    fn more_v1_items_than_the_cap_are_refused_even_with_a_valid_one() {
        let v = verifier(&[SECRET], Some(300));
        let at_cap = format!(
            "t={T}{},v1={VECTOR_SIG}",
            ",v1=".repeat(MAX_V1_CANDIDATES - 1)
        );
        assert_eq!(v.verify_signature(Some(&at_cap), BODY, T), Ok(()));
        let over = format!("t={T}{},v1={VECTOR_SIG}", ",v1=".repeat(MAX_V1_CANDIDATES));
        assert_eq!(
            v.verify_signature(Some(&over), BODY, T),
            Err(SignatureError::TooManySignatures)
        );
    }

    #[test]
    fn only_candidates_of_exactly_64_hex_characters_can_match() {
        let v = verifier(&[SECRET], Some(300));
        for candidate in [
            format!("{VECTOR_SIG}00"),
            VECTOR_SIG[..62].to_owned(),
            VECTOR_SIG.to_uppercase().replace('D', "g"),
            String::new(),
        ] {
            let header = format!("t={T},v1={candidate}");
            assert_eq!(
                v.verify_signature(Some(&header), BODY, T),
                Err(SignatureError::NoMatch),
                "{candidate}"
            );
        }
        // Hex is case-insensitive, as hex decoding is for the SDKs.
        let upper = format!("t={T},v1={}", VECTOR_SIG.to_uppercase());
        assert_eq!(v.verify_signature(Some(&upper), BODY, T), Ok(()));
    }

    #[test]
    fn a_stale_header_is_refused_whatever_its_signatures() {
        let v = verifier(&[SECRET], Some(300));
        let header = format!("t={},v1={}", T - 1000, "0".repeat(64));
        assert_eq!(
            v.verify_signature(Some(&header), BODY, T),
            Err(SignatureError::TooOld)
        );
    }

    proptest! {
        #[test]
        fn arbitrary_headers_and_bodies_never_panic(header in ".*", body in proptest::collection::vec(any::<u8>(), 0..512), now in any::<i64>()) {
            let v = verifier(&[SECRET], Some(300));
            let _ = v.verify(Some(&header), Bytes::from(body), now);
        }

        #[test]
        fn header_shaped_strings_never_panic(t in any::<i64>(), sigs in proptest::collection::vec("[0-9a-f=,v ]{0,70}", 0..4), now in any::<i64>()) {
            let header = format!("t={t},{}", sigs.join(","));
            let v = verifier(&[SECRET], Some(300));
            let _ = v.verify_signature(Some(&header), BODY, now);
        }

        #[test]
        fn a_correct_signature_is_always_accepted_inside_the_window(body in proptest::collection::vec(any::<u8>(), 0..256), skew in -300i64..=300) {
            let header = signature_header(SECRET, T, &body);
            prop_assert_eq!(verifier(&[SECRET], Some(300)).verify_signature(Some(&header), &body, T + skew), Ok(()));
        }
    }
}
