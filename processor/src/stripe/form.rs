//! Stripe's form encoding: an ordered list of `(key, value)` pairs whose keys carry nesting in
//! brackets (`line_items[0][price]`, `metadata[user_id]`, `types[]`).
//!
//! Invariant: pairs go on the wire in the order they were pushed, keys keep their brackets
//! literally (as the official SDKs send them) and everything else outside RFC 3986's unreserved
//! set is percent-encoded, so a value can never inject another pair.
//!
//! A hand-written encoder rather than `serde_qs`/`serde_urlencoded`: those either reject nested
//! keys or percent-encode the brackets and reorder maps, and the body of a POST must be
//! byte-for-byte stable for Stripe's idempotency check (same key + different bytes is an error).

use std::fmt::Write as _;

/// An ordered set of form parameters, used both for POST bodies and GET query strings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Form {
    pairs: Vec<(String, String)>,
}

impl Form {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends `key=value`. Keys are written with their brackets, e.g. `metadata[user_id]`.
    pub fn push(&mut self, key: impl Into<String>, value: impl Into<String>) -> &mut Self {
        self.pairs.push((key.into(), value.into()));
        self
    }

    /// Appends `key=value` when `value` is present.
    pub fn push_opt(
        &mut self,
        key: impl Into<String>,
        value: Option<impl Into<String>>,
    ) -> &mut Self {
        if let Some(value) = value {
            self.push(key, value);
        }
        self
    }

    /// Appends `root[k]=v` for every entry, in the given order.
    pub fn push_map<'a>(
        &mut self,
        root: &str,
        entries: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> &mut Self {
        for (k, v) in entries {
            self.push(nested(root, &[k]), v);
        }
        self
    }

    /// The value of the first pair named `key`.
    #[must_use]
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    #[must_use]
    pub fn pairs(&self) -> &[(String, String)] {
        &self.pairs
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// The `application/x-www-form-urlencoded` text: `a=1&metadata[user_id]=u%201`.
    #[must_use]
    pub fn encode(&self) -> String {
        let mut out = String::new();
        for (i, (k, v)) in self.pairs.iter().enumerate() {
            if i > 0 {
                out.push('&');
            }
            escape_into(&mut out, k, true);
            out.push('=');
            escape_into(&mut out, v, false);
        }
        out
    }
}

/// Builds a bracketed key: `nested("line_items", &["0", "price"])` is `line_items[0][price]`.
#[must_use]
pub fn nested(root: &str, path: &[&str]) -> String {
    let mut key = String::from(root);
    for segment in path {
        key.push('[');
        key.push_str(segment);
        key.push(']');
    }
    key
}

fn escape_into(out: &mut String, raw: &str, is_key: bool) {
    for byte in raw.bytes() {
        let keep = byte.is_ascii_alphanumeric()
            || matches!(byte, b'-' | b'.' | b'_' | b'~')
            || (is_key && matches!(byte, b'[' | b']'));
        if keep {
            out.push(char::from(byte));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(out, "%{byte:02X}");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn bracketed_keys_stay_literal_and_keep_their_order() {
        let mut form = Form::new();
        form.push("mode", "payment")
            .push(nested("line_items", &["0", "price"]), "price_123")
            .push(nested("line_items", &["0", "quantity"]), "1")
            .push(
                nested("payment_intent_data", &["metadata", "user_id"]),
                "u_1",
            )
            .push("types[]", "charge.refunded");
        assert_eq!(
            form.encode(),
            "mode=payment&line_items[0][price]=price_123&line_items[0][quantity]=1\
             &payment_intent_data[metadata][user_id]=u_1&types[]=charge.refunded"
        );
    }

    #[test]
    fn values_are_percent_encoded_so_they_cannot_inject_pairs() {
        let mut form = Form::new();
        form.push(
            "success_url",
            "https://app.test/ok?s={CHECKOUT_SESSION_ID}&x=1",
        )
        .push("metadata[note]", "a b+c=d[e]é");
        assert_eq!(
            form.encode(),
            "success_url=https%3A%2F%2Fapp.test%2Fok%3Fs%3D%7BCHECKOUT_SESSION_ID%7D%26x%3D1\
             &metadata[note]=a%20b%2Bc%3Dd%5Be%5D%C3%A9"
        );
    }

    #[test]
    fn optional_and_map_pairs_are_appended_in_order() {
        let mut form = Form::new();
        form.push_opt("customer", None::<&str>)
            .push_opt("customer", Some("cus_1"))
            .push_map("metadata", [("user_id", "u_1"), ("product_key", "pro")]);
        assert_eq!(
            form.encode(),
            "customer=cus_1&metadata[user_id]=u_1&metadata[product_key]=pro"
        );
        assert_eq!(form.get("metadata[product_key]"), Some("pro"));
        assert!(Form::new().encode().is_empty());
    }

    proptest::proptest! {
        /// An independent decoder (the `url` crate's, as servers use) reads back exactly the
        /// pairs that were pushed, in order, whatever the keys and values contain.
        #[test]
        fn any_pairs_round_trip_through_a_standard_decoder(
            pairs in proptest::collection::vec(("[a-z_\\[\\]0-9]{1,12}", ".*"), 0..8)
        ) {
            let mut form = Form::new();
            for (k, v) in &pairs {
                form.push(k.as_str(), v.as_str());
            }
            let url = reqwest::Url::parse(&format!("http://stripe.test/?{}", form.encode())).unwrap();
            let decoded: Vec<(String, String)> = url
                .query_pairs()
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            proptest::prop_assert_eq!(decoded, pairs);
        }

        #[test]
        fn encoded_values_never_contain_separators(value in ".*") {
            let mut form = Form::new();
            form.push("k", value.as_str());
            let encoded = form.encode();
            let tail = encoded.strip_prefix("k=").unwrap();
            proptest::prop_assert!(!tail.contains('&') && !tail.contains('=') && !tail.contains('['));
        }
    }
}
