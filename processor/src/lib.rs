//! The processor: consumes Stripe events from RabbitMQ, dedupes them, projects purchases,
//! subscriptions and entitlements into Postgres, refreshes the Redis entitlement cache, serves
//! the entitlement API and hosts the operator commands.
pub mod api;
pub mod auth;
pub mod catalog;
pub mod stripe;
