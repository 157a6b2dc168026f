//! The entitlement API served by `processor` (see CONTRACT.md, "Entitlement API").
//!
//! Invariant: every failure leaves through [`error::ApiError`], so clients only ever see
//! `{"error":"<stable_code>","message":"…"}` and 5xx bodies never carry internals.

pub mod error;
