//! `conneqt-guard proxy`'s HTTP/1.1 path: one task per client connection owns the client's
//! socket and one kept-alive connection to the backend, and relays each request through the
//! guard without handing anything to another task.
//!
//! This is the proxy's fast path, not a second HTTP implementation: it takes only the plain
//! requests that make up nearly all traffic (HTTP/1.1, origin-form path, no body or a
//! `Content-Length` body, no `Transfer-Encoding` or `Expect`, not gRPC), and WebSocket
//! handshakes, which become a byte tunnel after the backend's `101`. At the first request
//! that is anything else (or an HTTP/2 preface), it stops and hands the connection, with the
//! bytes it has read but not used, to hyper ([`crate::server`]), which serves the rest of it
//! through the same guard. Each request on a connection is checked by the guard, whichever
//! path serves it. What no reading makes safe (ambiguous framing, `CONNECT`, an unparseable or
//! over-long head) is refused here with problem+json before the guard sees it.
//!
//! The file list is the request's path: [`request`] (admission: parse, check, take, hand off
//! or refuse), then the guard, then this module's connection loop (write the head and body to
//! the backend), [`response`] (the backend's head, checked and rewritten with the framing the
//! relay decided) and [`body`] (the body relayed as it arrives, checked as it passes). The
//! smuggling rules are listed, with their tests, in [`crate::http1`].

mod body;
mod request;
mod response;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use conneqt_guard::AccessTokenLayer;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode, Uri};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use self::body::{Framing, read_within, relay_body};
pub(crate) use self::request::Refusal;
use self::request::{Admission, MAX_REQUEST_HEADERS, RequestHead};
use self::response::{Asked, ResponseHead, push_header, read_final_head};
use crate::http1;
use crate::proxy::{Backend, Timeouts, add_forwarded, forwarded_for, problem};

/// The most headers a backend response may have.
const MAX_RESPONSE_HEADERS: usize = 100;
/// The longest request head the relay reads (more is `431`).
const MAX_REQUEST_HEAD: usize = 64 * 1024;
/// The longest response head or chunk-size line accepted from the backend.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// How long a closing connection reads what the client still sends (see
/// [`Connection::close`]).
const LINGER: std::time::Duration = std::time::Duration::from_secs(2);
/// Read buffer size: enough for the heads of nearly all requests and responses in one read.
const BUFFER: usize = 8 * 1024;
/// The HTTP/2 connection preface: such a connection goes to hyper.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the relay needs, shared by every connection: the guard, where requests go, how to
/// connect there (`K`: TCP to the backend, or an in-memory pipe in tests), the timeouts.
#[derive(Debug)]
pub(crate) struct Relay<K = Backend> {
    guard: AccessTokenLayer,
    backend: Arc<Backend>,
    connector: Arc<K>,
    timeouts: Timeouts,
}

impl<K> Clone for Relay<K> {
    fn clone(&self) -> Self {
        Self {
            guard: self.guard.clone(),
            backend: self.backend.clone(),
            connector: self.connector.clone(),
            timeouts: self.timeouts,
        }
    }
}

impl Relay {
    pub(crate) fn new(guard: &AccessTokenLayer, backend: Arc<Backend>, timeouts: Timeouts) -> Self {
        Relay::with_connector(guard, backend.clone(), backend, timeouts)
    }
}

impl<K: Connect> Relay<K> {
    fn with_connector(
        guard: &AccessTokenLayer,
        backend: Arc<Backend>,
        connector: Arc<K>,
        timeouts: Timeouts,
    ) -> Self {
        Self {
            guard: guard.clone(),
            backend,
            connector,
            timeouts,
        }
    }
}

/// A byte stream the relay serves or forwards to: a TCP socket, or an in-memory pipe in
/// tests, so the connection loop is one piece of code whatever carries the bytes.
pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// The read and write halves, to use both at once.
    fn halves(
        &mut self,
    ) -> (
        impl AsyncRead + Unpin + Send + '_,
        impl AsyncWrite + Unpin + Send + '_,
    );

    /// Whether a kept-alive stream still looks open: the peer has not closed it or written
    /// anything unasked.
    fn is_idle_and_open(&mut self) -> bool;
}

impl Stream for TcpStream {
    fn halves(
        &mut self,
    ) -> (
        impl AsyncRead + Unpin + Send + '_,
        impl AsyncWrite + Unpin + Send + '_,
    ) {
        self.split()
    }

    /// Costs no system call while nothing has arrived.
    fn is_idle_and_open(&mut self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.try_read(&mut probe), Err(ref e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

/// How the relay reaches the backend.
pub(crate) trait Connect: Send + Sync + 'static {
    type Stream: Stream;

    fn connect(&self) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

impl Connect for Backend {
    type Stream = TcpStream;

    async fn connect(&self) -> io::Result<TcpStream> {
        let stream = TcpStream::connect(self.address()).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

/// How a connection left the fast path.
pub(crate) enum Ended<C> {
    /// Closed: by the client, after `Connection: close`, on shutdown, or on an error.
    Closed,
    /// A request this path does not take: hyper serves the rest of the connection, starting
    /// with the bytes already read.
    HandOff(Replay<C>),
}

/// Serves `client` until it closes or sends a request for hyper.
pub(crate) async fn serve<C: Stream, K: Connect>(
    relay: &Relay<K>,
    client: C,
    peer: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
) -> Ended<C> {
    let mut connection = Connection {
        relay: relay.clone(),
        forwarded_for: forwarded_for(peer.ip()),
        client,
        buffer: BytesMut::with_capacity(BUFFER),
        backend: None,
    };
    let head_timeout = relay.timeouts.request_head;
    loop {
        // On shutdown a connection waiting for a request (or for the rest of one) is closed.
        let admission = tokio::select! {
            biased;
            head = tokio::time::timeout(head_timeout, connection.read_request_head()) => head,
            _ = shutdown.wait_for(|stop| *stop) => return Ended::Closed,
        };
        let head = match admission {
            Ok(Ok(Admission::Take(head))) => head,
            Ok(Ok(Admission::HandOff)) => return Ended::HandOff(connection.hand_off()),
            Ok(Ok(Admission::Refuse(refusal))) => {
                tracing::debug!(status = %refusal.status, detail = refusal.detail, "request refused");
                connection.respond_locally(refused(refusal), false).await;
                connection.close(true).await;
                return Ended::Closed;
            }
            Ok(Err(_)) | Err(_) => return Ended::Closed,
        };
        let had_body = head.has_body();
        let keep_alive = connection.exchange(head).await;
        if !keep_alive || *shutdown.borrow() {
            connection.close(had_body).await;
            return Ended::Closed;
        }
    }
}

/// One client connection and its backend connection (opened at the first request, reopened
/// when the backend closes it).
struct Connection<C, K: Connect> {
    relay: Relay<K>,
    /// The client's address, for `X-Forwarded-For`.
    forwarded_for: HeaderValue,
    client: C,
    /// Bytes read from the client and not yet used.
    buffer: BytesMut,
    backend: Option<BackendConnection<K::Stream>>,
}

struct BackendConnection<S> {
    stream: S,
    /// Bytes read from the backend and not yet used.
    buffer: BytesMut,
    /// The backend has answered a request on this connection (so it was kept alive, and a
    /// failure before the next answer may just mean it was closed while idle).
    answered: bool,
}

impl<C: Stream, K: Connect> Connection<C, K> {
    /// Reads the next request head and decides what to do with it (taking it uses its bytes;
    /// handing off or refusing uses nothing). `Err`: the client closed or the connection
    /// failed.
    async fn read_request_head(&mut self) -> io::Result<Admission> {
        loop {
            if !self.buffer.is_empty() {
                if H2_PREFACE.starts_with(&self.buffer[..self.buffer.len().min(H2_PREFACE.len())]) {
                    return Ok(Admission::HandOff);
                }
                let mut headers = [httparse::EMPTY_HEADER; MAX_REQUEST_HEADERS];
                let mut parsed = httparse::Request::new(&mut headers);
                match parsed.parse(&self.buffer) {
                    Ok(httparse::Status::Complete(length)) => {
                        let admission = request::admit(&parsed);
                        if matches!(admission, Admission::Take(_)) {
                            self.buffer.advance(length);
                        }
                        return Ok(admission);
                    }
                    Ok(httparse::Status::Partial) if self.buffer.len() < MAX_REQUEST_HEAD => {}
                    Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
                        return Ok(Admission::Refuse(Refusal::HEAD_TOO_LARGE));
                    }
                    Err(_) => {
                        return Ok(Admission::Refuse(Refusal::malformed(
                            "The request head is not valid HTTP/1.1.",
                        )));
                    }
                }
            }
            self.buffer.reserve(BUFFER);
            if self.client.read_buf(&mut self.buffer).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Serves one request: the guard's check, then the backend's answer or a rejection.
    /// Returns whether the client connection stays open.
    async fn exchange(&mut self, head: RequestHead) -> bool {
        let has_body = head.has_body();
        let RequestHead {
            request,
            body_length,
            close,
            upgrade,
        } = head;
        let (method, uri) = (request.method().clone(), request.uri().clone());
        let request = match self.relay.guard.authorize(request).await {
            Ok(request) => request,
            Err(rejection) => {
                // The body was not read: the connection cannot be used again unless there is
                // none.
                let keep_alive = !close && !has_body;
                return self.respond_locally(rejection, keep_alive).await;
            }
        };
        let mut headers = request.into_parts().0.headers;
        let original_host = headers.get(header::HOST).cloned();
        http1::remove_hop_by_hop(&mut headers);
        headers.remove(header::HOST);
        add_forwarded(&mut headers, Some(&self.forwarded_for), original_host);
        if let Some(upgrade) = &upgrade {
            // Hop-by-hop, but the handshake is what this hop is for: asked for again.
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, upgrade.clone());
        }

        let head = self
            .relay
            .backend
            .request_head(&method, &uri, &headers, body_length);
        let asked = Asked {
            head: method == Method::HEAD,
            upgrade: upgrade.as_ref().map(HeaderValue::as_bytes),
        };
        let body_length = body_length.unwrap_or(0);
        match self.forward(&method, asked, head, body_length, close).await {
            Ok(keep_alive) => keep_alive,
            Err(Failure::Answer(status)) => {
                self.backend = None;
                self.respond_locally(local_answer(status), false).await
            }
            Err(Failure::DuringResponse) => false,
        }
    }

    /// Sends the request to the backend and relays its answer to the client. Returns whether
    /// the client connection stays open.
    async fn forward(
        &mut self,
        method: &Method,
        asked: Asked<'_>,
        head: Vec<u8>,
        body_length: u64,
        close: bool,
    ) -> Result<bool, Failure> {
        let timeouts = self.relay.timeouts;
        let reusable = self
            .backend
            .take()
            .and_then(|mut backend| backend.stream.is_idle_and_open().then_some(backend));
        let mut backend = match reusable {
            Some(backend) => backend,
            None => self.connect().await?,
        };
        let (keep_alive, backend_reusable) = if body_length == 0 {
            let mut answer = backend.ask(&head, asked, timeouts).await;
            // The backend may have closed a kept-alive connection while it was idle: a request
            // that has no body and can be repeated is sent again, once, on a new connection.
            if matches!(answer, Ok(None)) && backend.answered && is_idempotent(method) {
                backend = self.connect().await?;
                answer = backend.ask(&head, asked, timeouts).await;
            }
            let response = match answer {
                Ok(Some(response)) => response,
                Ok(None) => {
                    tracing::warn!("the backend closed the connection without answering: 502");
                    return Err(Failure::Answer(StatusCode::BAD_GATEWAY));
                }
                Err(error) => return Err(Failure::before_response(&error)),
            };
            if response.switching {
                return self.tunnel(backend, response.head).await;
            }
            let (_, mut client_write) = self.client.halves();
            let (mut backend_read, _) = backend.stream.halves();
            let answered = relay_response(
                response,
                close,
                &mut backend_read,
                &mut backend.buffer,
                &mut client_write,
                timeouts,
            )
            .await?;
            (answered.keep_alive, answered.backend_keep_alive)
        } else {
            self.forward_with_body(&mut backend, asked, &head, body_length, close)
                .await?
        };
        backend.answered = true;
        if backend_reusable && backend.buffer.is_empty() {
            self.backend = Some(backend);
        }
        Ok(keep_alive)
    }

    /// After the backend's `101 Switching Protocols`: passes it on, then copies bytes both
    /// ways until either side closes. The guard checked the handshake; what follows is not
    /// HTTP, so it is not checked again (a token revoked mid-session ends nothing).
    async fn tunnel(
        &mut self,
        mut backend: BackendConnection<K::Stream>,
        mut head: Vec<u8>,
    ) -> Result<bool, Failure> {
        head.extend_from_slice(b"\r\n");
        head.extend_from_slice(&backend.buffer.split());
        if let Err(error) = self.client.write_all(&head).await {
            tracing::debug!(%error, "passing on the upgrade failed: closing");
            return Err(Failure::DuringResponse);
        }
        if !self.buffer.is_empty()
            && let Err(error) = backend.stream.write_all(&self.buffer.split()).await
        {
            tracing::debug!(%error, "the backend failed after the upgrade: closing");
            return Err(Failure::DuringResponse);
        }
        if let Err(error) =
            tokio::io::copy_bidirectional(&mut self.client, &mut backend.stream).await
        {
            tracing::debug!(%error, "an upgraded connection ended with an error");
        }
        Ok(false)
    }

    /// [`Self::forward`] for a request with a body: the body is sent while the answer is
    /// relayed (a backend may stream its answer as the body arrives, or answer early, e.g.
    /// `413`). An answer that ends before the body was all sent closes both connections.
    /// A client that stalls for `request_body` gets `408` (or a close, once the answer has
    /// started); the backend has `backend_response` from the body's end to answer.
    /// Returns whether the client and the backend connection stay open.
    async fn forward_with_body(
        &mut self,
        backend: &mut BackendConnection<K::Stream>,
        asked: Asked<'_>,
        head: &[u8],
        body_length: u64,
        close: bool,
    ) -> Result<(bool, bool), Failure> {
        let timeouts = self.relay.timeouts;
        let in_buffer = body_length.min(self.buffer.len() as u64) as usize;
        let mut first = Vec::with_capacity(head.len() + in_buffer);
        first.extend_from_slice(head);
        first.extend_from_slice(&self.buffer.split_to(in_buffer));
        if let Err(error) = backend.stream.write_all(&first).await {
            tracing::warn!(%error, "the backend failed before answering: 502");
            return Err(Failure::Answer(StatusCode::BAD_GATEWAY));
        }
        let mut rest = body_length - in_buffer as u64;
        let (mut client_read, mut client_write) = self.client.halves();
        let (mut backend_read, mut backend_write) = backend.stream.halves();
        let buffer = &mut self.buffer;
        let send_body = async {
            while rest > 0 {
                if buffer.is_empty()
                    && read_within(timeouts.request_body, &mut client_read, buffer).await? == 0
                {
                    return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
                }
                let take = rest.min(buffer.len() as u64) as usize;
                backend_write.write_all(&buffer.split_to(take)).await?;
                rest -= take as u64;
            }
            Ok(())
        };
        let backend_buffer = &mut backend.buffer;
        // Set once the backend's final head is in: too late for a `408` or `504` then.
        let answering = AtomicBool::new(false);
        let answer = async {
            let response =
                match read_final_head(&mut backend_read, backend_buffer, &mut client_write, asked)
                    .await
                {
                    Ok(Some(response)) => response,
                    Ok(None) => return Err(Failure::Answer(StatusCode::BAD_GATEWAY)),
                    Err(error) => return Err(Failure::before_response(&error)),
                };
            answering.store(true, Ordering::Relaxed);
            relay_response(
                response,
                close,
                &mut backend_read,
                backend_buffer,
                &mut client_write,
                timeouts,
            )
            .await
        };
        tokio::pin!(send_body, answer);
        let mut answer_due: Option<Instant> = None;
        loop {
            tokio::select! {
                sent = &mut send_body, if answer_due.is_none() => match sent {
                    Ok(()) => answer_due = Some(Instant::now() + timeouts.backend_response),
                    Err(error) if error.kind() == io::ErrorKind::TimedOut && !answering.load(Ordering::Relaxed) => {
                        tracing::debug!("the client stalled sending the request body: 408");
                        return Err(Failure::Answer(StatusCode::REQUEST_TIMEOUT));
                    }
                    Err(error) => {
                        tracing::debug!(%error, "sending the request body failed: closing");
                        return Err(Failure::DuringResponse);
                    }
                },
                answered = &mut answer => {
                    let answered = answered?;
                    let body_sent = answer_due.is_some();
                    return Ok((
                        answered.keep_alive && body_sent,
                        answered.backend_keep_alive && body_sent,
                    ));
                }
                _ = tokio::time::sleep_until(answer_due.unwrap_or_else(Instant::now)),
                    if answer_due.is_some() && !answering.load(Ordering::Relaxed) =>
                {
                    // The head may have arrived in this same round: then it is too late for 504.
                    if !answering.load(Ordering::Relaxed) {
                        tracing::warn!("the backend did not answer in time: 504");
                        return Err(Failure::Answer(StatusCode::GATEWAY_TIMEOUT));
                    }
                }
            }
        }
    }

    /// Answers with a response made here (a rejection, a refusal, `502`...). Returns whether
    /// the client connection stays open.
    async fn respond_locally<B>(&mut self, response: Response<B>, keep_alive: bool) -> bool
    where
        B: Body<Data = Bytes>,
    {
        let (parts, body) = response.into_parts();
        let body = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => Bytes::new(),
        };
        let mut out = Vec::with_capacity(256 + body.len());
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(parts.status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(
            parts
                .status
                .canonical_reason()
                .unwrap_or("Unknown")
                .as_bytes(),
        );
        out.extend_from_slice(b"\r\n");
        for (name, value) in &parts.headers {
            if name != header::CONTENT_LENGTH && name != header::CONNECTION {
                push_header(&mut out, name.as_str().as_bytes(), value.as_bytes());
            }
        }
        push_header(
            &mut out,
            b"content-length",
            body.len().to_string().as_bytes(),
        );
        if !keep_alive {
            push_header(&mut out, b"connection", b"close");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&body);
        self.client.write_all(&out).await.is_ok() && keep_alive
    }

    /// Closes the client connection. After a request with a body, which may not all have been
    /// read (a rejection does not read it), what the client still sends is read and dropped
    /// until it closes too, for at most [`LINGER`]: closing with unread data would reset the
    /// connection, and a client that sends its whole body before reading would lose the answer.
    async fn close(mut self, had_body: bool) {
        let _ = self.client.shutdown().await;
        if !had_body {
            return;
        }
        let drain = async {
            let mut scratch = [0u8; 16 * 1024];
            while let Ok(1..) = self.client.read(&mut scratch).await {}
        };
        let _ = tokio::time::timeout(LINGER, drain).await;
    }

    /// A new connection to the backend, within `backend_connect`.
    async fn connect(&self) -> io::Result<BackendConnection<K::Stream>> {
        let connecting = self.relay.connector.connect();
        let stream = tokio::time::timeout(self.relay.timeouts.backend_connect, connecting)
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
        Ok(BackendConnection {
            stream,
            buffer: BytesMut::with_capacity(BUFFER),
            answered: false,
        })
    }

    /// The client connection and what was read from it but not used, for hyper.
    fn hand_off(self) -> Replay<C> {
        Replay {
            buffered: self.buffer.freeze(),
            stream: self.client,
        }
    }
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// A refusal as problem+json.
fn refused(refusal: Refusal) -> Response<crate::proxy::ProxyBody> {
    problem(refusal.status, refusal.kind, refusal.detail)
}

/// The answer made here when forwarding failed before the response: `502`, `504` or `408`.
fn local_answer(status: StatusCode) -> Response<crate::proxy::ProxyBody> {
    match status {
        StatusCode::GATEWAY_TIMEOUT => crate::proxy::backend_timeout(false),
        StatusCode::REQUEST_TIMEOUT => crate::proxy::request_timeout(false),
        _ => crate::proxy::bad_gateway(false),
    }
}

/// How forwarding failed.
enum Failure {
    /// Nothing was sent to the client yet: answer with this status (`502`, `504` or `408`).
    Answer(StatusCode),
    /// The response was under way: all that can be done is close the connection.
    DuringResponse,
}

impl Failure {
    /// The backend failed before its answer started: `504` if it ran out of time, else `502`.
    fn before_response(error: &io::Error) -> Self {
        if error.kind() == io::ErrorKind::TimedOut {
            tracing::warn!("the backend did not answer in time: 504");
            Failure::Answer(StatusCode::GATEWAY_TIMEOUT)
        } else {
            tracing::warn!(%error, "the backend failed before answering: 502");
            Failure::Answer(StatusCode::BAD_GATEWAY)
        }
    }
}

impl From<io::Error> for Failure {
    fn from(error: io::Error) -> Self {
        Failure::before_response(&error)
    }
}

impl Backend {
    /// The request head for the backend: its own `Host`, the path under its prefix, the
    /// headers as the guard and the hop-by-hop rules left them, and the framing the relay
    /// sends.
    fn request_head(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body_length: Option<u64>,
    ) -> Vec<u8> {
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(method.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.prefix().as_bytes());
        out.extend_from_slice(path.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        push_header(&mut out, b"host", self.authority().as_bytes());
        for (name, value) in headers {
            push_header(&mut out, name.as_str().as_bytes(), value.as_bytes());
        }
        if let Some(length) = body_length {
            push_header(&mut out, b"content-length", length.to_string().as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out
    }
}

impl<S: Stream> BackendConnection<S> {
    /// Sends a request head (of a request with no body) and reads the final response head,
    /// within `backend_response`. `Ok(None)`: the backend closed the connection without
    /// answering.
    async fn ask(
        &mut self,
        head: &[u8],
        asked: Asked<'_>,
        timeouts: Timeouts,
    ) -> io::Result<Option<ResponseHead>> {
        if self.stream.write_all(head).await.is_err() {
            return Ok(None);
        }
        let (mut read, _) = self.stream.halves();
        let mut informational = Vec::new();
        let final_head = tokio::time::timeout(
            timeouts.backend_response,
            read_final_head(&mut read, &mut self.buffer, &mut informational, asked),
        )
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()));
        if !informational.is_empty() && !matches!(final_head, Ok(Some(_))) {
            return Err(invalid("the backend failed after an informational answer"));
        }
        final_head.map(|head| {
            head.map(|mut head| {
                informational.append(&mut head.head);
                head.head = informational;
                head
            })
        })
    }
}

fn invalid(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// What relaying an answer left.
struct Answered {
    /// The client connection stays open.
    keep_alive: bool,
    /// The backend connection can take another request.
    backend_keep_alive: bool,
}

/// Writes the response head to the client and relays the body, which may pause for at most
/// `backend_body` between reads.
async fn relay_response(
    mut response: ResponseHead,
    close: bool,
    backend: &mut (impl AsyncRead + Unpin),
    backend_buffer: &mut BytesMut,
    client: &mut (impl AsyncWrite + Unpin),
    timeouts: Timeouts,
) -> Result<Answered, Failure> {
    let keep_alive = !close && !matches!(response.framing, Framing::UntilClose);
    response.finish(keep_alive);
    let ResponseHead {
        head,
        framing,
        backend_keep_alive,
        ..
    } = response;
    match relay_body(
        framing,
        backend,
        backend_buffer,
        client,
        head,
        timeouts.backend_body,
    )
    .await
    {
        Ok(()) => Ok(Answered {
            keep_alive,
            backend_keep_alive,
        }),
        Err(error) => {
            tracing::debug!(%error, "relaying the response failed: closing");
            Err(Failure::DuringResponse)
        }
    }
}

/// A client connection handed to hyper: first the bytes the relay read and did not use, then
/// the stream.
#[derive(Debug)]
pub(crate) struct Replay<C> {
    buffered: Bytes,
    stream: C,
}

impl<C: AsyncRead + Unpin> AsyncRead for Replay<C> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buffered.is_empty() {
            return Pin::new(&mut this.stream).poll_read(cx, buf);
        }
        let take = this.buffered.len().min(buf.remaining());
        buf.put_slice(&this.buffered.split_to(take));
        Poll::Ready(Ok(()))
    }
}

impl<C: AsyncWrite + Unpin> AsyncWrite for Replay<C> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
