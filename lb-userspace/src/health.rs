//! The agent's health endpoints, for the DaemonSet's probes and for operators (HTTP on a local
//! address, `--health-address`, 127.0.0.1:10256 by default: kube-proxy's healthz port, free on a
//! node that runs lb instead):
//!
//! - `GET /healthz` — liveness: 200 while the agent runs. An unreachable API server does not make
//!   it fail (restarting the agent would not bring the API server back, and the dataplane keeps
//!   serving); the body says how the source is doing.
//! - `GET /readyz` — readiness: 200 once the first full sync is programmed (every object of the
//!   source listed and written to the maps), 503 before.
//!
//! Both answer a small JSON object: `{"ready":true,"source":"kubernetes","source_reachable":true}`.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tracing::debug;

/// The default `--health-address`.
pub const DEFAULT_HEALTH_ADDRESS: &str = "127.0.0.1:10256";

/// What the endpoints report; updated by the agent's source loop.
#[derive(Debug)]
pub struct Health {
    /// `kubernetes` or `manifests`.
    source: &'static str,
    ready: AtomicBool,
    reachable: AtomicBool,
}

impl Health {
    pub fn new(source: &'static str) -> Arc<Self> {
        Arc::new(Self {
            source,
            ready: AtomicBool::new(false),
            reachable: AtomicBool::new(true),
        })
    }

    /// The first full sync is programmed.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// Whether the source (the API server) answers.
    pub fn set_reachable(&self, reachable: bool) {
        self.reachable.store(reachable, Ordering::Relaxed);
    }

    fn body(&self) -> String {
        format!(
            "{{\"ready\":{},\"source\":\"{}\",\"source_reachable\":{}}}\n",
            self.ready.load(Ordering::Relaxed),
            self.source,
            self.reachable.load(Ordering::Relaxed)
        )
    }

    fn answer(&self, method: &Method, path: &str) -> Reply {
        let status = match (method, path) {
            (&Method::GET | &Method::HEAD, "/healthz") => StatusCode::OK,
            (&Method::GET | &Method::HEAD, "/readyz") if self.ready.load(Ordering::Relaxed) => {
                StatusCode::OK
            }
            (&Method::GET | &Method::HEAD, "/readyz") => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::NOT_FOUND,
        };
        Reply {
            status,
            content_type: JSON,
            body: self.body(),
        }
    }
}

/// The content type of the health endpoints' bodies.
const JSON: &str = "application/json";

/// An answer of one of the agent's HTTP endpoints.
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: String,
}

/// What answers a request (method, path) on one of the agent's local HTTP servers. It may block
/// (reading maps): it runs on a blocking thread, not on the agent's event loop.
pub type Answer = Arc<dyn Fn(&Method, &str) -> Reply + Send + Sync>;

/// Binds `address` and serves the health endpoints from a background task of the current
/// runtime.
pub async fn serve(address: SocketAddr, health: Arc<Health>) -> anyhow::Result<()> {
    serve_http(
        address,
        "the health endpoints (--health-address)",
        Arc::new(move |method, path| health.answer(method, path)),
    )
    .await
}

/// Binds `address` and answers each request with `answer`, from a background task of the
/// current runtime; `what` names the server in errors.
pub async fn serve_http(address: SocketAddr, what: &str, answer: Answer) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("binding {what} to {address}"))?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let answer = Arc::clone(&answer);
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                    let answer = Arc::clone(&answer);
                    let method = request.method().clone();
                    let path = request.uri().path().to_owned();
                    async move {
                        let reply = tokio::task::spawn_blocking(move || answer(&method, &path))
                            .await
                            .unwrap_or_else(|error| Reply {
                                status: StatusCode::INTERNAL_SERVER_ERROR,
                                content_type: "text/plain",
                                body: format!("{error}\n"),
                            });
                        let response = Response::builder()
                            .status(reply.status)
                            .header("content-type", reply.content_type)
                            .body(Full::new(Bytes::from(reply.body)))
                            .expect("a valid response");
                        Ok::<_, Infallible>(response)
                    }
                });
                if let Err(error) = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    debug!("request from {peer}: {error}");
                }
            });
        }
    });
    Ok(())
}
