//! `send-test-event`: sends a correctly signed, Stripe-shaped sample event to a running ingress,
//! so the whole flow can be seen working within a minute of starting the system.
//!
//! ```text
//! cargo run -p ingress --bin send-test-event -- checkout.session.completed --user u_1
//! ```

use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Parser;
use serde_json::{Value, json};

#[derive(Debug, Parser)]
#[command(about = "Send a signed sample Stripe event to ingress", version)]
struct Args {
    /// Event type: checkout.session.completed, checkout.session.expired, charge.refunded,
    /// charge.dispute.created, charge.dispute.closed, customer.subscription.created,
    /// customer.subscription.updated, customer.subscription.deleted, invoice.paid,
    /// invoice.payment_failed, payment_intent.succeeded, or any other type (sent as-is).
    event_type: String,
    /// The application's user id the event is about.
    #[arg(long, default_value = "u_1")]
    user: String,
    /// Product key written to the metadata.
    #[arg(long, default_value = "pro")]
    product: String,
    /// Suffix shared by the sample's Stripe object ids, so related events refer to the same
    /// payment (e.g. send checkout.session.completed then charge.refunded with the same --object).
    #[arg(long, default_value = "sample")]
    object: String,
    /// Amount in cents.
    #[arg(long, default_value_t = 1999)]
    amount: i64,
    /// Webhook endpoint.
    #[arg(long, default_value = "http://127.0.0.1:8080/webhooks/stripe")]
    url: String,
    /// Signing secret (the first one is used when several are comma-separated).
    #[arg(long, env = "STRIPE_WEBHOOK_SECRET", hide_env_values = true)]
    secret: String,
    /// Event id (random when omitted; repeat one to see a duplicate skipped).
    #[arg(long)]
    id: Option<String>,
    /// Print the body instead of sending it.
    #[arg(long)]
    print: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(0))
        .unwrap_or(0);
    let id = args
        .id
        .clone()
        .unwrap_or_else(|| format!("evt_test_{}", uuid::Uuid::new_v4().simple()));
    let event = json!({
        "id": id,
        "object": "event",
        "api_version": "2025-03-31.basil",
        "created": now,
        "livemode": false,
        "pending_webhooks": 1,
        "request": {"id": null, "idempotency_key": null},
        "type": args.event_type,
        "data": {"object": sample_object(&args, now)},
    });
    let body = event.to_string();
    if args.print {
        println!("{body}");
        return ExitCode::SUCCESS;
    }
    let secret = args.secret.split(',').next().unwrap_or_default().trim();
    let header = shared::signature::signature_header(secret, now, body.as_bytes());
    let response = reqwest::Client::new()
        .post(&args.url)
        .header("Stripe-Signature", header)
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await;
    match response {
        Ok(response) => {
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            println!("{} {id} -> {status} {text}", args.event_type);
            if status.is_success() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(error) => {
            eprintln!("send-test-event: cannot reach {}: {error}", args.url);
            ExitCode::from(1)
        }
    }
}

fn sample_object(args: &Args, now: i64) -> Value {
    let o = &args.object;
    let customer = format!("cus_{o}");
    let pi = format!("pi_{o}");
    let sub = format!("sub_{o}");
    let metadata = json!({"user_id": args.user, "product_key": args.product});
    let period_end = now + 30 * 86_400;
    match args.event_type.as_str() {
        "checkout.session.completed"
        | "checkout.session.async_payment_succeeded"
        | "checkout.session.async_payment_failed"
        | "checkout.session.expired" => json!({
            "id": format!("cs_{o}"), "object": "checkout.session", "mode": "payment",
            "payment_status": if args.event_type == "checkout.session.expired" { "unpaid" } else { "paid" },
            "status": if args.event_type == "checkout.session.expired" { "expired" } else { "complete" },
            "client_reference_id": args.user, "customer": customer, "payment_intent": pi,
            "amount_total": args.amount, "currency": "usd", "metadata": metadata,
            "after_expiration": {"recovery": {"enabled": true, "url": format!("https://buy.stripe.com/r/{o}")}},
        }),
        "payment_intent.succeeded" => json!({
            "id": pi, "object": "payment_intent", "amount": args.amount, "amount_received": args.amount,
            "currency": "usd", "customer": customer, "status": "succeeded", "metadata": metadata,
        }),
        "charge.refunded" => json!({
            "id": format!("ch_{o}"), "object": "charge", "amount": args.amount,
            "amount_refunded": args.amount, "refunded": true, "currency": "usd",
            "customer": customer, "payment_intent": pi, "metadata": metadata,
            "refunds": {"data": [{"id": format!("re_{o}"), "amount": args.amount, "reason": "requested_by_customer"}]},
        }),
        "charge.dispute.created" | "charge.dispute.closed" => json!({
            "id": format!("dp_{o}"), "object": "dispute", "amount": args.amount,
            "charge": format!("ch_{o}"), "payment_intent": pi, "currency": "usd",
            "status": if args.event_type == "charge.dispute.closed" { "lost" } else { "needs_response" },
            "reason": "fraudulent",
        }),
        "invoice.paid" | "invoice.payment_failed" => json!({
            "id": format!("in_{o}"), "object": "invoice", "customer": customer,
            "status": if args.event_type == "invoice.paid" { "paid" } else { "open" },
            "amount_paid": args.amount, "currency": "usd",
            "parent": {"subscription_details": {"subscription": sub, "metadata": metadata}},
            "lines": {"data": [{"period": {"start": now, "end": period_end}}]},
            "period_end": period_end,
        }),
        t if t.starts_with("customer.subscription.") => json!({
            "id": sub, "object": "subscription", "customer": customer,
            "status": if t.ends_with("deleted") { "canceled" } else { "active" },
            "cancel_at_period_end": false, "metadata": metadata,
            "ended_at": if t.ends_with("deleted") { json!(now) } else { Value::Null },
            "items": {"data": [{"current_period_end": period_end, "price": {"id": "price_sample"}}]},
        }),
        _ => json!({"id": format!("obj_{o}"), "object": "unknown", "metadata": metadata}),
    }
}
