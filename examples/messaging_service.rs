//! A small instant-messaging service guarded by conneqt-guard: the main job.
//!
//! Run with
//!
//! ```text
//! cargo run --example messaging_service
//! ```
//!
//! With no configuration it starts the embedded Conneqt simulator, issues one valid and one
//! revoked token, sends itself one request of each kind (valid, revoked, missing, malformed)
//! and prints what came back, then keeps serving on 127.0.0.1:3000 and prints `curl` lines
//! to try by hand. Pass `--once` to exit after the demonstration.
//!
//! Against the real upstream:
//!
//! ```text
//! CONNEQT_BASE_URL=https://int.conneqt.health CONNEQT_API_KEY=... cargo run --example messaging_service
//! ```
//!
//! Settings: `CONNEQT_BASE_URL`, `CONNEQT_API_KEY` and the other `CONNEQT_*` variables in the
//! README, `ADDR` (listen address, default
//! `127.0.0.1:3000`), `METRICS_ADDR` (Prometheus metrics, default `127.0.0.1:9464`; the
//! guard's metrics are listed in the README).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::routing::get;
use axum::{Extension, Json, Router};
use conneqt_guard::{AccessTokenLayerBuilder, VerifiedToken};
use conneqt_guard_simulator::Simulator;
use serde::{Deserialize, Serialize};

/// A message as stored and listed.
#[derive(Clone, Serialize)]
struct Message {
    id: usize,
    to: String,
    text: String,
    /// Who sent it, as the fingerprint of their token (never the token itself).
    sender: String,
}

#[derive(Deserialize)]
struct NewMessage {
    to: String,
    text: String,
}

type Store = Arc<Mutex<Vec<Message>>>;

async fn send(
    State(store): State<Store>,
    Extension(token): Extension<VerifiedToken>,
    Json(new): Json<NewMessage>,
) -> (http::StatusCode, Json<Message>) {
    let mut messages = store
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let message = Message {
        id: messages.len() + 1,
        to: new.to,
        text: new.text,
        sender: token.fingerprint().to_string(),
    };
    messages.push(message.clone());
    tracing::info!(sender = %token.fingerprint(), id = message.id, "message sent");
    (http::StatusCode::CREATED, Json(message))
}

async fn list(State(store): State<Store>) -> Json<Vec<Message>> {
    Json(
        store
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone(),
    )
}

/// Where the tokens come from: the simulator, or the real upstream.
struct Upstream {
    base_url: String,
    api_key: String,
    /// Kept alive while the service runs; `None` against the real upstream.
    simulator: Option<Simulator>,
}

async fn upstream() -> Result<Upstream, Box<dyn std::error::Error>> {
    match std::env::var("CONNEQT_BASE_URL") {
        Ok(base_url) => {
            let api_key = std::env::var("CONNEQT_API_KEY")
                .map_err(|_| "CONNEQT_BASE_URL is set, so CONNEQT_API_KEY must be set too")?;
            Ok(Upstream {
                base_url,
                api_key,
                simulator: None,
            })
        }
        Err(_) => {
            let simulator = Simulator::start().await?;
            println!(
                "CONNEQT_BASE_URL is not set: started the Conneqt simulator at {}",
                simulator.base_url()
            );
            Ok(Upstream {
                base_url: simulator.base_url(),
                api_key: simulator.api_key().to_owned(),
                simulator: Some(simulator),
            })
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let once = std::env::args().any(|arg| arg == "--once");
    serve_metrics();
    let upstream = upstream().await?;

    // Every setting can come from the environment (`CONNEQT_CACHE_TTL=1m`, ...; see the
    // README); the base URL and key are set here because the simulator may provide them.
    let guard = AccessTokenLayerBuilder::from_env()
        .base_url(&upstream.base_url)
        .api_key(&upstream.api_key)
        .skip_path_prefix("/healthz")
        .build()?;

    let status = guard.check_connection().await;
    println!("Connection check: {status}");
    if !status.is_ok() {
        return Err(format!("cannot start: {status}").into());
    }

    let app = Router::new()
        .route("/messages", get(list).post(send))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(Store::default())
        .layer(guard);

    let addr: SocketAddr = std::env::var("ADDR")
        .unwrap_or_else(|_| "127.0.0.1:3000".into())
        .parse()
        .map_err(|e| format!("ADDR is not a socket address: {e}"))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr} ({e}); set ADDR to another address"))?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    println!("Messaging service listening on http://{addr}");

    if let Some(simulator) = &upstream.simulator {
        let valid = simulator.issue_token();
        let revoked = simulator.issue_token();
        simulator.revoke(&revoked);
        demonstrate(addr, &valid, &revoked).await?;
        print_curl_lines(addr, &valid, &revoked);
    }

    if once {
        return Ok(());
    }
    println!("\nPress Ctrl-C to stop.");
    tokio::select! {
        result = server => result??,
        _ = tokio::signal::ctrl_c() => println!("stopping"),
    }
    Ok(())
}

/// Publishes the guard's metrics (and any others) for Prometheus at `METRICS_ADDR`.
fn serve_metrics() {
    let addr = std::env::var("METRICS_ADDR").unwrap_or_else(|_| "127.0.0.1:9464".into());
    let installed = addr
        .parse::<SocketAddr>()
        .map_err(|e| e.to_string())
        .and_then(|addr| {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .with_http_listener(addr)
                .install()
                .map_err(|e| e.to_string())
        });
    match installed {
        Ok(()) => println!("Metrics for Prometheus at http://{addr}/metrics"),
        Err(error) => {
            println!("Metrics not published ({error}); set METRICS_ADDR to another address")
        }
    }
}

/// Sends one request of each kind and prints what the guard made of it.
async fn demonstrate(
    addr: SocketAddr,
    valid: &str,
    revoked: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    // The demonstration's own HTTP client. reqwest's rustls needs a crypto provider chosen by
    // the application; this one picks ring, the provider the guard uses for its own client.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder().no_proxy().build()?;
    let url = format!("http://{addr}/messages");
    let body = r#"{"to":"dr.jones","text":"Patient in bay 4 is ready for review"}"#;
    let cases: [(&str, Option<&str>); 4] = [
        ("valid token", Some(valid)),
        ("revoked token", Some(revoked)),
        ("missing token", None),
        ("malformed token", Some("not-a-uuid")),
    ];
    println!("\nSending one message with each kind of token:");
    for (case, token) in cases {
        let mut request = client
            .post(&url)
            .header("content-type", "application/json")
            .body(body);
        if let Some(token) = token {
            request = request.header("Conneqt-Instant-Access-Token", token);
        }
        let response = request.send().await?;
        let status = response.status();
        let text = response.text().await?;
        let summary = match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(json) if json.get("title").is_some() => {
                let why = json["invalidParameters"][0]["reason"]
                    .as_str()
                    .or(json["detail"].as_str())
                    .unwrap_or("");
                format!("{}: {why}", json["title"].as_str().unwrap_or(""))
            }
            _ => text,
        };
        println!("  {case:<16} -> {status}  {summary}");
    }
    Ok(())
}

fn print_curl_lines(addr: SocketAddr, valid: &str, revoked: &str) {
    let url = format!("http://{addr}/messages");
    let post = r#"-H 'content-type: application/json' -d '{"to":"dr.jones","text":"hello"}'"#;
    println!("\nTry it yourself:");
    println!("  # valid token: 201, then list the messages: 200");
    println!("  curl -i {post} -H 'Conneqt-Instant-Access-Token: {valid}' {url}");
    println!("  curl -i -H 'Conneqt-Instant-Access-Token: {valid}' {url}");
    println!("  # revoked token: 410");
    println!("  curl -i -H 'Conneqt-Instant-Access-Token: {revoked}' {url}");
    println!("  # missing token: 401");
    println!("  curl -i {url}");
    println!("  # malformed token: 400");
    println!("  curl -i -H 'Conneqt-Instant-Access-Token: not-a-uuid' {url}");
}
