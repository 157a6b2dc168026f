//! The API's configuration at the command line: `run` and `api` refuse to start without
//! `AUTH_JWT_SECRET` (exit 2, naming it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

#[test]
fn run_and_api_without_a_jwt_secret_exit_2_naming_it() {
    for sub in ["run", "api"] {
        let out = Command::new(env!("CARGO_BIN_EXE_processor"))
            .arg(sub)
            // No `.env` above the temporary directory can supply the secret.
            .current_dir(std::env::temp_dir())
            .env_remove("AUTH_JWT_SECRET")
            .env("API_ADDR", "127.0.0.1:0")
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "warn")
            .output()
            .expect("run the processor binary");
        assert_eq!(out.status.code(), Some(2), "{sub}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("AUTH_JWT_SECRET"), "{sub}: {stderr}");
    }
}

#[test]
fn a_short_jwt_secret_is_a_configuration_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_processor"))
        .arg("api")
        .current_dir(std::env::temp_dir())
        .env("AUTH_JWT_SECRET", "short")
        .env("API_ADDR", "127.0.0.1:0")
        .output()
        .expect("run the processor binary");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("AUTH_JWT_SECRET"));
}
