//! The load of the paid → Pro benchmark (`bench/e2e.sh`): what a buyer waits for on the success
//! page, measured through the public doors only.
//!
//! For one background rate it sends signed webhooks to ingress open-loop (each one at its time
//! on the clock, whatever the answers do): the realistic mix of `shared::samples::mix_customer`,
//! every customer a distinct user. Beside them, from the end of a warm-up on, it makes probe
//! purchases at a steady pace: a fresh user whose entitlement is read once (the app showing the
//! upgrade button), then a `checkout.session.completed` for a paid `pro` purchase as Stripe sends
//! it, timed from the moment its POST is sent to the first `GET /api/pro/entitlement` (the user's
//! own HS256 token) that answers `isPro: true`, polled every `--poll-ms`. Each probe's time is
//! also split into POST → 200 (ingress and the broker's confirm) and 200 → visible.
//!
//! With `--offers-db` it runs as production does with a Stripe key: the background's own
//! checkout sessions are recorded as the API records them (one customer in `--foreign-every`
//! buys through a session created elsewhere, read from Stripe), and each probe first opens its
//! checkout through `POST /api/checkout/session`, untimed: the time runs from the webhook.
//!
//! Prints one `RESULT` line: probes, p50/p90/p99/max, the split, the achieved background rate
//! and the load average at the start and the end.
//!
//! `e2e_load --rate 300 --seconds 20 --ingress http://127.0.0.1:18080 --api http://127.0.0.1:18081
//!  --webhook-secret whsec_… --jwt-secret … --run r1`
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mix_offers.rs"]
mod mix_offers;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;
use processor::devtoken::{DevTokenArgs, token};
use secrecy::SecretString;
use shared::samples::{self, Sample};
use tokio::time::Instant;

#[derive(Debug, Parser)]
struct Args {
    /// Background webhooks per second.
    #[arg(long)]
    rate: f64,
    /// How long probes are made (the background runs through the warm-up and this).
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Background only, before the first probe.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Probe purchases per second.
    #[arg(long, default_value_t = 20.0)]
    probes_per_second: f64,
    /// Pause between two entitlement reads of one probe.
    #[arg(long, default_value_t = 1)]
    poll_ms: u64,
    /// A probe not visible after this long counts as timed out.
    #[arg(long, default_value_t = 10)]
    timeout_seconds: u64,
    /// Ingress base URL.
    #[arg(long, default_value = "http://127.0.0.1:18080")]
    ingress: String,
    /// Entitlement API base URL.
    #[arg(long, default_value = "http://127.0.0.1:18081")]
    api: String,
    /// `STRIPE_WEBHOOK_SECRET` of the ingress.
    #[arg(long)]
    webhook_secret: String,
    /// `AUTH_JWT_SECRET` of the API.
    #[arg(long)]
    jwt_secret: String,
    /// Distinguishes the users and event ids of one run (and rate) from another's.
    #[arg(long)]
    run: String,
    /// As production runs with a Stripe key: the background's own checkout sessions are
    /// recorded in this database's `checkout_offers` as the API records them, and each probe
    /// first opens its checkout through `POST /api/checkout/session`.
    #[arg(long)]
    offers_db: Option<String>,
    /// With `--offers-db`, one background customer in this many buys through a session created
    /// elsewhere, whose line items the worker reads from Stripe (0: none).
    #[arg(long, default_value_t = 10)]
    foreign_every: usize,
    /// What a probe times: `purchase` (paid → Pro) or `refund` (a Pro user's refund → not Pro;
    /// the purchase before it is a `payment_intent.succeeded`, untimed, which needs no Stripe
    /// call, so refunds can be timed while Stripe fails).
    #[arg(long, default_value = "purchase")]
    probe: ProbeKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ProbeKind {
    Purchase,
    Refund,
}

/// What the background sender counts.
#[derive(Default)]
struct Background {
    accepted: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
}

/// One probe purchase's times, from the moment its POST was sent.
struct Probe {
    answered: Duration,
    visible: Option<Duration>,
}

#[tokio::main]
async fn main() {
    let args = Arc::new(Args::parse());
    let load_start = load_average();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let webhook_url = format!("{}/webhooks/stripe", args.ingress.trim_end_matches('/'));
    let entitlement_url = format!("{}/api/pro/entitlement", args.api.trim_end_matches('/'));

    let total = Duration::from_secs(args.warmup + args.seconds);
    let (bodies, customers) =
        background_bodies(&args.run, (args.rate * total.as_secs_f64()).ceil() as usize);
    let checkouts = bodies
        .iter()
        .filter(|b| b.contains(r#""type":"checkout.session.completed""#))
        .count();
    eprintln!("background_checkouts={checkouts}");
    if let Some(db) = &args.offers_db {
        let recorded = mix_offers::record(
            db,
            &format!("bg_{}", args.run),
            customers,
            args.foreign_every,
        )
        .await;
        eprintln!("recorded {recorded} own checkout sessions of the background");
    }
    let counts = Arc::new(Background::default());
    let start = Instant::now();

    let background = tokio::spawn({
        let (client, url, counts, args) = (
            client.clone(),
            webhook_url.clone(),
            Arc::clone(&counts),
            Arc::clone(&args),
        );
        async move {
            let mut sends = tokio::task::JoinSet::new();
            let mut late = Duration::ZERO;
            for (i, body) in bodies.into_iter().enumerate() {
                let due = start + Duration::from_secs_f64(i as f64 / args.rate);
                if due > Instant::now() {
                    tokio::time::sleep_until(due).await;
                }
                late = late.max(due.elapsed());
                let (client, url, counts) = (client.clone(), url.clone(), Arc::clone(&counts));
                let secret = args.webhook_secret.clone();
                sends.spawn(async move {
                    let counter = match post_signed(&client, &url, &secret, body).await {
                        Ok(status) if status == reqwest::StatusCode::OK => &counts.accepted,
                        Ok(_) => &counts.refused,
                        Err(_) => &counts.failed,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                });
                while sends.try_join_next().is_some() {}
            }
            while sends.join_next().await.is_some() {}
            (start.elapsed(), late)
        }
    });

    let mut probes = tokio::task::JoinSet::new();
    let probe_count = (args.probes_per_second * args.seconds as f64).round() as usize;
    for i in 0..probe_count {
        let due = start
            + Duration::from_secs(args.warmup)
            + Duration::from_secs_f64(i as f64 / args.probes_per_second);
        tokio::time::sleep_until(due).await;
        let (client, args) = (client.clone(), Arc::clone(&args));
        let (webhook_url, entitlement_url) = (webhook_url.clone(), entitlement_url.clone());
        probes.spawn(async move { probe(&client, &args, &webhook_url, &entitlement_url, i).await });
    }
    let mut results = Vec::with_capacity(probe_count);
    let mut errors = 0usize;
    while let Some(done) = probes.join_next().await {
        match done.unwrap() {
            Ok(probe) => results.push(probe),
            Err(error) => {
                errors += 1;
                eprintln!("probe failed: {error}");
            }
        }
    }
    let (elapsed, late) = background.await.unwrap();
    report(&args, &counts, elapsed, late, &results, errors, load_start);
}

/// The background's bodies, customer after customer of the mix, `count` events in all, and the
/// number of customers.
fn background_bodies(run: &str, count: usize) -> (Vec<String>, usize) {
    let created = unix_now();
    let mut bodies = Vec::with_capacity(count);
    let mut k = 0;
    while bodies.len() < count {
        for event in samples::mix_customer(&format!("bg_{run}"), k, created) {
            if bodies.len() < count {
                bodies.push(event.to_string());
            }
        }
        k += 1;
    }
    (bodies, k)
}

/// POSTs `body` signed now, as Stripe does.
async fn post_signed(
    client: &reqwest::Client,
    url: &str,
    secret: &str,
    body: String,
) -> reqwest::Result<reqwest::StatusCode> {
    let header = shared::signature::signature_header(secret, unix_now(), body.as_bytes());
    let response = client
        .post(url)
        .header("Stripe-Signature", header)
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await?;
    let status = response.status();
    // Read the body so the connection goes back to the pool.
    let _ = response.bytes().await;
    Ok(status)
}

/// One probe purchase: a read while the user has nothing, the purchase, then reads until Pro.
async fn probe(
    client: &reqwest::Client,
    args: &Args,
    webhook_url: &str,
    entitlement_url: &str,
    i: usize,
) -> Result<Probe, String> {
    let user = format!("p_{}_{i}", args.run);
    let bearer = token(
        &DevTokenArgs {
            user: user.clone(),
            ttl: Duration::from_secs(3600),
        },
        &SecretString::from(args.jwt_secret.clone()),
        None,
        None,
    )
    .map_err(|e| e.to_string())?;
    if is_pro(client, entitlement_url, &bearer).await? {
        return Err(format!("{user} is Pro before buying"));
    }
    let object = format!("p_{}_{i}", args.run);
    let sample = Sample {
        user: &user,
        product: "pro",
        object: &object,
        amount: 1999,
        created: unix_now(),
        subscription: false,
    };
    let (body, want_pro) = match args.probe {
        ProbeKind::Purchase => {
            let mut event = samples::event(
                &format!("evt_{object}"),
                "checkout.session.completed",
                &sample,
            );
            if args.offers_db.is_some() {
                // The checkout the app opens for its user (the API asks Stripe, and records the
                // offer); Stripe's event then carries that session.
                let session = open_checkout(client, &args.api, &bearer).await?;
                event["data"]["object"]["id"] = serde_json::Value::String(session);
            }
            (event.to_string(), true)
        }
        ProbeKind::Refund => {
            let paid = samples::event(
                &format!("evt_{object}_paid"),
                "payment_intent.succeeded",
                &sample,
            );
            let status = post_signed(client, webhook_url, &args.webhook_secret, paid.to_string())
                .await
                .map_err(|e| e.to_string())?;
            if status != reqwest::StatusCode::OK {
                return Err(format!("purchase of {user} answered {status}"));
            }
            let deadline = Instant::now() + Duration::from_secs(args.timeout_seconds);
            while !is_pro(client, entitlement_url, &bearer).await? {
                if Instant::now() > deadline {
                    return Err(format!("{user} not Pro before the refund"));
                }
                tokio::time::sleep(Duration::from_millis(args.poll_ms)).await;
            }
            let refund =
                samples::event(&format!("evt_{object}_refund"), "charge.refunded", &sample);
            (refund.to_string(), false)
        }
    };

    let sent = Instant::now();
    let post = tokio::spawn({
        let (client, url, secret) = (
            client.clone(),
            webhook_url.to_owned(),
            args.webhook_secret.clone(),
        );
        async move {
            let status = post_signed(&client, &url, &secret, body).await;
            (status, sent.elapsed())
        }
    });
    let poll = Duration::from_millis(args.poll_ms);
    let deadline = sent + Duration::from_secs(args.timeout_seconds);
    let visible = loop {
        let asked = Instant::now();
        if is_pro(client, entitlement_url, &bearer).await? == want_pro {
            break Some(sent.elapsed());
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep_until(asked + poll).await;
    };
    let (status, answered) = post.await.map_err(|e| e.to_string())?;
    match status {
        Ok(status) if status == reqwest::StatusCode::OK => Ok(Probe { answered, visible }),
        Ok(status) => Err(format!("purchase of {user} answered {status}")),
        Err(error) => Err(format!("purchase of {user}: {error}")),
    }
}

/// A response's status, text and JSON body (when it is JSON).
async fn answer(
    response: reqwest::Response,
) -> Result<(reqwest::StatusCode, String, Option<serde_json::Value>), String> {
    let status = response.status();
    let text = response.text().await.map_err(|e| e.to_string())?;
    let body = serde_json::from_str(&text).ok();
    Ok((status, text, body))
}

/// `POST /api/checkout/session` for `pro` as the user: the session's id.
async fn open_checkout(
    client: &reqwest::Client,
    api: &str,
    bearer: &str,
) -> Result<String, String> {
    let response = client
        .post(format!(
            "{}/api/checkout/session",
            api.trim_end_matches('/')
        ))
        .bearer_auth(bearer)
        .json(&serde_json::json!({ "productKey": "pro" }))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let (status, text, body) = answer(response).await?;
    match body.as_ref().and_then(|b| b["sessionId"].as_str()) {
        Some(session) if status == reqwest::StatusCode::OK => Ok(session.to_owned()),
        _ => Err(format!("checkout answered {status}: {text}")),
    }
}

/// `GET /api/pro/entitlement` as the user: is `isPro` true?
async fn is_pro(client: &reqwest::Client, url: &str, bearer: &str) -> Result<bool, String> {
    let response = client
        .get(url)
        .bearer_auth(bearer)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let (status, text, body) = answer(response).await?;
    match body {
        Some(body) if status == reqwest::StatusCode::OK => {
            Ok(body["isPro"] == serde_json::Value::Bool(true))
        }
        _ => Err(format!("entitlement read answered {status}: {text}")),
    }
}

fn report(
    args: &Args,
    counts: &Background,
    elapsed: Duration,
    late: Duration,
    probes: &[Probe],
    errors: usize,
    load_start: String,
) {
    let visible: Vec<Duration> = probes.iter().filter_map(|p| p.visible).collect();
    let answered: Vec<Duration> = probes.iter().map(|p| p.answered).collect();
    // Signed: a purchase can be visible before its POST's answer is back.
    let after_200: Vec<f64> = probes
        .iter()
        .filter_map(|p| Some(ms(p.visible?) - ms(p.answered)))
        .collect();
    let timeouts = probes.len() - visible.len();
    let accepted = counts.accepted.load(Ordering::Relaxed);
    let ms_list = |d: &[Duration]| d.iter().copied().map(ms).collect::<Vec<_>>();
    let (total, post, after) = (
        percentiles(ms_list(&visible)),
        percentiles(ms_list(&answered)),
        percentiles(after_200),
    );
    println!(
        "RESULT probe={:?} rate={} probes={} p50_ms={:.1} p90_ms={:.1} p99_ms={:.1} max_ms={:.1} \
         post_to_200_p50_ms={:.1} post_to_200_p99_ms={:.1} \
         after_200_to_visible_p50_ms={:.1} after_200_to_visible_p99_ms={:.1} \
         achieved_rate={:.0} accepted={accepted} refused={} failed={} timeouts={timeouts} \
         probe_errors={errors} send_lag_max_ms={:.1} load_start={load_start} load_end={}",
        args.probe,
        args.rate,
        visible.len(),
        total[0],
        total[1],
        total[2],
        total[3],
        post[0],
        post[2],
        after[0],
        after[2],
        accepted as f64 / elapsed.as_secs_f64(),
        counts.refused.load(Ordering::Relaxed),
        counts.failed.load(Ordering::Relaxed),
        ms(late),
        load_average(),
    );
}

/// p50, p90, p99 and max (nearest rank); NaN without values.
fn percentiles(mut values: Vec<f64>) -> [f64; 4] {
    if values.is_empty() {
        return [f64::NAN; 4];
    }
    values.sort_by(f64::total_cmp);
    let rank = |p: f64| {
        let index = ((p / 100.0) * values.len() as f64).ceil() as usize;
        values[index.clamp(1, values.len()) - 1]
    };
    [rank(50.0), rank(90.0), rank(99.0), values[values.len() - 1]]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0))
}

/// The 1- and 5-minute load averages, `1.23/0.98`.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| {
            let mut fields = l.split_whitespace();
            Some(format!("{}/{}", fields.next()?, fields.next()?))
        })
        .unwrap_or_else(|| "?".into())
}
