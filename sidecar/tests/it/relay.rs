//! `conneqt-guard proxy` on the wire: HTTP/1.1 behaviour pinned byte for byte, whatever relays
//! the bytes inside (these passed against the hyper-only proxy before the relay fast path was
//! written, and pass against it now). A raw client writes exact requests and reads exact responses; a scripted
//! raw backend records what reaches it and answers with exact bytes (both in `support/wire.rs`,
//! shared with `security.rs`). Each test starts its own simulator, backend and proxy.

use crate::sidecar::{Backend, Sidecar};
use crate::support::TOKEN_HEADER;
use crate::wire;
use crate::wire::{
    Client, Framing, WIRE_TOKEN_HEADER, assert_problem, close, get, keep, ok, raw_setup, request,
    within,
};
use conneqt_guard_simulator::Simulator;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn every_request_on_a_kept_alive_connection_is_checked_not_only_the_first() {
    let sim = Simulator::start().await.unwrap();
    let backend = Backend::start().await;
    let sidecar = Sidecar::proxy(&sim, &backend.url(), &[]).await;
    let valid = sim.issue_token();
    let revoked = sim.issue_token();
    sim.revoke(&revoked);
    let mut client = Client::connect(sidecar.addr).await;

    client.send(get("/", Some(&valid))).await;
    let answer = client.response().await;
    assert_eq!(
        (answer.status, answer.text().as_str()),
        (200, "hello from the backend")
    );
    assert_eq!((backend.calls(), sim.verify_calls_for(&valid)), (1, 1));

    client.send(get("/", Some(&revoked))).await;
    assert_problem(&client.response().await, 410, "token-gone");
    assert_eq!(
        backend.calls(),
        1,
        "the backend was called for a revoked token"
    );
    assert_eq!(sim.verify_calls_for(&revoked), 1);

    client.send(get("/", Some(&valid))).await;
    let answer = client.response().await;
    assert_eq!(
        (answer.status, answer.text().as_str()),
        (200, "hello from the backend")
    );
    assert_eq!(backend.calls(), 2);
    assert_eq!(
        sim.verify_calls_for(&valid),
        1,
        "the second use is a cache hit"
    );

    client.send(get("/", None)).await;
    assert_problem(&client.response().await, 401, "missing-token");
    client.send(get("/", Some("not-a-uuid"))).await;
    assert_problem(&client.response().await, 400, "malformed-token");
    assert_eq!(
        backend.calls(),
        2,
        "the backend was called without a valid token"
    );
    assert_eq!(
        sim.verify_calls(),
        2,
        "missing and malformed tokens are not verified"
    );
}

#[tokio::test]
async fn pipelined_requests_in_one_write_are_answered_in_order_and_each_is_checked() {
    let (_sim, backend, sidecar, token) = raw_setup(|seen| ok(seen.path())).await;
    let mut client = Client::connect(sidecar.addr).await;
    let pipelined =
        get("/one", Some(&token)) + &get("/unguarded", None) + &get("/two", Some(&token));
    client.send(pipelined).await;
    let answer = client.response().await;
    assert_eq!((answer.status, answer.text().as_str()), (200, "/one"));
    assert_problem(&client.response().await, 401, "missing-token");
    let answer = client.response().await;
    assert_eq!((answer.status, answer.text().as_str()), (200, "/two"));
    assert_eq!(backend.paths(), ["/one", "/two"]);
}

#[tokio::test]
async fn chunked_and_content_length_request_bodies_are_echoed_intact() {
    let sim = Simulator::start().await.unwrap();
    let backend = Backend::start().await;
    let sidecar = Sidecar::proxy(&sim, &backend.url(), &[]).await;
    let token = sim.issue_token();
    let mut client = Client::connect(sidecar.addr).await;
    // A plain request first: the proxy's fast path takes it, and hands the connection to
    // hyper at the chunked body below; checks must not change with who serves the connection.
    client.send(get("/", Some(&token))).await;
    assert_eq!(client.response().await.status, 200);

    let chunks: [Vec<u8>; 4] = [
        b"hello".to_vec(),
        b", ".to_vec(),
        (0..20_000_u32).map(|i| (i % 251) as u8).collect(),
        b"chunked world".to_vec(),
    ];
    let extra = "Transfer-Encoding: chunked\r\n";
    client
        .send(request("POST", "/echo", Some(&token), extra))
        .await;
    for chunk in &chunks {
        client.send(format!("{:x}\r\n", chunk.len())).await;
        client.send(chunk).await;
        client.send("\r\n").await;
    }
    client.send("0\r\n\r\n").await;
    let answer = client.response().await;
    assert_eq!(answer.status, 200);
    assert!(answer.body == chunks.concat(), "the chunked body differs");

    let body = "a body with a length";
    let extra = format!("Content-Length: {}\r\n", body.len());
    client
        .send(request("POST", "/echo", Some(&token), &extra) + body)
        .await;
    let answer = client.response().await;
    assert_eq!((answer.status, answer.text().as_str()), (200, body));
    client.send(get("/", None)).await;
    assert_problem(&client.response().await, 401, "missing-token");
    assert_eq!(backend.calls(), 3);
    assert_eq!(sim.verify_calls(), 1);
}

#[tokio::test]
async fn a_chunked_backend_response_reaches_the_client_decoded_and_the_connection_stays_usable() {
    let (_sim, backend, sidecar, token) = raw_setup(|seen| match seen.path() {
        "/chunked" => keep(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
             7\r\nhello, \r\n6\r\nworld!\r\n0\r\n\r\n",
        ),
        _ => ok("next"),
    })
    .await;
    let mut client = Client::connect(sidecar.addr).await;
    client.send(get("/chunked", Some(&token))).await;
    let answer = client.response().await;
    assert_eq!(
        (answer.status, answer.text().as_str()),
        (200, "hello, world!")
    );
    client.send(get("/next", Some(&token))).await;
    assert_eq!(client.response().await.text(), "next");
    assert_eq!(backend.paths(), ["/chunked", "/next"]);
}

#[tokio::test]
async fn a_head_response_has_no_body_and_the_connection_stays_usable() {
    let (_sim, backend, sidecar, token) = raw_setup(|seen| match seen.line.starts_with("HEAD ") {
        true => keep("HTTP/1.1 200 OK\r\nContent-Length: 11\r\nContent-Type: text/plain\r\n\r\n"),
        false => ok("next"),
    })
    .await;
    let mut client = Client::connect(sidecar.addr).await;
    client
        .send(request("HEAD", "/resource", Some(&token), ""))
        .await;
    let answer = client.head_response().await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("content-type"), Some("text/plain"));
    assert_eq!(
        answer.header("content-length"),
        Some("11"),
        "GET's length, kept"
    );
    // Any body bytes after the head would be read as the next status line and fail it.
    client.send(get("/next", Some(&token))).await;
    let answer = client.response().await;
    assert_eq!((answer.status, answer.text().as_str()), (200, "next"));
    assert_eq!(backend.seen()[0].line, "HEAD /resource HTTP/1.1");
    assert_eq!(backend.paths(), ["/resource", "/next"]);
}

#[tokio::test]
async fn no_body_after_204_or_304_and_the_connection_stays_usable() {
    let (_sim, backend, sidecar, token) = raw_setup(|seen| match seen.path() {
        "/204" => keep("HTTP/1.1 204 No Content\r\n\r\n"),
        "/304" => keep("HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\n\r\n"),
        _ => ok("next"),
    })
    .await;
    let mut client = Client::connect(sidecar.addr).await;
    client.send(get("/204", Some(&token))).await;
    assert_eq!(client.response().await.status, 204);
    client.send(get("/304", Some(&token))).await;
    let answer = client.response().await;
    assert_eq!(answer.status, 304);
    assert_eq!(answer.header("etag"), Some("\"v1\""));
    client.send(get("/next", Some(&token))).await;
    let answer = client.response().await;
    assert_eq!((answer.status, answer.text().as_str()), (200, "next"));
    assert_eq!(backend.paths(), ["/204", "/304", "/next"]);
}

#[tokio::test]
async fn a_close_delimited_backend_response_reaches_the_client_whole() {
    let body: Vec<u8> = (0..64 * 1024_u32).map(|i| b'a' + (i % 26) as u8).collect();
    let sent = body.clone();
    let (_sim, backend, sidecar, token) = raw_setup(move |seen| match seen.path() {
        "/close-delimited" => close(
            &[
                b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".as_slice(),
                &sent,
            ]
            .concat(),
        ),
        _ => ok("next"),
    })
    .await;
    let mut client = Client::connect(sidecar.addr).await;
    client.send(get("/close-delimited", Some(&token))).await;
    let answer = client.response().await;
    assert_eq!(answer.status, 200);
    assert!(
        answer.body == body,
        "the body differs ({} bytes)",
        answer.body.len()
    );
    // Re-framed (chunked or with a length), the connection goes on; close-delimited, it ended.
    if answer.framing == Framing::UntilEof {
        client = Client::connect(sidecar.addr).await;
    }
    client.send(get("/next", Some(&token))).await;
    assert_eq!(client.response().await.text(), "next");
    assert_eq!(backend.accepted(), 2);
}

#[tokio::test]
async fn a_backend_connection_close_does_not_end_the_client_connection() {
    let (_sim, backend, sidecar, token) = raw_setup(|seen| {
        let body = seen.path();
        let head = format!(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        close((head + body).as_bytes())
    })
    .await;
    let mut client = Client::connect(sidecar.addr).await;
    for path in ["/first", "/second"] {
        client.send(get(path, Some(&token))).await;
        let answer = client.response().await;
        assert_eq!((answer.status, answer.text().as_str()), (200, path));
    }
    assert_eq!(backend.accepted(), 2);
    let connections: Vec<usize> = backend.seen().iter().map(|s| s.connection).collect();
    assert_eq!(connections, [1, 2]);
}

#[tokio::test]
async fn a_backend_that_silently_closes_its_idle_connection_is_reconnected() {
    let (_sim, backend, sidecar, token) = raw_setup(|seen| match seen.path() {
        "/first" => close(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst"),
        _ => ok("second"),
    })
    .await;
    let mut client = Client::connect(sidecar.addr).await;
    client.send(get("/first", Some(&token))).await;
    assert_eq!(client.response().await.text(), "first");
    within(backend.closed.notified()).await;
    client.send(get("/second", Some(&token))).await;
    let answer = client.response().await;
    assert_eq!((answer.status, answer.text().as_str()), (200, "second"));
    assert_eq!(backend.accepted(), 2);
}

#[tokio::test]
async fn content_length_with_chunked_smuggles_no_request_to_the_backend() {
    let (sim, backend, sidecar, token) = raw_setup(|seen| ok(seen.path())).await;
    let body = "0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let length = format!("Content-Length: {}\r\n", body.len());
    let chunked = "Transfer-Encoding: chunked\r\n";
    for framing in [length.clone() + chunked, chunked.to_owned() + &length] {
        let mut client = Client::connect(sidecar.addr).await;
        let head = request("POST", "/echo", Some(&token), &framing);
        client.send(head + body).await;
        let answer = client.response().await;
        match answer.status {
            // Refused outright.
            400 => {}
            // Chunked wins: an empty body. The trailing GET is then a request of its own,
            // without a token (401), unless the connection is closed first.
            200 => {
                assert_eq!(answer.text(), "/echo");
                if let Some(second) = client.response_or_eof().await {
                    assert_problem(&second, 401, "missing-token");
                }
            }
            other => panic!("{framing:?}: unexpected {other}: {}", answer.text()),
        }
    }
    // One more request through the proxy, so that anything smuggled ahead of it has arrived.
    let mut other = Client::connect(sidecar.addr).await;
    other.send(get("/after", Some(&token))).await;
    assert_eq!(other.response().await.status, 200);

    let seen = backend.seen();
    assert!(seen.iter().all(|s| s.path() != "/smuggled"), "{seen:?}");
    for request in &seen {
        assert_eq!(
            request.headers[TOKEN_HEADER],
            [token.as_str()],
            "{request:?}"
        );
        assert!(request.body.is_empty(), "chunked framing wins: {request:?}");
    }
    assert_eq!(sim.verify_calls(), 1);
}

#[tokio::test]
async fn hop_by_hop_headers_are_dropped_both_ways_and_forwarding_headers_added() {
    let (_sim, backend, sidecar, token) = raw_setup(|_| {
        keep(
            "HTTP/1.1 200 OK\r\nConnection: x-hop, keep-alive\r\nX-Hop: 1\r\n\
             Keep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nX-End: 1\r\n\
             Content-Length: 2\r\n\r\nok",
        )
    })
    .await;
    let extra = "Connection: x-client-hop\r\nX-Client-Hop: 1\r\nKeep-Alive: 5\r\n\
                 Proxy-Authorization: Basic eA==\r\nX-Client-End: 1\r\n";
    let mut client = Client::connect(sidecar.addr).await;
    client
        .send(request("GET", "/headers", Some(&token), extra))
        .await;
    let answer = client.response().await;
    assert_eq!((answer.status, answer.text().as_str()), (200, "ok"));
    for dropped in ["x-hop", "keep-alive", "proxy-authenticate"] {
        assert!(
            !answer.headers.contains_key(dropped),
            "{dropped}: {answer:?}"
        );
    }
    let connection = answer
        .headers
        .get("connection")
        .cloned()
        .unwrap_or_default();
    assert!(!connection.concat().contains("x-hop"), "{connection:?}");
    assert_eq!(answer.header("x-end"), Some("1"));

    let seen = &backend.seen()[0];
    for dropped in ["x-client-hop", "keep-alive", "proxy-authorization"] {
        assert!(!seen.headers.contains_key(dropped), "{dropped}: {seen:?}");
    }
    let connection = seen.headers.get("connection").cloned().unwrap_or_default();
    assert!(
        !connection.concat().contains("x-client-hop"),
        "{connection:?}"
    );
    let header = |name: &str| seen.headers.get(name).cloned().unwrap_or_default();
    assert_eq!(header("x-client-end"), ["1"]);
    assert_eq!(header(TOKEN_HEADER), [token.as_str()]);
    assert_eq!(header("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(header("x-forwarded-proto"), ["http"]);
    assert_eq!(header("x-forwarded-host"), ["guarded.test"]);
    assert_eq!(header("host"), [backend.addr.to_string()]);
}

#[tokio::test]
async fn an_http_1_0_request_is_answered_and_then_the_connection_closed() {
    let sim = Simulator::start().await.unwrap();
    let backend = Backend::start().await;
    let sidecar = Sidecar::proxy(&sim, &backend.url(), &[]).await;
    let token = sim.issue_token();
    let mut client = Client::connect(sidecar.addr).await;
    let head =
        format!("GET / HTTP/1.0\r\nHost: guarded.test\r\n{WIRE_TOKEN_HEADER}: {token}\r\n\r\n");
    client.send(head).await;
    let answer = client.response().await;
    assert_eq!(
        (answer.status, answer.text().as_str()),
        (200, "hello from the backend")
    );
    client.assert_closed_by_proxy().await;
    assert_eq!(backend.calls(), 1);
}

#[tokio::test]
async fn an_http_1_0_client_never_gets_chunked_encoding() {
    let (_sim, backend, sidecar, token) = raw_setup(|_| {
        keep(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
             7\r\nhello, \r\n6\r\nworld!\r\n0\r\n\r\n",
        )
    })
    .await;
    let mut client = Client::connect(sidecar.addr).await;
    let head =
        format!("GET / HTTP/1.0\r\nHost: guarded.test\r\n{WIRE_TOKEN_HEADER}: {token}\r\n\r\n");
    client.send(head).await;
    let answer = client.response().await;
    assert_eq!(answer.status, 200);
    assert!(
        !answer.headers.contains_key("transfer-encoding"),
        "{answer:?}"
    );
    assert_eq!(answer.text(), "hello, world!");
    client.assert_closed_by_proxy().await;
    assert_eq!(backend.paths(), ["/"]);
}

#[tokio::test]
async fn expect_100_continue_with_a_valid_token_gets_100_then_the_echo() {
    let sim = Simulator::start().await.unwrap();
    let backend = Backend::start().await;
    let sidecar = Sidecar::proxy(&sim, &backend.url(), &[]).await;
    let token = sim.issue_token();
    let body = "the body after 100";
    let extra = format!("Expect: 100-continue\r\nContent-Length: {}\r\n", body.len());
    let mut client = Client::connect(sidecar.addr).await;
    client
        .send(request("POST", "/echo", Some(&token), &extra))
        .await;
    assert_eq!(client.response().await.status, 100);
    client.send(body).await;
    let answer = client.response().await;
    assert_eq!((answer.status, answer.text().as_str()), (200, body));
    assert_eq!((backend.calls(), sim.verify_calls()), (1, 1));
}

#[tokio::test]
async fn expect_100_continue_without_a_token_is_a_final_401_and_no_body_is_needed() {
    let sim = Simulator::start().await.unwrap();
    let backend = Backend::start().await;
    let sidecar = Sidecar::proxy(&sim, &backend.url(), &[]).await;
    let extra = "Expect: 100-continue\r\nContent-Length: 18\r\n";
    let mut client = Client::connect(sidecar.addr).await;
    client.send(request("POST", "/echo", None, extra)).await;
    assert_problem(&client.response().await, 401, "missing-token");
    assert_eq!((backend.calls(), sim.verify_calls()), (0, 0));
}

/// The length of the one header that makes a request head too large. Far over any limit: today
/// hyper still forwards a head of 420 KiB, and refuses one of 512 KiB.
const HUGE_HEADER: usize = 1024 * 1024;

#[tokio::test]
async fn a_one_mebibyte_request_head_is_refused_and_nobody_is_called() {
    let sim = Simulator::start().await.unwrap();
    let backend = Backend::start().await;
    let sidecar = Sidecar::proxy(&sim, &backend.url(), &[]).await;
    let token = sim.issue_token();
    let huge = format!("X-Huge: {}\r\n", "a".repeat(HUGE_HEADER));
    let head = request("GET", "/", Some(&token), &huge);
    // The proxy may answer before it has read everything: write and read at once.
    let stream = within(TcpStream::connect(sidecar.addr)).await.unwrap();
    let (mut from_proxy, mut to_proxy) = stream.into_split();
    let writer = tokio::spawn(async move {
        let _ = to_proxy.write_all(head.as_bytes()).await;
        to_proxy
    });
    let mut received = Vec::new();
    within(async {
        let mut chunk = [0; 4096];
        while let Ok(n @ 1..) = from_proxy.read(&mut chunk).await {
            received.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    drop(writer);
    let text = String::from_utf8_lossy(&received);
    let status = text.get(9..12).unwrap_or_default();
    assert!(text.starts_with("HTTP/1."), "{text}");
    assert!(status == "431" || status == "400", "{text}");
    assert_eq!((backend.calls(), sim.verify_calls()), (0, 0));
}

#[tokio::test]
async fn a_backend_answering_garbage_is_502_problem_json_that_does_not_name_it() {
    let (sim, backend, sidecar, token) = raw_setup(|_| keep("not http at all\r\n\r\n")).await;
    let mut client = Client::connect(sidecar.addr).await;
    client.send(get("/anything", Some(&token))).await;
    let answer = client.response().await;
    assert_problem(&answer, 502, "backend-unavailable");
    let shown = format!("{}{:?}", answer.text(), answer.headers);
    let port = backend.addr.port().to_string();
    assert!(
        !shown.contains(&port) && !shown.contains("127.0.0.1"),
        "{shown}"
    );
    assert!(
        backend.paths().contains(&"/anything".to_owned()),
        "the backend was asked"
    );
    assert_eq!(sim.verify_calls(), 1);
}

#[tokio::test]
async fn a_connection_close_request_is_answered_and_then_the_connection_closed() {
    let sim = Simulator::start().await.unwrap();
    let backend = Backend::start().await;
    let sidecar = Sidecar::proxy(&sim, &backend.url(), &[]).await;
    let token = sim.issue_token();
    let mut client = Client::connect(sidecar.addr).await;
    client
        .send(request("GET", "/", Some(&token), "Connection: close\r\n"))
        .await;
    let answer = client.response().await;
    assert_eq!(
        (answer.status, answer.text().as_str()),
        (200, "hello from the backend")
    );
    assert_eq!(answer.header("connection"), Some("close"));
    client.assert_closed_by_proxy().await;
    assert_eq!(backend.calls(), 1);
}

/// A simulator, a raw backend running `script`, and the proxy in front with `flags`.
async fn raw_setup_with(
    script: impl Fn(&wire::Seen) -> wire::Reply + Send + Sync + 'static,
    flags: &[&str],
) -> (Simulator, wire::RawBackend, Sidecar, String) {
    let sim = Simulator::start().await.unwrap();
    let backend = wire::RawBackend::start(script).await;
    let sidecar = Sidecar::proxy(&sim, &backend.url(), flags).await;
    let token = sim.issue_token();
    (sim, backend, sidecar, token)
}

#[tokio::test]
async fn on_the_hyper_path_a_backend_that_never_answers_is_504_after_the_response_timeout() {
    // The backend reads the request and says nothing.
    let (sim, backend, sidecar, token) =
        raw_setup_with(|_| keep(""), &["--backend-response-timeout", "300ms"]).await;
    let mut client = Client::connect(sidecar.addr).await;
    // HTTP/1.0 is served by hyper, not the relay.
    client
        .send(format!(
            "GET /silent HTTP/1.0\r\nHost: guarded.test\r\n{WIRE_TOKEN_HEADER}: {token}\r\n\r\n"
        ))
        .await;
    let answer = client.response().await;
    assert_problem(&answer, 504, "backend-timeout");
    assert_eq!(backend.paths(), ["/silent"]);
    assert_eq!(sim.verify_calls(), 1);
}

#[tokio::test]
async fn on_the_hyper_path_a_client_that_stalls_in_its_chunked_body_gets_408() {
    let (sim, backend, sidecar, token) =
        raw_setup_with(|_| ok("stored"), &["--request-body-timeout", "300ms"]).await;
    let mut client = Client::connect(sidecar.addr).await;
    // A chunked body is served by hyper; the client sends one chunk and then nothing.
    client
        .send(format!(
            "{}3\r\nabc\r\n",
            request(
                "POST",
                "/upload",
                Some(&token),
                "Transfer-Encoding: chunked\r\n"
            )
        ))
        .await;
    let answer = client.response().await;
    assert_problem(&answer, 408, "request-timeout");
    let seen = backend.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(!seen[0].complete, "the body never ended: {seen:?}");
    assert_eq!(sim.verify_calls(), 1);
}
