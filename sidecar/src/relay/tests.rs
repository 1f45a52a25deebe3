//! The connection loop over in-memory pipes: the client and every backend connection are
//! `tokio::io::duplex` streams, so what the backend receives is read byte for byte and the
//! timeouts run on tokio's paused clock (no waiting, no sleeps). The guard is the library's,
//! with `/public` skipped and an upstream that is never asked: skipped requests and missing
//! tokens need no verification.

use std::net::{Ipv4Addr, SocketAddr};
use std::task::Waker;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;

use super::*;
use crate::proxy::parse_backend;

impl Stream for DuplexStream {
    fn halves(
        &mut self,
    ) -> (
        impl AsyncRead + Unpin + Send + '_,
        impl AsyncWrite + Unpin + Send + '_,
    ) {
        tokio::io::split(self)
    }

    fn is_idle_and_open(&mut self) -> bool {
        let mut probe = [0u8; 1];
        let mut probe = ReadBuf::new(&mut probe);
        let mut cx = Context::from_waker(Waker::noop());
        Pin::new(self).poll_read(&mut cx, &mut probe).is_pending()
    }
}

/// Each connect is a new pipe whose other end goes to the test.
struct Pipes(mpsc::UnboundedSender<DuplexStream>);

impl Connect for Pipes {
    type Stream = DuplexStream;

    async fn connect(&self) -> io::Result<DuplexStream> {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        self.0
            .send(theirs)
            .map_err(|_| io::Error::from(io::ErrorKind::ConnectionRefused))?;
        Ok(ours)
    }
}

/// A backend whose connect never completes.
struct Unreachable;

impl Connect for Unreachable {
    type Stream = DuplexStream;

    async fn connect(&self) -> io::Result<DuplexStream> {
        std::future::pending().await
    }
}

const SECOND: Duration = Duration::from_secs(1);

/// A relay serving one client pipe, its backend connections coming out of the receiver.
fn start(timeouts: Timeouts) -> (DuplexStream, mpsc::UnboundedReceiver<DuplexStream>) {
    let (connections, backends) = mpsc::unbounded_channel();
    (start_with(Pipes(connections), timeouts), backends)
}

/// A relay reaching the backend through `connector`, serving one client pipe.
fn start_with(connector: impl Connect<Stream = DuplexStream>, timeouts: Timeouts) -> DuplexStream {
    let guard = AccessTokenLayer::builder()
        .base_url("http://127.0.0.1:9")
        .api_key("never-used")
        .skip_path_prefix("/public")
        .build()
        .unwrap();
    let backend = Arc::new(parse_backend("http://backend.test").unwrap());
    let relay = Relay::with_connector(&guard, backend, Arc::new(connector), timeouts);
    let (client, ours) = tokio::io::duplex(64 * 1024);
    let (_stop, shutdown) = watch::channel(false);
    let peer = SocketAddr::from((Ipv4Addr::LOCALHOST, 40000));
    tokio::spawn(async move {
        let _stop = _stop;
        let _ = serve(&relay, ours, peer, shutdown).await;
    });
    client
}

/// Reads until `bytes` holds `end`, returning everything up to and including it; `None` at
/// EOF first.
async fn read_through(
    stream: &mut DuplexStream,
    bytes: &mut Vec<u8>,
    end: &[u8],
) -> Option<Vec<u8>> {
    loop {
        if let Some(at) = bytes.windows(end.len()).position(|w| w == end) {
            return Some(bytes.drain(..at + end.len()).collect());
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn read_exactly(stream: &mut DuplexStream, bytes: &mut Vec<u8>, n: usize) -> Vec<u8> {
    while bytes.len() < n {
        let mut chunk = [0u8; 4096];
        let read = stream.read(&mut chunk).await.unwrap();
        assert!(read > 0, "EOF {} bytes into {n}", bytes.len());
        bytes.extend_from_slice(&chunk[..read]);
    }
    bytes.drain(..n).collect()
}

async fn read_to_end(stream: &mut DuplexStream, bytes: &mut Vec<u8>) {
    let _ = stream.read_to_end(bytes).await;
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

const FORWARDED: &str =
    "x-forwarded-for: 127.0.0.1\r\nx-forwarded-proto: http\r\nx-forwarded-host: guard.test\r\n";

#[tokio::test]
async fn connection_naming_content_length_smuggles_nothing_the_backend_gets_the_framing_we_state() {
    let (mut client, mut backends) = start(Timeouts::default());
    let hidden = "GET /smuggled HTTP/1.1\r\nHost: guard.test\r\n\r\n";
    client
        .write_all(
            format!(
                "POST /public/carrier HTTP/1.1\r\nHost: guard.test\r\nConnection: keep-alive, Content-Length\r\n\
                 Content-Length: {}\r\n\r\n{hidden}",
                hidden.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut backend = backends.recv().await.unwrap();
    let mut seen = Vec::new();
    let head = read_through(&mut backend, &mut seen, b"\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(
        text(&head),
        format!(
            "POST /public/carrier HTTP/1.1\r\nhost: backend.test\r\n{FORWARDED}content-length: {}\r\n\r\n",
            hidden.len()
        )
    );
    assert_eq!(
        text(&read_exactly(&mut backend, &mut seen, hidden.len()).await),
        hidden
    );
    // The answer names the framing in `Connection` too: the client still gets it.
    backend
        .write_all(b"HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 2\r\n\r\nok")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let head = read_through(&mut client, &mut answer, b"\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(text(&head), "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n");
    assert_eq!(read_exactly(&mut client, &mut answer, 2).await, b"ok");
    // Nothing else reached the backend: the next bytes are the next request's.
    client
        .write_all(b"GET /public/next HTTP/1.1\r\nHost: guard.test\r\n\r\n")
        .await
        .unwrap();
    let next = read_through(&mut backend, &mut seen, b"\r\n\r\n")
        .await
        .unwrap();
    assert!(
        text(&next).starts_with("GET /public/next HTTP/1.1\r\n"),
        "{}",
        text(&next)
    );
}

#[tokio::test]
async fn aliases_are_dropped_and_a_missing_token_never_reaches_the_backend() {
    let (mut client, mut backends) = start(Timeouts::default());
    client
        .write_all(
            b"GET /messages HTTP/1.1\r\nHost: guard.test\r\n\
              Conneqt_Instant_Access_Token: 123e4567-e89b-12d3-a456-426614174000\r\n\r\n",
        )
        .await
        .unwrap();
    let mut answer = Vec::new();
    let head = read_through(&mut client, &mut answer, b"\r\n\r\n")
        .await
        .unwrap();
    assert!(text(&head).starts_with("HTTP/1.1 401 "), "{}", text(&head));
    client
        .write_all(
            b"GET /public/a HTTP/1.1\r\nHost: guard.test\r\nX_Forwarded_For: 6.6.6.6\r\n\r\n",
        )
        .await
        .unwrap();
    let mut backend = backends.recv().await.unwrap();
    let mut seen = Vec::new();
    let head = read_through(&mut backend, &mut seen, b"\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(
        text(&head),
        format!("GET /public/a HTTP/1.1\r\nhost: backend.test\r\n{FORWARDED}\r\n")
    );
    assert!(backends.try_recv().is_err(), "one backend connection only");
}

#[tokio::test]
async fn a_101_for_another_protocol_than_the_one_asked_is_502_and_nothing_of_it_is_relayed() {
    let (mut client, mut backends) = start(Timeouts::default());
    client
        .write_all(
            b"GET /public/ws HTTP/1.1\r\nHost: guard.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .await
        .unwrap();
    let mut backend = backends.recv().await.unwrap();
    let mut seen = Vec::new();
    let head = read_through(&mut backend, &mut seen, b"\r\n\r\n")
        .await
        .unwrap();
    assert!(text(&head).contains("connection: upgrade\r\nupgrade: websocket\r\n"));
    backend
        .write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\nPRI",
        )
        .await
        .unwrap();
    let mut answer = Vec::new();
    read_to_end(&mut client, &mut answer).await;
    let answer = text(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 502 Bad Gateway\r\n"),
        "{answer}"
    );
    assert!(answer.contains("backend-unavailable"), "{answer}");
    assert!(
        !answer.contains("101") && !answer.contains("PRI"),
        "{answer}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_backend_that_never_answers_is_504_after_the_response_timeout() {
    let timeouts = Timeouts {
        backend_response: 5 * SECOND,
        ..Timeouts::default()
    };
    let (mut client, mut backends) = start(timeouts);
    client
        .write_all(b"GET /public/slow HTTP/1.1\r\nHost: guard.test\r\n\r\n")
        .await
        .unwrap();
    let _backend = backends.recv().await.unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    read_to_end(&mut client, &mut answer).await;
    assert!(
        text(&answer).starts_with("HTTP/1.1 504 Gateway Timeout\r\n"),
        "{}",
        text(&answer)
    );
    assert!(text(&answer).contains("backend-timeout"));
    assert_eq!(started.elapsed().as_secs(), 5);
}

#[tokio::test(start_paused = true)]
async fn the_response_timeout_starts_when_the_request_body_has_been_sent() {
    let timeouts = Timeouts {
        backend_response: 5 * SECOND,
        request_body: 30 * SECOND,
        ..Timeouts::default()
    };
    let (mut client, mut backends) = start(timeouts);
    client
        .write_all(
            b"POST /public/upload HTTP/1.1\r\nHost: guard.test\r\nContent-Length: 4\r\n\r\nab",
        )
        .await
        .unwrap();
    let mut backend = backends.recv().await.unwrap();
    let mut seen = Vec::new();
    read_through(&mut backend, &mut seen, b"\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_exactly(&mut backend, &mut seen, 2).await, b"ab");
    // The client takes 20 s for the rest: longer than the response timeout, within the
    // body's.
    tokio::time::sleep(20 * SECOND).await;
    client.write_all(b"cd").await.unwrap();
    assert_eq!(read_exactly(&mut backend, &mut seen, 2).await, b"cd");
    backend
        .write_all(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let head = read_through(&mut client, &mut answer, b"\r\n\r\n")
        .await
        .unwrap();
    assert!(
        text(&head).starts_with("HTTP/1.1 201 Created\r\n"),
        "{}",
        text(&head)
    );
}

#[tokio::test(start_paused = true)]
async fn a_client_that_stalls_in_its_body_gets_408_and_the_backend_connection_is_dropped() {
    let timeouts = Timeouts {
        request_body: 7 * SECOND,
        ..Timeouts::default()
    };
    let (mut client, mut backends) = start(timeouts);
    client
        .write_all(
            b"POST /public/upload HTTP/1.1\r\nHost: guard.test\r\nContent-Length: 10\r\n\r\nabc",
        )
        .await
        .unwrap();
    let mut backend = backends.recv().await.unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    read_to_end(&mut client, &mut answer).await;
    let answer = text(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
        "{answer}"
    );
    assert!(answer.contains("request-timeout") && answer.contains("connection: close"));
    assert_eq!(started.elapsed().as_secs(), 7);
    let mut seen = Vec::new();
    read_to_end(&mut backend, &mut seen).await;
    assert!(
        text(&seen).ends_with("\r\n\r\nabc"),
        "the backend saw {:?}",
        text(&seen)
    );
}

#[tokio::test(start_paused = true)]
async fn a_backend_that_stalls_in_its_body_is_cut_off_after_the_body_timeout() {
    let timeouts = Timeouts {
        backend_body: 3 * SECOND,
        ..Timeouts::default()
    };
    let (mut client, mut backends) = start(timeouts);
    client
        .write_all(b"GET /public/big HTTP/1.1\r\nHost: guard.test\r\n\r\n")
        .await
        .unwrap();
    let mut backend = backends.recv().await.unwrap();
    let mut seen = Vec::new();
    read_through(&mut backend, &mut seen, b"\r\n\r\n")
        .await
        .unwrap();
    backend
        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        .await
        .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    read_to_end(&mut client, &mut answer).await;
    assert_eq!(
        text(&answer),
        "HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc"
    );
    assert_eq!(started.elapsed().as_secs(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_client_that_sends_no_head_is_closed_after_the_head_timeout() {
    let timeouts = Timeouts {
        request_head: 11 * SECOND,
        ..Timeouts::default()
    };
    let (mut client, mut backends) = start(timeouts);
    client
        .write_all(b"GET /public/a HTTP/1.1\r\nHo")
        .await
        .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    read_to_end(&mut client, &mut answer).await;
    assert!(answer.is_empty(), "{}", text(&answer));
    assert_eq!(started.elapsed().as_secs(), 11);
    assert!(
        backends.try_recv().is_err(),
        "the backend was never reached"
    );
}

#[tokio::test(start_paused = true)]
async fn a_backend_that_cannot_be_connected_to_in_time_is_504() {
    let timeouts = Timeouts {
        backend_connect: 4 * SECOND,
        ..Timeouts::default()
    };
    let mut client = start_with(Unreachable, timeouts);
    client
        .write_all(b"GET /public/a HTTP/1.1\r\nHost: guard.test\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    read_to_end(&mut client, &mut answer).await;
    let answer = text(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 504 Gateway Timeout\r\n"),
        "{answer}"
    );
    assert!(answer.contains("backend-timeout"), "{answer}");
    assert_eq!(started.elapsed().as_secs(), 4);
}
