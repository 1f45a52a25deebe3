//! An embedded simulator of the Quicksilva Conneqt instant-messaging access-token API, served
//! over real HTTP/1.1 on `127.0.0.1`.
//!
//! **This is test tooling, not production code.** It exists so that this crate's tests,
//! examples and benchmarks (and yours) can exercise a real network round trip against a
//! faithful stand-in for the vendor's upstream, and inject the failures a real upstream can
//! produce (error statuses, latency, hung requests, dropped connections, non-HTTP replies).
//!
//! # Example
//!
//! ```
//! use conneqt_guard_simulator::Simulator;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let sim = Simulator::start().await?;
//! let token = sim.issue_token();
//!
//! # let _ = rustls::crypto::ring::default_provider().install_default();
//! let client = reqwest::Client::builder().no_proxy().build()?;
//! let verify = |token: String| {
//!     client
//!         .get(format!("{}/api/v1/messages/instant/access/token/verify", sim.base_url()))
//!         .header("ApiKey", sim.api_key())
//!         .header("Content-Type", "application/json; charset=utf-8")
//!         .header("Conneqt-Instant-Access-Token", token)
//!         .send()
//! };
//!
//! assert_eq!(verify(token.clone()).await?.status(), 200);
//! sim.revoke(&token);
//! assert_eq!(verify(token.clone()).await?.status(), 410);
//! assert_eq!(sim.verify_calls_for(&token), 2);
//! # Ok(())
//! # }
//! ```
//!
//! # Endpoints
//!
//! | Request | Answer |
//! |---|---|
//! | `GET /api/v1/messages/instant/access/token/verify` | `200` (valid) or `410` (revoked / never issued), empty bodies |
//! | `POST /api/v1/messages/instant/access/token`, body `{"accessCode": "JH23MA1Z"}` | `200` with `{"token": "<fresh v4 uuid>"}`; the token is then valid |
//! | `GET /api/v1/test` | `200` when the `ApiKey` authenticates and is authorised |
//! | anything else | `404`, empty body (a known path with the wrong method gets `405`) |
//!
//! Errors are RFC 7807 problem details (`Content-Type: application/problem+json`) of the shape
//! `{"type", "title", "status", "instance"}`, with a fresh `urn:uuid:` instance per answer.
//! Validation errors (`400`) use the vendor's `type` string verbatim
//! (`https//qxlva.com/im1toolbar/documentation/api/v1/validation-error`, including the missing
//! colon), the title `Request Validation Error` and an `invalidParameters` list of
//! `{"name", "reason"}`. Every other problem uses `type: "about:blank"` with the status's
//! canonical reason phrase as title (`Unauthorized`, `Forbidden`, `Internal Server Error`, ...).
//!
//! # Decisions where the vendor's specification is silent
//!
//! * **API keys** are random per simulator instance, with distinctive prefixes:
//!   [`Simulator::api_key`] (`sim-authorised-<hex>`) authenticates and is authorised;
//!   [`Simulator::unauthorised_api_key`] (`sim-unauthorised-<hex>`) is known but not
//!   authorised (`403`). Any other value, or no `ApiKey` header, is `401`. [`Simulator`]'s
//!   `Debug` output never shows them.
//! * **Verify check order:** method (`405` unless `GET`), then `ApiKey` (`401` / `403`), then
//!   `Content-Type` must start with `application/json`, ASCII case-insensitively (else `400`,
//!   parameter `Content-Type`), then the `Conneqt-Instant-Access-Token` header: missing or
//!   blank is `400` (`AccessToken`, "Access token must be provided"), not a hyphenated UUID is
//!   `400` (`AccessToken`, "Access token is not in a valid format"), issued and not revoked is
//!   `200`, revoked or never issued is `410`. Tokens compare as UUIDs, so hex case does not
//!   matter.
//! * **Token issue check order:** `ApiKey`, then `Content-Type`, then `accessCode` (property
//!   name matched ASCII case-insensitively, as ASP.NET does): a body that is not a JSON object,
//!   or a missing/empty code, is "Access code must be provided"; anything other than exactly 8
//!   characters of `A-Z0-9` is "Access code must be 8 characters, each A-Z or 0-9" (both
//!   `400`, parameter `AccessCode`).
//! * **Controls apply to the verify path only** (token issue and test connection are never
//!   delayed or faulted). A verify request, of any method, is read in full, then recorded and
//!   counted ([`Simulator::verify_calls`], [`Simulator::recorded_requests`]), then waits at the
//!   [pause](Simulator::pause) gate, then sleeps the [latency](Simulator::set_latency), and
//!   only then looks at the current [`Fault`]: a fault set while requests are paused applies to
//!   them when they are released.
//! * **Faults are decided per request, not per connection**, since clients pool connections.
//! * **Routing** is exact and case-sensitive; query strings are ignored (but recorded).
//! * **Protocol:** HTTP/1.1 only (no h2c), because [`Fault::DropConnection`] and
//!   [`Fault::Garbage`] must act on the one connection that carried the faulted request.

mod controls;
mod routes;
#[cfg(test)]
mod tests;

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Weak};
use std::task::Poll;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

use self::controls::Shared;
use self::routes::{ConnAction, ConnControl};

/// A failure the simulator injects into every verify request while it is set (see
/// [`Simulator::set_fault`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// Answer with this status code. `4xx` and `5xx` carry a problem+json body; every other
    /// status (for example `204`, a `302` without `Location`, or `200`) has an empty body.
    /// Codes that cannot be a final HTTP response (below 200 or above 999) are answered as
    /// `500`.
    Status(u16),
    /// Accept the request and never answer (until the client gives up or the simulator is
    /// dropped).
    Hang,
    /// Close the connection that carried the request without writing any response.
    DropConnection,
    /// Write bytes that are not HTTP (`not http at all\r\n\r\n`) on the connection that
    /// carried the request, then close it.
    Garbage,
}

/// One verify request as the simulator received it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RecordedRequest {
    /// The request method.
    pub method: http::Method,
    /// The path and query, as received.
    pub path: String,
    /// All request headers.
    pub headers: http::HeaderMap,
    /// The request body (verify requests normally have none).
    pub body: bytes::Bytes,
}

/// A running Conneqt simulator bound to `127.0.0.1` on an ephemeral port.
///
/// All methods take `&self` and are safe to call from many tasks at once. Dropping the
/// simulator stops it: the listening socket is closed before `drop` returns, so new
/// connections to [`Simulator::addr`] are refused, and every connection task is aborted.
pub struct Simulator {
    shared: Arc<Shared>,
    addr: SocketAddr,
    /// The only strong reference to the listener: the accept loop holds a `Weak` and upgrades
    /// it only inside a single poll, so dropping this closes the port synchronously.
    listener: Option<Arc<TcpListener>>,
    server: JoinHandle<()>,
}

impl Simulator {
    /// Binds `127.0.0.1:0` and starts serving on the current tokio runtime.
    ///
    /// # Errors
    ///
    /// Fails if the socket cannot be bound.
    ///
    /// # Panics
    ///
    /// Panics if called outside a tokio runtime.
    pub async fn start() -> io::Result<Simulator> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let listener = Arc::new(listener);
        let shared = Arc::new(Shared::new());
        let router = routes::router(Arc::clone(&shared));
        let server = tokio::spawn(accept_loop(Arc::downgrade(&listener), router));
        tracing::debug!(%addr, "conneqt simulator listening");
        Ok(Simulator {
            shared,
            addr,
            listener: Some(listener),
            server,
        })
    }

    /// The base URL to configure clients with: `http://127.0.0.1:PORT`, no trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The socket address the simulator listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The `ApiKey` that authenticates and is authorised.
    pub fn api_key(&self) -> &str {
        &self.shared.api_key
    }

    /// An `ApiKey` the simulator knows but that is not authorised: requests with it get `403`.
    pub fn unauthorised_api_key(&self) -> &str {
        &self.shared.unauthorised_api_key
    }
}

impl fmt::Debug for Simulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the API keys.
        f.debug_struct("Simulator")
            .field("addr", &self.addr)
            .field("verify_calls", &self.verify_calls())
            .finish_non_exhaustive()
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        // Closing the listener here (not in the aborted task, which the runtime drops later)
        // makes the port refuse connections as soon as `drop` returns.
        drop(self.listener.take());
        // Aborting the accept task drops its `JoinSet`, which aborts every connection task.
        self.server.abort();
    }
}

/// Pause before retrying after a failed `accept` (for example when out of file descriptors),
/// so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);

/// Bytes written by [`Fault::Garbage`].
const GARBAGE: &[u8] = b"not http at all\r\n\r\n";

async fn accept_loop(listener: Weak<TcpListener>, router: Router) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = accept(&listener) => match accepted {
                None => break,
                Some(Ok((stream, _peer))) => {
                    connections.spawn(serve_connection(stream, router.clone()));
                }
                Some(Err(err)) => {
                    tracing::warn!(%err, "conneqt simulator: accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            // Reap finished connection tasks so the set does not grow without bound.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Accepts one connection, or `None` once the simulator has dropped the listener.
async fn accept(listener: &Weak<TcpListener>) -> Option<io::Result<(TcpStream, SocketAddr)>> {
    std::future::poll_fn(|cx| match listener.upgrade() {
        Some(listener) => listener.poll_accept(cx).map(Some),
        None => Poll::Ready(None),
    })
    .await
}

/// Serves one connection with hyper's HTTP/1 server.
///
/// Connection-level faults work like this: each connection owns a oneshot channel whose
/// sender ([`ConnControl`]) is put into the extensions of every request on it. A verify
/// handler that must drop the connection or write garbage fires the sender and then never
/// completes; this task, which races the hyper connection against the receiver, then stops
/// serving. For [`Fault::DropConnection`] it drops the connection (closing the socket without a
/// response); for [`Fault::Garbage`] it takes the socket back from hyper with
/// `Connection::into_parts`, writes the garbage and closes it. HTTP/1 handles one request at a
/// time per connection, so the fault hits exactly the request that asked for it, and other
/// pooled connections are unaffected.
async fn serve_connection(stream: TcpStream, router: Router) {
    // Best effort: small request/answer exchanges should not wait for Nagle.
    let _ = stream.set_nodelay(true);
    let (kill_tx, mut kill_rx) = oneshot::channel();
    let control = ConnControl::new(kill_tx);
    let service = hyper::service::service_fn(move |mut request: http::Request<Incoming>| {
        request.extensions_mut().insert(control.clone());
        let mut router = router.clone();
        async move {
            use tower_service::Service as _;
            std::future::poll_fn(|cx| {
                tower_service::Service::<http::Request<Incoming>>::poll_ready(&mut router, cx)
            })
            .await?;
            router.call(request).await
        }
    });
    let mut connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        result = &mut connection => {
            if let Err(err) = result {
                tracing::debug!(%err, "conneqt simulator: connection ended with an error");
            }
        }
        Ok(action) = &mut kill_rx => match action {
            ConnAction::Drop => drop(connection),
            ConnAction::Garbage => {
                let stream = connection.into_parts().io.into_inner();
                write_garbage(&stream).await;
            }
        },
    }
}

/// Writes [`GARBAGE`] to the socket (best effort); the socket closes when the caller drops it.
async fn write_garbage(stream: &TcpStream) {
    let mut rest = GARBAGE;
    while !rest.is_empty() {
        if stream.writable().await.is_err() {
            return;
        }
        match stream.try_write(rest) {
            Ok(written) => rest = &rest[written..],
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}
