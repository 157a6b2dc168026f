//! Refusing what is not a secret: a binary configured with a value the repository ships (in
//! `.env.example`), a placeholder, or a string too short or too uniform to be a key, stops at
//! start-up naming the variable, instead of serving with a key anyone who read the repository
//! knows.
//!
//! Invariant: a value passes only if it is none of the shipped ones, matches no placeholder
//! pattern, and has at least [`MIN_BITS`] bits of apparent entropy (its length times the bits of
//! the character classes it draws from), with no more repetition than a random key shows (at
//! least [`MIN_BITS_PER_CHAR`] bits per character by its own character frequencies). A Stripe
//! webhook secret is also held to the shape Stripe issues: `whsec_` and a base-62 key.

use crate::config::ConfigError;

/// The least apparent entropy of a secret, in bits.
pub const MIN_BITS: f64 = 128.0;

/// The least entropy per character, by the value's own character frequencies: a key drawn at
/// random from hex digits shows about 3.7; `abab…` shows 1.
pub const MIN_BITS_PER_CHAR: f64 = 3.0;

/// The example configuration, whose secret values are placeholders by definition.
const EXAMPLE_ENV: &str = include_str!("../../.env.example");

/// Fragments no real key contains (case-insensitive).
const PLACEHOLDERS: [&str; 12] = [
    "replace_me",
    "replaceme",
    "change_me",
    "changeme",
    "placeholder",
    "example",
    "your_",
    "your-",
    "xxxx",
    "<",
    ">",
    "insert",
];

/// The values `.env.example` ships for variables named `*SECRET*`, `*TOKEN*` or `*PASSWORD*`.
fn shipped() -> impl Iterator<Item = &'static str> {
    EXAMPLE_ENV.lines().filter_map(|line| {
        let (name, value) = line.split_once('=')?;
        let secret = ["SECRET", "TOKEN", "PASSWORD"]
            .iter()
            .any(|w| name.contains(w));
        (secret && !name.starts_with('#') && !value.trim().is_empty()).then_some(value.trim())
    })
}

/// Bits of apparent entropy: length × log2 of the character classes drawn from.
fn apparent_bits(value: &str) -> f64 {
    let has = |f: fn(&char) -> bool| value.chars().any(|c| f(&c));
    let alphabet = [
        (has(char::is_ascii_lowercase), 26.0),
        (has(char::is_ascii_uppercase), 26.0),
        (has(char::is_ascii_digit), 10.0),
        (has(|c| !c.is_ascii_alphanumeric()), 33.0),
    ]
    .iter()
    .filter(|(present, _)| *present)
    .map(|(_, size)| size)
    .sum::<f64>();
    if alphabet == 0.0 {
        return 0.0;
    }
    value.chars().count() as f64 * f64::log2(alphabet)
}

/// Bits per character by the value's own character frequencies (Shannon).
fn bits_per_char(value: &str) -> f64 {
    let mut counts = std::collections::BTreeMap::new();
    for c in value.chars() {
        *counts.entry(c).or_insert(0usize) += 1;
    }
    let n = value.chars().count() as f64;
    counts
        .values()
        .map(|&k| {
            let p = k as f64 / n;
            -p * p.log2()
        })
        .sum()
}

/// Checks `value` as the secret of `var`.
///
/// # Errors
/// A [`ConfigError`] naming `var` and saying why: a shipped value, a placeholder, too short or
/// too uniform. The value itself is never in the message.
pub fn check(var: &str, value: &str) -> Result<(), ConfigError> {
    let refuse = |why: &str| {
        Err(ConfigError::new(
            var,
            format!("{why}; generate one (e.g. `openssl rand -hex 32`)"),
        ))
    };
    if shipped().any(|s| s == value) {
        return refuse("is the placeholder .env.example ships, not a secret");
    }
    let lower = value.to_ascii_lowercase();
    if PLACEHOLDERS.iter().any(|p| lower.contains(p)) {
        return refuse("looks like a placeholder, not a secret");
    }
    if apparent_bits(value) < MIN_BITS || bits_per_char(value) < MIN_BITS_PER_CHAR {
        return refuse(&format!(
            "is too short or too uniform to be a key (under {MIN_BITS} bits of apparent entropy)"
        ));
    }
    Ok(())
}

/// Checks `value` as a Stripe webhook signing secret: `whsec_` and a key as Stripe issues it
/// (base 62, at least 128 bits of apparent entropy), then as any secret.
///
/// # Errors
/// A [`ConfigError`] naming `var`.
pub fn check_webhook_secret(var: &str, value: &str) -> Result<(), ConfigError> {
    let Some(key) = value.strip_prefix("whsec_") else {
        return Err(ConfigError::new(
            var,
            "must start with whsec_ (the endpoint's signing secret from the Dashboard or `stripe listen`)",
        ));
    };
    if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(ConfigError::new(
            var,
            "is not a signing secret as Stripe issues them (whsec_ and letters and digits)",
        ));
    }
    check(var, value)?;
    check(var, key)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_values_and_placeholders_are_refused_naming_the_variable() {
        let shipped: Vec<&str> = shipped().collect();
        assert!(shipped.contains(&"whsec_replace_me"), "{shipped:?}");
        assert!(shipped.contains(&"replace_me_with_at_least_32_random_bytes"));
        for value in shipped.iter().copied().chain([
            "CHANGEME-0123456789abcdefghijklmnopqrstuvwxyz",
            "<your-32-byte-key-goes-here-please-ok>",
        ]) {
            let err = check("AUTH_JWT_SECRET", value).unwrap_err();
            assert_eq!(err.var, "AUTH_JWT_SECRET");
            assert!(
                !err.to_string().contains(value),
                "the value is never echoed"
            );
        }
    }

    #[test]
    fn short_or_uniform_values_are_refused_and_random_keys_pass() {
        for weak in [
            "admin-token-for-tests",
            "0123456789abcdef",
            &"ab".repeat(40),
            &"a".repeat(100),
            "Password1!",
        ] {
            assert!(check("ADMIN_API_TOKEN", weak).is_err(), "{weak}");
        }
        for strong in [
            // 16 random bytes in hex, 24 in base64url, 32 in hex.
            "4f1c9a7e02b85d3c6e91a0f47b2d8c53",
            "q7Zr_2kX9mB-4tYw1LpN8sVd0cHe6JuA",
            "9b2e7d41c08f6a35e19d4b7026fc83a15d6e0b9f42c7a8e3d1f05b6c29a47e80",
        ] {
            assert!(check("ADMIN_API_TOKEN", strong).is_ok(), "{strong}");
        }
    }

    #[test]
    fn webhook_secrets_are_held_to_the_shape_stripe_issues() {
        for good in [
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            // As `stripe listen` prints them.
            "whsec_9b2e7d41c08f6a35e19d4b7026fc83a15d6e0b9f42c7a8e3d1f05b6c29a47e80",
        ] {
            assert!(
                check_webhook_secret("STRIPE_WEBHOOK_SECRET", good).is_ok(),
                "{good}"
            );
        }
        for bad in [
            "whsec_replace_me",
            "whsec_test_secret",
            "whsec_",
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "whsec_MfKQ9r8GKYqr-TwjUPD8ILPZIo2LaLaSw",
            "whsec_abcabcabcabcabcabcabcabcabcabcab",
        ] {
            let err = check_webhook_secret("STRIPE_WEBHOOK_SECRET", bad).unwrap_err();
            assert_eq!(err.var, "STRIPE_WEBHOOK_SECRET", "{bad}");
        }
    }
}
