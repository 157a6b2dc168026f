//! Ingress on port 0 over a test topology, and a client for its webhook endpoint.

use std::net::SocketAddr;
use std::time::Duration;

use shared::config::Env;
use tokio::sync::oneshot;

use crate::amqp::TestBroker;
use crate::eventually;

pub const SECRET: &str = "whsec_Jv3kQp8ZrT2mWx6sLd9bHn4cFy7gAe1u";

pub struct Ingress {
    pub addr: SocketAddr,
    pub stop: Option<oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
    pub http: reqwest::Client,
}

impl Ingress {
    pub async fn start(broker: &TestBroker, amqp: &str, extra: &[(&str, &str)]) -> Self {
        let mut pairs = vec![("STRIPE_WEBHOOK_SECRET", SECRET), ("AMQP_URL", amqp)];
        pairs.extend_from_slice(extra);
        let mut config = ingress::Config::from_env(&Env::from_pairs(pairs)).unwrap();
        config.topology = broker.topology.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(ingress::run(config, listener, async {
            let _ = rx.await;
        }));
        Self {
            addr,
            stop: Some(tx),
            task,
            http: reqwest::Client::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The Prometheus text of `/metrics` on the ingress address.
    pub async fn metrics(&self) -> String {
        let response = self.http.get(self.url("/metrics")).send().await.unwrap();
        response.text().await.unwrap()
    }

    pub async fn wait_ready(&self) {
        eventually(
            Duration::from_secs(10),
            "ingress /readyz to say ready",
            || async {
                let r = self.http.get(self.url("/readyz")).send().await.ok()?;
                (r.status() == 200).then_some(())
            },
        )
        .await;
    }

    pub async fn post(
        &self,
        body: &str,
        signature: Option<String>,
    ) -> (u16, serde_json::Value, Option<String>) {
        let mut request = self
            .http
            .post(self.url("/webhooks/stripe"))
            .body(body.to_owned());
        if let Some(signature) = signature {
            request = request.header("Stripe-Signature", signature);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        let json = response.json().await.unwrap_or(serde_json::Value::Null);
        (status, json, retry_after)
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }
}
