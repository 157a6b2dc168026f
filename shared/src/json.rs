//! Request bodies read as their OpenAPI schemas state them (`#[serde(deserialize_with = …)]`):
//! a field is absent or of its type, never `null`; an `integer` is any JSON number without a
//! fraction, whether written `7` or `7.0` (JSON Schema's meaning, which serde's `i64` is not).

use serde::{Deserialize, Deserializer};

/// A field that is there: `null` is refused (an absent field is `None` through
/// `#[serde(default)]`).
///
/// # Errors
/// The inner type's error, or "invalid type: null" for `null`.
pub fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// An optional `integer` (with `#[serde(default)]`).
///
/// # Errors
/// As [`integer`].
pub fn optional_integer<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    integer(d).map(Some)
}

/// A JSON Schema `integer`: a number without a fraction, within ±2^53 when written with one.
///
/// # Errors
/// A custom error for anything else (`null`, a string, `7.5`, `1e300`).
pub fn integer<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    let number = serde_json::Number::deserialize(d)?;
    if let Some(n) = number.as_i64() {
        return Ok(n);
    }
    match number.as_f64() {
        #[allow(clippy::cast_possible_truncation)] // integral and within ±2^53
        Some(f) if f.fract() == 0.0 && f.abs() <= 9_007_199_254_740_992.0 => Ok(f as i64),
        _ => Err(serde::de::Error::custom(format!(
            "{number} is not an integer"
        ))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Body {
        #[serde(deserialize_with = "integer")]
        version: i64,
        #[serde(default, deserialize_with = "optional_integer")]
        limit: Option<i64>,
        #[serde(default, deserialize_with = "present")]
        name: Option<String>,
    }

    #[test]
    fn integers_as_json_schema_counts_them_and_no_nulls() {
        let read = |s: &str| serde_json::from_str::<Body>(s);
        let body = read(r#"{"version": 100001.0, "limit": 5}"#).unwrap();
        assert_eq!(
            (body.version, body.limit, body.name),
            (100_001, Some(5), None)
        );
        for refused in [
            r#"{"version": 7.5}"#,
            r#"{"version": 1e300}"#,
            r#"{"version": "7"}"#,
            r#"{"version": null}"#,
            r#"{"version": 1, "limit": null}"#,
            r#"{"version": 1, "name": null}"#,
            r#"{}"#,
        ] {
            assert!(read(refused).is_err(), "{refused}");
        }
    }
}
