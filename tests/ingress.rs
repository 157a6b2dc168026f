//! Ingress against the real RabbitMQ: what is accepted is stored exactly once with the
//! contract's properties, what is refused publishes nothing, and a broker outage gives prompt
//! 503s and heals without a restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use lapin::types::AMQPValue;
use serde_json::json;
use shared::signature::signature_header;
use system_tests::amqp::TestBroker;
use system_tests::chaos::ChaosProxy;
use system_tests::ingress::{Ingress, SECRET};
use system_tests::{amqp_url, eventually};

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn event(id: &str) -> String {
    json!({
        "id": id, "object": "event", "type": "checkout.session.completed", "created": 1_700_000_123,
        "data": {"object": {"id": "cs_1", "client_reference_id": "u_1", "payment_status": "paid"}},
        "padding": "x".repeat(1500),
    })
    .to_string()
}

fn signed(body: &str) -> Option<String> {
    Some(signature_header(SECRET, now(), body.as_bytes()))
}

fn header_str(props: &lapin::BasicProperties, name: &str) -> Option<String> {
    match props.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        other => Some(format!("{other:?}")),
    }
}

#[tokio::test]
async fn signed_webhook_ends_as_exactly_one_persistent_message_with_the_same_bytes() {
    let broker = TestBroker::new(vec![Duration::from_secs(1)]).await;
    let ingress = Ingress::start(&broker, &amqp_url(), &[]).await;
    ingress.wait_ready().await;

    let body = event("evt_one_message");
    let (status, json, _) = ingress.post(&body, signed(&body)).await;
    assert_eq!(status, 200);
    assert_eq!(json, json!({"received": true}));

    let queue = broker.topology.main_queue();
    let message = broker
        .get(&queue)
        .await
        .expect("one message in the main queue");
    assert_eq!(
        message.delivery.data,
        body.as_bytes(),
        "body bytes unchanged"
    );
    let props = &message.delivery.properties;
    assert_eq!(props.delivery_mode(), &Some(2), "persistent");
    assert_eq!(
        props.message_id().as_ref().unwrap().as_str(),
        "evt_one_message"
    );
    assert_eq!(
        props.kind().as_ref().unwrap().as_str(),
        "checkout.session.completed"
    );
    assert_eq!(props.timestamp(), &Some(1_700_000_123));
    let received_at = header_str(props, "received_at").expect("received_at header");
    assert!(chrono::DateTime::parse_from_rfc3339(&received_at).is_ok());
    assert!(broker.get(&queue).await.is_none(), "exactly one message");

    ingress.stop().await;
}

#[tokio::test]
async fn a_thin_event_is_accepted_at_the_same_endpoint_with_the_same_signature() {
    let broker = TestBroker::new(vec![Duration::from_secs(1)]).await;
    let ingress = Ingress::start(&broker, &amqp_url(), &[]).await;
    ingress.wait_ready().await;
    let body = json!({
        "id": "evt_thin_accepted", "object": "v2.core.event",
        "type": "v1.checkout.session.completed", "livemode": false,
        "created": "2026-12-05T04:20:52.246Z", "context": null,
        "related_object": {"id": "cs_1", "type": "checkout.session",
                           "url": "/v1/checkout/sessions/cs_1"},
    })
    .to_string();
    let (status, _, _) = ingress.post(&body, Some("t=1,v1=00".into())).await;
    assert_eq!(status, 400, "a thin event is verified as any other");
    let (status, json, _) = ingress.post(&body, signed(&body)).await;
    assert_eq!((status, json), (200, json!({"received": true})));
    let message = broker
        .get(&broker.topology.main_queue())
        .await
        .expect("the thin event is stored");
    assert_eq!(message.delivery.data, body.as_bytes());
    let props = &message.delivery.properties;
    assert_eq!(
        props.message_id().as_ref().unwrap().as_str(),
        "evt_thin_accepted"
    );
    assert_eq!(
        props.kind().as_ref().unwrap().as_str(),
        "v1.checkout.session.completed"
    );
    ingress.stop().await;
}

#[tokio::test]
async fn rejected_webhooks_publish_nothing() {
    let broker = TestBroker::new(vec![Duration::from_secs(1)]).await;
    let ingress = Ingress::start(&broker, &amqp_url(), &[("INGRESS_MAX_BODY_BYTES", "4096")]).await;
    ingress.wait_ready().await;
    let body = event("evt_rejected");

    let wrong_secret = Some(signature_header("whsec_other", now(), body.as_bytes()));
    // Well outside the 300 s window: the exact boundary is the signature unit tests' job (fixed
    // clock); here the server's clock may tick between signing and checking.
    let stale = Some(signature_header(SECRET, now() - 400, body.as_bytes()));
    let future = Some(signature_header(SECRET, now() + 400, body.as_bytes()));
    for signature in [
        None,
        Some("garbage".to_owned()),
        wrong_secret,
        stale,
        future,
    ] {
        let (status, json, _) = ingress.post(&body, signature.clone()).await;
        assert_eq!(
            (status, json),
            (400, json!({"error": "invalid_signature"})),
            "{signature:?}"
        );
    }
    for bad in [
        "not json",
        "[1,2,3]",
        r#"{"id":"evt_x"}"#,
        r#"{"type":"a.b"}"#,
    ] {
        let (status, json, _) = ingress.post(bad, signed(bad)).await;
        assert_eq!(
            (status, json),
            (400, json!({"error": "invalid_payload"})),
            "{bad}"
        );
    }
    let huge = json!({"id": "evt_huge", "type": "a.b", "blob": "x".repeat(5000)}).to_string();
    let (status, json, _) = ingress.post(&huge, signed(&huge)).await;
    assert_eq!((status, json), (413, json!({"error": "payload_too_large"})));

    // A valid one afterwards proves the queue was reachable all along.
    let (status, _, _) = ingress.post(&body, signed(&body)).await;
    assert_eq!(status, 200);
    assert_eq!(broker.main_depth().await, 1);
    let message = broker.get(&broker.topology.main_queue()).await.unwrap();
    assert_eq!(message.delivery.data, body.as_bytes());

    ingress.stop().await;
}

#[tokio::test]
async fn broker_outage_gives_prompt_503_and_heals_without_restart() {
    let broker = TestBroker::new(vec![Duration::from_secs(1)]).await;
    let proxy = ChaosProxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let ingress = Ingress::start(&broker, &proxy.amqp_url(), &[]).await;
    ingress.wait_ready().await;

    let body = event("evt_outage_before");
    assert_eq!(ingress.post(&body, signed(&body)).await.0, 200);

    proxy.break_all();
    eventually(
        Duration::from_secs(5),
        "/readyz to report the broker down",
        || async {
            let r = ingress.http.get(ingress.url("/readyz")).send().await.ok()?;
            (r.status() == 503).then_some(())
        },
    )
    .await;
    let body = event("evt_during_outage");
    let started = Instant::now();
    let (status, json, retry_after) = ingress.post(&body, signed(&body)).await;
    assert_eq!((status, json), (503, json!({"error": "unavailable"})));
    assert!(retry_after.is_some(), "503 carries Retry-After");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "answered within 6 s"
    );

    proxy.restore();
    ingress.wait_ready().await;
    let body = event("evt_after_outage");
    let (status, _, _) = ingress.post(&body, signed(&body)).await;
    assert_eq!(status, 200, "accepts again without a restart");

    let queue = broker.topology.main_queue();
    let mut ids = Vec::new();
    while let Some(m) = broker.get(&queue).await {
        ids.push(
            m.delivery
                .properties
                .message_id()
                .clone()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(
        ids,
        ["evt_outage_before", "evt_after_outage"],
        "nothing published for the 503"
    );

    ingress.stop().await;
}

#[tokio::test]
async fn ingress_starts_while_the_broker_is_down_and_connects_when_it_appears() {
    let broker = TestBroker::new(vec![Duration::from_secs(1)]).await;
    let proxy = ChaosProxy::start("127.0.0.1:5672".parse().unwrap()).await;
    proxy.break_all();
    let ingress = Ingress::start(&broker, &proxy.amqp_url(), &[]).await;

    let healthz = ingress
        .http
        .get(ingress.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(healthz.status(), 200, "alive without a broker");
    let readyz = ingress
        .http
        .get(ingress.url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(readyz.status(), 503);
    let body = event("evt_no_broker");
    let started = Instant::now();
    assert_eq!(ingress.post(&body, signed(&body)).await.0, 503);
    assert!(started.elapsed() < Duration::from_secs(6));

    proxy.restore();
    ingress.wait_ready().await;
    assert_eq!(ingress.post(&body, signed(&body)).await.0, 200);
    assert_eq!(broker.main_depth().await, 1);

    ingress.stop().await;
}

#[tokio::test]
async fn concurrent_webhooks_are_all_stored_once_each() {
    let broker = TestBroker::new(vec![Duration::from_secs(1)]).await;
    let ingress = Ingress::start(&broker, &amqp_url(), &[]).await;
    ingress.wait_ready().await;

    let mut tasks = Vec::new();
    for i in 0..200 {
        let http = ingress.http.clone();
        let url = ingress.url("/webhooks/stripe");
        tasks.push(tokio::spawn(async move {
            let body = event(&format!("evt_concurrent_{i}"));
            http.post(url)
                .header("Stripe-Signature", signed(&body).unwrap())
                .body(body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), 200);
    }
    let queue = broker.topology.main_queue();
    let mut ids = std::collections::BTreeSet::new();
    while let Some(m) = broker.get(&queue).await {
        assert!(
            ids.insert(
                m.delivery
                    .properties
                    .message_id()
                    .clone()
                    .unwrap()
                    .to_string()
            )
        );
    }
    assert_eq!(ids.len(), 200);

    ingress.stop().await;
}

#[tokio::test]
async fn metrics_count_requests_by_outcome() {
    let broker = TestBroker::new(vec![Duration::from_secs(1)]).await;
    let ingress = Ingress::start(&broker, &amqp_url(), &[]).await;
    ingress.wait_ready().await;
    let body = event("evt_metrics");
    assert_eq!(ingress.post(&body, signed(&body)).await.0, 200);
    assert_eq!(ingress.post(&body, None).await.0, 400);

    let text = ingress.metrics().await;
    assert!(
        text.contains("ingress_requests_total{outcome=\"accepted\"}"),
        "{text}"
    );
    assert!(text.contains("ingress_requests_total{outcome=\"invalid_signature\"}"));
    assert!(text.contains("amqp_publish_confirm_seconds_bucket"));
    assert!(!text.contains(SECRET));

    ingress.stop().await;
}

#[tokio::test]
async fn every_outcome_is_exported_before_its_first_request() {
    // Counters that appear only on their first increment make `rate()` and alerts on rare
    // outcomes (unavailable) blind until the first one happens.
    let broker = TestBroker::new(vec![Duration::from_secs(1)]).await;
    let ingress = Ingress::start(&broker, &amqp_url(), &[]).await;
    ingress.wait_ready().await;
    let text = ingress.metrics().await;
    for outcome in [
        "accepted",
        "unavailable",
        "invalid_signature",
        "invalid_payload",
        "payload_too_large",
        "bad_request",
    ] {
        assert!(
            text.contains(&format!(
                "ingress_requests_total{{outcome=\"{outcome}\"}} 0"
            )),
            "{outcome} missing: {text}"
        );
    }

    ingress.stop().await;
}

#[tokio::test]
async fn a_broker_that_never_confirms_gives_503_after_the_confirm_deadline() {
    let broker = TestBroker::new(vec![Duration::from_secs(1)]).await;
    let proxy = ChaosProxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let ingress = Ingress::start(&broker, &proxy.amqp_url(), &[]).await;
    ingress.wait_ready().await;

    proxy.stall();
    let body = event("evt_black_hole");
    let started = Instant::now();
    let (status, json, retry_after) = ingress.post(&body, signed(&body)).await;
    let waited = started.elapsed();
    assert_eq!((status, json), (503, json!({"error": "unavailable"})));
    assert!(retry_after.is_some());
    assert!(
        waited >= Duration::from_millis(4900),
        "waited for the confirm deadline: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(6),
        "never beyond the 5 s bound: {waited:?}"
    );

    proxy.restore();
    ingress.wait_ready().await;
    let body = event("evt_after_black_hole");
    eventually(
        Duration::from_secs(15),
        "a webhook to be accepted again",
        || async { (ingress.post(&body, signed(&body)).await.0 == 200).then_some(()) },
    )
    .await;

    ingress.stop().await;
}

#[tokio::test]
async fn shutdown_finishes_the_request_in_flight() {
    let broker = TestBroker::new(vec![Duration::from_secs(1)]).await;
    let mut ingress = Ingress::start(&broker, &amqp_url(), &[]).await;
    ingress.wait_ready().await;

    // A request whose body is still arriving when shutdown begins.
    let body = event("evt_in_flight");
    let signature = signed(&body).unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(2);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    });
    let request = ingress
        .http
        .post(ingress.url("/webhooks/stripe"))
        .header("Stripe-Signature", signature)
        .header("Content-Length", body.len())
        .body(reqwest::Body::wrap_stream(stream))
        .send();
    let in_flight = tokio::spawn(request);
    let (first, rest) = body.as_bytes().split_at(100);
    tx.send(Ok(first.to_vec())).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let _ = ingress.stop.take().unwrap().send(());
    tokio::time::sleep(Duration::from_millis(100)).await;
    tx.send(Ok(rest.to_vec())).await.unwrap();
    drop(tx);

    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(
        response.status(),
        200,
        "in-flight request completed during shutdown"
    );
    ingress.task.await.unwrap().unwrap();
    assert_eq!(broker.main_depth().await, 1);
    assert!(
        tokio::net::TcpStream::connect(ingress.addr).await.is_err(),
        "listener closed after shutdown"
    );
}
