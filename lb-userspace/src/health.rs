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

    fn answer(&self, request: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let status = match (request.method(), request.uri().path()) {
            (&Method::GET | &Method::HEAD, "/healthz") => StatusCode::OK,
            (&Method::GET | &Method::HEAD, "/readyz") if self.ready.load(Ordering::Relaxed) => {
                StatusCode::OK
            }
            (&Method::GET | &Method::HEAD, "/readyz") => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::NOT_FOUND,
        };
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(self.body())))
            .expect("a valid response")
    }
}

/// Binds `address` and serves the endpoints from a background task of the current runtime.
pub async fn serve(address: SocketAddr, health: Arc<Health>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("binding the health endpoints to {address} (--health-address)"))?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let health = Arc::clone(&health);
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let response = health.answer(&request);
                    async move { Ok::<_, Infallible>(response) }
                });
                if let Err(error) = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    debug!("health request from {peer}: {error}");
                }
            });
        }
    });
    Ok(())
}
