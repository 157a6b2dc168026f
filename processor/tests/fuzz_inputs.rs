//! Fuzzing of the processor's outside input: event bodies (from the queue and from Stripe's
//! API), bearer tokens, the catalog file and `dlq replay --from-file` lines. Whatever arrives,
//! each parser answers with a value or its own named error, never a panic.
//!
//! Runs with proptest's default 256 cases in the normal suite; `scripts/fuzz.sh N` sets
//! `PROPTEST_CASES` for millions. The replay lines go through the command itself (its line
//! parser is private to `dlq`), which costs a file and a command run per case, so that property
//! runs a hundredth of the cases.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write as _;
use std::process::ExitCode;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use processor::auth::{AuthConfig, Authenticator};
use processor::catalog::Catalog;
use proptest::prelude::*;
use secrecy::SecretString;
use serde_json::{Value, json};

const JWT_SECRET: &str = "fuzz-secret-of-at-least-thirty-two-bytes";

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "\\PC{0,24}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map("\\PC{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A field the projection reads, with a value of any type: reaches the typed parsers deep in
/// the event instead of stopping at the envelope.
fn event_object() -> impl Strategy<Value = Value> {
    const FIELDS: &[&str] = &[
        "id",
        "object",
        "customer",
        "payment_status",
        "status",
        "mode",
        "amount",
        "amount_total",
        "amount_refunded",
        "refunded",
        "currency",
        "payment_intent",
        "subscription",
        "charge",
        "client_reference_id",
        "metadata",
        "created",
        "current_period_end",
        "items",
        "parent",
        "lines",
        "cancel_at_period_end",
        "ended_at",
        "dispute",
        "disputed",
        "after_expiration",
    ];
    proptest::collection::vec((proptest::sample::select(FIELDS), json_value()), 0..10).prop_map(
        |pairs| Value::Object(pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()),
    )
}

fn event_type() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => proptest::sample::select(&processor::domain::events::HANDLED_TYPES[..]).prop_map(Value::from),
        1 => json_value(),
    ]
}

fn jwt_authenticator() -> Authenticator {
    Authenticator::new(&AuthConfig {
        jwt_secret: SecretString::from(JWT_SECRET),
        issuer: Some("https://auth.fuzz".into()),
        audience: Some("entitlements".into()),
        admin_token: Some(SecretString::from("fuzz-admin")),
        ..AuthConfig::with_secret(SecretString::from(JWT_SECRET))
    })
}

fn b64(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(value.to_string())
}

proptest! {
    #[test]
    fn fuzz_event_bodies_of_arbitrary_bytes(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Err(error) = processor::domain::events::parse(&body) {
            prop_assert!(!error.to_string().is_empty());
        }
    }

    #[test]
    fn fuzz_event_bodies_shaped_like_stripe_events(
        id in prop_oneof![3 => "evt_[a-zA-Z0-9]{1,24}".prop_map(Value::from), 1 => json_value()],
        ty in event_type(),
        created in prop_oneof![any::<i64>().prop_map(Value::from), json_value()],
        object in event_object(),
        previous in json_value(),
    ) {
        let body = json!({"id": id, "object": "event", "type": ty, "created": created,
            "data": {"object": object, "previous_attributes": previous}});
        if let Err(error) = processor::domain::events::parse(body.to_string().as_bytes()) {
            prop_assert!(!error.to_string().is_empty());
        }
    }

    #[test]
    fn fuzz_jwt_of_arbitrary_text(token in "\\PC{0,300}", header in proptest::collection::vec(any::<u8>(), 0..300)) {
        let auth = jwt_authenticator();
        if let Err(error) = auth.verify(&token) {
            prop_assert!(!error.to_string().is_empty());
        }
        let header = String::from_utf8_lossy(&header);
        prop_assert!(auth.verify_header(Some(&header)).is_err());
        prop_assert!(auth.verify_admin_header(Some(&header)).is_err());
    }

    #[test]
    fn fuzz_jwt_shaped_tokens(
        alg in prop_oneof![Just(json!("HS256")), Just(json!("none")), Just(json!("RS256")), json_value()],
        extra_header in json_value(),
        claims in proptest::collection::btree_map(
            proptest::sample::select(&["sub", "exp", "nbf", "iat", "iss", "aud", "jti"][..]), json_value(), 0..7),
        signature in "[A-Za-z0-9_-]{0,90}",
    ) {
        let header = json!({"alg": alg, "typ": "JWT", "x": extra_header});
        let claims = Value::Object(claims.into_iter().map(|(k, v)| (k.to_owned(), v)).collect());
        let token = format!("{}.{}.{signature}", b64(&header), b64(&claims));
        // Without the key nothing forged verifies; every refusal has a reason.
        let result = jwt_authenticator().verify(&token);
        prop_assert!(result.is_err(), "{token}");
        prop_assert!(!result.unwrap_err().to_string().is_empty());
    }

    #[test]
    fn fuzz_catalog_file_of_arbitrary_text(text in "\\PC{0,400}", pro in proptest::option::of("\\PC{0,30}")) {
        if let Err(error) = Catalog::from_sources(pro.as_deref(), Some(("catalog.toml", &text))) {
            prop_assert!(error.var == "CATALOG_FILE" || error.var == "STRIPE_PRICE_PRO_LIFETIME", "{error}");
            prop_assert!(!error.reason.is_empty());
        }
    }

    #[test]
    fn fuzz_catalog_file_shaped_like_a_catalog(
        products in proptest::collection::vec(
            ("[a-z\\-_.\" ]{0,10}", "\\PC{0,20}", "[a-z]{0,14}", "\\PC{0,20}"), 0..5),
        pro in proptest::option::of("price_[a-z]{0,6}"),
    ) {
        let text: String = products
            .iter()
            .map(|(key, price, mode, entitlement)| {
                format!("[products.{key:?}]\nprice = {price:?}\nmode = {mode:?}\nentitlement = {entitlement:?}\n")
            })
            .collect();
        match Catalog::from_sources(pro.as_deref(), Some(("catalog.toml", &text))) {
            Ok(catalog) => prop_assert!(catalog.products().all(|p| p.price_id.as_deref().is_some_and(|id| !id.is_empty()))),
            Err(error) => prop_assert!(!error.reason.is_empty(), "{error}"),
        }
    }
}

/// A line of an export file: free text, or a record with fields of any shape.
fn replay_line() -> impl Strategy<Value = String> {
    let record = (
        proptest::option::of(json_value()),
        proptest::option::of(json_value()),
        json_value(),
        prop_oneof![
            "[A-Za-z0-9+/=]{0,40}".prop_map(Value::from),
            any::<Vec<u8>>().prop_map(|b| Value::from(STANDARD.encode(b))),
            json_value()
        ],
    )
        .prop_map(|(event_id, properties, headers, body)| {
            let mut record =
                json!({"eventId": event_id, "type": "x.y", "headers": headers, "bodyBase64": body});
            if let Some(properties) = properties {
                record["properties"] = properties;
            }
            record.to_string()
        });
    prop_oneof![2 => record, 1 => "\\PC{0,120}"]
}

fn replay_cases() -> u32 {
    let cases: u32 = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(256);
    (cases / 100).max(16)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(replay_cases()))]

    #[test]
    fn fuzz_dlq_replay_from_file_lines(lines in proptest::collection::vec(replay_line(), 0..6)) {
        let mut file = tempfile_in_target();
        file.1.write_all(lines.join("\n").as_bytes()).unwrap();
        let path = file.0.to_str().unwrap().to_owned();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let code = runtime.block_on(processor::cli::main_with_args([
            "processor", "dlq", "replay", "--from-file", &path, "--dry-run",
        ]));
        let _ = std::fs::remove_file(&file.0);
        // 0: every line is a record (dry run, nothing published); 2: a line is refused, by number.
        prop_assert!(code == ExitCode::SUCCESS || code == ExitCode::from(2), "{code:?} for {lines:?}");
    }
}

/// A fresh file under the target directory (tests may not write elsewhere).
fn tempfile_in_target() -> (std::path::PathBuf, std::fs::File) {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let path = dir.join(format!(
        "fuzz-replay-{}.jsonl",
        uuid::Uuid::new_v4().simple()
    ));
    let file = std::fs::File::create(&path).unwrap();
    (path, file)
}
