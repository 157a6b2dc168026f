//! Secure by default: `ingress` and `processor` refuse to start (exit 2, naming the variable)
//! with what `.env.example` ships, a placeholder, or a value too short or too uniform to be a
//! key, as a new operator's `cp .env.example .env` would give them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

/// The value `.env.example` gives `var`.
fn shipped(var: &str) -> String {
    let example = include_str!("../.env.example");
    example
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{var}=")))
        .unwrap_or_else(|| panic!("{var} is in .env.example"))
        .to_owned()
}

/// Runs `binary args` with only `env` (and no `.env` to read), expecting exit 2 naming `var`.
fn refused(binary: &str, args: &[&str], env: &[(&str, &str)], var: &str) {
    let out = Command::new(system_tests::binary(binary))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .env("API_ADDR", "127.0.0.1:0")
        .env("INGRESS_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .current_dir(std::env::temp_dir())
        .output()
        .expect("run the binary");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{binary} {args:?} with {env:?}: {stderr}"
    );
    assert!(stderr.contains(var), "{binary} names {var}: {stderr}");
    for (_, value) in env {
        if value.len() > 8 {
            assert!(
                !stderr.contains(value),
                "the value is never echoed: {stderr}"
            );
        }
    }
}

const JWT: &str = "9b2e7d41c08f6a35e19d4b7026fc83a15d6e0b9f42c7a8e3";

#[test]
fn the_shipped_placeholders_are_refused_at_start_up() {
    let webhook = shipped("STRIPE_WEBHOOK_SECRET");
    refused(
        "ingress",
        &[],
        &[("STRIPE_WEBHOOK_SECRET", &webhook)],
        "STRIPE_WEBHOOK_SECRET",
    );
    let jwt = shipped("AUTH_JWT_SECRET");
    let admin = shipped("ADMIN_API_TOKEN");
    for sub in ["run", "api"] {
        refused(
            "processor",
            &[sub],
            &[("AUTH_JWT_SECRET", &jwt)],
            "AUTH_JWT_SECRET",
        );
        refused(
            "processor",
            &[sub],
            &[("AUTH_JWT_SECRET", JWT), ("ADMIN_API_TOKEN", &admin)],
            "ADMIN_API_TOKEN",
        );
    }
    refused(
        "processor",
        &["dev-token", "--user", "u_1"],
        &[("AUTH_JWT_SECRET", &jwt)],
        "AUTH_JWT_SECRET",
    );
}

#[test]
fn secrets_too_weak_to_be_keys_are_refused_at_start_up() {
    for webhook in [
        "whsec_test_secret",
        "whsec_dev",
        "not-a-whsec-0123456789abcdefghijklmnopqrstuvwxyz",
        // Two secrets during a rotation: each is checked.
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw,whsec_old",
    ] {
        refused(
            "ingress",
            &[],
            &[("STRIPE_WEBHOOK_SECRET", webhook)],
            "STRIPE_WEBHOOK_SECRET",
        );
    }
    for (var, value) in [
        (
            "AUTH_JWT_SECRET",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        ),
        (
            "AUTH_JWT_SECRET",
            "abababababababababababababababababababab",
        ),
        ("ADMIN_API_TOKEN", "admin-token"),
    ] {
        let jwt = if var == "AUTH_JWT_SECRET" { value } else { JWT };
        let mut env = vec![("AUTH_JWT_SECRET", jwt)];
        if var == "ADMIN_API_TOKEN" {
            env.push((var, value));
        }
        refused("processor", &["api"], &env, var);
    }
}
