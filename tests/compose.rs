//! `docker-compose.yml` has no secret of its own: every secret is a `${VAR:?message}`
//! interpolation, so `docker compose up` stops with the message instead of starting with a value
//! everyone can read in this repository.
#![allow(clippy::unwrap_used, clippy::expect_used)]

const SECRETS: [&str; 5] = [
    "STRIPE_WEBHOOK_SECRET",
    "AUTH_JWT_SECRET",
    "ADMIN_API_TOKEN",
    "POSTGRES_PASSWORD",
    "RABBITMQ_PASSWORD",
];

fn compose() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docker-compose.yml")).unwrap()
}

/// Every `${…}` interpolation of the file, without its braces.
fn interpolations(text: &str) -> Vec<&str> {
    text.split("${")
        .skip(1)
        .map(|rest| rest.split_once('}').expect("closed interpolation").0)
        .collect()
}

#[test]
fn compose_refuses_to_start_without_real_secrets() {
    let text = compose();
    let found = interpolations(&text);
    for secret in SECRETS {
        let uses: Vec<&&str> = found
            .iter()
            .filter(|i| i.split([':', '-', '?']).next() == Some(secret))
            .collect();
        assert!(
            !uses.is_empty(),
            "{secret} is not taken from the environment"
        );
        for interpolation in uses {
            let (_, message) = interpolation
                .split_once(":?")
                .unwrap_or_else(|| panic!("${{{interpolation}}} does not require a value"));
            assert!(!message.trim().is_empty(), "{secret} needs a message");
        }
    }
    // No fallback of any kind (`:-`, `-`) is left for any variable.
    for interpolation in found {
        let name_end = interpolation
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(interpolation.len());
        assert!(
            !interpolation[name_end..].starts_with(":-")
                && !interpolation[name_end..].starts_with('-'),
            "${{{interpolation}}} falls back to a default"
        );
    }
    for known in [
        "guest:guest",
        "postgres:postgres@",
        "whsec_dev",
        "dev_compose",
    ] {
        assert!(!text.contains(known), "{known} is still in the file");
    }
}

#[test]
fn the_example_env_lists_every_secret_compose_requires() {
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.env.example")).unwrap();
    for secret in SECRETS {
        assert!(
            example
                .lines()
                .any(|l| l.starts_with(&format!("{secret}="))),
            "{secret} missing from .env.example"
        );
    }
}
