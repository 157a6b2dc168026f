//! TLS on every connection: the whole stack (ingress, the serving worker, every operator
//! command) runs against a PostgreSQL, a Redis and a RabbitMQ that accept TLS only, presenting
//! certificates of a private CA the test adds to the system trust store. Purchases are applied,
//! the app's messages relayed, and every `processor dlq` and `processor outbox` command works;
//! a clear-text connection to any of the three is refused, so none of this can have gone around
//! TLS.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use serde_json::{Value, json};
use shared::samples::{self, Sample};
use system_tests::api::sign;
use system_tests::servers::{
    PrivatePostgres, PrivateRabbit, PrivateRedis, Process, TestCa, free_port,
};
use system_tests::{eventually, unique};

const STRIPE_SECRET: &str = "whsec_Tq8vN3kZ7mRw2xYc5LpB9dHf4gJs6KeU";
const JWT_SECRET: &str = "tls-suite-jwt-key-4b9e1c7a2f6d8305e1a9c4b7d2f0";
const ADMIN: &str = "tls_admin_7c2e9a4f1b8d3065c9e2a7f4b1d8";
/// A Standard Webhooks secret (`whsec_` and 32 random bytes in base64).
const APP_SECRET: &str = "whsec_q3N0c1B4Wk1rR2VqU3Z0YjlMbU5wUjd4YzJ3RmhLOGc=";
const WAIT: Duration = Duration::from_secs(60);

/// The app's webhook endpoint: every body it was sent.
#[derive(Clone, Default)]
struct Hooks(Arc<Mutex<Vec<Value>>>);

impl Hooks {
    async fn serve(&self) -> SocketAddr {
        async fn receive(State(hooks): State<Hooks>, body: Bytes) -> &'static str {
            if let Ok(json) = serde_json::from_slice(&body) {
                hooks.0.lock().unwrap().push(json);
            }
            "ok"
        }
        let app = axum::Router::new()
            .route("/hooks", axum::routing::post(receive))
            .with_state(self.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    /// How many `entitlements.changed` messages about `user` carried message id `id` (any id
    /// when `None`).
    fn changed(&self, user: &str, id: Option<&str>) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m["type"] == "entitlements.changed" && m["userId"] == user)
            .filter(|m| id.is_none_or(|id| m["id"] == id))
            .count()
    }

    fn first_id(&self, user: &str) -> Option<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .find(|m| m["type"] == "entitlements.changed" && m["userId"] == user)
            .and_then(|m| m["id"].as_str().map(str::to_owned))
    }
}

struct Stack {
    env: Vec<(&'static str, String)>,
    ingress: String,
    api: String,
    http: reqwest::Client,
    dir: std::path::PathBuf,
    _processes: Vec<Process>,
}

impl Stack {
    async fn start(
        pg: &PrivatePostgres,
        redis: &PrivateRedis,
        rabbit: &PrivateRabbit,
        hooks: SocketAddr,
    ) -> Self {
        let dir = std::env::temp_dir().join(unique("tls-stack"));
        std::fs::create_dir_all(&dir).unwrap();
        let api = format!("127.0.0.1:{}", free_port());
        let ingress = format!("127.0.0.1:{}", free_port());
        let env = vec![
            ("DATABASE_URL", pg.url("entitlements")),
            ("REDIS_URL", redis.url()),
            ("AMQP_URL", rabbit.url()),
            ("API_ADDR", api.clone()),
            ("AUTH_JWT_SECRET", JWT_SECRET.to_owned()),
            ("ADMIN_API_TOKEN", ADMIN.to_owned()),
            ("APP_WEBHOOK_URL", format!("http://{hooks}/hooks")),
            ("APP_WEBHOOK_SECRET", APP_SECRET.to_owned()),
            ("RETRY_DELAYS", "1s".to_owned()),
            ("RUST_LOG", "warn".to_owned()),
        ];
        let stack = Self {
            env,
            ingress: ingress.clone(),
            api,
            http: reqwest::Client::new(),
            _processes: Vec::new(),
            dir,
        };
        let migrate = stack.processor(&["migrate"]);
        assert!(migrate.status.success(), "migrate: {}", stderr(&migrate));
        let ingress_env = [
            ("INGRESS_ADDR", ingress),
            ("AMQP_URL", rabbit.url()),
            ("STRIPE_WEBHOOK_SECRET", STRIPE_SECRET.to_owned()),
            ("RUST_LOG", "warn".to_owned()),
        ];
        let processes = vec![
            Process::spawn("ingress", &[], &ingress_env, stack.dir.join("ingress.log")),
            Process::spawn(
                "processor",
                &["run"],
                &stack.env,
                stack.dir.join("processor.log"),
            ),
        ];
        let stack = Self {
            _processes: processes,
            ..stack
        };
        // Ready means each process holds its stores' connections: over TLS, as nothing else is
        // accepted.
        for base in [&stack.ingress, &stack.api] {
            let url = format!("http://{base}/readyz");
            eventually(WAIT, &format!("{url} is ready"), || async {
                let response = stack.http.get(&url).send().await.ok()?;
                (response.status() == 200).then_some(())
            })
            .await;
        }
        stack
    }

    /// `processor <args>` with the stack's environment.
    fn processor(&self, args: &[&str]) -> Output {
        Command::new(system_tests::binary("processor"))
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .output()
            .expect("run processor")
    }

    /// `processor <args>`, which must succeed; its standard output.
    fn command(&self, args: &[&str]) -> String {
        let out = self.processor(args);
        assert!(
            out.status.success(),
            "processor {}: {}\n(logs in {})",
            args.join(" "),
            stderr(&out),
            self.dir.display()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Posts `event` to ingress signed as Stripe does; ingress answers 200 only after the broker
    /// confirmed it.
    async fn deliver(&self, event: &Value) {
        let body = serde_json::to_vec(event).unwrap();
        let header = shared::signature::signature_header(
            STRIPE_SECRET,
            chrono::Utc::now().timestamp(),
            &body,
        );
        let response = self
            .http
            .post(format!("http://{}/webhooks/stripe", self.ingress))
            .header("Stripe-Signature", header)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    }

    async fn get(&self, path: &str, bearer: &str) -> Value {
        self.http
            .get(format!("http://{}{path}", self.api))
            .bearer_auth(bearer)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The ids `processor dlq list --json` shows.
    fn parked(&self) -> Vec<String> {
        let list: Value = serde_json::from_str(&self.command(&["dlq", "list", "--json"])).unwrap();
        list.as_array()
            .unwrap()
            .iter()
            .filter_map(|m| m["eventId"].as_str().map(str::to_owned))
            .collect()
    }

    async fn wait_parked(&self, id: &str, parked: bool) {
        let what = format!("{id} parked: {parked}");
        eventually(WAIT, &what, || async {
            (self.parked().iter().any(|p| p == id) == parked).then_some(())
        })
        .await;
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Each server refuses a client that does not speak TLS.
async fn assert_clear_text_refused(pg: &PrivatePostgres, redis: &PrivateRedis, port: u16) {
    let plain_pg = pg
        .url("postgres")
        .replace("sslmode=require", "sslmode=disable");
    let refused = tokio_postgres::connect(&plain_pg, tokio_postgres::NoTls).await;
    let error = format!("{:?}", refused.err().expect("Postgres refuses clear text"));
    assert!(error.contains("no encryption"), "{error}");

    let plain_redis = redis::Client::open(redis.url().replace("rediss://", "redis://")).unwrap();
    let ping = tokio::time::timeout(Duration::from_secs(5), async {
        let mut connection = plain_redis.get_multiplexed_async_connection().await?;
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
    })
    .await;
    assert!(
        !matches!(ping, Ok(Ok(_))),
        "Redis answers a clear-text PING"
    );

    let plain_amqp = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    assert!(
        shared::amqp::connect(&plain_amqp, "clear-text probe")
            .await
            .is_err(),
        "RabbitMQ accepts clear-text AMQP"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stack_works_against_stores_that_accept_tls_only() {
    let ca = TestCa::install();
    let pg = PrivatePostgres::start_tls(&ca);
    let redis = PrivateRedis::start_tls(&ca);
    let rabbit = PrivateRabbit::start_tls(&ca);
    assert!(pg.url("x").ends_with("?sslmode=require"));
    assert!(redis.url().starts_with("rediss://") && rabbit.url().starts_with("amqps://"));
    assert_clear_text_refused(&pg, &redis, rabbit.port).await;

    let hooks = Hooks::default();
    let hooks_addr = hooks.serve().await;
    let stack = Stack::start(&pg, &redis, &rabbit, hooks_addr).await;

    // A purchase through ingress (RabbitMQ), the worker (Postgres, Redis) and the API.
    let user = unique("tls_user");
    let object = unique("tls");
    let event_id = unique("evt_tls");
    let sample = Sample::pro(&user, &object);
    stack
        .deliver(&samples::event(
            &event_id,
            "checkout.session.completed",
            &sample,
        ))
        .await;
    let path = format!("/v1/entitlements/{user}");
    eventually(WAIT, "the purchase is applied", || async {
        let answer = stack.get(&path, ADMIN).await;
        (answer["entitlements"][0]["key"] == "pro" && answer["entitlements"][0]["active"] == true)
            .then_some(())
    })
    .await;
    let token = sign(
        &json!({"sub": user, "exp": chrono::Utc::now().timestamp() + 600}),
        JWT_SECRET,
    );
    let pro = stack.get("/api/pro/entitlement", &token).await;
    assert_eq!(pro["isPro"], true, "{pro}");
    // The answer is cached in Redis, which the service reached over TLS, as this client does.
    let cache = processor::redis_link::client(redis.url()).unwrap();
    let mut connection = cache.get_multiplexed_async_connection().await.unwrap();
    let cached: i64 = redis::cmd("EXISTS")
        .arg(format!("entitlements:v1:{user}"))
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(cached, 1, "the entitlement is cached");

    // The outbox relay (its own Postgres connection, the app's exchange over amqps://).
    let message = eventually(WAIT, "entitlements.changed reaches the app", || async {
        hooks.first_id(&user)
    })
    .await;
    let undelivered = || -> Vec<Value> {
        let list = stack.command(&["outbox", "list", "--json", "--user", &user]);
        serde_json::from_str(&list).unwrap()
    };
    eventually(WAIT, "delivered on every channel", || async {
        undelivered().is_empty().then_some(())
    })
    .await;
    let replay = |channel: &str, mode: &str| {
        stack.command(&[
            "outbox",
            "replay",
            "--id",
            &message,
            "--channel",
            channel,
            mode,
        ])
    };
    let plan = replay("webhook", "--dry-run");
    assert!(plan.contains(&message), "{plan}");
    replay("webhook", "--yes");
    eventually(WAIT, "the replayed message is delivered again", || async {
        (hooks.changed(&user, Some(&message)) >= 2).then_some(())
    })
    .await;
    replay("amqp", "--yes");
    eventually(WAIT, "the amqp replay is relayed", || async {
        undelivered().is_empty().then_some(())
    })
    .await;

    // Every dead-letter command, on an event that can never succeed.
    let poison = unique("evt_tls_poison");
    stack
        .deliver(
            &json!({"id": poison, "object": "event", "type": "checkout.session.completed",
                         "created": 1_900_000_000, "data": {"object": "not an object"}}),
        )
        .await;
    stack.wait_parked(&poison, true).await;
    let shown = stack.command(&["dlq", "show", &poison]);
    assert!(shown.contains("not an object"), "{shown}");
    let export = stack.dir.join("parked.jsonl");
    stack.command(&["dlq", "export", "--out", &export.display().to_string()]);
    assert!(exported(&export).contains(&poison));
    stack.command(&["dlq", "replay", "--event-id", &poison, "--yes"]);
    // Replayed, it fails again and is parked again.
    stack.wait_parked(&poison, true).await;
    stack.command(&["dlq", "purge", "--event-id", &poison, "--yes"]);
    stack.wait_parked(&poison, false).await;
    stack.command(&[
        "dlq",
        "replay",
        "--from-file",
        &export.display().to_string(),
        "--yes",
    ]);
    stack.wait_parked(&poison, true).await;
    stack.command(&["dlq", "purge", "--all", "--yes"]);
    stack.wait_parked(&poison, false).await;

    // The commands that rebuild state from Postgres.
    stack.command(&["recompute", "--user", &user]);
    let answer = stack.get(&path, ADMIN).await;
    assert_eq!(answer["entitlements"][0]["active"], true, "{answer}");
}

fn exported(path: &Path) -> String {
    std::fs::read_to_string(path).expect("the export file")
}
