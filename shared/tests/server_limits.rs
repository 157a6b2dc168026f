//! The listener's limits, seen from a raw TCP client: stalled heads are cut off, slow requests
//! get 408, requests over the in-flight cap and connections over the connection cap get 503.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use shared::server::{ServerLimits, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

const GET_FAST: &[u8] = b"GET /fast HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
const GET_SLOW: &[u8] = b"GET /slow HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";

struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(limits: ServerLimits) -> Self {
        let router = Router::new()
            .route("/fast", get(|| async { "fast" }))
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    "slow"
                }),
            );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            serve(listener, router, &limits, async {
                let _ = stopped.await;
            })
            .await
        });
        Self {
            addr,
            stop: Some(stop),
            task,
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("server stops")
            .unwrap()
            .unwrap();
    }
}

fn limits() -> ServerLimits {
    ServerLimits {
        header_read_timeout: Duration::from_millis(300),
        request_timeout: Duration::from_millis(500),
        max_connections: 4,
        max_in_flight: 2,
    }
}

/// Sends `request` on a new connection and reads the answer to the end (5 s at most).
async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    read_to_end(&mut stream).await
}

async fn read_to_end(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out))
        .await
        .expect("the server closes the connection");
    String::from_utf8_lossy(&out).into_owned()
}

fn status(answer: &str) -> &str {
    answer.split(' ').nth(1).unwrap_or("")
}

#[tokio::test]
async fn a_half_sent_header_is_cut_off_after_the_header_read_timeout() {
    let server = Server::start(limits()).await;
    let mut stalled = TcpStream::connect(server.addr).await.unwrap();
    stalled
        .write_all(b"POST /fast HTTP/1.1\r\nhost: x\r\nstripe-sig")
        .await
        .unwrap();
    let started = Instant::now();
    let answer = read_to_end(&mut stalled).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "closed after {waited:?}"
    );
    assert!(!answer.contains("200"), "{answer}");
    // A client that sends nothing at all is cut off too.
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    read_to_end(&mut silent).await;
    assert_eq!(status(&exchange(server.addr, GET_FAST).await), "200");
    server.stop().await;
}

#[tokio::test]
async fn a_request_running_past_the_request_timeout_is_answered_408() {
    let server = Server::start(limits()).await;
    let started = Instant::now();
    let answer = exchange(server.addr, GET_SLOW).await;
    assert_eq!(status(&answer), "408", "{answer}");
    assert!(answer.contains(r#""error":"request_timeout""#), "{answer}");
    assert!(started.elapsed() < Duration::from_millis(1500));
    server.stop().await;
}

#[tokio::test]
async fn requests_over_the_in_flight_cap_are_shed_with_503() {
    let mut generous = limits();
    generous.request_timeout = Duration::from_secs(5);
    let server = Server::start(generous).await;
    let addr = server.addr;
    let slow: Vec<_> = (0..2)
        .map(|_| tokio::spawn(async move { exchange(addr, GET_SLOW).await }))
        .collect();
    // The two slow requests hold both permits; poll until the cap is reached.
    let shed = loop {
        let answer = exchange(addr, GET_FAST).await;
        if status(&answer) == "503" {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        shed.to_ascii_lowercase().contains("retry-after: 1"),
        "{shed}"
    );
    assert!(shed.contains(r#""error":"unavailable""#), "{shed}");
    for task in slow {
        assert_eq!(status(&task.await.unwrap()), "200");
    }
    assert_eq!(status(&exchange(addr, GET_FAST).await), "200");
    server.stop().await;
}

#[tokio::test]
async fn connections_over_the_cap_are_answered_503_and_closed() {
    let mut tight = limits();
    tight.max_connections = 2;
    tight.header_read_timeout = Duration::from_secs(5);
    let server = Server::start(tight).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut idle = TcpStream::connect(server.addr).await.unwrap();
        // A complete keep-alive exchange proves the connection holds a slot.
        idle.write_all(b"GET /fast HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = idle.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).contains(" 200 "));
        held.push(idle);
    }
    let answer = exchange(server.addr, GET_FAST).await;
    assert_eq!(status(&answer), "503", "{answer}");
    assert!(answer.contains("too many connections"));
    drop(held);
    // The slots come back once the held connections are gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    while status(&exchange(server.addr, GET_FAST).await) != "200" {
        assert!(Instant::now() < deadline, "slots never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
}
