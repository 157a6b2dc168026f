//! `processor dlq …` end to end: the real binary against the machine's RabbitMQ, each test on
//! its own topology (`--topology-base`), with parked messages shaped like the consumer's.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_debug_implementations
)]

use std::collections::{BTreeMap, HashSet};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use chrono::Utc;
use futures_util::future::try_join_all;
use lapin::options::{BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel};
use shared::topology::Topology;
use system_tests::amqp::TestBroker;
use system_tests::amqp_url;
use system_tests::db::TestDb;

const RETRY_DELAYS: &str = "1s,2s";
const DEADLINE: Duration = Duration::from_secs(60);

/// A parked event as the test wrote it.
#[derive(Debug, Clone, PartialEq)]
struct Parked {
    id: String,
    event_type: String,
    body: Vec<u8>,
    timestamp: u64,
}

/// A message read back from a queue.
#[derive(Debug)]
struct Got {
    routing_key: String,
    body: Vec<u8>,
    properties: BasicProperties,
}

impl Got {
    fn id(&self) -> String {
        self.properties.message_id().as_ref().unwrap().to_string()
    }

    fn header(&self, name: &str) -> Option<AMQPValue> {
        self.properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(name).cloned())
    }
}

/// The test's topology (deleted on drop), a confirming channel on it, and an empty database of
/// its own for the index of parked events (dropped on drop).
struct Broker {
    topology: Topology,
    channel: Channel,
    database: TestDb,
    queues: TestBroker,
}

async fn postgres(database: &TestDb) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&database.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

impl Broker {
    async fn new() -> Self {
        let delays = shared::config::parse_duration_list(RETRY_DELAYS).unwrap();
        let queues = TestBroker::new(delays).await;
        Self {
            topology: queues.topology.clone(),
            channel: queues.channel.clone(),
            database: TestDb::create().await,
            queues,
        }
    }

    /// Rows of the index for this queue, and whether it is trusted (`None`: never written).
    async fn index(&self) -> (i64, Option<bool>) {
        let client = postgres(&self.database).await;
        let queue = self.dlq();
        let rows = client
            .query_one("SELECT count(*) FROM dlq_index WHERE queue = $1", &[&queue])
            .await
            .map_or(0, |row| row.get(0));
        let trusted = client
            .query_opt(
                "SELECT trusted FROM dlq_index_state WHERE queue = $1",
                &[&queue],
            )
            .await
            .ok()
            .flatten()
            .map(|row| row.get(0));
        (rows, trusted)
    }

    fn dlq(&self) -> String {
        self.topology.dead_letter_queue()
    }

    fn main_queue(&self) -> String {
        self.topology.main_queue()
    }

    /// Parks events in the test's dead-letter queue exactly as the consumer does: original body
    /// and properties, plus the dead-letter headers; confirmed before returning.
    async fn park(&self, events: &[Parked], dead_lettered_at: chrono::DateTime<Utc>) {
        let dead_lettered_at = dead_lettered_at.to_rfc3339();
        let headers = consumer_headers(Some(&dead_lettered_at), Vec::new());
        self.park_with(events, &headers).await;
    }

    /// Parks events with exactly these headers, confirmed before returning.
    async fn park_with(&self, events: &[Parked], headers: &FieldTable) {
        let mut confirms = Vec::new();
        for event in events {
            let properties = parked_properties(event, headers);
            confirms.push(
                self.channel
                    .basic_publish(
                        "".into(),
                        self.dlq().as_str().into(),
                        BasicPublishOptions::default(),
                        &event.body,
                        properties,
                    )
                    .await
                    .unwrap(),
            );
        }
        for confirm in try_join_all(confirms).await.unwrap() {
            assert!(confirm.is_ack());
        }
    }

    async fn depth(&self, queue: &str) -> u32 {
        let channel = self.queues.connection.create_channel().await.unwrap();
        let depth = processor::dlq::queue_depth(&channel, queue).await.unwrap();
        let _ = channel.close(200, "done".into()).await;
        depth
    }

    /// Consumers on `queue` right now.
    async fn consumers(&self, queue: &str) -> u32 {
        let channel = self.queues.connection.create_channel().await.unwrap();
        let counts = processor::dlq::queue_counts(&channel, queue).await.unwrap();
        let _ = channel.close(200, "done".into()).await;
        counts.consumers
    }

    /// Takes every message out of `queue`, in order.
    async fn drain(&self, queue: &str) -> Vec<Got> {
        let mut got = Vec::new();
        while let Some(m) = self
            .channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            got.push(Got {
                routing_key: m.delivery.routing_key.to_string(),
                body: m.delivery.data,
                properties: m.delivery.properties,
            });
        }
        got
    }

    /// The ids in `queue`, read without removing anything.
    async fn peek_ids(&self, queue: &str) -> HashSet<String> {
        self.peek_messages(queue)
            .await
            .iter()
            .map(Got::id)
            .collect()
    }

    /// The index's rows for this queue: (seq, event id), in order.
    async fn index_rows(&self) -> Vec<(i64, String)> {
        postgres(&self.database)
            .await
            .query(
                "SELECT seq, event_id FROM dlq_index WHERE queue = $1 ORDER BY seq",
                &[&self.dlq()],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect()
    }

    /// The messages in `queue`, read without removing anything (held, then requeued by
    /// closing the channel).
    async fn peek_messages(&self, queue: &str) -> Vec<Got> {
        let channel = self.queues.connection.create_channel().await.unwrap();
        let mut got = Vec::new();
        while let Some(m) = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
            .unwrap()
        {
            got.push(Got {
                routing_key: m.delivery.routing_key.to_string(),
                body: m.delivery.data,
                properties: m.delivery.properties,
            });
        }
        channel.close(200, "requeue".into()).await.unwrap();
        got
    }

    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(system_tests::binary("processor"));
        command
            .arg("--topology-base")
            .arg(self.topology.exchange())
            .arg("dlq")
            .args(args)
            .env("AMQP_URL", amqp_url())
            .env("DATABASE_URL", &self.database.url)
            .env("RETRY_DELAYS", RETRY_DELAYS)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    }

    /// Starts `processor dlq args` and kills it (SIGKILL: no chance to clean up) as soon as
    /// `under_way` says it is in the middle of its work.
    async fn kill_when(&self, args: &[&str], under_way: impl AsyncFn(&Self) -> bool) {
        let mut child = self.command(args).spawn().unwrap();
        let started = Instant::now();
        while !under_way(self).await {
            assert!(
                started.elapsed() < DEADLINE,
                "the command never got under way"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        child.start_kill().unwrap();
        child.wait().await.unwrap();
    }

    /// [`Self::run`] with one variable of the environment changed.
    async fn run_with(&self, args: &[&str], variable: &str, value: &str) -> Output {
        self.command(args)
            .env(variable, value)
            .output()
            .await
            .unwrap()
    }

    async fn run(&self, args: &[&str]) -> Output {
        let output = self.command(args).output().await.unwrap();
        eprintln!(
            "$ processor dlq {}\n-> {:?}\n{}{}",
            args.join(" "),
            output.status.code(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }
}

/// The headers the consumer writes when it parks an event (`dead_lettered_at` optional, to
/// model a message the broker dead-lettered by itself), plus `x-death` entries at these times.
fn consumer_headers(dead_lettered_at: Option<&str>, x_death_times: Vec<u64>) -> FieldTable {
    let mut headers = BTreeMap::new();
    let mut text = |k: &str, v: &str| {
        headers.insert(
            ShortString::from(k),
            AMQPValue::LongString(LongString::from(v)),
        );
    };
    text("received_at", "2026-01-01T00:00:00Z");
    text("first_seen_at", "2026-01-01T00:00:01Z");
    text("last_error", "projection failed: db timeout");
    if let Some(at) = dead_lettered_at {
        text("dead_lettered_at", at);
    }
    headers.insert("attempts".into(), AMQPValue::LongUInt(6));
    let deaths: Vec<AMQPValue> = x_death_times
        .into_iter()
        .map(|time| {
            let mut death = FieldTable::default();
            death.insert(
                "reason".into(),
                AMQPValue::LongString("delivery_limit".into()),
            );
            death.insert(
                "queue".into(),
                AMQPValue::LongString("stripe.events.q".into()),
            );
            death.insert("time".into(), AMQPValue::Timestamp(time));
            AMQPValue::FieldTable(death)
        })
        .collect();
    headers.insert("x-death".into(), AMQPValue::FieldArray(deaths.into()));
    FieldTable::from(headers)
}

/// The properties a parked event is published with.
fn parked_properties(event: &Parked, headers: &FieldTable) -> BasicProperties {
    BasicProperties::default()
        .with_message_id(event.id.as_str().into())
        .with_type(event.event_type.as_str().into())
        .with_timestamp(event.timestamp)
        .with_delivery_mode(2)
        .with_headers(headers.clone())
}

fn events(n: usize, event_type: &str) -> Vec<Parked> {
    (0..n)
        .map(|i| {
            let id = format!("evt_{}", uuid::Uuid::new_v4().simple());
            Parked {
                body: format!(r#"{{"id":"{id}","type":"{event_type}","n":{i}}}"#).into_bytes(),
                id,
                event_type: event_type.to_owned(),
                timestamp: 1_700_000_000 + i as u64,
            }
        })
        .collect()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn assert_same_messages(got: &[Got], parked: &[Parked]) {
    let got: Vec<(String, &[u8])> = got.iter().map(|g| (g.id(), g.body.as_slice())).collect();
    let want: Vec<(String, &[u8])> = parked
        .iter()
        .map(|p| (p.id.clone(), p.body.as_slice()))
        .collect();
    assert_eq!(got, want);
}

fn assert_replayed_headers(got: &Got) {
    // Reset to zero, whatever integer width the header travels in.
    let attempts = match got.header("attempts") {
        Some(AMQPValue::LongUInt(n)) => i64::from(n),
        Some(AMQPValue::LongLongInt(n)) => n,
        other => panic!("attempts header is {other:?}"),
    };
    assert_eq!(attempts, 0);
    for gone in ["last_error", "dead_lettered_at", "x-death"] {
        assert_eq!(got.header(gone), None, "{gone} survived the replay");
    }
    assert!(got.header("first_seen_at").is_some());
    assert!(got.header("received_at").is_some());
}

#[tokio::test]
async fn list_leaves_every_parked_message_in_place_and_in_order() {
    let broker = Broker::new().await;
    let mut parked = events(15, "invoice.paid");
    parked.extend(events(5, "charge.refunded"));
    broker.park(&parked, Utc::now()).await;

    let table = broker.run(&["list"]).await;
    assert!(table.status.success());
    let table = stdout(&table);
    assert!(table.contains("LAST ERROR"));
    for p in &parked {
        assert!(table.contains(&p.id), "{} missing from the table", p.id);
    }
    assert!(table.contains("projection failed: db timeout"));

    let json = broker
        .run(&[
            "list",
            "--json",
            "--type",
            "charge.refunded",
            "--limit",
            "3",
        ])
        .await;
    assert!(json.status.success());
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&json.stdout).unwrap();
    let ids: Vec<&str> = rows
        .iter()
        .map(|r| r["eventId"].as_str().unwrap())
        .collect();
    let want: Vec<&str> = parked[15..18].iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, want);
    assert_eq!(rows[0]["attempts"], 6);
    assert_eq!(rows[0]["type"], "charge.refunded");

    assert_eq!(broker.depth(&broker.dlq()).await, 20);
    let remaining = broker.drain(&broker.dlq()).await;
    assert_same_messages(&remaining, &parked);
}

#[tokio::test]
async fn show_prints_one_parked_event_and_fails_cleanly_for_a_missing_one() {
    let broker = Broker::new().await;
    let parked = events(3, "customer.subscription.updated");
    broker.park(&parked, Utc::now()).await;

    let shown = broker.run(&["show", &parked[1].id]).await;
    assert!(shown.status.success());
    let text = stdout(&shown);
    assert!(text.contains("last_error: \"projection failed: db timeout\""));
    assert!(text.contains("attempts: 6"));
    assert!(
        text.contains(&format!("\"id\": \"{}\"", parked[1].id)),
        "body is pretty-printed"
    );

    let missing = broker.run(&["show", "evt_not_parked"]).await;
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("evt_not_parked is not parked"));

    let remaining = broker.drain(&broker.dlq()).await;
    assert_same_messages(&remaining, &parked);
}

#[tokio::test]
async fn replaying_a_thousand_parked_events_delivers_each_exactly_once_and_empties_the_queue() {
    let broker = Broker::new().await;
    let parked = events(1000, "checkout.session.completed");
    broker.park(&parked, Utc::now()).await;

    let output = broker.run(&["replay", "--all", "--yes"]).await;
    assert!(output.status.success());
    assert!(stdout(&output).contains("replayed 1000 events"));

    assert_eq!(broker.depth(&broker.dlq()).await, 0);
    let delivered = broker.drain(&broker.main_queue()).await;
    assert_eq!(delivered.len(), 1000);
    let ids: HashSet<String> = delivered.iter().map(Got::id).collect();
    let want: HashSet<String> = parked.iter().map(|p| p.id.clone()).collect();
    assert_eq!(ids, want);
    let by_id: BTreeMap<&str, &Parked> = parked.iter().map(|p| (p.id.as_str(), p)).collect();
    for got in &delivered {
        let original = by_id[got.id().as_str()];
        assert_eq!(got.body, original.body);
        assert_eq!(got.routing_key, original.event_type);
        assert_eq!(
            got.properties.kind().as_ref().unwrap().as_str(),
            original.event_type
        );
        assert_eq!(*got.properties.timestamp(), Some(original.timestamp));
        assert_replayed_headers(got);
    }
}

#[tokio::test]
async fn a_replay_killed_midway_and_rerun_loses_no_event() {
    let broker = Broker::new().await;
    let parked = events(3000, "invoice.payment_failed");
    let all: HashSet<String> = parked.iter().map(|p| p.id.clone()).collect();
    broker.park(&parked, Utc::now()).await;

    broker
        .kill_when(&["replay", "--all", "--yes"], async |b: &Broker| {
            b.depth(&b.main_queue()).await >= 100
        })
        .await;

    // Wait until the broker has taken back what the killed process held: every event is then
    // visible either in the main queue or in the dead-letter queue.
    let mut delivered: HashSet<String> = HashSet::new();
    let started = Instant::now();
    loop {
        delivered.extend(broker.drain(&broker.main_queue()).await.iter().map(Got::id));
        let parked_now = broker.peek_ids(&broker.dlq()).await;
        if delivered.union(&parked_now).count() == all.len() {
            assert!(
                !parked_now.is_empty(),
                "the kill came after the replay finished"
            );
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "events vanished after the kill"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    let rerun = broker.run(&["replay", "--all", "--yes"]).await;
    assert!(rerun.status.success());
    delivered.extend(broker.drain(&broker.main_queue()).await.iter().map(Got::id));
    assert_eq!(delivered, all);
    assert_eq!(broker.depth(&broker.dlq()).await, 0);
}

#[tokio::test]
async fn purge_without_yes_and_without_a_terminal_changes_nothing_and_exits_2() {
    let broker = Broker::new().await;
    let parked = events(5, "invoice.paid");
    broker.park(&parked, Utc::now()).await;

    let purge = broker.run(&["purge", "--all"]).await;
    assert_eq!(purge.status.code(), Some(2));
    assert!(
        stdout(&purge).contains("5 of 5 parked events"),
        "the plan is printed"
    );
    let stderr = String::from_utf8_lossy(&purge.stderr);
    assert!(stderr.contains("--yes") && stderr.contains("dlq export"));

    let replay = broker.run(&["replay", "--all"]).await;
    assert_eq!(replay.status.code(), Some(2));

    assert_eq!(broker.depth(&broker.main_queue()).await, 0);
    let remaining = broker.drain(&broker.dlq()).await;
    assert_same_messages(&remaining, &parked);
}

#[tokio::test]
async fn purge_older_than_ages_events_by_when_they_were_parked_never_by_their_creation() {
    let broker = Broker::new().await;
    let ten_days_ago = Utc::now() - chrono::Duration::days(10);
    let old_secs = u64::try_from(ten_days_ago.timestamp()).unwrap();
    let old = events(2, "invoice.paid");
    let recent = events(2, "invoice.paid");
    broker.park(&old, ten_days_ago).await;
    broker.park(&recent, Utc::now()).await;
    // Created ten days ago (the message timestamp is the event's `created`), parked just now.
    let mut created_long_ago = events(1, "invoice.paid");
    created_long_ago[0].timestamp = old_secs;
    broker.park(&created_long_ago, Utc::now()).await;
    // Dead-lettered by the broker itself ten days ago: only x-death says when.
    let by_broker = events(1, "invoice.paid");
    broker
        .park_with(&by_broker, &consumer_headers(None, vec![old_secs]))
        .await;
    // No parking time at all, only an old `created`: unknown age, never "old".
    let mut unknown_age = events(1, "invoice.paid");
    unknown_age[0].timestamp = old_secs;
    broker
        .park_with(&unknown_age, &consumer_headers(None, Vec::new()))
        .await;

    let dry = broker
        .run(&["purge", "--older-than", "7d", "--dry-run"])
        .await;
    assert!(dry.status.success());
    assert!(stdout(&dry).contains("3 of 7 parked events"));
    assert!(stdout(&dry).contains("dry run: nothing changed"));
    assert_eq!(broker.depth(&broker.dlq()).await, 7);

    let purge = broker.run(&["purge", "--older-than", "7d", "--yes"]).await;
    assert!(purge.status.success());
    assert!(stdout(&purge).contains("purged 3 events"));

    let remaining = broker.drain(&broker.dlq()).await;
    let mut kept = recent.clone();
    kept.extend(created_long_ago);
    kept.extend(unknown_age);
    assert_same_messages(&remaining, &kept);
}

#[tokio::test]
async fn purge_by_id_with_yes_removes_exactly_those() {
    let broker = Broker::new().await;
    let parked = events(4, "invoice.paid");
    broker.park(&parked, Utc::now()).await;

    let purge = broker
        .run(&["purge", "--event-id", &parked[0].id, &parked[2].id, "--yes"])
        .await;
    assert!(purge.status.success());

    let remaining = broker.drain(&broker.dlq()).await;
    assert_same_messages(&remaining, &[parked[1].clone(), parked[3].clone()]);
}

#[tokio::test]
async fn a_dry_run_moves_nothing_and_a_selective_replay_moves_only_the_selection() {
    let broker = Broker::new().await;
    let paid = events(3, "invoice.paid");
    let refunded = events(2, "charge.refunded");
    broker.park(&paid, Utc::now()).await;
    broker.park(&refunded, Utc::now()).await;

    let dry = broker.run(&["replay", "--all", "--dry-run"]).await;
    assert!(dry.status.success());
    assert!(stdout(&dry).contains("5 of 5 parked events would be replayed"));
    assert_eq!(broker.depth(&broker.main_queue()).await, 0);
    assert_eq!(broker.depth(&broker.dlq()).await, 5);

    let by_type = broker
        .run(&["replay", "--type", "charge.refunded", "--yes"])
        .await;
    assert!(by_type.status.success());
    let by_id = broker
        .run(&["replay", "--event-id", &paid[1].id, "--yes"])
        .await;
    assert!(by_id.status.success());

    let delivered = broker.drain(&broker.main_queue()).await;
    let mut ids: Vec<String> = delivered.iter().map(Got::id).collect();
    ids.sort();
    let mut want = vec![
        refunded[0].id.clone(),
        refunded[1].id.clone(),
        paid[1].id.clone(),
    ];
    want.sort();
    assert_eq!(ids, want);
    let remaining = broker.drain(&broker.dlq()).await;
    assert_same_messages(&remaining, &[paid[0].clone(), paid[2].clone()]);
}

#[tokio::test]
async fn export_then_replay_from_file_round_trips_the_bytes_exactly() {
    let broker = Broker::new().await;
    let mut parked = events(2, "invoice.paid");
    parked[1].body = vec![0xff, 0xfe, 0x00, b'{', 0x80];
    let mut text = events(1, "invoice.paid").remove(0);
    text.body = b"plain text, not JSON".to_vec();
    parked.push(text);
    broker.park(&parked, Utc::now()).await;

    let file = std::env::temp_dir().join(format!("dlq-export-{}.jsonl", uuid::Uuid::new_v4()));
    let path = file.to_str().unwrap();
    let export = broker.run(&["export", "--out", path]).await;
    assert!(export.status.success());
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["eventId"], parked[0].id.as_str());
    assert_eq!(lines[0]["headers"]["attempts"], 6);
    assert_eq!(lines[0]["properties"]["messageId"], parked[0].id.as_str());
    assert!(lines[0]["body"].is_string());
    assert!(lines[1].get("body").is_none() && lines[1]["bodyBase64"].is_string());
    assert_eq!(
        broker.depth(&broker.dlq()).await,
        3,
        "export leaves everything parked"
    );

    let again = broker.run(&["export", "--out", path]).await;
    assert_eq!(
        again.status.code(),
        Some(2),
        "an existing file is not overwritten"
    );

    let replay = broker.run(&["replay", "--from-file", path, "--yes"]).await;
    assert!(replay.status.success());
    // Replays pipeline their confirms, so arrival order is not part of the promise.
    let mut delivered = broker.drain(&broker.main_queue()).await;
    let position = |id: &str| parked.iter().position(|p| p.id == id).unwrap();
    delivered.sort_by_key(|g| position(&g.id()));
    assert_same_messages(&delivered, &parked);
    for (got, original) in delivered.iter().zip(&parked) {
        assert_eq!(*got.properties.timestamp(), Some(original.timestamp));
        assert_eq!(got.routing_key, original.event_type);
        assert_replayed_headers(got);
    }
    assert_eq!(
        broker.depth(&broker.dlq()).await,
        3,
        "replay --from-file leaves the queue alone"
    );
    let _ = std::fs::remove_file(&file);
}

#[tokio::test]
async fn a_replay_interrupted_with_ctrl_c_says_so_and_a_rerun_finishes_it() {
    let broker = Broker::new().await;
    let parked = events(3000, "invoice.paid");
    let all: HashSet<String> = parked.iter().map(|p| p.id.clone()).collect();
    broker.park(&parked, Utc::now()).await;

    let child = broker
        .command(&["replay", "--all", "--yes"])
        .spawn()
        .unwrap();
    let pid = child.id().unwrap().to_string();
    let started = Instant::now();
    while broker.depth(&broker.main_queue()).await < 100 {
        assert!(
            started.elapsed() < DEADLINE,
            "the replay never started moving"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let signalled = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(signalled.success());
    let output = child.wait_with_output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("interrupted") && stderr.contains("Rerun the same command"));
    assert!(stderr.contains("dedupes by event id"));

    let mut delivered: HashSet<String> = broker
        .drain(&broker.main_queue())
        .await
        .iter()
        .map(Got::id)
        .collect();
    let still_parked = broker.peek_ids(&broker.dlq()).await;
    assert!(
        !still_parked.is_empty(),
        "the interrupt came after the replay finished"
    );
    assert_eq!(delivered.union(&still_parked).count(), all.len());

    let rerun = broker.run(&["replay", "--all", "--yes"]).await;
    assert!(rerun.status.success());
    delivered.extend(broker.drain(&broker.main_queue()).await.iter().map(Got::id));
    assert_eq!(delivered, all);
    assert_eq!(broker.depth(&broker.dlq()).await, 0);
}

/// Runs the command on a pseudo-terminal (util-linux `script`), typing `input`.
async fn run_on_terminal(broker: &Broker, args: &[&str], input: &str) -> Output {
    use tokio::io::AsyncWriteExt as _;
    let mut line = format!(
        "{} --topology-base {} dlq",
        system_tests::binary("processor").display(),
        broker.topology.exchange()
    );
    for arg in args {
        line.push(' ');
        line.push_str(arg);
    }
    let mut child = tokio::process::Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .env("AMQP_URL", amqp_url())
        .env("DATABASE_URL", &broker.database.url)
        .env("RETRY_DELAYS", RETRY_DELAYS)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).await.unwrap();
    // Keep stdin open until the command is done: closing it would end the terminal session.
    let output = tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .expect("the command finished")
        .unwrap();
    drop(stdin);
    eprintln!("{}", String::from_utf8_lossy(&output.stdout));
    output
}

#[tokio::test]
async fn purge_on_a_terminal_offers_an_export_then_deletes_only_after_a_yes() {
    let broker = Broker::new().await;
    let parked = events(3, "invoice.paid");
    broker.park(&parked, Utc::now()).await;
    let file =
        std::env::temp_dir().join(format!("dlq-before-purge-{}.jsonl", uuid::Uuid::new_v4()));

    let declined = run_on_terminal(&broker, &["purge", "--event-id", &parked[0].id], "\nn\n").await;
    assert!(declined.status.success());
    assert!(stdout(&declined).contains("cancelled: nothing changed"));
    assert_eq!(broker.depth(&broker.dlq()).await, 3);

    let input = format!("{}\ny\n", file.display());
    let accepted = run_on_terminal(&broker, &["purge", "--event-id", &parked[0].id], &input).await;
    assert!(accepted.status.success());
    let text = stdout(&accepted);
    assert!(text.contains("Export 1 event to a file first?"));
    assert!(text.contains("purged 1 event from"));
    let exported = std::fs::read_to_string(&file).unwrap();
    assert_eq!(exported.lines().count(), 1);
    assert!(exported.contains(&parked[0].id));

    let remaining = broker.drain(&broker.dlq()).await;
    assert_same_messages(&remaining, &parked[1..]);
    let _ = std::fs::remove_file(&file);
}

/// Every read-only command, twice: the same answer both times, nothing unacknowledged the
/// moment it exits, and the queue in its original order afterwards.
#[tokio::test]
async fn read_only_commands_answer_the_same_twice_and_leave_the_queue_as_it_was() {
    let broker = Broker::new().await;
    let mut parked = events(250, "checkout.session.completed");
    parked.extend(events(50, "invoice.paid"));
    broker.park(&parked, Utc::now()).await;
    let dir = std::env::temp_dir().join(format!("dlq-reads-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir(&dir).unwrap();
    let export = dir.join("parked.jsonl");
    let export = export.to_str().unwrap();
    let show_id = parked[260].id.clone();

    let commands: Vec<Vec<&str>> = vec![
        vec!["list", "--limit", "20"],
        vec!["list", "--type", "invoice.paid", "--json"],
        vec!["list"],
        vec!["show", &show_id],
        vec!["replay", "--type", "invoice.paid", "--dry-run"],
        vec!["purge", "--older-than", "1d", "--dry-run"],
        vec!["purge", "--all", "--dry-run"],
        vec!["export", "--out", export, "--force"],
    ];
    for args in &commands {
        let mut answers = Vec::new();
        for _ in 0..2 {
            let output = broker.run(args).await;
            assert!(output.status.success(), "{args:?}");
            // Ready right away: nothing was left unacknowledged for the broker to return.
            assert_eq!(broker.depth(&broker.dlq()).await, 300, "{args:?}");
            let mut answer = stdout(&output);
            if args[0] == "export" {
                answer.push_str(&std::fs::read_to_string(export).unwrap());
            }
            answers.push(answer);
        }
        assert_eq!(answers[0], answers[1], "{args:?} answered differently");
    }
    let listed = broker.run(&["list", "--limit", "20"]).await;
    assert!(stdout(&listed).contains("20 shown, 300 parked"));
    let json = broker
        .run(&["list", "--type", "invoice.paid", "--json"])
        .await;
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(rows.len(), 50);
    assert_eq!(
        std::fs::read_to_string(export).unwrap().lines().count(),
        300
    );
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        1,
        "no temporary file left"
    );

    let remaining = broker.drain(&broker.dlq()).await;
    assert_same_messages(&remaining, &parked);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `kill -9` in the middle of a read: nothing is lost, and the copies the killed pass had
/// confirmed but not yet acknowledged are removed by the next command.
#[tokio::test]
async fn a_read_killed_midway_loses_nothing_and_the_next_command_removes_the_leftover_copies() {
    let broker = Broker::new().await;
    let parked = events(2000, "invoice.paid");
    let all: HashSet<String> = parked.iter().map(|p| p.id.clone()).collect();
    broker.park(&parked, Utc::now()).await;

    // The pass is under way once its consumer is there and has taken a window.
    broker
        .kill_when(&["replay", "--all", "--dry-run"], async |b: &Broker| {
            b.consumers(&b.dlq()).await > 0 && b.depth(&b.dlq()).await < 2000
        })
        .await;

    // Every event is still parked (some perhaps twice) once the broker took back the window.
    let started = Instant::now();
    loop {
        let parked_now = broker.peek_ids(&broker.dlq()).await;
        if parked_now == all {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "events vanished after the kill"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        broker.index().await.1,
        Some(false),
        "a killed pass leaves the index untrusted"
    );
    let listed = broker.run(&["list", "--json"]).await;
    assert!(listed.status.success());
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(rows.len(), 2000, "each event listed once");
    assert_eq!(broker.index().await, (2000, Some(true)));
    let remaining = broker.drain(&broker.dlq()).await;
    assert_eq!(remaining.len(), 2000, "no copy left behind");
    let ids: HashSet<String> = remaining.iter().map(Got::id).collect();
    assert_eq!(ids, all);
}

#[tokio::test]
async fn a_second_command_on_the_same_queue_is_refused_while_one_runs() {
    let broker = Broker::new().await;
    broker.park(&events(3, "invoice.paid"), Utc::now()).await;
    // What a running command holds: the queue's exclusive lock, on a connection of its own.
    let running = shared::amqp::connect(&amqp_url(), "dlq-lock-holder")
        .await
        .unwrap();
    let holder = running.create_channel().await.unwrap();
    holder
        .queue_declare(
            format!("{}.lock", broker.dlq()).as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();

    let refused = broker.run(&["list"]).await;
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("another `processor dlq` command"));

    running.close(200, "done".into()).await.unwrap();
    let listed = broker.run(&["list"]).await;
    assert!(listed.status.success());
    assert!(stdout(&listed).contains("3 shown, 3 parked"));
}

#[tokio::test]
async fn a_failed_command_names_its_cause_once_without_colour_codes() {
    let broker = Broker::new().await;
    let output = broker
        .run_with(&["list"], "AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")
        .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot reach the broker"), "{stderr}");
    assert_eq!(
        stderr.matches("refused").count(),
        1,
        "the cause is named once: {stderr}"
    );
    assert!(
        !stderr.contains('\u{1b}'),
        "no colour codes off a terminal: {stderr}"
    );

    // A warning is logged (no index without Postgres), plain: stderr is not a terminal.
    broker.park(&events(2, "invoice.paid"), Utc::now()).await;
    let output = broker
        .run_with(
            &["list"],
            "DATABASE_URL",
            "postgres://postgres@127.0.0.1:1/none",
        )
        .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("working without the dead-letter index"),
        "{stderr}"
    );
    assert!(
        !stderr.contains('\u{1b}'),
        "no colour codes off a terminal: {stderr}"
    );
    assert!(stdout(&output).contains("2 shown, 2 parked"));
}

#[tokio::test]
async fn a_failed_export_with_force_keeps_the_earlier_export() {
    let broker = Broker::new().await;
    let dir = std::env::temp_dir().join(format!("dlq-force-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir(&dir).unwrap();
    let target = dir.join("parked.jsonl");
    std::fs::write(&target, "the earlier export\n").unwrap();

    let output = broker
        .run_with(
            &["export", "--out", target.to_str().unwrap(), "--force"],
            "AMQP_URL",
            "amqp://guest:guest@127.0.0.1:1/%2f",
        )
        .await;
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        std::fs::read_to_string(&target).unwrap(),
        "the earlier export\n"
    );
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        1,
        "no temporary file left"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An existing deployment's dead-letter queue was declared without a type (classic by the
/// broker's default): declaring the topology with the explicit type accepts it, and the queue
/// is classic either way (a quorum declaration of it is refused).
#[tokio::test]
async fn the_dead_letter_queue_is_declared_classic_and_an_untyped_one_upgrades_in_place() {
    let delays = shared::config::parse_duration_list(RETRY_DELAYS).unwrap();
    let connection = shared::amqp::connect(&amqp_url(), "dlq-type-test")
        .await
        .unwrap();
    for pre_existing in [true, false] {
        let base = format!("t.dlqtype.{}", uuid::Uuid::new_v4().simple());
        let topology = Topology::new(base, delays.clone());
        let channel = connection.create_channel().await.unwrap();
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        if pre_existing {
            channel
                .queue_declare(
                    topology.dead_letter_queue().as_str().into(),
                    durable,
                    FieldTable::default(),
                )
                .await
                .unwrap();
        }
        topology.declare(&channel).await.unwrap();
        topology.declare(&channel).await.unwrap();

        let probe = connection.create_channel().await.unwrap();
        let mut quorum = FieldTable::default();
        quorum.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        let refused = probe
            .queue_declare(
                topology.dead_letter_queue().as_str().into(),
                durable,
                quorum,
            )
            .await;
        assert!(refused.is_err(), "the dead-letter queue is not classic");
        let _ = topology.delete(&channel).await;
    }
    let _ = connection.close(200, "done".into()).await;
}

/// The index of parked events follows the queue: a full pass fills it, replay and purge take
/// their events out, `show` answers from it, and an event parked after the last pass is found
/// in the queue (and indexed by the next pass).
#[tokio::test]
async fn the_index_follows_the_queue_through_reads_replays_and_purges() {
    let broker = Broker::new().await;
    let parked = events(200, "invoice.paid");
    broker.park(&parked, Utc::now()).await;

    assert!(broker.run(&["list", "--limit", "5"]).await.status.success());
    assert_eq!(broker.index().await.0, 0, "a look at the head is no pass");
    assert!(broker.run(&["list"]).await.status.success());
    assert_eq!(broker.index().await, (200, Some(true)));

    let shown = broker.run(&["show", &parked[150].id]).await;
    assert!(shown.status.success());
    assert!(stdout(&shown).contains(&format!("\"id\": \"{}\"", parked[150].id)));
    assert!(stdout(&shown).contains("last_error: \"projection failed: db timeout\""));

    let replay = broker
        .run(&["replay", "--event-id", &parked[10].id, "--yes"])
        .await;
    assert!(replay.status.success());
    let purge = broker
        .run(&["purge", "--event-id", &parked[11].id, "--yes"])
        .await;
    assert!(purge.status.success());
    assert_eq!(broker.index().await, (198, Some(true)));
    let gone = broker.run(&["show", &parked[11].id]).await;
    assert_eq!(gone.status.code(), Some(1), "a purged event is not shown");

    let late = events(3, "charge.refunded");
    broker.park(&late, Utc::now()).await;
    let shown = broker.run(&["show", &late[2].id]).await;
    assert!(
        shown.status.success(),
        "found in the queue though not indexed"
    );
    assert!(broker.run(&["list"]).await.status.success());
    assert_eq!(broker.index().await, (201, Some(true)));
}

/// With the park-time call ([`processor::dlq::ParkedIndex`]) the index stays current without a
/// pass: an empty queue makes it trusted, every event recorded as it is parked keeps it whole,
/// and a later pass finds the very same fingerprints (no row is replaced).
#[tokio::test]
async fn events_recorded_at_park_time_keep_the_index_current_without_a_pass() {
    let broker = Broker::new().await;
    assert!(broker.run(&["list"]).await.status.success());
    assert_eq!(
        broker.index().await,
        (0, Some(true)),
        "an empty queue is indexed"
    );

    // What the consumer would do: record each event, as published, once its publish is confirmed.
    let parked = events(50, "invoice.paid");
    let headers = consumer_headers(Some(&Utc::now().to_rfc3339()), Vec::new());
    broker.park_with(&parked, &headers).await;
    let hook = processor::dlq::ParkedIndex::open(&broker.database.url, &broker.topology)
        .await
        .unwrap();
    for event in &parked {
        let published = parked_properties(event, &headers);
        hook.record(&event.body, &published).await.unwrap();
    }
    assert_eq!(broker.index().await, (50, Some(true)));
    let shown = broker.run(&["show", &parked[49].id]).await;
    assert!(shown.status.success());

    let rows_before = broker.index_rows().await;
    let pass = broker
        .run(&["purge", "--event-id", "evt_not_parked", "--yes"])
        .await;
    assert!(pass.status.success());
    assert_eq!(
        broker.index_rows().await,
        rows_before,
        "the pass found the recorded fingerprints"
    );
    // A plan read from the index is carried out on the queue's messages: they agree.
    let replayed = run_on_terminal(&broker, &["replay", "--event-id", &parked[7].id], "y\n").await;
    assert!(replayed.status.success());
    assert!(stdout(&replayed).contains("replayed 1 event"));
    let delivered = broker.drain(&broker.main_queue()).await;
    assert_same_messages(&delivered, &parked[7..8]);
}
