//! Typed reading of environment variables, shared by both binaries' config structs.
//!
//! Invariant: this is the only place that reads the process environment. Every failure names
//! the variable, so a misconfigured deployment fails fast at start-up with exit code 2.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use secrecy::SecretString;

/// A configuration variable that is missing or unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("configuration error in {var}: {reason}")]
pub struct ConfigError {
    pub var: String,
    pub reason: String,
}

impl ConfigError {
    #[must_use]
    pub fn new(var: &str, reason: impl Into<String>) -> Self {
        Self {
            var: var.to_owned(),
            reason: reason.into(),
        }
    }
}

/// A snapshot of the variables a config struct reads. Built from the process environment
/// (after loading `.env` if present), or from a map in tests.
#[derive(Debug, Clone, Default)]
pub struct Env {
    vars: HashMap<String, String>,
}

impl Env {
    /// Loads `.env` from the working directory if it exists (real environment variables win),
    /// then snapshots the environment.
    #[must_use]
    pub fn load() -> Self {
        let _ = dotenvy::dotenv();
        Self {
            vars: std::env::vars().collect(),
        }
    }

    #[must_use]
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self {
            vars: pairs
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        }
    }

    /// The value of `var`, treating an empty or blank value as unset.
    #[must_use]
    pub fn get(&self, var: &str) -> Option<&str> {
        self.vars
            .get(var)
            .map(String::as_str)
            .filter(|v| !v.trim().is_empty())
    }

    #[must_use]
    pub fn string_or(&self, var: &str, default: &str) -> String {
        self.get(var).unwrap_or(default).to_owned()
    }

    /// # Errors
    /// When the variable is unset or blank.
    pub fn required(&self, var: &str) -> Result<&str, ConfigError> {
        self.get(var)
            .ok_or_else(|| ConfigError::new(var, "is required but not set"))
    }

    #[must_use]
    pub fn secret(&self, var: &str) -> Option<SecretString> {
        self.get(var).map(|v| SecretString::from(v.to_owned()))
    }

    /// # Errors
    /// When the variable is set but does not parse as `T`.
    pub fn parse_or<T: FromStr>(&self, var: &str, default: T) -> Result<T, ConfigError>
    where
        T::Err: std::fmt::Display,
    {
        match self.get(var) {
            None => Ok(default),
            Some(raw) => raw
                .trim()
                .parse()
                .map_err(|e| ConfigError::new(var, format!("cannot parse {raw:?}: {e}"))),
        }
    }

    /// # Errors
    /// When the variable is set but is not a duration such as `30s`, `2m`, `1h`, `7d`.
    pub fn duration_or(&self, var: &str, default: Duration) -> Result<Duration, ConfigError> {
        match self.get(var) {
            None => Ok(default),
            Some(raw) => parse_duration(raw).map_err(|e| ConfigError::new(var, e)),
        }
    }
}

/// Parses `500ms`, `5s`, `30s`, `2m`, `1h`, `7d` (a bare number means seconds).
///
/// # Errors
/// A human-readable reason when the text is not such a duration.
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (digits, unit) = raw.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{raw:?} is not a duration like 30s, 2m, 1h or 7d"))?;
    let secs = match unit.trim() {
        "ms" => return Ok(Duration::from_millis(n)),
        "" | "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        other => {
            return Err(format!(
                "unknown unit {other:?} in {raw:?} (use ms, s, m, h or d)"
            ));
        }
    };
    Ok(Duration::from_secs(secs))
}

/// Parses a comma-separated list of durations such as `5s,30s,2m,10m,1h`.
///
/// # Errors
/// When any element is not a duration.
pub fn parse_duration_list(raw: &str) -> Result<Vec<Duration>, String> {
    raw.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(parse_duration)
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_in_every_unit() {
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86_400)
        );
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("42").unwrap(), Duration::from_secs(42));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5y").is_err());
        assert_eq!(parse_duration_list("5s,30s,2m,10m,1h").unwrap().len(), 5);
    }

    #[test]
    fn bad_values_name_the_variable() {
        let env = Env::from_pairs([("PROCESSOR_PREFETCH", "many")]);
        let err = env.parse_or::<u16>("PROCESSOR_PREFETCH", 64).unwrap_err();
        assert_eq!(err.var, "PROCESSOR_PREFETCH");
        assert!(err.to_string().contains("PROCESSOR_PREFETCH"));
        assert_eq!(env.parse_or::<u16>("UNSET", 64).unwrap(), 64);
        assert!(Env::default().required("STRIPE_WEBHOOK_SECRET").is_err());
    }
}
