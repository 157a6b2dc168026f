//! Ingress under the attacks of the "hostile input" review, repeated from outside: signature
//! bombs sent beside genuine webhooks, stalled request heads, trickled bodies.
//!
//! `bombs_beside_genuine_webhooks_leave_their_latency_alone` doubles as the benchmark: it prints
//! the genuine p50/p99 and the slowest bomb answer (`bench/ingress_bombs.sh` runs it in release
//! mode; `HOSTILE_GENUINE_REQUESTS` sets how many genuine webhooks it sends, default 200).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use shared::signature::signature_header;
use system_tests::amqp::TestBroker;
use system_tests::amqp_url;
use system_tests::ingress::{Ingress, SECRET};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BOMBERS: usize = 4;
const BOMB_BODY_BYTES: usize = 1 << 20;

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The two bombs: the one seen from outside (`t=<now>,` and 40,000 empty `v1=`), and the most
/// expensive header still read (eight well-formed wrong `v1`, so the body's MAC is computed).
fn bomb_header(round: usize) -> String {
    if round.is_multiple_of(2) {
        format!("t={},{}", now(), "v1=,".repeat(40_000))
    } else {
        let wrong = format!("{round:064x}");
        format!("t={}{}", now(), format!(",v1={wrong}").repeat(8))
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64) * p).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bombs_beside_genuine_webhooks_leave_their_latency_alone() {
    let genuine_requests: usize = std::env::var("HOSTILE_GENUINE_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let broker = TestBroker::new(vec![Duration::from_secs(1)]).await;
    let ingress = Ingress::start(&broker, &amqp_url(), &[]).await;
    ingress.wait_ready().await;
    let url = ingress.url("/webhooks/stripe");

    let stop = Arc::new(AtomicBool::new(false));
    let bombers: Vec<_> = (0..BOMBERS)
        .map(|b| {
            let (stop, url) = (Arc::clone(&stop), url.clone());
            tokio::spawn(async move {
                // Each bomber on its own connection, as separate attackers would be.
                let http = reqwest::Client::new();
                let body = bytes::Bytes::from(vec![b'x'; BOMB_BODY_BYTES]);
                let mut answers = Vec::new();
                let mut round = b;
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let response = http
                        .post(&url)
                        .header("Stripe-Signature", bomb_header(round))
                        .body(body.clone())
                        .send()
                        .await
                        .unwrap();
                    let status = response.status().as_u16();
                    let json: serde_json::Value = response.json().await.unwrap();
                    answers.push((started.elapsed(), status, json));
                    round += BOMBERS;
                }
                answers
            })
        })
        .collect();

    let http = reqwest::Client::new();
    let mut latencies = Vec::with_capacity(genuine_requests);
    for n in 0..genuine_requests {
        let body = json!({"id": format!("evt_genuine_{n}"), "object": "event",
            "type": "checkout.session.completed", "created": now(),
            "data": {"object": {"id": "cs_1"}}})
        .to_string();
        let started = Instant::now();
        let response = http
            .post(&url)
            .header(
                "Stripe-Signature",
                signature_header(SECRET, now(), body.as_bytes()),
            )
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "genuine webhook {n}");
        latencies.push(started.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    let mut bombs = Vec::new();
    for bomber in bombers {
        bombs.extend(bomber.await.unwrap());
    }

    latencies.sort();
    let (p50, p99, max) = (
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies[latencies.len() - 1],
    );
    let slowest_bomb = bombs.iter().map(|(d, _, _)| *d).max().unwrap();
    println!(
        "RESULT genuine={} p50={p50:?} p99={p99:?} max={max:?} bombs={} slowest_bomb={slowest_bomb:?}",
        latencies.len(),
        bombs.len(),
    );
    assert!(
        bombs.len() >= BOMBERS,
        "the bombs arrived beside the genuine traffic"
    );
    for (took, status, json) in &bombs {
        assert_eq!(*status, 400);
        assert_eq!(json["error"], "invalid_signature");
        assert!(*took < Duration::from_secs(2), "a bomb took {took:?}");
    }
    assert!(p99 < Duration::from_secs(1), "genuine p99 {p99:?}");
    assert_eq!(broker.main_depth().await as usize, genuine_requests);
    ingress.stop().await;
}

/// Opens a connection, sends half a request head, and waits for the server to close it.
async fn stall(addr: std::net::SocketAddr) -> Duration {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"POST /webhooks/stripe HTTP/1.1\r\nHost: ingress\r\nStripe-Signa")
        .await
        .unwrap();
    let started = Instant::now();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut sink))
        .await
        .expect("closed within 60 s");
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_request_heads_are_closed_and_genuine_webhooks_still_pass() {
    let broker = TestBroker::new(vec![Duration::from_secs(1)]).await;
    let ingress = Ingress::start(
        &broker,
        &amqp_url(),
        &[("INGRESS_HEADER_READ_TIMEOUT", "2s")],
    )
    .await;
    ingress.wait_ready().await;
    let stalled: Vec<_> = (0..300)
        .map(|_| tokio::spawn(stall(ingress.addr)))
        .collect();
    // While 300 connections stall, a genuine webhook is served.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let body = json!({"id": "evt_beside_stalls", "type": "invoice.paid"}).to_string();
    let (status, _, _) = ingress
        .post(
            &body,
            Some(signature_header(SECRET, now(), body.as_bytes())),
        )
        .await;
    assert_eq!(status, 200);
    for task in stalled {
        let waited = task.await.unwrap();
        assert!(waited < Duration::from_secs(5), "closed after {waited:?}");
    }
    ingress.stop().await;
}

#[tokio::test]
async fn a_trickled_body_is_answered_408_after_the_request_timeout() {
    let broker = TestBroker::new(vec![Duration::from_secs(1)]).await;
    let ingress = Ingress::start(&broker, &amqp_url(), &[("INGRESS_REQUEST_TIMEOUT", "1s")]).await;
    let mut stream = TcpStream::connect(ingress.addr).await.unwrap();
    stream
        .write_all(
            b"POST /webhooks/stripe HTTP/1.1\r\nHost: ingress\r\nContent-Length: 1000\r\n\r\n{\"id\":",
        )
        .await
        .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("answered")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(3));
    ingress.stop().await;
}

#[tokio::test]
async fn metrics_move_to_their_own_address_when_configured() {
    let broker = TestBroker::new(vec![Duration::from_secs(1)]).await;
    let metrics_addr = format!("127.0.0.1:{}", system_tests::servers::free_port());
    let ingress = Ingress::start(
        &broker,
        &amqp_url(),
        &[("INGRESS_METRICS_ADDR", metrics_addr.as_str())],
    )
    .await;
    ingress.wait_ready().await;
    let public = ingress
        .http
        .get(ingress.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(public.status(), 404);
    let internal = ingress
        .http
        .get(format!("http://{metrics_addr}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(internal.status(), 200);
    ingress.stop().await;
}
