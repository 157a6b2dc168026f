//! The processor: consumes Stripe events from RabbitMQ, dedupes them, projects purchases,
//! subscriptions and entitlements into Postgres, refreshes the Redis entitlement cache, serves
//! the entitlement API and hosts the operator commands.
// The OpenAPI document (api::openapi) is one `json!` literal, deeper than the default limit.
#![recursion_limit = "256"]

pub mod api;
pub mod auth;
pub mod cache;
pub mod catalog;
pub mod cli;
pub mod complete;
pub mod config;
pub mod db;
pub mod devtoken;
pub mod dlq;
pub mod domain;
pub mod local_cache;
pub mod outbox;
pub mod reconcile;
pub mod redis_link;
pub mod registry;
pub mod service;
pub mod store;
pub mod stripe;
pub mod tls;
pub mod worker;

pub use worker::run_worker;
