//! The HTTP listener both services use, with the limits a public listener needs.
//!
//! Invariants, for every connection and request the listener accepts:
//! - a client that has not sent a complete request head within `header_read_timeout` is
//!   disconnected (hyper's header read timeout, which `axum::serve` leaves unset), so stalled or
//!   trickling clients cannot hold sockets;
//! - at most `max_connections` connections are open at once; one more is answered 503 (with
//!   `Retry-After`) and closed, instead of waiting in the backlog;
//! - at most `max_in_flight` requests run at once; one more is answered 503 at once (load
//!   shedding, no queue), so a burst cannot pile up latency behind it;
//! - no request runs longer than `request_timeout` (reading the body included); it is answered
//!   408.
//!
//! Refusals use the services' error shape `{"error":"<code>","message":"…"}`. On shutdown the
//! listener stops accepting, idle connections are closed, and requests in flight get up to
//! `request_timeout` to finish.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::config::{ConfigError, Env};

/// Seconds a refused client is asked to wait.
const RETRY_AFTER_SECS: &str = "1";

/// How long a refused connection may take to receive its 503 and go away.
const REFUSE_DEADLINE: Duration = Duration::from_secs(2);

/// The answer to a connection over `max_connections`, written before the request is read.
const REFUSED_CONNECTION: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 57\r\n\r\n\
{\"error\":\"unavailable\",\"message\":\"too many connections\"}\n";

/// Limits of one listener. Read with [`ServerLimits::from_env`] under the listener's variable
/// prefix (`INGRESS_…`, `API_…`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerLimits {
    /// `<PREFIX>_HEADER_READ_TIMEOUT`: time to send a complete request head.
    pub header_read_timeout: Duration,
    /// `<PREFIX>_REQUEST_TIMEOUT`: longest a request may run, body included (408 after).
    pub request_timeout: Duration,
    /// `<PREFIX>_MAX_CONNECTIONS`: open connections at once (503 and close beyond).
    pub max_connections: usize,
    /// `<PREFIX>_MAX_IN_FLIGHT`: requests running at once (503 beyond).
    pub max_in_flight: usize,
}

impl ServerLimits {
    /// The defaults of a listener: 10 s to send the head, the given request timeout, 1024
    /// connections and 256 requests in flight.
    #[must_use]
    pub fn with_request_timeout(request_timeout: Duration) -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            request_timeout,
            max_connections: 1024,
            max_in_flight: 256,
        }
    }

    /// Reads `<prefix>_HEADER_READ_TIMEOUT`, `<prefix>_REQUEST_TIMEOUT` (durations such as `10s`),
    /// `<prefix>_MAX_CONNECTIONS` and `<prefix>_MAX_IN_FLIGHT`, each falling back to `defaults`.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the variable that does not parse or is zero.
    pub fn from_env(env: &Env, prefix: &str, defaults: &Self) -> Result<Self, ConfigError> {
        let duration = |name: &str, default: Duration| {
            let var = format!("{prefix}_{name}");
            let value = env.duration_or(&var, default)?;
            if value.is_zero() {
                return Err(ConfigError::new(&var, "must be positive"));
            }
            Ok(value)
        };
        let count = |name: &str, default: usize| {
            let var = format!("{prefix}_{name}");
            let value: usize = env.parse_or(&var, default)?;
            if value == 0 {
                return Err(ConfigError::new(&var, "must be at least 1"));
            }
            Ok(value)
        };
        Ok(Self {
            header_read_timeout: duration("HEADER_READ_TIMEOUT", defaults.header_read_timeout)?,
            request_timeout: duration("REQUEST_TIMEOUT", defaults.request_timeout)?,
            max_connections: count("MAX_CONNECTIONS", defaults.max_connections)?,
            max_in_flight: count("MAX_IN_FLIGHT", defaults.max_in_flight)?,
        })
    }
}

/// An optional listen address variable (`INGRESS_METRICS_ADDR`, `PROCESSOR_METRICS_ADDR`).
///
/// # Errors
/// A [`ConfigError`] naming `var` when it is set but not a socket address.
pub fn optional_addr(env: &Env, var: &str) -> Result<Option<SocketAddr>, ConfigError> {
    env.get(var)
        .map(|raw| {
            raw.trim()
                .parse()
                .map_err(|e| ConfigError::new(var, format!("cannot parse {raw:?}: {e}")))
        })
        .transpose()
}

/// The error answer of the listener's own refusals.
fn refusal(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({ "error": code, "message": message });
    let mut response = (status, axum::Json(body)).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from_static(RETRY_AFTER_SECS),
        );
    }
    response
}

#[derive(Debug)]
struct Guard {
    in_flight: Semaphore,
    request_timeout: Duration,
}

/// Sheds requests over the in-flight cap and times out the slow ones.
async fn guard(State(guard): State<Arc<Guard>>, request: Request, next: Next) -> Response {
    let Ok(_permit) = guard.in_flight.try_acquire() else {
        metrics::counter!("http_requests_shed_total").increment(1);
        return refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "too many requests in flight, retry shortly",
        );
    };
    match tokio::time::timeout(guard.request_timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            metrics::counter!("http_requests_timed_out_total").increment(1);
            refusal(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                "the request took too long",
            )
        }
    }
}

/// Wraps `router` in the per-request limits (in-flight cap and request timeout).
pub fn with_request_limits(router: Router, limits: &ServerLimits) -> Router {
    let state = Arc::new(Guard {
        in_flight: Semaphore::new(limits.max_in_flight),
        request_timeout: limits.request_timeout,
    });
    router.layer(axum::middleware::from_fn_with_state(state, guard))
}

/// A router with only `GET /metrics` (Prometheus text), for a separate, internal address.
pub fn metrics_router() -> Router {
    let handle = crate::telemetry::metrics_handle();
    Router::new().route(
        "/metrics",
        axum::routing::get(move || std::future::ready(handle.render())),
    )
}

/// Serves `router` on `listener` under `limits` until `shutdown` resolves, then stops accepting,
/// closes idle connections and gives requests in flight up to `request_timeout` to finish.
///
/// # Errors
/// Never in practice: accept errors (out of file descriptors, a reset before accept) are logged
/// and retried; the signature keeps `axum::serve`'s.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: &ServerLimits,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let service = TowerToHyperService::new(with_request_limits(router, limits));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(error) => {
                    // As axum::serve: EMFILE and friends are transient; back off briefly.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
            metrics::counter!("http_connections_refused_total").increment(1);
            tokio::spawn(refuse(stream));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let connection =
            graceful.watch(http.serve_connection(TokioIo::new(stream), service.clone()));
        tokio::spawn(async move {
            // Errors here are the client's (reset, header timeout, malformed request).
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection closed with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.request_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the shutdown deadline; closing them");
    }
    Ok(())
}

/// Answers a connection over the cap with 503 and closes it. The request is drained briefly so
/// closing does not reset the connection before the client has read the answer.
async fn refuse(mut stream: TcpStream) {
    let _ = tokio::time::timeout(REFUSE_DEADLINE, async {
        stream.write_all(REFUSED_CONNECTION).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 1024];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<(), std::io::Error>(())
    })
    .await;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn limits_read_their_prefixed_variables_and_name_bad_ones() {
        let defaults = ServerLimits::with_request_timeout(Duration::from_secs(15));
        let env = Env::from_pairs([
            ("API_HEADER_READ_TIMEOUT", "2s"),
            ("API_MAX_IN_FLIGHT", "7"),
        ]);
        let limits = ServerLimits::from_env(&env, "API", &defaults).unwrap();
        assert_eq!(limits.header_read_timeout, Duration::from_secs(2));
        assert_eq!(limits.max_in_flight, 7);
        assert_eq!(limits.request_timeout, Duration::from_secs(15));
        assert_eq!(limits.max_connections, 1024);
        for (var, value) in [
            ("API_MAX_CONNECTIONS", "0"),
            ("API_MAX_IN_FLIGHT", "many"),
            ("API_REQUEST_TIMEOUT", "0s"),
            ("API_HEADER_READ_TIMEOUT", "soon"),
        ] {
            let err = ServerLimits::from_env(&Env::from_pairs([(var, value)]), "API", &defaults)
                .unwrap_err();
            assert_eq!(err.var, var);
        }
        assert_eq!(
            optional_addr(&Env::from_pairs([("M", "127.0.0.1:9100")]), "M").unwrap(),
            Some(SocketAddr::from(([127, 0, 0, 1], 9100)))
        );
        assert_eq!(optional_addr(&Env::default(), "M").unwrap(), None);
        assert_eq!(
            optional_addr(&Env::from_pairs([("M", "nowhere")]), "M")
                .unwrap_err()
                .var,
            "M"
        );
    }

    #[test]
    fn the_refused_connection_answer_declares_its_exact_length() {
        let text = std::str::from_utf8(REFUSED_CONNECTION).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["error"], "unavailable");
    }
}
