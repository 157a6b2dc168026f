//! Fuzzing of ingress' outside input: the `Stripe-Signature` header and the webhook envelope.
//! Whatever arrives, verification ends in `Ok` or in one of the named refusals, never a panic,
//! and a header the verifier refuses unread (too long, too many `v1`) is refused whatever else
//! it holds.
//!
//! Runs with proptest's default 256 cases in the normal suite; `scripts/fuzz.sh N` sets
//! `PROPTEST_CASES` for millions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use proptest::prelude::*;
use secrecy::SecretString;
use shared::signature::{
    MAX_HEADER_BYTES, MAX_V1_CANDIDATES, SignatureError, Verifier, WebhookError, compute_v1,
    signature_header,
};

const SECRETS: [&str; 2] = ["whsec_fuzz_old", "whsec_fuzz_new"];
const NOW: i64 = 1_700_000_000;

fn verifier() -> Verifier {
    Verifier::new(
        SECRETS
            .iter()
            .map(|s| SecretString::from((*s).to_owned()))
            .collect(),
        Some(300),
    )
}

/// One `key=value` item of a header, biased towards what the parser distinguishes.
fn item() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|t| format!("t={t}")),
        (NOW - 400..NOW + 400).prop_map(|t| format!("t={t}")),
        "[0-9a-fA-F]{0,70}".prop_map(|v| format!("v1={v}")),
        "[0-9a-f]{64}".prop_map(|v| format!("v1={v}")),
        "[0-9a-f]{64}".prop_map(|v| format!("v0={v}")),
        "[a-z0-9]{0,4}=[^,]{0,20}",
        "[ =,\t]{0,4}",
        "\\PC{0,30}",
    ]
}

fn shaped_header() -> impl Strategy<Value = String> {
    proptest::collection::vec(item(), 0..(MAX_V1_CANDIDATES * 2)).prop_map(|items| items.join(","))
}

/// Every refusal is a named reason with a readable text.
fn assert_clear(result: &Result<(), SignatureError>) {
    if let Err(reason) = result {
        assert!(!reason.to_string().is_empty());
    }
}

proptest! {
    #[test]
    fn fuzz_signature_header_of_arbitrary_bytes(
        header in proptest::collection::vec(any::<u8>(), 0..(MAX_HEADER_BYTES + 64)),
        body in proptest::collection::vec(any::<u8>(), 0..256),
        now in any::<i64>(),
    ) {
        let header = String::from_utf8_lossy(&header);
        let result = verifier().verify_signature(Some(&header), &body, now);
        assert_clear(&result);
        prop_assert!(result.is_err(), "random bytes never carry a valid signature");
    }

    #[test]
    fn fuzz_signature_header_shaped(
        header in shaped_header(),
        body in proptest::collection::vec(any::<u8>(), 0..256),
        skew in -400i64..400,
    ) {
        let result = verifier().verify_signature(Some(&header), &body, NOW + skew);
        assert_clear(&result);
        let v1_items = header.split(',').filter(|i| i.trim().starts_with("v1=")).count();
        if v1_items > MAX_V1_CANDIDATES {
            prop_assert_eq!(result, Err(SignatureError::TooManySignatures));
        }
    }

    #[test]
    fn fuzz_signature_a_valid_v1_among_fuzzed_items_is_found_within_the_caps(
        noise in proptest::collection::vec(item(), 0..4),
        secret in 0usize..2,
        body in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        // `t` first (the first `t` wins), then noise without timestamps, then the signature.
        let noise: Vec<String> = noise.into_iter().filter(|i| !i.trim_start().starts_with("t=")).collect();
        let header = format!("t={NOW},{},v1={}", noise.join(","), compute_v1(SECRETS[secret], NOW, &body));
        let v1_items = header.split(',').filter(|i| i.trim().starts_with("v1=")).count();
        let result = verifier().verify_signature(Some(&header), &body, NOW);
        if v1_items <= MAX_V1_CANDIDATES {
            prop_assert_eq!(result, Ok(()));
        } else {
            prop_assert_eq!(result, Err(SignatureError::TooManySignatures));
        }
    }

    #[test]
    fn fuzz_webhook_envelope_of_arbitrary_signed_bytes(
        body in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let header = signature_header(SECRETS[0], NOW, &body);
        match verifier().verify(Some(&header), Bytes::from(body), NOW) {
            Ok(hook) => prop_assert!(!hook.id().as_str().is_empty() && !hook.event_type().is_empty()),
            Err(WebhookError::Payload(reason)) => prop_assert!(!reason.to_string().is_empty()),
            Err(other) => prop_assert!(false, "a correct signature was refused: {other}"),
        }
    }

    #[test]
    fn fuzz_webhook_envelope_json_shaped(
        id in prop_oneof![Just(serde_json::json!("evt_1")), any::<i64>().prop_map(serde_json::Value::from), "\\PC{0,300}".prop_map(serde_json::Value::from), Just(serde_json::Value::Null)],
        ty in prop_oneof![Just(serde_json::json!("checkout.session.completed")), "\\PC{0,300}".prop_map(serde_json::Value::from), any::<bool>().prop_map(serde_json::Value::from)],
        created in prop_oneof![any::<i64>().prop_map(serde_json::Value::from), any::<f64>().prop_map(serde_json::Value::from), "\\PC{0,10}".prop_map(serde_json::Value::from)],
        extra in "\\PC{0,40}",
    ) {
        let body = serde_json::json!({"id": id, "type": ty, "created": created, "data": {"object": extra}}).to_string();
        let header = signature_header(SECRETS[1], NOW, body.as_bytes());
        match verifier().verify(Some(&header), Bytes::from(body), NOW) {
            Ok(hook) => {
                prop_assert!(hook.event_type().len() <= 255);
                prop_assert!(hook.event_type().bytes().all(|b| b.is_ascii_graphic()));
            }
            Err(WebhookError::Payload(_)) => {}
            Err(other) => prop_assert!(false, "a correct signature was refused: {other}"),
        }
    }
}
