//! The `processor` binary's command line: help on every level, exit codes, and `migrate`
//! creating and migrating a database (idempotently).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

fn processor(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_processor"));
    command
        .args(args)
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "warn");
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().expect("run the processor binary")
}

fn server() -> String {
    std::env::var("TEST_DATABASE_SERVER")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

#[test]
fn help_works_on_every_level() {
    let top = processor(&["--help"], &[]);
    assert_eq!(top.status.code(), Some(0));
    let text = String::from_utf8_lossy(&top.stdout);
    for sub in ["run", "worker", "api", "migrate", "outbox", "dev-token"] {
        assert!(text.contains(sub), "{sub} missing from:\n{text}");
    }
    for sub in [
        &["outbox", "list", "--help"][..],
        &["outbox", "replay", "--help"],
    ] {
        assert_eq!(processor(sub, &[]).status.code(), Some(0), "{sub:?}");
    }
    for sub in ["run", "worker", "api", "migrate"] {
        let out = processor(&[sub, "--help"], &[]);
        assert_eq!(out.status.code(), Some(0), "{sub} --help");
    }
}

#[test]
fn dev_token_prints_a_token_signed_with_the_configured_secret_and_claims() {
    let secret = "a-local-secret-of-at-least-32-bytes";
    let out = processor(
        &["dev-token", "--user", "u_1", "--ttl", "10m"],
        &[("AUTH_JWT_SECRET", secret), ("AUTH_JWT_AUDIENCE", "app")],
    );
    assert_eq!(out.status.code(), Some(0));
    let token = String::from_utf8(out.stdout).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.set_audience(&["app"]);
    let claims = jsonwebtoken::decode::<serde_json::Value>(
        token.trim(),
        &jsonwebtoken::DecodingKey::from_secret(secret.as_bytes()),
        &validation,
    )
    .expect("a valid HS256 token")
    .claims;
    assert_eq!(claims["sub"], "u_1");
    let ttl = claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap();
    assert_eq!(ttl, 600);

    let out = Command::new(env!("CARGO_BIN_EXE_processor"))
        .args(["dev-token", "--user", "u_1"])
        .env_remove("AUTH_JWT_SECRET")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("AUTH_JWT_SECRET"));
}

#[test]
fn usage_errors_exit_with_code_2() {
    let out = processor(&["frobnicate"], &[]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn configuration_errors_exit_with_code_2_and_name_the_variable() {
    let out = processor(&["migrate"], &[("PROCESSOR_PREFETCH", "zero")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("PROCESSOR_PREFETCH"));
    let out = processor(&["migrate"], &[("RETRY_DELAYS", "5s,later")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("RETRY_DELAYS"));
}

#[test]
fn migrate_creates_the_database_and_is_idempotent() {
    let name = format!("t_cli_{}", uuid::Uuid::new_v4().simple());
    let url = format!("{}/{name}", server());
    for _ in 0..2 {
        let out = processor(&["migrate"], &[("DATABASE_URL", url.as_str())]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("the database exists");
        tokio::spawn(connection);
        let rows: i64 = client
            .query_one("SELECT count(*) FROM schema_migrations", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(rows, processor::db::MIGRATIONS.len() as i64);
        drop(client);
        let (admin, connection) =
            tokio_postgres::connect(&format!("{}/postgres", server()), tokio_postgres::NoTls)
                .await
                .unwrap();
        tokio::spawn(connection);
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await
            .unwrap();
    });
}

#[test]
fn an_unreachable_database_is_a_runtime_failure() {
    let out = processor(
        &["migrate"],
        &[("DATABASE_URL", "postgres://postgres@127.0.0.1:1/nothing")],
    );
    assert_eq!(out.status.code(), Some(1));
}
