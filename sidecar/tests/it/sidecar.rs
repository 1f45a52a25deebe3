//! Running the `conneqt-guard` binary in tests: start it, read the addresses it prints, send it
//! signals, and a counting axum backend to put behind it.

#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use bytes::Bytes;
use conneqt_guard_simulator::Simulator;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{Notify, mpsc};

/// How long the binary may take to print an expected line.
const LINE_TIMEOUT: Duration = Duration::from_secs(60);

/// A running `conneqt-guard` process; killed on drop if still running.
pub struct Sidecar {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    stderr: Arc<Mutex<String>>,
    /// Every stdout line read so far.
    pub stdout: Vec<String>,
    /// `listening on ADDR`.
    pub addr: SocketAddr,
    /// `admin listening on ADDR`.
    pub admin: SocketAddr,
}

impl Sidecar {
    /// Starts the binary with `args` (plus `--listen 127.0.0.1:0 --admin-listen 127.0.0.1:0`)
    /// and waits until it prints both addresses.
    pub async fn start(args: &[&str]) -> Sidecar {
        Self::start_with_env(args, &[]).await
    }

    /// [`Sidecar::start`] with the variables in `env` set too.
    pub async fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Sidecar {
        let mut sidecar = Self::spawn_with_env(args, env);
        let admin = sidecar.line_after("admin listening on ").await;
        let addr = sidecar.line_after("listening on ").await;
        sidecar.admin = admin.parse().unwrap();
        sidecar.addr = addr.parse().unwrap();
        sidecar
    }

    /// `conneqt-guard proxy` in front of `backend`, verifying against `sim`, with `extra` flags.
    pub async fn proxy(sim: &Simulator, backend: &str, extra: &[&str]) -> Sidecar {
        Self::proxy_with_env(sim, backend, extra, &[]).await
    }

    /// [`Sidecar::proxy`] with the variables in `env` set too.
    pub async fn proxy_with_env(
        sim: &Simulator,
        backend: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Sidecar {
        let base_url = sim.base_url();
        let mut args = vec![
            "proxy",
            "--backend",
            backend,
            "--base-url",
            &base_url,
            "--api-key",
            sim.api_key(),
        ];
        args.extend_from_slice(extra);
        Sidecar::start_with_env(&args, env).await
    }

    /// Starts the binary with exactly `args` and does not wait for anything.
    pub fn spawn(args: &[&str]) -> Sidecar {
        Self::spawn_with_env(args, &[])
    }

    /// [`Sidecar::spawn`] with the variables in `env` set too.
    pub fn spawn_with_env(args: &[&str], env: &[(&str, &str)]) -> Sidecar {
        let mut command = Command::new(env!("CARGO_BIN_EXE_conneqt-guard"));
        command.args(args);
        if matches!(args.first(), Some(&"proxy" | &"forward-auth")) {
            command.args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]);
        }
        let mut child = command
            .env("RUST_LOG", "conneqt_guard=debug,warn")
            .env_remove("CONNEQT_BASE_URL")
            .env_remove("CONNEQT_API_KEY")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the conneqt-guard binary starts");
        let (send, lines) = mpsc::unbounded_channel();
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = stdout.next_line().await {
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        tokio::spawn(async move {
            let mut buffer = [0; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut buffer).await {
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buffer[..n]));
            }
        });
        Sidecar {
            child,
            lines,
            stderr,
            stdout: Vec::new(),
            addr: ([0, 0, 0, 0], 0).into(),
            admin: ([0, 0, 0, 0], 0).into(),
        }
    }

    /// Waits for the next stdout line starting with `prefix` and returns the rest of it.
    pub async fn line_after(&mut self, prefix: &str) -> String {
        let deadline = tokio::time::Instant::now() + LINE_TIMEOUT;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "no line {prefix:?} within {LINE_TIMEOUT:?}; stdout {:?}, stderr:\n{}",
                        self.stdout,
                        self.stderr()
                    )
                });
            let Some(line) = line else {
                panic!(
                    "conneqt-guard closed stdout before {prefix:?}; stdout {:?}, stderr:\n{}",
                    self.stdout,
                    self.stderr()
                );
            };
            self.stdout.push(line.clone());
            if let Some(rest) = line.strip_prefix(prefix) {
                return rest.to_owned();
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// What the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Sends SIGTERM (through `kill`, to need no extra crate).
    pub fn terminate(&self) {
        let pid = self.child.id().expect("still running");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// Waits for the process to exit.
    pub async fn exit_status(&mut self) -> ExitStatus {
        tokio::time::timeout(LINE_TIMEOUT, self.child.wait())
            .await
            .expect("conneqt-guard exits in time")
            .unwrap()
    }
}

/// A run of the binary that ended by itself: how, and everything it printed.
pub struct Exited {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Sidecar {
    /// Runs the binary with `args` as [`Sidecar::spawn`] does (same listen flags and
    /// environment), plus the variables in `env`, and waits for it to exit by itself (killed,
    /// and a panic, if it has not within the line timeout).
    pub async fn run_to_exit(args: &[&str], env: &[(&str, &str)]) -> Exited {
        let mut command = Command::new(env!("CARGO_BIN_EXE_conneqt-guard"));
        command.args(args);
        if matches!(args.first(), Some(&"proxy" | &"forward-auth")) {
            command.args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]);
        }
        command
            .env("RUST_LOG", "conneqt_guard=debug,warn")
            .env_remove("CONNEQT_BASE_URL")
            .env_remove("CONNEQT_API_KEY")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let output = tokio::time::timeout(LINE_TIMEOUT, command.output())
            .await
            .unwrap_or_else(|_| {
                panic!("conneqt-guard {args:?} still running after {LINE_TIMEOUT:?}")
            })
            .expect("the conneqt-guard binary starts");
        Exited {
            status: output.status,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

/// A counting axum backend on 127.0.0.1:0.
pub struct Backend {
    pub addr: SocketAddr,
    pub calls: Arc<AtomicUsize>,
    /// Notified when `/slow` or `/stream` has started answering.
    pub entered: Arc<Notify>,
    /// Lets `/slow` and `/stream` finish.
    pub release: Arc<Notify>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.server.abort();
    }
}

#[derive(Clone)]
struct BackendState {
    calls: Arc<AtomicUsize>,
    entered: Arc<Notify>,
    release: Arc<Notify>,
}

impl Backend {
    pub async fn start() -> Backend {
        let state = BackendState {
            calls: Arc::new(AtomicUsize::new(0)),
            entered: Arc::new(Notify::new()),
            release: Arc::new(Notify::new()),
        };
        let app = Router::new()
            .route("/echo", post(echo))
            .route("/headers", any(headers))
            .route("/slow", get(slow))
            .route("/stream", get(stream))
            .route("/status/{code}", get(status))
            .fallback(any(hello))
            .layer(axum::extract::DefaultBodyLimit::disable())
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Backend {
            addr,
            calls: state.calls,
            entered: state.entered,
            release: state.release,
            server,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

async fn hello(State(state): State<BackendState>) -> &'static str {
    state.calls.fetch_add(1, Ordering::SeqCst);
    "hello from the backend"
}

/// Streams the request body back as it arrives.
async fn echo(State(state): State<BackendState>, request: Request) -> Response {
    state.calls.fetch_add(1, Ordering::SeqCst);
    Body::from_stream(request.into_body().into_data_stream()).into_response()
}

/// Answers with the request headers it saw (JSON: name → list of values), and with hop-by-hop
/// headers of its own that a proxy must drop.
async fn headers(State(state): State<BackendState>, request: Request) -> Response {
    state.calls.fetch_add(1, Ordering::SeqCst);
    let mut seen = serde_json::Map::new();
    for name in request.headers().keys() {
        let values: Vec<serde_json::Value> = request
            .headers()
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned().into())
            .collect();
        seen.insert(name.as_str().to_owned(), values.into());
    }
    (
        [
            ("connection", "x-backend-hop"),
            ("x-backend-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-authenticate", "Basic realm=\"backend\""),
            ("x-backend-end-to-end", "1"),
        ],
        axum::Json(serde_json::Value::Object(seen)),
    )
        .into_response()
}

async fn slow(State(state): State<BackendState>) -> &'static str {
    state.calls.fetch_add(1, Ordering::SeqCst);
    state.entered.notify_one();
    state.release.notified().await;
    "slow answer"
}

/// Sends a first chunk at once and the second only after `release`.
async fn stream(State(state): State<BackendState>) -> Response {
    state.calls.fetch_add(1, Ordering::SeqCst);
    let release = state.release;
    Body::new(TwoChunks {
        step: 0,
        wait: Box::pin(async move { release.notified().await }),
    })
    .into_response()
}

/// A body of two chunks: the first at once, the second when `wait` completes.
struct TwoChunks {
    step: u8,
    wait: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
}

impl http_body::Body for TwoChunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        use std::task::Poll;
        match self.step {
            0 => {
                self.step = 1;
                Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(
                    b"first chunk;",
                )))))
            }
            1 => match self.wait.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    self.step = 2;
                    Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(
                        b"second chunk",
                    )))))
                }
                Poll::Pending => Poll::Pending,
            },
            _ => Poll::Ready(None),
        }
    }
}

async fn status(
    State(state): State<BackendState>,
    axum::extract::Path(code): axum::extract::Path<u16>,
) -> Response {
    state.calls.fetch_add(1, Ordering::SeqCst);
    let status = http::StatusCode::from_u16(code).unwrap();
    (status, format!("backend says {code}")).into_response()
}
