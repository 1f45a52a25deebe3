//! A minimal stand-in for Conneqt's verify endpoint, for the benches that fill a cache with
//! many distinct tokens: it answers what the real endpoint answers for a valid token (`200 OK`,
//! empty body) to *any* token, so the tokens need not be issued first, and it records nothing
//! but a count. The simulator (`conneqt_guard_simulator`) is the faithful one; this one is
//! cheap, so that a fill of a million verifications is bounded by the guard's side.
//!
//! | Request | Answer |
//! |---|---|
//! | `GET` [`VERIFY_PATH`] with the right `ApiKey` and a `Conneqt-Instant-Access-Token` | `200`, empty |
//! | the same without the token header | `400`, empty |
//! | the same with another `ApiKey` | `401`, empty |
//! | `GET /api/v1/test` with the right `ApiKey` | `200`, empty |
//! | `GET` [`CALLS_PATH`] | `200`, the number of verify requests so far, as text |
//! | anything else | `404`, empty |
//!
//! It serves HTTP/1.1 on `127.0.0.1`, on a runtime and thread of its own.

use std::convert::Infallible;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// The verify endpoint's path (the layer's default `verify_path`).
pub(crate) const VERIFY_PATH: &str = "/api/v1/messages/instant/access/token/verify";
/// Where the count of verify requests can be read.
pub(crate) const CALLS_PATH: &str = "/bench/verify-calls";
/// The one `ApiKey` accepted.
pub(crate) const API_KEY: &str = "bench-api-key";

/// A running upstream; stops when dropped.
#[derive(Debug)]
pub(crate) struct TinyUpstream {
    addr: SocketAddr,
    calls: Arc<AtomicUsize>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TinyUpstream {
    /// Binds `127.0.0.1:0` and serves on a new thread with its own current-thread runtime.
    pub(crate) fn start() -> TinyUpstream {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("upstream runtime");
        let listener = runtime
            .block_on(TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
            .expect("upstream binds");
        let addr = listener.local_addr().expect("a local address");
        let calls = Arc::new(AtomicUsize::new(0));
        let (stop, stopped) = oneshot::channel();
        let counted = calls.clone();
        let thread = std::thread::Builder::new()
            .name("tiny-upstream".to_owned())
            .spawn(move || runtime.block_on(serve(listener, counted, stopped)))
            .expect("upstream thread");
        TinyUpstream {
            addr,
            calls,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub(crate) fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Verify requests received so far.
    pub(crate) fn verify_calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Drop for TinyUpstream {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve(listener: TcpListener, calls: Arc<AtomicUsize>, mut stopped: oneshot::Receiver<()>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let calls = calls.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        std::future::ready(Ok::<_, Infallible>(answer(&request, &calls)))
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }
    }
    connections.abort_all();
}

fn answer(request: &Request<Incoming>, calls: &AtomicUsize) -> Response<Full<Bytes>> {
    let empty = |status: StatusCode| {
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = status;
        response
    };
    if request.method() != Method::GET {
        return empty(StatusCode::NOT_FOUND);
    }
    let key_ok = request
        .headers()
        .get("apikey")
        .is_some_and(|key| key == API_KEY);
    match request.uri().path() {
        VERIFY_PATH => {
            calls.fetch_add(1, Ordering::SeqCst);
            if !key_ok {
                empty(StatusCode::UNAUTHORIZED)
            } else if request
                .headers()
                .contains_key("conneqt-instant-access-token")
            {
                empty(StatusCode::OK)
            } else {
                empty(StatusCode::BAD_REQUEST)
            }
        }
        "/api/v1/test" if key_ok => empty(StatusCode::OK),
        CALLS_PATH => Response::new(Full::new(Bytes::from(
            calls.load(Ordering::SeqCst).to_string(),
        ))),
        _ => empty(StatusCode::NOT_FOUND),
    }
}

/// Reads the verify-call count of the upstream at `base_url` (as [`TinyUpstream::base_url`]
/// gives it), from another process, with a blocking HTTP/1.1 request and no client library.
pub(crate) fn remote_verify_calls(base_url: &str) -> std::io::Result<usize> {
    let invalid =
        |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let addr = base_url
        .strip_prefix("http://")
        .ok_or_else(|| invalid("not an http:// base URL"))?;
    let mut stream = TcpStream::connect(addr)?;
    write!(
        stream,
        "GET {CALLS_PATH} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| invalid("no end of headers"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(invalid("not 200"));
    }
    body.trim()
        .parse()
        .map_err(|_| invalid("the body is not a count"))
}
