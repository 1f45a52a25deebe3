//! HTTP/1.x on the wire, for the tests that put the `conneqt-guard` proxy between a raw client
//! and a raw backend: a client that writes exact bytes and reads exact responses, and a
//! scripted backend that answers with exact bytes and records every request it reads, parsed
//! the way a real, lenient server would parse it, and raw.
//!
//! Used as `#[path = "support/wire.rs"] mod wire;` next to `mod sidecar` (for [`raw_setup`]).

#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use conneqt_guard_simulator::Simulator;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::sidecar::Sidecar;

/// The token header as a client would spell it on the wire.
pub const WIRE_TOKEN_HEADER: &str = "Conneqt-Instant-Access-Token";

/// The longest any single step may take before the test fails instead of hanging.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Header names (lower case) and their values, in the order received.
pub type Headers = HashMap<String, Vec<String>>;

/// `future`, or a failed test if it takes longer than [`STEP_TIMEOUT`].
pub async fn within<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(STEP_TIMEOUT, future)
        .await
        .expect("the step finished within the step timeout")
}

/// `bytes` as printable ASCII, escaped (`\r`, `\n`, `\x00`, ...).
pub fn escaped(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
}

/// One end of a TCP connection, with the bytes read but not consumed yet.
pub struct Wire {
    pub stream: TcpStream,
    pub buffer: Vec<u8>,
    /// Every byte ever read on this connection, consumed or not.
    pub received: Vec<u8>,
    /// The backend's count of connections waiting for bytes (see [`RawBackend::settle`]).
    activity: Option<Arc<Activity>>,
}

impl Wire {
    pub fn new(stream: TcpStream) -> Wire {
        Wire {
            stream,
            buffer: Vec::new(),
            received: Vec::new(),
            activity: None,
        }
    }

    /// Reads more bytes into the buffer; `false` at EOF (a reset counts as EOF).
    pub async fn fill(&mut self) -> bool {
        let mut chunk = [0; 16 * 1024];
        loop {
            match self.stream.try_read(&mut chunk) {
                Ok(n) => {
                    if let Some(activity) = &self.activity {
                        activity.bytes.fetch_add(n, Ordering::SeqCst);
                    }
                    self.buffer.extend_from_slice(&chunk[..n]);
                    self.received.extend_from_slice(&chunk[..n]);
                    return n > 0;
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    // Only now, with nothing left in the socket, does the connection count as
                    // waiting.
                    let _waiting = self.activity.as_deref().map(Waiting::new);
                    if self.stream.readable().await.is_err() {
                        return false;
                    }
                }
                Err(_) => return false,
            }
        }
    }

    /// Everything up to and including `delimiter`; `None` at EOF first.
    pub async fn until(&mut self, delimiter: &[u8]) -> Option<Vec<u8>> {
        loop {
            if let Some(at) = self
                .buffer
                .windows(delimiter.len())
                .position(|w| w == delimiter)
            {
                return Some(self.buffer.drain(..at + delimiter.len()).collect());
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// The next `n` bytes; `None` at EOF first (what was read stays in the buffer).
    pub async fn take(&mut self, n: usize) -> Option<Vec<u8>> {
        while self.buffer.len() < n {
            if !self.fill().await {
                return None;
            }
        }
        Some(self.buffer.drain(..n).collect())
    }

    pub async fn exactly(&mut self, n: usize) -> Vec<u8> {
        match self.take(n).await {
            Some(bytes) => bytes,
            None => panic!("EOF {} bytes into {n}", self.buffer.len()),
        }
    }

    /// A start line and its headers; `None` at EOF before a whole head.
    pub async fn head(&mut self) -> Option<(String, Headers)> {
        let raw = String::from_utf8(self.until(b"\r\n\r\n").await?).expect("a UTF-8 head");
        let mut lines = raw.trim_end().split("\r\n");
        let start = lines.next().unwrap_or_default().to_owned();
        let mut headers = Headers::new();
        for line in lines {
            let (name, value) = line.split_once(':').expect("a header line");
            let values = headers.entry(name.to_ascii_lowercase()).or_default();
            values.push(value.trim().to_owned());
        }
        Some((start, headers))
    }

    /// A body framed by `framing`.
    pub async fn body(&mut self, framing: Framing) -> Vec<u8> {
        match framing {
            Framing::None => Vec::new(),
            Framing::Length(n) => self.exactly(n).await,
            Framing::UntilEof => {
                while self.fill().await {}
                std::mem::take(&mut self.buffer)
            }
            Framing::Chunked => {
                let mut body = Vec::new();
                loop {
                    let line = self.until(b"\r\n").await.expect("a chunk size line");
                    let line = String::from_utf8(line).expect("a UTF-8 chunk size line");
                    let size = line.split([';', '\r']).next().unwrap_or_default();
                    let size = usize::from_str_radix(size.trim(), 16).expect("a hex chunk size");
                    if size == 0 {
                        // Trailers, if any, up to the empty line.
                        while self.until(b"\r\n").await.expect("the end of trailers") != b"\r\n" {}
                        return body;
                    }
                    body.extend(self.exactly(size).await);
                    assert_eq!(self.exactly(2).await, b"\r\n", "CRLF after a chunk");
                }
            }
        }
    }
}

/// How a message body is delimited.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Framing {
    None,
    Length(usize),
    Chunked,
    UntilEof,
}

/// The framing `headers` declare: chunked wins over `Content-Length`; `otherwise` for neither.
pub fn declared_framing(headers: &Headers, otherwise: Framing) -> Framing {
    let chunked = headers
        .get("transfer-encoding")
        .is_some_and(|v| v.iter().any(|v| v.to_ascii_lowercase().contains("chunked")));
    match headers.get("content-length") {
        _ if chunked => Framing::Chunked,
        Some(length) => Framing::Length(length[0].parse().expect("a numeric Content-Length")),
        None => otherwise,
    }
}

/// A response head as the client received it.
#[derive(Debug)]
pub struct Head {
    /// The status line, such as `HTTP/1.1 200 OK`.
    pub line: String,
    pub status: u16,
    pub headers: Headers,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v[0].as_str())
    }
}

/// One response as the client received it.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Headers,
    pub body: Vec<u8>,
    pub framing: Framing,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v[0].as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A raw HTTP/1.x client connection to the proxy.
pub struct Client(pub Wire);

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        let stream = within(TcpStream::connect(addr))
            .await
            .expect("the proxy accepts");
        let _ = stream.set_nodelay(true);
        Client(Wire::new(stream))
    }

    /// A client, and a second handle on the same socket to write with while the client reads
    /// (for requests the proxy may answer before it has read them whole).
    pub async fn connect_with_writer(addr: SocketAddr) -> (Client, TcpStream) {
        let client = Client::connect(addr).await;
        let std = client.0.stream.into_std().expect("a std socket");
        let writer = std.try_clone().expect("the socket clones");
        let reader = TcpStream::from_std(std).expect("back to tokio");
        let writer = TcpStream::from_std(writer).expect("back to tokio");
        (Client(Wire::new(reader)), writer)
    }

    pub async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        let write = self.0.stream.write_all(bytes.as_ref());
        within(write).await.expect("the proxy takes the bytes");
    }

    /// The next response to a request that was not `HEAD`.
    pub async fn response(&mut self) -> Answer {
        self.response_or_eof().await.expect("a response, not EOF")
    }

    /// The next response, or `None` if the proxy closed the connection instead.
    pub async fn response_or_eof(&mut self) -> Option<Answer> {
        within(self.read(false, None)).await
    }

    /// The next response, which must have `status`: checked on its head, before its body is
    /// read (a wrong answer fails at once, with its head, instead of stalling on its body).
    pub async fn expect(&mut self, status: u16) -> Answer {
        within(self.read(false, Some(status)))
            .await
            .unwrap_or_else(|| panic!("expected a {status} response, got EOF"))
    }

    /// The next response, which must be the guard's problem+json with `status` and `kind`.
    pub async fn problem(&mut self, status: u16, kind: &str) -> serde_json::Value {
        assert_problem(&self.expect(status).await, status, kind)
    }

    /// The next response to a `HEAD` request: never a body.
    pub async fn head_response(&mut self) -> Answer {
        within(self.read(true, None))
            .await
            .expect("a response, not EOF")
    }

    /// The next response head alone; its body (if any) is left on the wire for
    /// [`Client::body_of`].
    pub async fn next_head(&mut self) -> Head {
        within(self.read_head())
            .await
            .expect("a response head, not EOF")
    }

    /// The body that follows `head` (the response to a request that was not `HEAD`).
    pub async fn body_of(&mut self, head: &Head) -> Vec<u8> {
        let framing = response_framing(head, false);
        within(self.0.body(framing)).await
    }

    async fn read_head(&mut self) -> Option<Head> {
        let Some((line, headers)) = self.0.head().await else {
            assert!(
                self.0.buffer.is_empty(),
                "EOF inside a head: {:?}",
                escaped(&self.0.buffer)
            );
            return None;
        };
        let mut parts = line.splitn(3, ' ');
        assert!(
            parts.next().is_some_and(|v| v.starts_with("HTTP/1.")),
            "{line}"
        );
        let status: u16 = parts.next().and_then(|s| s.parse().ok()).expect(&line);
        Some(Head {
            line,
            status,
            headers,
        })
    }

    async fn read(&mut self, to_head: bool, expected: Option<u16>) -> Option<Answer> {
        let head = self.read_head().await?;
        if let Some(expected) = expected {
            assert_eq!(
                head.status, expected,
                "expected {expected}, got {} {:?}",
                head.line, head.headers
            );
        }
        let body = self.0.body(response_framing(&head, to_head)).await;
        Some(Answer {
            status: head.status,
            framing: response_framing(&head, to_head),
            headers: head.headers,
            body,
        })
    }

    /// Asserts that the proxy closes the connection with nothing more sent.
    pub async fn assert_closed_by_proxy(&mut self) {
        let wire = &mut self.0;
        tokio::time::timeout(STEP_TIMEOUT, async { while wire.fill().await {} })
            .await
            .expect("the proxy closes the connection (within the step timeout)");
        assert!(
            wire.buffer.is_empty(),
            "bytes after the last response: {:?}",
            escaped(&wire.buffer)
        );
    }

    /// Ends the request side (shuts down writing) and returns everything the proxy sends until
    /// it closes, from what is buffered on.
    pub async fn finish(&mut self) -> Vec<u8> {
        let _ = self.0.stream.shutdown().await;
        let wire = &mut self.0;
        tokio::time::timeout(STEP_TIMEOUT, async { while wire.fill().await {} })
            .await
            .expect(
                "the proxy closes the connection after the client's EOF (within the step timeout)",
            );
        std::mem::take(&mut wire.buffer)
    }
}

/// How the body of a response with `head` is framed.
fn response_framing(head: &Head, to_head: bool) -> Framing {
    if to_head || head.status < 200 || head.status == 204 || head.status == 304 {
        Framing::None
    } else {
        declared_framing(&head.headers, Framing::UntilEof)
    }
}

/// `METHOD path HTTP/1.1` with a `Host`, the token if given, and `extra` header lines (each
/// ending in CRLF), up to and including the empty line.
pub fn request(method: &str, path: &str, token: Option<&str>, extra: &str) -> String {
    let token = token.map_or_else(String::new, |t| format!("{WIRE_TOKEN_HEADER}: {t}\r\n"));
    format!("{method} {path} HTTP/1.1\r\nHost: guarded.test\r\n{token}{extra}\r\n")
}

pub fn get(path: &str, token: Option<&str>) -> String {
    request("GET", path, token, "")
}

/// Asserts that `answer` is the guard's problem+json with `status` and type `kind`.
pub fn assert_problem(answer: &Answer, status: u16, kind: &str) -> serde_json::Value {
    assert_eq!(answer.status, status, "{}", answer.text());
    assert_eq!(
        answer.header("content-type"),
        Some("application/problem+json"),
        "{answer:?}"
    );
    let body: serde_json::Value = serde_json::from_slice(&answer.body).expect("a JSON problem");
    assert_eq!(body["status"], status, "{body}");
    assert_eq!(
        body["type"],
        format!("tag:conneqt-guard,2026:{kind}"),
        "{body}"
    );
    body
}

/// One request as the raw backend received it.
#[derive(Clone)]
pub struct Seen {
    /// Which accepted connection it came on, from 1.
    pub connection: usize,
    /// The request line, such as `GET /x HTTP/1.1`.
    pub line: String,
    /// Header fields by lower-case name (not trimmed: `Name :` is the key `name `).
    pub headers: Headers,
    /// Header fields as received: name (as spelled) and value, in order. A line without a colon
    /// is a field with that name and an empty value.
    pub fields: Vec<(String, String)>,
    /// The decoded body: what a `Content-Length` or the chunks delimited.
    pub body: Vec<u8>,
    /// Trailer fields of a chunked body, by lower-case name.
    pub trailers: Headers,
    /// The head exactly as read: request line to the blank line, both included.
    pub raw_head: Vec<u8>,
    /// The body exactly as read (chunk-size lines and trailers included).
    pub raw_body: Vec<u8>,
    /// The whole body was read (`false` while waiting for it, or if it never came whole).
    pub complete: bool,
}

impl fmt::Debug for Seen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Seen {{ connection: {}, head: \"{}\", body: \"{}\", complete: {} }}",
            self.connection,
            escaped(&self.raw_head),
            escaped(&self.raw_body),
            self.complete
        )
    }
}

impl Seen {
    /// The request target, such as `/x?a=1`.
    pub fn path(&self) -> &str {
        self.line.split(' ').nth(1).unwrap_or_default()
    }

    /// The request target without its query.
    pub fn route(&self) -> &str {
        let path = self.path();
        path.split_once('?').map_or(path, |(route, _)| route)
    }

    /// The values of the field `name` (lower case), or none.
    pub fn values(&self, name: &str) -> Vec<String> {
        self.headers.get(name).cloned().unwrap_or_default()
    }
}

/// What the raw backend does after writing a reply.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum After {
    /// Reads the next request on the connection.
    Keep,
    /// Shuts the connection down.
    Close,
    /// Echoes every later byte back, as a tunnel would (after a `101`).
    Echo,
}

/// What the raw backend answers one request with.
pub struct Reply {
    pub bytes: Vec<u8>,
    pub after: After,
}

/// `200 OK` with `body` and a `Content-Length`, keeping the connection.
pub fn ok(body: &str) -> Reply {
    let bytes = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    keep(&bytes)
}

pub fn keep(bytes: &str) -> Reply {
    Reply {
        bytes: bytes.as_bytes().to_vec(),
        after: After::Keep,
    }
}

pub fn close(bytes: &[u8]) -> Reply {
    Reply {
        bytes: bytes.to_vec(),
        after: After::Close,
    }
}

pub fn echo(bytes: &str) -> Reply {
    Reply {
        bytes: bytes.as_bytes().to_vec(),
        after: After::Echo,
    }
}

/// Bytes by the connection (from 1) that brought them.
type ByteLog = Arc<Mutex<Vec<(usize, Vec<u8>)>>>;

/// The backend's connections, for [`RawBackend::settle`].
#[derive(Default)]
struct Activity {
    /// Connections being served.
    open: AtomicUsize,
    /// Connections with nothing to read, waiting for bytes.
    waiting: AtomicUsize,
    /// Bytes read on all connections.
    bytes: AtomicUsize,
}

/// Counts one connection as waiting while it lives.
struct Waiting<'a>(&'a Activity);

impl<'a> Waiting<'a> {
    fn new(activity: &'a Activity) -> Self {
        activity.waiting.fetch_add(1, Ordering::SeqCst);
        Waiting(activity)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counts one connection as open while it lives.
struct Open(Arc<Activity>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A backend on 127.0.0.1:0 that answers each request with what `script` returns.
///
/// It parses like a real, lenient server: a `Transfer-Encoding` whose value contains `chunked`
/// wins over `Content-Length`; a `Content-Length` is the first such field read with
/// `trim().parse::<usize>()` (no body if that fails); names are matched trimmed and in any
/// case. Every request it can parse is recorded as soon as its head is read (its body is filled
/// in when read); bytes it cannot parse as a request are kept in [`RawBackend::garbage`].
pub struct RawBackend {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    garbage: ByteLog,
    tunneled: ByteLog,
    accepted: Arc<AtomicUsize>,
    activity: Arc<Activity>,
    /// Notified each time the backend has shut a connection down after a reply.
    pub closed: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What one backend connection task shares with the [`RawBackend`].
#[derive(Clone)]
struct Recorder {
    connection: usize,
    seen: Arc<Mutex<Vec<Seen>>>,
    garbage: ByteLog,
    tunneled: ByteLog,
    closed: Arc<Notify>,
}

impl RawBackend {
    pub async fn start(script: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> RawBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::<Mutex<Vec<Seen>>>::default();
        let garbage = ByteLog::default();
        let tunneled = ByteLog::default();
        let accepted = Arc::<AtomicUsize>::default();
        let activity = Arc::<Activity>::default();
        let closed = Arc::<Notify>::default();
        let script = Arc::new(script);
        let recorder = Recorder {
            connection: 0,
            seen: seen.clone(),
            garbage: garbage.clone(),
            tunneled: tunneled.clone(),
            closed: closed.clone(),
        };
        let (count, active) = (accepted.clone(), activity.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                active.open.fetch_add(1, Ordering::SeqCst);
                let open = Open(active.clone());
                let recorder = Recorder {
                    connection: count.fetch_add(1, Ordering::SeqCst) + 1,
                    ..recorder.clone()
                };
                let mut wire = Wire::new(stream);
                wire.activity = Some(active.clone());
                let script = script.clone();
                tokio::spawn(async move {
                    let _open = open;
                    serve_raw(wire, &recorder, &*script).await;
                });
            }
        });
        RawBackend {
            addr,
            seen,
            garbage,
            tunneled,
            accepted,
            activity,
            closed,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request read so far, in the order their heads arrived.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn paths(&self) -> Vec<String> {
        self.seen().iter().map(|s| s.path().to_owned()).collect()
    }

    /// Bytes that reached the backend and are not a request it could parse (by connection).
    pub fn garbage(&self) -> Vec<(usize, Vec<u8>)> {
        self.garbage.lock().unwrap().clone()
    }

    /// Bytes read after a reply that made the connection a tunnel (by connection).
    pub fn tunneled(&self) -> Vec<(usize, Vec<u8>)> {
        self.tunneled.lock().unwrap().clone()
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Waits (at most 3 s) until the backend is quiet: every connection it accepted is waiting
    /// for bytes with none left to read, and that, the connection count and the bytes read
    /// stayed the same over three checks 5 ms apart. There is no event for "nothing more will
    /// arrive", so this polls for it: it makes a check that something did *not* reach the
    /// backend see whatever the proxy had already sent it.
    pub async fn settle(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        let mut quiet = 0;
        let mut last = None;
        while tokio::time::Instant::now() < deadline {
            let activity = &self.activity;
            let state = (
                activity.open.load(Ordering::SeqCst),
                activity.waiting.load(Ordering::SeqCst),
                activity.bytes.load(Ordering::SeqCst),
                self.accepted(),
            );
            if state.0 == state.1 && last == Some(state) {
                quiet += 1;
                if quiet == 3 {
                    return;
                }
            } else {
                quiet = 0;
            }
            last = Some(state);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Serves one backend connection: reads requests, records them, answers with the script.
async fn serve_raw(mut wire: Wire, recorder: &Recorder, script: &(dyn Fn(&Seen) -> Reply + Sync)) {
    loop {
        let Some(raw_head) = wire.until(b"\r\n\r\n").await else {
            if !wire.buffer.is_empty() {
                // A partial head, then EOF.
                let rest = std::mem::take(&mut wire.buffer);
                recorder
                    .garbage
                    .lock()
                    .unwrap()
                    .push((recorder.connection, rest));
            }
            return;
        };
        let Some((line, fields)) = parse_request_head(&raw_head) else {
            let mut rest = raw_head;
            rest.append(&mut wire.buffer);
            keep_garbage(&mut wire, recorder, rest).await;
            return;
        };
        let mut headers = Headers::new();
        for (name, value) in &fields {
            let values = headers.entry(name.to_ascii_lowercase()).or_default();
            values.push(value.clone());
        }
        let framing = lenient_framing(&fields);
        let index = {
            let mut seen = recorder.seen.lock().unwrap();
            seen.push(Seen {
                connection: recorder.connection,
                line,
                headers,
                fields,
                body: Vec::new(),
                trailers: Headers::new(),
                raw_head,
                raw_body: Vec::new(),
                complete: false,
            });
            seen.len() - 1
        };
        let read = read_body(&mut wire, framing).await;
        let request = {
            let mut seen = recorder.seen.lock().unwrap();
            let request = &mut seen[index];
            request.body = read.body;
            request.raw_body = read.raw;
            request.trailers = read.trailers;
            request.complete = read.outcome == BodyOutcome::Complete;
            request.clone()
        };
        match read.outcome {
            BodyOutcome::Complete => {}
            BodyOutcome::Eof => return,
            BodyOutcome::Malformed => {
                let rest = std::mem::take(&mut wire.buffer);
                keep_garbage(&mut wire, recorder, rest).await;
                return;
            }
        }
        let reply = script(&request);
        if wire.stream.write_all(&reply.bytes).await.is_err() {
            return;
        }
        match reply.after {
            After::Keep => {}
            After::Close => {
                let _ = wire.stream.shutdown().await;
                drop(wire);
                recorder.closed.notify_one();
                return;
            }
            After::Echo => {
                let mut bytes = std::mem::take(&mut wire.buffer);
                loop {
                    if !bytes.is_empty() {
                        recorder
                            .tunneled
                            .lock()
                            .unwrap()
                            .push((recorder.connection, bytes.clone()));
                        if wire.stream.write_all(&bytes).await.is_err() {
                            return;
                        }
                    }
                    if !wire.fill().await {
                        return;
                    }
                    bytes = std::mem::take(&mut wire.buffer);
                }
            }
        }
    }
}

/// Records `first` and everything else the connection brings as garbage, until EOF.
async fn keep_garbage(wire: &mut Wire, recorder: &Recorder, first: Vec<u8>) {
    let index = {
        let mut garbage = recorder.garbage.lock().unwrap();
        garbage.push((recorder.connection, first));
        garbage.len() - 1
    };
    while wire.fill().await {
        let more = std::mem::take(&mut wire.buffer);
        recorder.garbage.lock().unwrap()[index].1.extend(more);
    }
}

/// A request line (`METHOD target HTTP/x`) and header fields, leniently: any bytes (lossy
/// UTF-8), a field line without a colon is a name alone. `None` if the first line is not a
/// request line.
fn parse_request_head(raw: &[u8]) -> Option<(String, Vec<(String, String)>)> {
    let text = String::from_utf8_lossy(raw);
    let text = text.strip_suffix("\r\n\r\n").unwrap_or(&text);
    let mut lines = text.split("\r\n");
    let line = lines.next()?.to_owned();
    let parts: Vec<&str> = line.split(' ').collect();
    if parts.len() != 3 || parts[0].is_empty() || !parts[2].starts_with("HTTP/") {
        return None;
    }
    let fields = lines
        .map(|field| match field.split_once(':') {
            Some((name, value)) => (name.to_owned(), value.trim().to_owned()),
            None => (field.to_owned(), String::new()),
        })
        .collect();
    Some((line, fields))
}

/// How a lenient server frames a request body with `fields`.
fn lenient_framing(fields: &[(String, String)]) -> Framing {
    fn named<'a>(
        fields: &'a [(String, String)],
        name: &'a str,
    ) -> impl Iterator<Item = &'a String> + 'a {
        fields
            .iter()
            .filter(move |(n, _)| n.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }
    if named(fields, "transfer-encoding").any(|v| v.to_ascii_lowercase().contains("chunked")) {
        return Framing::Chunked;
    }
    match named(fields, "content-length").next() {
        Some(length) => Framing::Length(length.trim().parse::<usize>().unwrap_or(0)),
        None => Framing::None,
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum BodyOutcome {
    Complete,
    /// The connection ended inside the body.
    Eof,
    /// A chunked body that is not chunked encoding.
    Malformed,
}

struct BodyRead {
    body: Vec<u8>,
    raw: Vec<u8>,
    trailers: Headers,
    outcome: BodyOutcome,
}

/// Reads a request body framed by `framing` (never [`Framing::UntilEof`] for a request).
async fn read_body(wire: &mut Wire, framing: Framing) -> BodyRead {
    let mut read = BodyRead {
        body: Vec::new(),
        raw: Vec::new(),
        trailers: Headers::new(),
        outcome: BodyOutcome::Complete,
    };
    match framing {
        Framing::None | Framing::UntilEof => {}
        Framing::Length(n) => {
            // In steps, so that a huge length only holds what actually arrives.
            let mut left = n;
            while left > 0 {
                if wire.buffer.is_empty() && !wire.fill().await {
                    read.outcome = BodyOutcome::Eof;
                    break;
                }
                let take = left.min(wire.buffer.len());
                let bytes: Vec<u8> = wire.buffer.drain(..take).collect();
                read.raw.extend_from_slice(&bytes);
                read.body.extend(bytes);
                left -= take;
            }
        }
        Framing::Chunked => read.outcome = read_chunked(wire, &mut read).await,
    }
    read
}

async fn read_chunked(wire: &mut Wire, read: &mut BodyRead) -> BodyOutcome {
    loop {
        let Some(line) = wire.until(b"\r\n").await else {
            return BodyOutcome::Eof;
        };
        read.raw.extend_from_slice(&line);
        let text = String::from_utf8_lossy(&line);
        let size = text.split([';', '\r']).next().unwrap_or_default().trim();
        let Ok(size) = usize::from_str_radix(size, 16) else {
            return BodyOutcome::Malformed;
        };
        if size == 0 {
            loop {
                let Some(line) = wire.until(b"\r\n").await else {
                    return BodyOutcome::Eof;
                };
                read.raw.extend_from_slice(&line);
                if line == b"\r\n" {
                    return BodyOutcome::Complete;
                }
                let text = String::from_utf8_lossy(&line);
                let (name, value) = text.trim_end().split_once(':').unwrap_or((&text, ""));
                let values = read.trailers.entry(name.to_ascii_lowercase()).or_default();
                values.push(value.trim().to_owned());
            }
        }
        let Some(data) = wire.take(size).await else {
            return BodyOutcome::Eof;
        };
        read.raw.extend_from_slice(&data);
        read.body.extend(data);
        let Some(end) = wire.take(2).await else {
            return BodyOutcome::Eof;
        };
        read.raw.extend_from_slice(&end);
        if end != b"\r\n" {
            return BodyOutcome::Malformed;
        }
    }
}

/// A simulator, a raw backend running `script`, the proxy in front, and a valid token.
pub async fn raw_setup(
    script: impl Fn(&Seen) -> Reply + Send + Sync + 'static,
) -> (Simulator, RawBackend, Sidecar, String) {
    let sim = Simulator::start().await.unwrap();
    let backend = RawBackend::start(script).await;
    let sidecar = Sidecar::proxy(&sim, &backend.url(), &[]).await;
    let token = sim.issue_token();
    (sim, backend, sidecar, token)
}
