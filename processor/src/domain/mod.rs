//! The domain: what Stripe's events mean for a user's access, with no I/O. Every adapter
//! (`store`, `cache`, `stripe`, `api`, `outbox`, `worker`, `dlq`, `reconcile`, `cli`) depends on
//! it; it depends on `shared` alone and never on an adapter (`processor/tests/layers.rs` checks
//! the direction).
//!
//! - [`events`]: the raw body parsed once into typed events;
//! - [`projection`]: the facts an event contributes, their merges and the entitlements they imply;
//! - [`fold`]: a batch's facts joined with the stored rows into the rows to write;
//! - [`access`]: what a stored entitlement means at a given time;
//! - [`view`]: the read model (the cache's format) and the views built from it;
//! - [`message`]: the types and fields of the app's messages;
//! - [`offer`]: what a checkout this service created charges, known without Stripe;
//! - [`scope`]: which events are this service's (its Stripe mode and accounts).

pub mod access;
pub mod events;
pub mod fold;
pub mod message;
pub mod offer;
pub mod organization;
pub mod projection;
pub mod scope;
pub mod view;
