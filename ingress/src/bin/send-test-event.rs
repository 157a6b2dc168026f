//! `send-test-event`: sends a correctly signed, Stripe-shaped sample event to a running ingress,
//! so the whole flow can be seen working within a minute of starting the system.
//!
//! ```text
//! cargo run -p ingress --bin send-test-event -- checkout.session.completed --user u_1
//! ```
//!
//! Like both services, it reads `.env` from the working directory (real environment variables
//! win): the signing secret comes from `STRIPE_WEBHOOK_SECRET` and the endpoint from
//! `INGRESS_ADDR` unless `--secret` or `--url` say otherwise.

use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Parser;
use shared::samples::{self, Sample};

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
    /// Checkout in subscription mode (for checkout.session.* events).
    #[arg(long)]
    subscription: bool,
    /// Amount in cents.
    #[arg(long, default_value_t = 1999)]
    amount: i64,
    /// Webhook endpoint [default: http://$INGRESS_ADDR/webhooks/stripe, INGRESS_ADDR defaulting
    /// to 127.0.0.1:8080].
    #[arg(long)]
    url: Option<String>,
    /// Signing secret (the first one is used when several are comma-separated) [default:
    /// STRIPE_WEBHOOK_SECRET from the environment or .env].
    #[arg(long)]
    secret: Option<String>,
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
    let env = shared::config::Env::load();
    let url = args.url.clone().unwrap_or_else(|| {
        let addr = env.string_or("INGRESS_ADDR", "127.0.0.1:8080");
        format!("http://{addr}/webhooks/stripe")
    });
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(0))
        .unwrap_or(0);
    let id = args
        .id
        .clone()
        .unwrap_or_else(|| format!("evt_test_{}", uuid::Uuid::new_v4().simple()));
    let sample = Sample {
        user: &args.user,
        product: &args.product,
        object: &args.object,
        amount: args.amount,
        created: now,
        subscription: args.subscription,
    };
    let event = samples::event(&id, &args.event_type, &sample);
    let body = event.to_string();
    if args.print {
        println!("{body}");
        return ExitCode::SUCCESS;
    }
    let Some(secrets) = args
        .secret
        .clone()
        .or_else(|| env.get("STRIPE_WEBHOOK_SECRET").map(str::to_owned))
    else {
        eprintln!(
            "send-test-event: configuration error in STRIPE_WEBHOOK_SECRET: is not set (in the \
             environment or .env); pass --secret or run scripts/up.sh, which writes .env"
        );
        return ExitCode::from(2);
    };
    let secret = secrets.split(',').next().unwrap_or_default().trim();
    let header = shared::signature::signature_header(secret, now, body.as_bytes());
    let response = reqwest::Client::new()
        .post(&url)
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
            eprintln!("send-test-event: cannot reach {url}: {error}");
            ExitCode::from(1)
        }
    }
}
