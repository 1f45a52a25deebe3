//! Shared test harness: the Conneqt simulator and a guarded axum app, both on 127.0.0.1:0,
//! with a counter of how often the inner (messaging) service ran.

#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::extract::State;
use axum::routing::get;
use axum::{Extension, Json, Router};
use bytes::Bytes;
use conneqt_guard::{AccessTokenLayer, AccessTokenLayerBuilder, VerifiedToken};
use conneqt_guard_simulator::Simulator;
use http::HeaderMap;

pub const TOKEN_HEADER: &str = "conneqt-instant-access-token";

/// A running simulator plus a guarded app.
pub struct Harness {
    pub simulator: Arc<Simulator>,
    pub guard: AccessTokenLayer,
    pub app: App,
    pub client: reqwest::Client,
}

/// One guarded app on its own port.
pub struct App {
    pub addr: SocketAddr,
    pub inner_calls: Arc<AtomicUsize>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for App {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl App {
    pub fn inner_calls(&self) -> usize {
        self.inner_calls.load(Ordering::SeqCst)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// What the inner handler saw, echoed back so tests can check it.
#[derive(serde::Deserialize, serde::Serialize, Debug)]
pub struct Seen {
    pub fingerprint: String,
    pub token_matches_header: bool,
    pub body_len: usize,
    pub body_blake3: String,
}

async fn messages(
    State(calls): State<Arc<AtomicUsize>>,
    Extension(token): Extension<VerifiedToken>,
    headers: HeaderMap,
    body: Bytes,
) -> Json<Seen> {
    calls.fetch_add(1, Ordering::SeqCst);
    let header = headers.get(TOKEN_HEADER).and_then(|v| v.to_str().ok());
    Json(Seen {
        fingerprint: token.fingerprint().to_string(),
        token_matches_header: header == Some(token.as_str()),
        body_len: body.len(),
        body_blake3: blake3::hash(&body).to_hex().to_string(),
    })
}

/// Starts a guarded app using `guard`.
pub async fn serve(guard: AccessTokenLayer) -> App {
    let inner_calls = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route("/messages", get(messages).post(messages))
        .with_state(inner_calls.clone())
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(guard);
    spawn_app(app, inner_calls).await
}

/// Serves `app` on 127.0.0.1:0 until the returned [`App`] is dropped.
async fn spawn_app(app: Router, inner_calls: Arc<AtomicUsize>) -> App {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    App {
        addr,
        inner_calls,
        server,
    }
}

/// The builder pointed at `simulator`, with the simulator's good key.
pub fn builder_for(simulator: &Simulator) -> AccessTokenLayerBuilder {
    AccessTokenLayer::builder()
        .base_url(simulator.base_url())
        .api_key(simulator.api_key())
}

/// Simulator + app with default settings.
pub async fn start() -> Harness {
    start_with(|b| b).await
}

/// Simulator + app, with the builder adjusted by `configure`.
pub async fn start_with(
    configure: impl FnOnce(AccessTokenLayerBuilder) -> AccessTokenLayerBuilder,
) -> Harness {
    harness(configure, Inner::Messages).await
}

/// Which inner service a [`Harness`] guards.
enum Inner {
    Messages,
    Probe,
}

async fn harness(
    configure: impl FnOnce(AccessTokenLayerBuilder) -> AccessTokenLayerBuilder,
    inner: Inner,
) -> Harness {
    let simulator = Arc::new(Simulator::start().await.expect("simulator starts"));
    let guard = configure(builder_for(&simulator))
        .build()
        .expect("guard builds");
    let app = match inner {
        Inner::Messages => serve(guard.clone()).await,
        Inner::Probe => serve_probe(guard.clone()).await,
    };
    Harness {
        simulator,
        guard,
        app,
        client: client(),
    }
}

/// A client for the tests' plain-HTTP requests. reqwest is built without a TLS provider of its
/// own (see Cargo.toml), so ring is installed as the process default first.
pub fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().no_proxy().build().unwrap()
}

impl Harness {
    /// `GET /messages`, with the token header if given.
    pub async fn get(&self, token: Option<&str>) -> reqwest::Response {
        let mut request = self.client.get(self.app.url("/messages"));
        if let Some(token) = token {
            request = request.header(TOKEN_HEADER, token);
        }
        request.send().await.expect("the guarded app answers")
    }

    pub fn inner_calls(&self) -> usize {
        self.app.inner_calls()
    }

    pub fn upstream_calls(&self) -> usize {
        self.simulator.verify_calls()
    }
}

/// A problem+json body, checked for the RFC 9457 members every rejection has.
pub async fn problem(response: reqwest::Response, status: u16) -> serde_json::Value {
    assert_eq!(response.status().as_u16(), status);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let body: serde_json::Value = response.json().await.expect("problem body is JSON");
    assert_eq!(body["status"], status, "{body}");
    for member in ["type", "title", "detail", "instance"] {
        assert!(body[member].is_string(), "{member} missing in {body}");
    }
    assert!(body["instance"].as_str().unwrap().starts_with("urn:uuid:"));
    body
}

/// What the catch-all probe handler saw (see [`serve_probe`]).
#[derive(serde::Deserialize, serde::Serialize, Debug)]
pub struct Probe {
    pub method: String,
    pub path: String,
    /// `VerifiedToken::as_str()`, when the guard put one in the extensions.
    pub verified_token: Option<String>,
    /// The token header, as the handler received it.
    pub token_header: Option<String>,
}

async fn probe(
    State(calls): State<Arc<AtomicUsize>>,
    request: axum::extract::Request,
) -> Json<Probe> {
    calls.fetch_add(1, Ordering::SeqCst);
    let header = request.headers().get(TOKEN_HEADER);
    Json(Probe {
        method: request.method().to_string(),
        path: request.uri().path().to_owned(),
        verified_token: request
            .extensions()
            .get::<VerifiedToken>()
            .map(|token| token.as_str().to_owned()),
        token_header: header.map(|v| v.to_str().unwrap().to_owned()),
    })
}

/// Starts a guarded app whose inner service answers every method and path with a [`Probe`].
pub async fn serve_probe(guard: AccessTokenLayer) -> App {
    let inner_calls = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .fallback(probe)
        .with_state(inner_calls.clone())
        .layer(guard);
    spawn_app(app, inner_calls).await
}

/// Simulator + probe app, with the builder adjusted by `configure`.
pub async fn start_probe_with(
    configure: impl FnOnce(AccessTokenLayerBuilder) -> AccessTokenLayerBuilder,
) -> Harness {
    harness(configure, Inner::Probe).await
}

impl Harness {
    /// `method path` with `headers`.
    pub async fn send(
        &self,
        method: http::Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut request = self.client.request(method, self.app.url(path));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.expect("the guarded app answers")
    }
}

/// The status of `GET target` sent byte for byte over HTTP/1.1, for request targets that
/// client libraries would normalise (such as `/a/../b`).
pub async fn raw_get_status(addr: SocketAddr, target: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8_lossy(&response);
    let status = response
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .unwrap_or_else(|| panic!("not an HTTP/1.1 response: {response}"));
    status.parse().unwrap()
}
