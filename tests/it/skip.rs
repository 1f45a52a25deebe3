//! Skip rules and credential stripping, over real HTTP on 127.0.0.1: what the client gets,
//! whether the inner service ran (and what it saw), and how often the upstream was called.

use crate::support;
use crate::support::{Probe, TOKEN_HEADER, problem, raw_get_status, start_probe_with};
use http::Method;

#[tokio::test]
async fn without_skip_rules_a_health_path_is_guarded_like_any_other() {
    let h = start_probe_with(|b| b).await;

    problem(h.send(Method::GET, "/health", &[]).await, 401).await;
    problem(
        h.send(
            Method::OPTIONS,
            "/messages",
            &[("access-control-request-method", "POST")],
        )
        .await,
        401,
    )
    .await;

    assert_eq!(h.inner_calls(), 0);
    assert_eq!(h.upstream_calls(), 0);
}

#[tokio::test]
async fn a_skipped_prefix_passes_without_a_token_to_a_handler_that_gets_no_verified_token() {
    let h = start_probe_with(|b| b.skip_path_prefix("/health")).await;

    for path in ["/health", "/health/live"] {
        let response = h.send(Method::GET, path, &[]).await;
        assert_eq!(response.status(), 200, "{path}");
        let seen: Probe = response.json().await.unwrap();
        assert_eq!(seen.path, path);
        assert_eq!(seen.verified_token, None, "{path}");
    }

    assert_eq!(h.inner_calls(), 2);
    assert_eq!(h.upstream_calls(), 0);
}

#[tokio::test]
async fn a_token_on_a_skipped_path_is_not_verified_and_gives_no_verified_token() {
    let h = start_probe_with(|b| b.skip_path_prefix("/health")).await;
    let token = h.simulator.issue_token();

    let response = h
        .send(Method::GET, "/health/live", &[(TOKEN_HEADER, &token)])
        .await;

    assert_eq!(response.status(), 200);
    let seen: Probe = response.json().await.unwrap();
    assert_eq!(seen.verified_token, None);
    assert_eq!(seen.token_header.as_deref(), Some(token.as_str()));
    assert_eq!(h.inner_calls(), 1);
    assert_eq!(h.upstream_calls(), 0);
}

#[tokio::test]
async fn paths_outside_the_prefix_lookalikes_and_dot_segments_are_still_401() {
    let h = start_probe_with(|b| b.skip_path_prefix("/health")).await;

    for path in ["/healthcheck-admin", "/messages", "/api/health"] {
        problem(h.send(Method::GET, path, &[]).await, 401).await;
    }
    // Sent byte for byte: reqwest would resolve the dot segments before sending.
    for target in ["/health/../messages", "/health/%2e%2e/messages"] {
        assert_eq!(raw_get_status(h.app.addr, target).await, 401, "{target}");
    }

    assert_eq!(h.inner_calls(), 0);
    assert_eq!(h.upstream_calls(), 0);
}

/// Paths below `/public` that Tomcat/Jetty (`;` parameters), decode-first routers or
/// Windows-style backends would serve from outside it.
const AMBIGUOUS: &[&str] = &[
    "/public/..;/secret",
    "/public/..%2fsecret",
    "/public/%2e%2e%2fsecret",
    "/public/..\\secret",
    "/public/%252e%252e/secret",
    "/public/.%00./secret",
    "/public/..%2Fsecret",
    "/public/..%5Csecret",
    "/public/..%3b/secret",
    "/public/..;jsessionid=1/secret",
    "/public/%25252e%25252e/secret",
    "/public/x%0d%0aSet-Cookie:%20a=b",
];

/// `GET target` on a fresh HTTP/1.1 connection through hyper's connection API, which writes the
/// request target byte for byte (reqwest resolves `..` and turns `\` into `/` before sending).
/// Returns the status and the JSON body (a [`Probe`] or a problem).
async fn get_as_sent(
    addr: std::net::SocketAddr,
    target: &str,
    token: Option<&str>,
) -> (u16, serde_json::Value) {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::TokioIo;

    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    let uri: http::Uri = target.parse().expect("a valid request target");
    assert_eq!(uri.path(), target, "the URI keeps the path as written");
    let mut request = http::Request::get(uri).header("host", addr.to_string());
    if let Some(token) = token {
        request = request.header(TOKEN_HEADER, token);
    }
    let response = sender
        .send_request(request.body(Empty::<bytes::Bytes>::new()).unwrap())
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    drop(sender);
    connection.await.unwrap().unwrap();
    let body = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("{target}: a JSON body ({e}): {body:?}"));
    (status, body)
}

#[tokio::test]
async fn an_ambiguous_path_below_a_skipped_prefix_is_verified_like_any_other() {
    let h = start_probe_with(|b| b.skip_path_prefix("/public")).await;

    for target in AMBIGUOUS {
        let (status, body) = get_as_sent(h.app.addr, target, None).await;
        assert_eq!(status, 401, "{target}: {body}");
        assert_eq!(
            body["type"], "tag:conneqt-guard,2026:missing-token",
            "{target}"
        );
        assert_eq!(h.inner_calls(), 0, "{target} reached the inner service");
    }
    assert_eq!(
        h.upstream_calls(),
        0,
        "a missing token costs no upstream call"
    );

    // Plain paths below the prefix are still skipped, and arrive as sent (not decoded or
    // normalised), so the ambiguous ones above were judged on their exact bytes too.
    for target in ["/public/x", "/public/a%20b", "/public/...x"] {
        let (status, body) = get_as_sent(h.app.addr, target, None).await;
        assert_eq!(status, 200, "{target}: {body}");
        let seen: Probe = serde_json::from_value(body).unwrap();
        assert_eq!(seen.path, *target);
        assert_eq!(seen.verified_token, None, "{target}");
    }
    assert_eq!(h.inner_calls(), 3);
    assert_eq!(h.upstream_calls(), 0);
}

#[tokio::test]
async fn an_ambiguous_path_with_a_good_token_reaches_the_service_verified_and_unchanged() {
    let h = start_probe_with(|b| b.skip_path_prefix("/public")).await;
    let token = h.simulator.issue_token();

    for target in AMBIGUOUS {
        let (status, body) = get_as_sent(h.app.addr, target, Some(&token)).await;
        assert_eq!(status, 200, "{target}");
        let seen: Probe = serde_json::from_value(body).unwrap();
        assert_eq!(seen.path, *target, "the service sees the path as sent");
        // Compared without printing the token on failure.
        assert!(
            seen.verified_token.as_deref() == Some(token.as_str()),
            "{target}: no VerifiedToken, so the request was skipped"
        );
    }

    assert_eq!(h.inner_calls(), AMBIGUOUS.len());
    assert_eq!(h.simulator.verify_calls_for(&token), 1, "then cache hits");
}

#[tokio::test]
async fn a_skip_if_predicate_lets_matching_requests_through_and_guards_the_rest() {
    let h = start_probe_with(|b| {
        b.skip_if(|head| head.method == Method::GET && head.uri.path() == "/metrics")
    })
    .await;

    let response = h.send(Method::GET, "/metrics", &[]).await;
    assert_eq!(response.status(), 200);
    let seen: Probe = response.json().await.unwrap();
    assert_eq!(seen.verified_token, None);
    assert_eq!(h.inner_calls(), 1);

    problem(h.send(Method::POST, "/metrics", &[]).await, 401).await;
    problem(h.send(Method::GET, "/metrics/extra", &[]).await, 401).await;

    assert_eq!(h.inner_calls(), 1);
    assert_eq!(h.upstream_calls(), 0);
}

#[tokio::test]
async fn grpc_health_checks_pass_unverified_while_other_grpc_methods_are_unauthenticated() {
    let h = start_probe_with(|b| b.skip_grpc_health_checks()).await;
    let grpc = [("content-type", "application/grpc")];

    for path in [
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
    ] {
        let response = h.send(Method::POST, path, &grpc).await;
        assert_eq!(response.status(), 200, "{path}");
        assert!(response.headers().get("grpc-status").is_none(), "{path}");
        let seen: Probe = response.json().await.unwrap();
        assert_eq!(seen.path, path);
        assert_eq!(seen.verified_token, None);
    }
    assert_eq!(h.inner_calls(), 2);

    let other = h.send(Method::POST, "/chat.v1.Messages/Send", &grpc).await;
    assert_eq!(other.status(), 200, "a trailers-only gRPC rejection");
    assert_eq!(other.headers()["grpc-status"], "16", "UNAUTHENTICATED");

    assert_eq!(h.inner_calls(), 2);
    assert_eq!(h.upstream_calls(), 0);
}

/// A real tonic server and client: the health service answers `SERVING` without a token.
#[tokio::test]
async fn a_tonic_health_check_is_served_without_a_token_only_when_skipped() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let simulator = conneqt_guard_simulator::Simulator::start().await.unwrap();
    let check = |skip: bool| {
        let mut builder = support::builder_for(&simulator);
        if skip {
            builder = builder.skip_grpc_health_checks();
        }
        let guard = builder.build().unwrap();
        async move {
            let (_reporter, health) = tonic_health::server::health_reporter();
            let incoming =
                tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap())
                    .unwrap();
            let addr = incoming.local_addr().unwrap();
            let server = tokio::spawn(
                tonic::transport::Server::builder()
                    .layer(guard)
                    .add_service(health)
                    .serve_with_incoming(incoming),
            );
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut client = HealthClient::new(channel);
            let answer = client
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await;
            server.abort();
            answer
        }
    };

    let skipped = check(true).await.expect("served");
    assert_eq!(skipped.into_inner().status(), ServingStatus::Serving);
    let guarded = check(false).await.expect_err("rejected");
    assert_eq!(guarded.code(), tonic::Code::Unauthenticated);
    assert_eq!(simulator.verify_calls(), 0);
}

#[tokio::test]
async fn a_cors_preflight_passes_but_a_plain_options_or_get_without_a_token_is_still_401() {
    let h = start_probe_with(|b| b.skip_cors_preflight()).await;

    let preflight = h
        .send(
            Method::OPTIONS,
            "/messages",
            &[
                ("origin", "https://app.example"),
                ("access-control-request-method", "POST"),
                ("access-control-request-headers", TOKEN_HEADER),
            ],
        )
        .await;
    assert_eq!(preflight.status(), 200);
    let seen: Probe = preflight.json().await.unwrap();
    assert_eq!(seen.method, "OPTIONS");
    assert_eq!(seen.verified_token, None);
    assert_eq!(h.inner_calls(), 1);

    problem(
        h.send(
            Method::OPTIONS,
            "/messages",
            &[("origin", "https://app.example")],
        )
        .await,
        401,
    )
    .await;
    problem(
        h.send(
            Method::GET,
            "/messages",
            &[("access-control-request-method", "GET")],
        )
        .await,
        401,
    )
    .await;

    assert_eq!(h.inner_calls(), 1);
    assert_eq!(h.upstream_calls(), 0);
}

#[tokio::test]
async fn with_strip_token_header_the_handler_gets_a_verified_token_but_not_the_header() {
    let h = start_probe_with(|b| b.strip_token_header(true)).await;
    let token = h.simulator.issue_token();

    // The first request is a cache miss (forwarded by the future), the second a hit
    // (forwarded from `call`): both must strip.
    for attempt in ["miss", "hit"] {
        let response = h
            .send(Method::GET, "/messages", &[(TOKEN_HEADER, &token)])
            .await;
        assert_eq!(response.status(), 200, "{attempt}");
        let seen: Probe = response.json().await.unwrap();
        assert_eq!(seen.token_header, None, "{attempt}");
        assert_eq!(
            seen.verified_token.as_deref(),
            Some(token.as_str()),
            "{attempt}"
        );
    }

    assert_eq!(h.inner_calls(), 2);
    assert_eq!(
        h.simulator.verify_calls_for(&token),
        1,
        "the second was a hit"
    );
}

#[tokio::test]
async fn without_strip_token_header_the_handler_sees_the_header_too() {
    let h = start_probe_with(|b| b).await;
    let token = h.simulator.issue_token();

    let response = h
        .send(Method::GET, "/messages", &[(TOKEN_HEADER, &token)])
        .await;

    let seen: Probe = response.json().await.unwrap();
    assert_eq!(seen.token_header.as_deref(), Some(token.as_str()));
    assert_eq!(seen.verified_token.as_deref(), Some(token.as_str()));
    assert_eq!(h.inner_calls(), 1);
    assert_eq!(h.upstream_calls(), 1);
}

#[tokio::test]
async fn strip_token_header_also_strips_it_from_skipped_requests() {
    let h = start_probe_with(|b| b.skip_path_prefix("/health").strip_token_header(true)).await;
    let token = h.simulator.issue_token();

    let response = h
        .send(Method::GET, "/health", &[(TOKEN_HEADER, &token)])
        .await;

    assert_eq!(response.status(), 200);
    let seen: Probe = response.json().await.unwrap();
    assert_eq!(seen.token_header, None);
    assert_eq!(seen.verified_token, None);
    assert_eq!(h.inner_calls(), 1);
    assert_eq!(h.upstream_calls(), 0);
}

#[test]
fn a_bad_skip_prefix_is_a_build_error_naming_the_setting() {
    for prefix in ["", "health", "/"] {
        let error = conneqt_guard::AccessTokenLayer::builder()
            .base_url("https://int.conneqt.health")
            .api_key("key")
            .skip_path_prefix(prefix)
            .build()
            .unwrap_err();
        assert_eq!(error.setting(), "skip_path_prefix", "{prefix:?}");
        assert!(error.to_string().contains("skip_path_prefix"), "{error}");
    }
}
