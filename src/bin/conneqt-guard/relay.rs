//! `conneqt-guard proxy`'s HTTP/1.1 path: one task per client connection owns the client's
//! socket and one kept-alive connection to the backend, and relays each request through the
//! guard without handing anything to another task.
//!
//! This is the proxy's fast path, not a second HTTP implementation: it takes only the plain
//! requests that make up nearly all traffic (HTTP/1.1, origin-form path, no body or a
//! `Content-Length` body, no `Transfer-Encoding` or `Expect`, not gRPC), and WebSocket
//! handshakes, which become a byte tunnel after the backend's `101`. At the
//! first request that is anything else (or an HTTP/2 preface), it stops and hands the
//! connection, with the bytes it has read but not used, to hyper ([`crate::server`]), which
//! serves the rest of it through the same guard. Each request on a connection is checked by
//! the guard, whichever path serves it.
//!
//! Requests are parsed with `httparse` and turned into an `http::Request` for the guard, so
//! skip rules, `--strip-token-header`, metrics and rejections are the library's own.
//! Responses are relayed as they arrive: `Content-Length`, chunked (checked chunk by chunk and
//! passed on as they are) or until the backend closes.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use conneqt_guard::{AccessTokenLayer, AccessTokenService, RejectionReason};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, Uri};
use http_body::Body;
use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tower_service::Service;

use crate::proxy::{Backend, add_forwarded, bad_gateway, forwarded_for, remove_hop_by_hop};

/// The most headers a request may have on this path (more goes to hyper, which allows 100).
const MAX_REQUEST_HEADERS: usize = 64;
/// The most headers a backend response may have.
const MAX_RESPONSE_HEADERS: usize = 100;
/// The longest request head this path reads before giving the connection to hyper (which
/// answers `431` past its own limit).
const MAX_REQUEST_HEAD: usize = 64 * 1024;
/// The longest response head or chunk-size line accepted from the backend.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// How long a client connection may wait between requests, or take to send a request head.
const REQUEST_HEAD_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a closing connection reads what the client still sends (see
/// [`Connection::close`]).
const LINGER: Duration = Duration::from_secs(2);
/// Read buffer size: enough for the heads of nearly all requests and responses in one read.
const BUFFER: usize = 8 * 1024;
/// The HTTP/2 connection preface: such a connection goes to hyper.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the relay needs, shared by every connection.
#[derive(Clone, Debug)]
pub(crate) struct Relay {
    guard: AccessTokenService<Pass>,
    backend: Arc<Backend>,
}

impl Relay {
    pub(crate) fn new(guard: &AccessTokenLayer, backend: Arc<Backend>) -> Self {
        Self {
            guard: tower_layer::Layer::layer(guard, Pass),
            backend,
        }
    }
}

/// How a connection left the fast path.
pub(crate) enum Ended {
    /// Closed: by the client, after `Connection: close`, on shutdown, or on an error.
    Closed,
    /// A request this path does not take: hyper serves the rest of the connection, starting
    /// with the bytes already read.
    HandOff(Replay),
}

/// Serves `client` until it closes or sends a request for hyper.
pub(crate) async fn serve(
    relay: &Relay,
    client: TcpStream,
    peer: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
) -> Ended {
    let mut connection = Connection {
        relay: relay.clone(),
        forwarded_for: forwarded_for(peer.ip()),
        client,
        buffer: BytesMut::with_capacity(BUFFER),
        backend: None,
    };
    loop {
        // On shutdown a connection waiting for a request (or for the rest of one) is closed.
        let head = tokio::select! {
            biased;
            head = tokio::time::timeout(REQUEST_HEAD_TIMEOUT, connection.read_request_head()) => head,
            _ = shutdown.wait_for(|stop| *stop) => return Ended::Closed,
        };
        let head = match head {
            Ok(Ok(Some(head))) => head,
            Ok(Ok(None)) => return Ended::HandOff(connection.hand_off()),
            Ok(Err(_)) | Err(_) => return Ended::Closed,
        };
        let had_body = head.body_length > 0;
        let keep_alive = connection.exchange(head).await;
        if !keep_alive || *shutdown.borrow() {
            connection.close(had_body).await;
            return Ended::Closed;
        }
    }
}

/// One client connection and its backend connection (opened at the first request, reopened
/// when the backend closes it).
struct Connection {
    relay: Relay,
    /// The client's address, for `X-Forwarded-For`.
    forwarded_for: HeaderValue,
    client: TcpStream,
    /// Bytes read from the client and not yet used.
    buffer: BytesMut,
    backend: Option<BackendConnection>,
}

struct BackendConnection {
    stream: TcpStream,
    /// Bytes read from the backend and not yet used.
    buffer: BytesMut,
    /// The backend has answered a request on this connection (so it was kept alive, and a
    /// failure before the next answer may just mean it was closed while idle).
    answered: bool,
}

/// A request this path takes, parsed.
struct RequestHead {
    request: Request<()>,
    /// The `Content-Length`, 0 for none.
    body_length: u64,
    /// The client asked to close after this request.
    close: bool,
    /// A WebSocket handshake (`Upgrade: websocket`, `Connection: upgrade`, no body): the
    /// `Upgrade` value, passed to the backend.
    upgrade: Option<HeaderValue>,
}

impl Connection {
    /// Reads the next request head. `Ok(None)`: the request is one for hyper, and nothing of it
    /// has been used. `Err`: the client closed or the connection failed.
    async fn read_request_head(&mut self) -> io::Result<Option<RequestHead>> {
        loop {
            if !self.buffer.is_empty() {
                if H2_PREFACE.starts_with(&self.buffer[..self.buffer.len().min(H2_PREFACE.len())]) {
                    return Ok(None);
                }
                let mut headers = [httparse::EMPTY_HEADER; MAX_REQUEST_HEADERS];
                let mut parsed = httparse::Request::new(&mut headers);
                match parsed.parse(&self.buffer) {
                    Ok(httparse::Status::Complete(length)) => {
                        let head = plain_request(&parsed);
                        if head.is_some() {
                            self.buffer.advance(length);
                        }
                        return Ok(head);
                    }
                    Ok(httparse::Status::Partial) if self.buffer.len() < MAX_REQUEST_HEAD => {}
                    // Too long, too many headers or not HTTP/1.x: hyper answers those.
                    Ok(httparse::Status::Partial) | Err(_) => return Ok(None),
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
        let RequestHead {
            request,
            body_length,
            close,
            upgrade,
        } = head;
        let (method, uri) = (request.method().clone(), request.uri().clone());
        let response = {
            let guard = &mut self.relay.guard;
            // `Pass` is always ready, and so is the guard around it.
            let _ = poll_fn(|cx| guard.poll_ready(cx)).await;
            match guard.call(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            }
        };
        if response.extensions().get::<RejectionReason>().is_some() {
            // The body was not read: the connection cannot be used again unless there is none.
            let keep_alive = !close && body_length == 0;
            return self.respond_locally(response, keep_alive).await;
        }
        let mut headers = response.into_parts().0.headers;
        let original_host = headers.get(header::HOST).cloned();
        remove_hop_by_hop(&mut headers);
        headers.remove(header::HOST);
        add_forwarded(&mut headers, Some(&self.forwarded_for), original_host);
        let upgrading = upgrade.is_some();
        if let Some(upgrade) = upgrade {
            // Hop-by-hop, but the handshake is what this hop is for: asked for again.
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, upgrade);
        }

        let head = self.relay.backend.request_head(&method, &uri, &headers);
        match self
            .forward(&method, head, body_length, close, upgrading)
            .await
        {
            Ok(keep_alive) => keep_alive,
            Err(Failure::BeforeResponse) => {
                self.backend = None;
                self.respond_locally(bad_gateway(false), false).await
            }
            Err(Failure::DuringResponse) => false,
        }
    }

    /// Sends the request to the backend and relays its answer to the client. Returns whether
    /// the client connection stays open.
    async fn forward(
        &mut self,
        method: &Method,
        head: Vec<u8>,
        body_length: u64,
        close: bool,
        upgrading: bool,
    ) -> Result<bool, Failure> {
        let mut backend = match self.backend.take() {
            Some(backend) if backend.is_usable() => backend,
            _ => self.relay.backend.connect().await?,
        };
        let (keep_alive, backend_reusable) = if body_length == 0 {
            let mut answer = backend.ask(&head, upgrading).await;
            // The backend may have closed a kept-alive connection while it was idle: a request
            // that has no body and can be repeated is sent again, once, on a new connection.
            if matches!(answer, Ok(None)) && backend.answered && is_idempotent(method) {
                backend = self.relay.backend.connect().await?;
                answer = backend.ask(&head, upgrading).await;
            }
            let response = match answer {
                Ok(Some(response)) => response,
                Ok(None) => {
                    tracing::warn!("the backend closed the connection without answering: 502");
                    return Err(Failure::BeforeResponse);
                }
                Err(error) => {
                    tracing::warn!(%error, "the backend failed before answering: 502");
                    return Err(Failure::BeforeResponse);
                }
            };
            if response.switching {
                return self.tunnel(backend, response.head).await;
            }
            let (_, mut client_write) = self.client.split();
            let (mut backend_read, _) = backend.stream.split();
            let answered = relay_response(
                response,
                method,
                close,
                &mut backend_read,
                &mut backend.buffer,
                &mut client_write,
            )
            .await?;
            (answered.keep_alive, answered.backend_keep_alive)
        } else {
            self.forward_with_body(&mut backend, method, &head, body_length, close)
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
        mut backend: BackendConnection,
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
    /// Returns whether the client and the backend connection stay open.
    async fn forward_with_body(
        &mut self,
        backend: &mut BackendConnection,
        method: &Method,
        head: &[u8],
        body_length: u64,
        close: bool,
    ) -> Result<(bool, bool), Failure> {
        let in_buffer = body_length.min(self.buffer.len() as u64) as usize;
        let mut first = Vec::with_capacity(head.len() + in_buffer);
        first.extend_from_slice(head);
        first.extend_from_slice(&self.buffer.split_to(in_buffer));
        if let Err(error) = backend.stream.write_all(&first).await {
            tracing::warn!(%error, "the backend failed before answering: 502");
            return Err(Failure::BeforeResponse);
        }
        let mut rest = body_length - in_buffer as u64;
        let (mut client_read, mut client_write) = self.client.split();
        let (mut backend_read, mut backend_write) = backend.stream.split();
        let buffer = &mut self.buffer;
        let send_body = async {
            while rest > 0 {
                if buffer.is_empty() {
                    buffer.reserve(BUFFER);
                    if client_read.read_buf(buffer).await? == 0 {
                        return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
                    }
                }
                let take = rest.min(buffer.len() as u64) as usize;
                backend_write.write_all(&buffer.split_to(take)).await?;
                rest -= take as u64;
            }
            Ok(())
        };
        let backend_buffer = &mut backend.buffer;
        let answer = async {
            let response =
                match read_final_head(&mut backend_read, backend_buffer, &mut client_write, false)
                    .await
                {
                    Ok(Some(response)) => response,
                    Ok(None) => return Err(Failure::BeforeResponse),
                    Err(error) => {
                        tracing::warn!(%error, "the backend failed before answering: 502");
                        return Err(Failure::BeforeResponse);
                    }
                };
            relay_response(
                response,
                method,
                close,
                &mut backend_read,
                backend_buffer,
                &mut client_write,
            )
            .await
        };
        tokio::pin!(send_body, answer);
        let mut body_sent = false;
        loop {
            tokio::select! {
                sent = &mut send_body, if !body_sent => match sent {
                    Ok(()) => body_sent = true,
                    Err(error) => {
                        tracing::debug!(%error, "sending the request body failed: closing");
                        return Err(Failure::DuringResponse);
                    }
                },
                answered = &mut answer => {
                    let answered = answered?;
                    return Ok((
                        answered.keep_alive && body_sent,
                        answered.backend_keep_alive && body_sent,
                    ));
                }
            }
        }
    }

    /// Answers with a response made here (a rejection or `502`). Returns whether the client
    /// connection stays open.
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

    /// The client connection and what was read from it but not used, for hyper.
    fn hand_off(self) -> Replay {
        Replay {
            buffered: self.buffer.freeze(),
            stream: self.client,
        }
    }
}

/// A request the fast path takes, turned into an `http::Request` for the guard; `None` for
/// anything else.
fn plain_request(parsed: &httparse::Request<'_, '_>) -> Option<RequestHead> {
    if parsed.version != Some(1) {
        return None;
    }
    let method = Method::from_bytes(parsed.method?.as_bytes()).ok()?;
    let path = parsed.path?;
    if method == Method::CONNECT || !path.starts_with('/') {
        return None;
    }
    let uri = Uri::try_from(path).ok()?;
    let mut headers = HeaderMap::with_capacity(parsed.headers.len());
    let mut body_length = None;
    let mut close = false;
    let mut upgrade: Option<HeaderValue> = None;
    let mut connection_upgrade = false;
    for field in parsed.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(field.value).ok()?;
        if name == header::CONTENT_LENGTH {
            // Digits only: `u64::from_str` would also take `+5`, which a backend may read
            // differently (a way to smuggle a request past the guard).
            let length = content_length(field.value)?;
            if body_length.replace(length).is_some() {
                return None;
            }
        } else if name == header::TRANSFER_ENCODING
            || name == header::EXPECT
            || (name == header::CONTENT_TYPE && field.value.starts_with(b"application/grpc"))
        {
            return None;
        } else if name == header::UPGRADE {
            if upgrade.replace(value.clone()).is_some() {
                return None;
            }
        } else if name == header::CONNECTION {
            close |= has_token(field.value, b"close");
            connection_upgrade |= has_token(field.value, b"upgrade");
        }
        headers.append(name, value);
    }
    // Only a WebSocket handshake is taken here; other upgrades (h2c, ...) go to hyper.
    let upgrade = match upgrade {
        None => None,
        Some(protocol)
            if connection_upgrade
                && method == Method::GET
                && body_length.unwrap_or(0) == 0
                && protocol.as_bytes().eq_ignore_ascii_case(b"websocket") =>
        {
            Some(protocol)
        }
        Some(_) => return None,
    };
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    Some(RequestHead {
        request,
        body_length: body_length.unwrap_or(0),
        close,
        upgrade,
    })
}

/// A `Content-Length` value: 1 to 19 ASCII digits, nothing else.
fn content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// Whether a comma-separated header value lists `token` (case-insensitive).
fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|item| item.trim_ascii().eq_ignore_ascii_case(token))
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// How forwarding failed.
enum Failure {
    /// Nothing was sent to the client yet: answer `502`.
    BeforeResponse,
    /// The response was under way: all that can be done is close the connection.
    DuringResponse,
}

impl From<io::Error> for Failure {
    fn from(error: io::Error) -> Self {
        tracing::warn!(%error, "backend unreachable: answering 502");
        Failure::BeforeResponse
    }
}

impl Backend {
    /// The request head for the backend: its own `Host`, the path under its prefix, the
    /// headers as the guard and the hop-by-hop rules left them.
    fn request_head(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> Vec<u8> {
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
        out.extend_from_slice(b"\r\n");
        out
    }

    async fn connect(&self) -> io::Result<BackendConnection> {
        let stream = TcpStream::connect(self.address()).await?;
        stream.set_nodelay(true)?;
        Ok(BackendConnection {
            stream,
            buffer: BytesMut::with_capacity(BUFFER),
            answered: false,
        })
    }
}

impl BackendConnection {
    /// Sends a request head (of a request with no body) and reads the final response head.
    /// `Ok(None)`: the backend closed the connection without answering.
    /// `upgrading`: the request is a WebSocket handshake, so `101` is an answer.
    async fn ask(&mut self, head: &[u8], upgrading: bool) -> io::Result<Option<ResponseHead>> {
        if self.stream.write_all(head).await.is_err() {
            return Ok(None);
        }
        let (mut read, _) = self.stream.split();
        let mut informational = Vec::new();
        let final_head =
            read_final_head(&mut read, &mut self.buffer, &mut informational, upgrading).await;
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

    /// Whether a kept-alive connection still looks open: the backend has not closed it or
    /// written anything unasked. Costs no system call while nothing has arrived.
    fn is_usable(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(ref e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

/// The backend's response head, rewritten for the client, and how its body is framed.
struct ResponseHead {
    /// Status line and end-to-end headers, without the blank line: framing and `Connection`
    /// are added by [`finish_response_head`].
    head: Vec<u8>,
    framing: Framing,
    /// The backend lets us send another request on this connection.
    backend_keep_alive: bool,
    /// A `1xx` head other than `101`: passed on, and the final one follows.
    informational: bool,
    /// `101 Switching Protocols` to a WebSocket handshake: the connection becomes a tunnel.
    switching: bool,
}

/// How a response body ends.
enum Framing {
    /// After this many bytes.
    Length(u64),
    /// After the last chunk and the trailers.
    Chunked(Chunked),
    /// When the backend closes the connection.
    UntilClose,
}

/// Where a chunked body is.
#[derive(Clone, Copy)]
enum Chunked {
    /// At a chunk-size line.
    Size,
    /// Inside a chunk's data, this much left.
    Data(u64),
    /// After a chunk's data: its CRLF, this many bytes of it seen.
    DataEnd(u8),
    /// After the last chunk: the trailer section.
    Trailers,
}

impl Framing {
    /// How many of `bytes` (the start of what is left of the body) belong to the body, and
    /// whether the body ends there.
    fn scan(&mut self, bytes: &[u8]) -> io::Result<(usize, bool)> {
        match self {
            Framing::Length(left) => {
                let take = (*left).min(bytes.len() as u64);
                *left -= take;
                Ok((take as usize, *left == 0))
            }
            Framing::UntilClose => Ok((bytes.len(), false)),
            Framing::Chunked(state) => scan_chunked(state, bytes),
        }
    }
}

/// [`Framing::scan`] for a chunked body: walks chunk-size lines, data and trailers, checking
/// each, so the body is passed on as it is and its end is known.
fn scan_chunked(state: &mut Chunked, bytes: &[u8]) -> io::Result<(usize, bool)> {
    let mut at = 0;
    loop {
        let rest = &bytes[at..];
        match *state {
            Chunked::Size => match httparse::parse_chunk_size(rest) {
                Ok(httparse::Status::Complete((line, 0))) => {
                    at += line;
                    *state = Chunked::Trailers;
                }
                Ok(httparse::Status::Complete((line, size))) => {
                    at += line;
                    *state = Chunked::Data(size);
                }
                Ok(httparse::Status::Partial) if rest.len() < 1024 => return Ok((at, false)),
                Ok(httparse::Status::Partial) | Err(_) => {
                    return Err(invalid("bad chunk size line from the backend"));
                }
            },
            Chunked::Data(left) => {
                let take = left.min(rest.len() as u64);
                at += take as usize;
                if take < left {
                    *state = Chunked::Data(left - take);
                    return Ok((at, false));
                }
                *state = Chunked::DataEnd(0);
            }
            Chunked::DataEnd(seen) => {
                let Some(&byte) = rest.first() else {
                    return Ok((at, false));
                };
                if byte != b"\r\n"[usize::from(seen)] {
                    return Err(invalid("chunk data not followed by CRLF"));
                }
                at += 1;
                *state = if seen == 0 {
                    Chunked::DataEnd(1)
                } else {
                    Chunked::Size
                };
            }
            Chunked::Trailers => {
                let mut fields = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
                return match httparse::parse_headers(rest, &mut fields) {
                    Ok(httparse::Status::Complete((length, _))) => Ok((at + length, true)),
                    Ok(httparse::Status::Partial) if rest.len() < MAX_RESPONSE_HEAD => {
                        Ok((at, false))
                    }
                    Ok(httparse::Status::Partial) | Err(_) => {
                        Err(invalid("bad trailer section from the backend"))
                    }
                };
            }
        }
    }
}

fn invalid(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// Reads the backend's final response head, writing any `1xx` heads before it to `client`.
/// `Ok(None)`: the backend closed the connection before sending anything.
async fn read_final_head(
    backend: &mut (impl AsyncRead + Unpin),
    buffer: &mut BytesMut,
    client: &mut (impl AsyncWrite + Unpin),
    upgrading: bool,
) -> io::Result<Option<ResponseHead>> {
    loop {
        let Some(response) = read_response_head(backend, buffer, upgrading).await? else {
            return Ok(None);
        };
        if !response.informational {
            return Ok(Some(response));
        }
        let mut head = response.head;
        head.extend_from_slice(b"\r\n");
        client.write_all(&head).await?;
    }
}

/// What relaying an answer left.
struct Answered {
    /// The client connection stays open.
    keep_alive: bool,
    /// The backend connection can take another request.
    backend_keep_alive: bool,
}

/// Writes the response head to the client and relays the body.
async fn relay_response(
    response: ResponseHead,
    method: &Method,
    close: bool,
    backend: &mut (impl AsyncRead + Unpin),
    backend_buffer: &mut BytesMut,
    client: &mut (impl AsyncWrite + Unpin),
) -> Result<Answered, Failure> {
    let ResponseHead {
        mut head,
        framing,
        backend_keep_alive,
        ..
    } = response;
    let framing = if *method == Method::HEAD {
        Framing::Length(0)
    } else {
        framing
    };
    let keep_alive = !close && !matches!(framing, Framing::UntilClose);
    finish_response_head(&mut head, &framing, keep_alive);
    match relay_body(framing, backend, backend_buffer, client, head).await {
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

/// Reads the backend's next response head. `Ok(None)`: the backend closed the connection
/// before sending anything.
async fn read_response_head(
    stream: &mut (impl AsyncRead + Unpin),
    buffer: &mut BytesMut,
    upgrading: bool,
) -> io::Result<Option<ResponseHead>> {
    loop {
        if !buffer.is_empty() {
            let mut fields = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
            let mut parsed = httparse::Response::new(&mut fields);
            match parsed.parse(buffer) {
                Ok(httparse::Status::Complete(length)) => {
                    let head = response_head(&parsed, upgrading)?;
                    buffer.advance(length);
                    return Ok(Some(head));
                }
                Ok(httparse::Status::Partial) if buffer.len() < MAX_RESPONSE_HEAD => {}
                Ok(httparse::Status::Partial) => {
                    return Err(invalid("response head from the backend too long"));
                }
                Err(_) => return Err(invalid("the backend's answer is not HTTP/1.x")),
            }
        }
        buffer.reserve(BUFFER);
        if stream.read_buf(buffer).await? == 0 {
            return if buffer.is_empty() {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
    }
}

/// Hop-by-hop fields (RFC 9110 §7.6.1) never passed from the backend to the client, besides
/// those its `Connection` names. The framing is re-stated by [`finish_response_head`].
const HOP_BY_HOP: [&[u8]; 8] = [
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"transfer-encoding",
    b"upgrade",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"te",
];

/// The client's view of a backend response head, and how its body is framed (RFC 9112 §6.3).
/// `upgrading`: the request was a WebSocket handshake, so `101` is an answer.
fn response_head(parsed: &httparse::Response<'_, '_>, upgrading: bool) -> io::Result<ResponseHead> {
    let (Some(code), Some(version)) = (parsed.code, parsed.version) else {
        return Err(invalid("incomplete status line from the backend"));
    };
    let switching = code == 101;
    if switching && !upgrading {
        return Err(invalid("the backend switched protocols unasked"));
    }
    let mut backend_keep_alive = version == 1;
    let mut named: Vec<&[u8]> = Vec::new();
    let mut length = None;
    let mut chunked = None;
    for field in parsed.headers.iter() {
        let name = field.name.as_bytes();
        if name.eq_ignore_ascii_case(b"connection") {
            for token in field.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    backend_keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    backend_keep_alive |= version == 0;
                }
                named.push(token);
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            let last = field
                .value
                .rsplit(|&b| b == b',')
                .next()
                .unwrap_or_default();
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"content-length") {
            let value = content_length(field.value)
                .ok_or_else(|| invalid("bad Content-Length from the backend"))?;
            if length.replace(value).is_some_and(|before| before != value) {
                return Err(invalid("conflicting Content-Length from the backend"));
            }
        }
    }
    let informational = (100..200).contains(&code) && !switching;
    let framing = match (chunked, length) {
        _ if informational || code == 204 || code == 304 => Framing::Length(0),
        (Some(true), _) => Framing::Chunked(Chunked::Size),
        (Some(false), _) | (None, None) => Framing::UntilClose,
        (None, Some(length)) => Framing::Length(length),
    };
    if matches!(framing, Framing::UntilClose) {
        backend_keep_alive = false;
    }
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(code.to_string().as_bytes());
    head.push(b' ');
    head.extend_from_slice(parsed.reason.unwrap_or_default().as_bytes());
    head.extend_from_slice(b"\r\n");
    for field in parsed.headers.iter() {
        let name = field.name.as_bytes();
        let hop_by_hop = HOP_BY_HOP
            .iter()
            .chain(named.iter())
            .any(|hop| hop.eq_ignore_ascii_case(name));
        let replaced_length = chunked.is_some() && name.eq_ignore_ascii_case(b"content-length");
        if !hop_by_hop && !replaced_length {
            push_header(&mut head, name, field.value);
        }
    }
    if switching {
        // The upgrade is this hop's, so its fields are restated for the client.
        let protocol = parsed
            .headers
            .iter()
            .find(|field| field.name.eq_ignore_ascii_case("upgrade"))
            .ok_or_else(|| invalid("101 without Upgrade from the backend"))?;
        push_header(&mut head, b"connection", b"upgrade");
        push_header(&mut head, b"upgrade", protocol.value);
    }
    Ok(ResponseHead {
        head,
        framing,
        backend_keep_alive,
        informational,
        switching,
    })
}

/// Adds the framing and `Connection` fields and the blank line.
fn finish_response_head(head: &mut Vec<u8>, framing: &Framing, keep_alive: bool) {
    if matches!(framing, Framing::Chunked(_)) {
        push_header(head, b"transfer-encoding", b"chunked");
    }
    if !keep_alive {
        push_header(head, b"connection", b"close");
    }
    head.extend_from_slice(b"\r\n");
}

fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Writes `head`, then the body from `source` as it arrives, until `framing` says it ended.
/// The first write carries the head and the body bytes already read.
async fn relay_body(
    mut framing: Framing,
    source: &mut (impl AsyncRead + Unpin),
    buffer: &mut BytesMut,
    sink: &mut (impl AsyncWrite + Unpin),
    mut head: Vec<u8>,
) -> io::Result<()> {
    loop {
        let (used, done) = framing.scan(buffer)?;
        if head.is_empty() {
            if used > 0 {
                sink.write_all(&buffer[..used]).await?;
            }
        } else {
            head.extend_from_slice(&buffer[..used]);
            sink.write_all(&head).await?;
            head = Vec::new();
        }
        buffer.advance(used);
        if done {
            return Ok(());
        }
        buffer.reserve(BUFFER);
        if source.read_buf(buffer).await? == 0 {
            return match framing {
                Framing::UntilClose => Ok(()),
                _ => Err(io::ErrorKind::UnexpectedEof.into()),
            };
        }
    }
}

/// The service the guard wraps on this path: it hands the request's headers back, as the
/// guard left them (token concealed or stripped), in its response, for the relay to forward.
/// A rejection is told apart by the [`RejectionReason`] the guard puts in its extensions.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pass;

impl Service<Request<()>> for Pass {
    type Response = Response<Empty<Bytes>>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<()>) -> Self::Future {
        let mut response = Response::new(Empty::new());
        *response.headers_mut() = request.into_parts().0.headers;
        std::future::ready(Ok(response))
    }
}

/// A client connection handed to hyper: first the bytes the relay read and did not use, then
/// the socket.
#[derive(Debug)]
pub(crate) struct Replay {
    buffered: Bytes,
    stream: TcpStream,
}

impl AsyncRead for Replay {
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

impl AsyncWrite for Replay {
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
mod tests {
    use super::*;

    fn parse_request(raw: &[u8]) -> Option<RequestHead> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_REQUEST_HEADERS];
        let mut parsed = httparse::Request::new(&mut headers);
        assert!(parsed.parse(raw).unwrap().is_complete());
        plain_request(&parsed)
    }

    fn parse_response(raw: &[u8]) -> io::Result<ResponseHead> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
        let mut parsed = httparse::Response::new(&mut headers);
        assert!(parsed.parse(raw).unwrap().is_complete());
        response_head(&parsed, false)
    }

    #[test]
    fn plain_requests_are_taken_and_everything_else_goes_to_hyper() {
        let head = parse_request(
            b"POST /m?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        assert_eq!(head.body_length, 5);
        assert!(head.close);
        assert_eq!(head.request.uri(), "/m?x=1");
        assert_eq!(head.request.headers()["host"], "a");
        assert!(head.upgrade.is_none());

        let handshake =
            parse_request(b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: WebSocket\r\n\r\n")
                .unwrap();
        assert_eq!(handshake.upgrade.unwrap(), "WebSocket");

        for other in [
            &b"GET / HTTP/1.0\r\n\r\n"[..],
            b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
            b"GET / HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n",
            b"POST / HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Type: application/grpc\r\n\r\n",
        ] {
            assert!(
                parse_request(other).is_none(),
                "{}",
                String::from_utf8_lossy(other)
            );
        }
    }

    #[test]
    fn response_heads_lose_hop_by_hop_fields_and_say_how_the_body_ends() {
        let head = parse_response(
            b"HTTP/1.1 200 OK\r\nConnection: X-Hop, keep-alive\r\nX-Hop: 1\r\nKeep-Alive: 5\r\n\
              Proxy-Authenticate: Basic\r\nX-End: 1\r\nContent-Length: 12\r\n\r\n",
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(head.head).unwrap(),
            "HTTP/1.1 200 OK\r\nX-End: 1\r\nContent-Length: 12\r\n"
        );
        assert!(matches!(head.framing, Framing::Length(12)));
        assert!(head.backend_keep_alive);

        let chunked = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 3\r\n\r\n",
        )
        .unwrap();
        assert!(matches!(chunked.framing, Framing::Chunked(Chunked::Size)));
        assert_eq!(chunked.head, b"HTTP/1.1 200 OK\r\n");

        let closing = parse_response(b"HTTP/1.0 200 OK\r\n\r\n").unwrap();
        assert!(matches!(closing.framing, Framing::UntilClose));
        assert!(!closing.backend_keep_alive);
        let close =
            parse_response(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
        assert!(!close.unwrap().backend_keep_alive);
        let not_modified =
            parse_response(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n");
        assert!(matches!(not_modified.unwrap().framing, Framing::Length(0)));
        assert!(
            parse_response(b"HTTP/1.1 103 Early Hints\r\n\r\n")
                .unwrap()
                .informational
        );

        let mut headers = [httparse::EMPTY_HEADER; 4];
        let mut parsed = httparse::Response::new(&mut headers);
        parsed
            .parse(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nX: 1\r\n\r\n")
            .unwrap();
        let switching = response_head(&parsed, true).unwrap();
        assert!(switching.switching && !switching.informational);
        assert_eq!(
            String::from_utf8(switching.head).unwrap(),
            "HTTP/1.1 101 Switching Protocols\r\nX: 1\r\nconnection: upgrade\r\nupgrade: websocket\r\n"
        );

        for bad in [
            // Not asked for.
            &b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        ] {
            assert!(
                parse_response(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// Scans `body` fed in pieces of `step` bytes, as reads would bring it.
    fn scan_in_pieces(body: &[u8], step: usize) -> io::Result<usize> {
        let mut framing = Framing::Chunked(Chunked::Size);
        let mut buffer = Vec::new();
        let mut passed = 0;
        for piece in body.chunks(step) {
            buffer.extend_from_slice(piece);
            let (used, done) = framing.scan(&buffer)?;
            buffer.drain(..used);
            passed += used;
            if done {
                return Ok(passed);
            }
        }
        Err(io::ErrorKind::UnexpectedEof.into())
    }

    #[test]
    fn chunked_bodies_end_after_the_last_chunk_and_trailers_whatever_the_reads() {
        let body =
            b"5;ext=1\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Trailer: 1\r\n\r\n";
        let mut with_more = body.to_vec();
        with_more.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        for step in [1, 2, 3, 7, body.len()] {
            assert_eq!(
                scan_in_pieces(&with_more, step).unwrap(),
                body.len(),
                "{step}"
            );
        }
        assert_eq!(scan_in_pieces(b"0\r\n\r\n", 1).unwrap(), 5);
        for bad in [
            &b"zz\r\n"[..],
            b"3\r\nabcX\r\n",
            b"3\r\nabc\r\n0\r\nbad trailer\r\n\r\n",
        ] {
            assert!(
                scan_in_pieces(bad, 1).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn content_length_is_digits_only() {
        assert_eq!(content_length(b"0"), Some(0));
        assert_eq!(content_length(b"1234"), Some(1234));
        for bad in [
            &b""[..],
            b"+1",
            b"-1",
            b" 1",
            b"1 ",
            b"0x1",
            b"99999999999999999999",
        ] {
            assert_eq!(
                content_length(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
