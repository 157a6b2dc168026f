//! Domain identifiers parsed at the edge. Their fields are private: a value of these types has
//! passed validation (non-empty, bounded length, printable ASCII without whitespace).

use std::fmt;

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind}: {reason}")]
pub struct IdError {
    kind: &'static str,
    reason: &'static str,
}

fn validate(kind: &'static str, raw: &str, max: usize) -> Result<(), IdError> {
    if raw.is_empty() {
        return Err(IdError {
            kind,
            reason: "empty",
        });
    }
    if raw.len() > max {
        return Err(IdError {
            kind,
            reason: "too long",
        });
    }
    if !raw.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(IdError {
            kind,
            reason: "must be printable ASCII without spaces",
        });
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $max:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// # Errors
            /// [`IdError`] when the value is empty, too long or not printable ASCII.
            pub fn parse(raw: &str) -> Result<Self, IdError> {
                validate($kind, raw, $max)?;
                Ok(Self(raw.to_owned()))
            }

            #[must_use]
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let raw = String::deserialize(d)?;
                Self::parse(&raw).map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(
    /// A Stripe event id (`evt_…`); the dedupe key.
    StripeEventId,
    "event id",
    255
);
id_type!(
    /// The application's user id, as carried in a JWT `sub` or Checkout `client_reference_id`.
    UserId,
    "user id",
    200
);
id_type!(
    /// An entitlement key such as `pro`.
    EntitlementKey,
    "entitlement key",
    100
);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ids_reject_empty_blank_and_oversized_values() {
        assert!(UserId::parse("").is_err());
        assert!(UserId::parse("u 1").is_err());
        assert!(UserId::parse(&"a".repeat(201)).is_err());
        assert_eq!(UserId::parse("u_1").unwrap().as_str(), "u_1");
        assert!(serde_json::from_str::<StripeEventId>(r#""""#).is_err());
    }
}
