//! `conneqt-guard`: the sidecar. Verifies `Conneqt-Instant-Access-Token` headers for services
//! that are not written in Rust, either as a reverse proxy in front of them or as the auth
//! service of nginx `auth_request`, Traefik `ForwardAuth` or Envoy `ext_authz`.
//!
//! Run with
//!
//! ```text
//! cargo run --bin conneqt-guard -- proxy --backend http://127.0.0.1:3000 --simulator
//! cargo run --bin conneqt-guard -- forward-auth --base-url https://int.conneqt.health --api-key ...
//! cargo run --bin conneqt-guard -- --help
//! ```
//!
//! It prints `listening on ADDR` and `admin listening on ADDR` on stdout once it accepts
//! connections, and `stopped accepting on ADDR` when a SIGTERM or SIGINT starts the graceful
//! stop. A flag it cannot parse (or `--simulator` with `--base-url` or `--api-key`) is a usage
//! error, status 2. A setting that is wrong makes it exit with status 1 and the library's
//! `BuildError` message, which names the setting, before it listens; so does an API key
//! Conneqt refuses at the start-up check (`check_connection`), while an upstream that cannot be
//! reached only logs a warning.

mod admin;
mod cli;
mod forward_auth;
mod http1;
mod proxy;
mod relay;
mod server;
mod settings;

use std::num::NonZeroUsize;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use conneqt_guard::ConnectionStatus;
use conneqt_guard_simulator::Simulator;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};

use crate::cli::{Cli, Common, Mode};

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    // The main thread runs the admin listener, the simulator and signal handling; the
    // listener's connections are served by `--workers` threads of their own (see `serve`).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    // First of all, so that a SIGTERM as soon as `listening on` is printed is a graceful stop,
    // not the default action (death by signal).
    let shutdown = server::shutdown_signal();
    let common = match &cli.mode {
        Mode::Proxy(args) => &args.common,
        Mode::ForwardAuth(args) => &args.common,
    };
    // Checked before anything is started (the simulator included) or bound.
    let proxy_setup = match &cli.mode {
        Mode::Proxy(args) => Some((
            Arc::new(proxy::parse_backend(&args.backend)?),
            args.timeouts(),
        )),
        Mode::ForwardAuth(_) => None,
    };
    let (_simulator, guard) = guard(common).await?;
    check_connection(&guard).await?;
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(|error| format!("cannot install the metrics recorder: {error}"))?;

    let (listen, name) = match &cli.mode {
        Mode::Proxy(args) => (args.listen, "proxy"),
        Mode::ForwardAuth(args) => (args.listen, "forward-auth"),
    };
    let admin_listener = bind(common.admin_listen, "--admin-listen").await?;
    let listener = bind(listen, "--listen").await?;
    let grace = common.shutdown_timeout;
    let (stop, stopped) = watch::channel(false);

    let admin = admin::Admin::new(guard.clone(), metrics);
    let admin_task = tokio::spawn(server::serve(admin_listener, admin, stopped.clone(), grace));
    let frontend = match proxy_setup {
        Some((backend, timeouts)) => Frontend::Proxy(Box::new((
            relay::Relay::new(&guard, backend.clone(), timeouts),
            tower_layer::Layer::layer(&guard, proxy::Forwarder::new(backend, timeouts)),
        ))),
        None => Frontend::ForwardAuth(forward_auth::ForwardAuth::new(guard.clone())),
    };
    let (workers, finished) = start_workers(&frontend, common.workers(), &stopped, grace)?;
    let acceptor = tokio::spawn(server::accept(listener, stopped, {
        let mut next = 0;
        move |stream, peer| {
            // Round robin. A worker that is gone (its runtime failed) loses the connection.
            let Ok(stream) = stream.into_std() else {
                return;
            };
            let _ = workers[next % workers.len()].send((stream, peer));
            next = next.wrapping_add(1);
        }
    }));
    tracing::info!(mode = name, "conneqt-guard started");

    shutdown.await;
    tracing::info!("shutdown signal: finishing in-flight requests");
    let _ = stop.send(true);
    // The acceptor drops the workers' senders when it stops, which starts their graceful stop.
    let _ = acceptor.await;
    let mut all_finished = admin_task.await.unwrap_or(false);
    for worker in finished {
        all_finished &= worker.await.unwrap_or(false);
    }
    let finished = all_finished;
    if !finished {
        tracing::warn!(
            timeout = %settings::format_duration(common.shutdown_timeout),
            "some requests were still in flight when --shutdown-timeout ran out"
        );
    }
    Ok(())
}

/// What the listener serves.
#[derive(Clone)]
enum Frontend {
    Proxy(
        Box<(
            relay::Relay,
            conneqt_guard::AccessTokenService<proxy::Forwarder>,
        )>,
    ),
    ForwardAuth(forward_auth::ForwardAuth),
}

/// Starts `count` threads, each with a single-threaded runtime that serves the connections
/// sent to it start to end, as nginx's worker processes do: a connection never moves between
/// threads, and no request is handed from one thread to another. Returns where to send
/// connections, and for each worker a receiver that gets `true` when it stopped within the
/// grace period (after its sender is dropped).
#[allow(clippy::type_complexity)]
fn start_workers(
    frontend: &Frontend,
    count: NonZeroUsize,
    stopped: &watch::Receiver<bool>,
    grace: std::time::Duration,
) -> Result<
    (
        Vec<mpsc::UnboundedSender<server::Handed>>,
        Vec<oneshot::Receiver<bool>>,
    ),
    String,
> {
    let mut senders = Vec::with_capacity(count.get());
    let mut finished = Vec::with_capacity(count.get());
    for index in 0..count.get() {
        let (send, handed) = mpsc::unbounded_channel();
        let (done, receiver) = oneshot::channel();
        senders.push(send);
        finished.push(receiver);
        let (frontend, stopped) = (frontend.clone(), stopped.clone());
        std::thread::Builder::new()
            .name(format!("worker-{index}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                let finished = match runtime {
                    Ok(runtime) => runtime.block_on(async move {
                        match frontend {
                            Frontend::Proxy(proxy) => {
                                let (relay, service) = *proxy;
                                let connections =
                                    server::Connections::new(service, Some(relay), stopped);
                                server::serve_handed(handed, connections, grace).await
                            }
                            Frontend::ForwardAuth(service) => {
                                let connections = server::Connections::new(service, None, stopped);
                                server::serve_handed(handed, connections, grace).await
                            }
                        }
                    }),
                    Err(error) => {
                        tracing::error!(%error, "cannot start a worker's runtime");
                        false
                    }
                };
                let _ = done.send(finished);
            })
            .map_err(|error| format!("cannot start a worker thread: {error}"))?;
    }
    Ok((senders, finished))
}

/// Builds the guard from the settings, starting the simulator first with `--simulator`.
async fn guard(
    common: &Common,
) -> Result<(Option<Simulator>, conneqt_guard::AccessTokenLayer), String> {
    let mut builder = common.builder();
    let simulator = if common.simulator {
        let simulator = Simulator::start()
            .await
            .map_err(|error| format!("cannot start the simulator: {error}"))?;
        let valid = simulator.issue_token();
        let revoked = simulator.issue_token();
        simulator.revoke(&revoked);
        println!("simulator listening on {}", simulator.base_url());
        println!("simulator valid token: {valid}");
        println!("simulator revoked token: {revoked}");
        builder = builder
            .base_url(simulator.base_url())
            .api_key(simulator.api_key());
        Some(simulator)
    } else {
        None
    };
    let guard = builder.build().map_err(|error| error.to_string())?;
    Ok((simulator, guard))
}

/// The start-up check (`/api/v1/test`): a key Conneqt refuses is fatal, since every request
/// would be refused; an upstream that cannot be reached now may be later, so the guard starts
/// (with `/readyz` reporting 503 until it answers).
async fn check_connection(guard: &conneqt_guard::AccessTokenLayer) -> Result<(), String> {
    match guard.check_connection().await {
        status @ ConnectionStatus::Ok => {
            tracing::info!("start-up check: {status}");
            Ok(())
        }
        status @ (ConnectionStatus::KeyRejected
        | ConnectionStatus::KeyNotAuthorised
        | ConnectionStatus::RedisRefused { .. }) => Err(format!("cannot start: {status}")),
        status => {
            tracing::warn!(
                "start-up check: {status}; starting anyway, /readyz answers 503 until it succeeds"
            );
            Ok(())
        }
    }
}

async fn bind(addr: std::net::SocketAddr, flag: &str) -> Result<TcpListener, String> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|error| format!("{flag} {addr}: cannot listen ({error})"))?;
    let local = listener
        .local_addr()
        .map_err(|error| format!("{flag} {addr}: {error}"))?;
    let prefix = if flag == "--admin-listen" {
        "admin "
    } else {
        ""
    };
    println!("{prefix}listening on {local}");
    Ok(listener)
}
