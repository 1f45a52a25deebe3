//! A tonic gRPC service (the standard `grpc.health.v1.Health`, so no protoc or codegen is
//! needed) behind the Conneqt access-token guard.
//!
//! Run with
//!
//! ```not_rust
//! cargo run --example grpc_health
//! ```
//!
//! With `CONNEQT_BASE_URL` unset it starts the embedded Conneqt simulator, calls its own server
//! three times (a valid token, no token, a revoked token), prints what each call got, and keeps
//! serving until Ctrl-C. Add `--once` (or set `GRPC_HEALTH_ONCE=1`) to exit after those calls,
//! with a non-zero status if any of them got an unexpected answer:
//!
//! ```not_rust
//! cargo run --example grpc_health -- --once
//! ```
//!
//! Against a real Conneqt environment (no demo calls: tokens come from the practitioner's
//! toolbar):
//!
//! ```not_rust
//! CONNEQT_BASE_URL=https://int.conneqt.health CONNEQT_API_KEY=... cargo run --example grpc_health
//! ```
//!
//! The server listens on `GRPC_ADDR` (default `127.0.0.1:50051`). A client sends the token as
//! the gRPC metadata entry `conneqt-instant-access-token`.

use std::error::Error;
use std::net::SocketAddr;
use std::process::ExitCode;

use conneqt_guard::{AccessTokenLayer, VerifiedToken};
use conneqt_guard_simulator::Simulator;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tower::util::MapRequestLayer;
use tracing_subscriber::EnvFilter;

/// The metadata key (lower case, as gRPC requires) that carries the access token.
const TOKEN_KEY: &str = "conneqt-instant-access-token";

type BoxError = Box<dyn Error + Send + Sync>;

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("grpc_health: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), BoxError> {
    // Logs go to stderr, so stdout shows only the example's own lines.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,conneqt_guard=debug")),
        )
        .init();
    let once = std::env::args().skip(1).any(|arg| arg == "--once")
        || std::env::var_os("GRPC_HEALTH_ONCE").is_some_and(|v| !v.is_empty() && v != "0");

    // The upstream: a real Conneqt environment, or the simulator.
    let (base_url, api_key, simulator) = match std::env::var("CONNEQT_BASE_URL") {
        Ok(base_url) => {
            let api_key = std::env::var("CONNEQT_API_KEY")
                .map_err(|_| "CONNEQT_BASE_URL is set, so CONNEQT_API_KEY must be set too")?;
            println!("Upstream: {base_url}");
            (base_url, api_key, None)
        }
        Err(_) => {
            let sim = Simulator::start().await?;
            println!(
                "Upstream: the embedded Conneqt simulator at {}",
                sim.base_url()
            );
            (sim.base_url(), sim.api_key().to_owned(), Some(sim))
        }
    };

    let guard = AccessTokenLayer::builder()
        .base_url(base_url)
        .api_key(api_key)
        .build()?;
    let status = guard.check_connection().await;
    println!("Start-up check: {status}");
    if !status.is_ok() {
        return Err("the start-up check failed; every request would be refused".into());
    }

    // The gRPC server: the guard first, then (inside it) a small layer that shows where a
    // handler finds the verified token, then the health service.
    let addr: SocketAddr = std::env::var("GRPC_ADDR")
        .unwrap_or_else(|_| "127.0.0.1:50051".to_owned())
        .parse()
        .map_err(|error| format!("GRPC_ADDR must be an address like 127.0.0.1:50051 ({error})"))?;
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let (reporter, health) = tonic_health::server::health_reporter();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(
        Server::builder()
            .layer(guard)
            .layer(MapRequestLayer::new(log_verified_token))
            .add_service(health)
            .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                let _ = stopped.await;
            }),
    );
    // `health_reporter` reports the whole server ("") as SERVING; keep the reporter alive.
    let _reporter = reporter;

    print_instructions(addr);

    let mut demo_failed = false;
    if let Some(sim) = &simulator {
        demo_failed = !demo(sim, addr).await?;
        if !once {
            println!(
                "A token to try from your own client (valid while this example runs): {}",
                sim.issue_token()
            );
        }
    }

    if once {
        println!("--once: stopping.");
    } else {
        println!("Serving on {addr}; press Ctrl-C to stop.");
        tokio::signal::ctrl_c().await?;
    }
    let _ = stop.send(());
    server.await??;
    drop(simulator);
    if demo_failed {
        return Err("a demo call got an unexpected answer".into());
    }
    Ok(())
}

/// Runs inside the guard: every request that gets here carries a [`VerifiedToken`].
fn log_verified_token(
    request: http::Request<tonic::body::Body>,
) -> http::Request<tonic::body::Body> {
    if let Some(token) = request.extensions().get::<VerifiedToken>() {
        // The fingerprint is safe to log; the token itself is a secret.
        tracing::info!(token = %token.fingerprint(), path = %request.uri().path(), "verified request");
    }
    request
}

fn print_instructions(addr: SocketAddr) {
    println!();
    println!("grpc.health.v1.Health is listening on http://{addr} behind the guard.");
    println!("A client must send the token as gRPC metadata `{TOKEN_KEY}`. With tonic:");
    println!();
    println!(
        "    let channel = tonic::transport::Channel::from_static(\"http://{addr}\").connect().await?;"
    );
    println!("    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);");
    println!(
        "    let mut request = tonic::Request::new(tonic_health::pb::HealthCheckRequest::default());"
    );
    println!("    request.metadata_mut().insert(\"{TOKEN_KEY}\", token.parse()?);");
    println!("    let status = client.check(request).await?.into_inner().status(); // Serving");
    println!();
    println!(
        "Without a valid token the call fails with a gRPC status instead: Unauthenticated (16)"
    );
    println!(
        "for a missing, malformed, refused or revoked token, Unavailable (14) when Conneqt cannot"
    );
    println!("be reached, Internal (13) when Conneqt refuses this server's API key.");
    println!();
}

/// Three calls against our own server; true when each got the answer it should.
async fn demo(sim: &Simulator, addr: SocketAddr) -> Result<bool, BoxError> {
    let channel = Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let mut client = HealthClient::new(channel);
    let valid = sim.issue_token();
    let revoked = sim.issue_token();
    sim.revoke(&revoked);

    println!("Demo calls (tokens issued by the simulator):");
    let cases = [
        (
            "1/3 valid token  ",
            Some(valid.as_str()),
            Ok(ServingStatus::Serving),
        ),
        ("2/3 no token     ", None, Err(tonic::Code::Unauthenticated)),
        (
            "3/3 revoked token",
            Some(revoked.as_str()),
            Err(tonic::Code::Unauthenticated),
        ),
    ];
    let mut all_as_expected = true;
    for (label, token, expected) in cases {
        let mut request = tonic::Request::new(HealthCheckRequest::default());
        if let Some(token) = token {
            request.metadata_mut().insert(TOKEN_KEY, token.parse()?);
        }
        let got = client
            .check(request)
            .await
            .map(|response| response.into_inner().status());
        let shown = match &got {
            Ok(serving) => format!("OK, {}", serving.as_str_name()),
            Err(status) => format!("{:?}: {}", status.code(), status.message()),
        };
        let as_expected = match (&got, expected) {
            (Ok(serving), Ok(want)) => *serving == want,
            (Err(status), Err(want)) => status.code() == want,
            _ => false,
        };
        all_as_expected &= as_expected;
        let mark = if as_expected { "" } else { "  <-- unexpected" };
        println!("  {label} -> {shown}{mark}");
    }
    println!(
        "  (the simulator answered {} verify calls for these three requests)",
        sim.verify_calls()
    );
    println!();
    Ok(all_as_expected)
}
