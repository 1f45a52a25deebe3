//! A backend to put behind the `conneqt-guard` sidecar: answers every request with JSON of the
//! method, path and headers it received, so you can see what the proxy forwards (the token
//! header, `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host`). It checks nothing
//! itself. The README's "Sidecar" quick start runs it:
//!
//! ```text
//! cargo run --example echo_backend
//! cargo run --bin conneqt-guard -- proxy --backend http://127.0.0.1:3000 --simulator
//! ```
//!
//! Settings: `ADDR` (listen address, default `127.0.0.1:3000`).

use std::net::SocketAddr;

use axum::Json;
use axum::extract::Request;
use axum::routing::any;
use serde_json::{Map, Value, json};

/// The request as JSON: `{"method", "path" (with the query), "headers": {name: [values]}}`.
async fn echo(request: Request) -> Json<Value> {
    let mut headers = Map::new();
    for name in request.headers().keys() {
        let values = request
            .headers()
            .get_all(name)
            .iter()
            .map(|value| Value::from(String::from_utf8_lossy(value.as_bytes())))
            .collect();
        headers.insert(name.as_str().to_owned(), Value::Array(values));
    }
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |path| path.as_str());
    Json(json!({
        "method": request.method().as_str(),
        "path": path,
        "headers": headers,
    }))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr = std::env::var("ADDR")
        .unwrap_or_else(|_| "127.0.0.1:3000".into())
        .parse()
        .map_err(|e| format!("ADDR is not a socket address: {e}"))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr} ({e}); set ADDR to another address"))?;
    println!(
        "Echo backend listening on http://{}",
        listener.local_addr()?
    );
    axum::serve(listener, any(echo)).await?;
    Ok(())
}
