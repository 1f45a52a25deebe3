//! `conneqt-guard proxy`, the binary cargo built, in front of an axum (or tonic) backend in this
//! process, verifying against the simulator in this process. Each test starts its own.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::sidecar::{Backend, Exited, Sidecar};
use crate::support::{TOKEN_HEADER, client, problem};
use conneqt_guard::ConnectionStatus;
use conneqt_guard_simulator::{Fault, Simulator};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// A simulator, a backend and the proxy in front of it.
struct Setup {
    sim: Simulator,
    backend: Backend,
    proxy: Sidecar,
}

async fn start(extra: &[&str]) -> Setup {
    let sim = Simulator::start().await.unwrap();
    let backend = Backend::start().await;
    let proxy = Sidecar::proxy(&sim, &backend.url(), extra).await;
    Setup {
        sim,
        backend,
        proxy,
    }
}

#[tokio::test]
async fn a_valid_token_passes_and_a_multi_megabyte_body_is_echoed_intact() {
    let setup = start(&[]).await;
    let token = setup.sim.issue_token();
    let body: Vec<u8> = (0..8 * 1024 * 1024).map(|i: u32| (i % 251) as u8).collect();
    let response = client()
        .post(setup.proxy.url("/echo"))
        .header(TOKEN_HEADER, &token)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let echoed = response.bytes().await.unwrap();
    assert_eq!(echoed.len(), body.len());
    assert!(echoed == body, "the echoed body differs");
    assert_eq!(setup.backend.calls(), 1);
    assert_eq!(setup.sim.verify_calls(), 1);

    // A second request is a cache hit: no further upstream call.
    let response = client()
        .get(setup.proxy.url("/"))
        .header(TOKEN_HEADER, &token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "hello from the backend");
    assert_eq!(setup.backend.calls(), 2);
    assert_eq!(setup.sim.verify_calls(), 1);
}

#[tokio::test]
async fn hop_by_hop_headers_are_dropped_both_ways_and_x_forwarded_headers_added() {
    let setup = start(&[]).await;
    let token = setup.sim.issue_token();
    let response = client()
        .get(setup.proxy.url("/headers"))
        .header(TOKEN_HEADER, &token)
        .header("connection", "keep-alive, x-client-hop")
        .header("x-client-hop", "1")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .header("proxy-authorization", "Basic c2VjcmV0")
        .header("te", "gzip")
        .header("upgrade", "something")
        .header("x-forwarded-for", "10.0.0.1")
        .header("x-end-to-end", "kept")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    for dropped in ["x-backend-hop", "keep-alive", "proxy-authenticate"] {
        assert!(
            !headers.contains_key(dropped),
            "{dropped} reached the client"
        );
    }
    assert_eq!(headers["x-backend-end-to-end"], "1");

    let seen: serde_json::Value = response.json().await.unwrap();
    for dropped in [
        "x-client-hop",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
        "upgrade",
        "transfer-encoding",
    ] {
        assert!(
            seen.get(dropped).is_none(),
            "{dropped} reached the backend: {seen}"
        );
    }
    assert_eq!(seen["x-end-to-end"][0], "kept");
    assert_eq!(
        seen[TOKEN_HEADER][0],
        token.as_str(),
        "the token is forwarded"
    );
    assert_eq!(seen["x-forwarded-for"][0], "10.0.0.1, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"][0], "http");
    assert_eq!(
        seen["x-forwarded-host"][0],
        setup.proxy.addr.to_string().as_str()
    );
    assert_eq!(seen["host"][0], setup.backend.addr.to_string().as_str());
    assert_eq!(setup.backend.calls(), 1);
}

#[tokio::test]
async fn backend_errors_pass_through_as_they_are() {
    let setup = start(&[]).await;
    let token = setup.sim.issue_token();
    for code in [404_u16, 500, 503] {
        let response = client()
            .get(setup.proxy.url(&format!("/status/{code}")))
            .header(TOKEN_HEADER, &token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), code);
        assert_eq!(
            response.text().await.unwrap(),
            format!("backend says {code}")
        );
    }
    assert_eq!(setup.backend.calls(), 3);
    assert_eq!(setup.sim.verify_calls(), 1);
}

#[tokio::test]
async fn a_backend_that_is_down_is_502_problem_json_that_does_not_name_it() {
    let sim = Simulator::start().await.unwrap();
    // A port that was free a moment ago: nothing listens there.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = Sidecar::proxy(&sim, &format!("http://{closed}"), &[]).await;
    let token = sim.issue_token();
    let response = client()
        .get(proxy.url("/anything"))
        .header(TOKEN_HEADER, &token)
        .send()
        .await
        .unwrap();
    let text = format!("{:?}", response.headers());
    let body = problem(response, 502).await;
    assert_eq!(body["type"], "tag:conneqt-guard,2026:backend-unavailable");
    let shown = format!("{body}{text}");
    assert!(
        !shown.contains(&closed.port().to_string()) && !shown.contains("127.0.0.1"),
        "{shown}"
    );
    assert_eq!(sim.verify_calls(), 1);
}

#[tokio::test]
async fn response_bodies_stream_without_waiting_for_the_end() {
    let setup = start(&[]).await;
    let token = setup.sim.issue_token();
    let mut response = client()
        .get(setup.proxy.url("/stream"))
        .header(TOKEN_HEADER, &token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // The backend holds the second chunk back until released: the first arrives before.
    let first = response.chunk().await.unwrap().expect("a first chunk");
    assert_eq!(&first[..], b"first chunk;");
    setup.backend.release.notify_one();
    let mut rest = Vec::new();
    while let Some(chunk) = response.chunk().await.unwrap() {
        rest.extend_from_slice(&chunk);
    }
    assert_eq!(rest, b"second chunk");
}

#[tokio::test]
async fn grpc_passes_through_h2c_with_a_valid_token_and_is_unauthenticated_without() {
    let sim = Simulator::start().await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = listener.local_addr().unwrap();
    let backend_calls = Arc::new(AtomicUsize::new(0));
    let counter = backend_calls.clone();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let server = tokio::spawn(
        Server::builder()
            .layer(tower::util::MapRequestLayer::new(
                move |request: http::Request<tonic::body::Body>| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    request
                },
            ))
            .add_service(health)
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    let proxy = Sidecar::proxy(&sim, &format!("http://{backend_addr}"), &[]).await;
    let channel = Channel::from_shared(proxy.url(""))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);

    let status = client
        .check(HealthCheckRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert_eq!(backend_calls.load(Ordering::SeqCst), 0);
    assert_eq!(sim.verify_calls(), 0);

    let token = sim.issue_token();
    let mut request = tonic::Request::new(HealthCheckRequest::default());
    request
        .metadata_mut()
        .insert(TOKEN_HEADER, token.parse().unwrap());
    let answer = client.check(request).await.unwrap().into_inner();
    assert_eq!(answer.status, ServingStatus::Serving as i32);
    assert_eq!(backend_calls.load(Ordering::SeqCst), 1);
    assert_eq!(sim.verify_calls(), 1);
    server.abort();
}

#[tokio::test]
async fn sigterm_lets_the_request_in_flight_finish_and_exits_0() {
    let mut setup = start(&[]).await;
    let token = setup.sim.issue_token();
    let request = client()
        .get(setup.proxy.url("/slow"))
        .header(TOKEN_HEADER, &token)
        .send();
    let in_flight = tokio::spawn(request);
    setup.backend.entered.notified().await;

    setup.proxy.terminate();
    let addr = setup.proxy.addr;
    setup.proxy.line_after("stopped accepting on ").await;
    setup.proxy.line_after("stopped accepting on ").await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still accepting after SIGTERM"
    );

    setup.backend.release.notify_one();
    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "slow answer");
    let status = setup.proxy.exit_status().await;
    assert!(status.success(), "{status:?}: {}", setup.proxy.stderr());
}

#[tokio::test]
async fn the_simulator_switch_needs_no_other_settings() {
    let backend = Backend::start().await;
    let backend_url = backend.url();
    let mut proxy = Sidecar::spawn(&["proxy", "--backend", &backend_url, "--simulator"]);
    let valid = proxy.line_after("simulator valid token: ").await;
    let revoked = proxy.line_after("simulator revoked token: ").await;
    let admin = proxy.line_after("admin listening on ").await;
    let addr = proxy.line_after("listening on ").await;
    proxy.admin = admin.parse().unwrap();
    proxy.addr = addr.parse().unwrap();

    let response = client()
        .get(proxy.url("/"))
        .header(TOKEN_HEADER, &valid)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(backend.calls(), 1);
    let response = client()
        .get(proxy.url("/"))
        .header(TOKEN_HEADER, &revoked)
        .send()
        .await
        .unwrap();
    problem(response, 410).await;
    assert_eq!(backend.calls(), 1);
}

#[tokio::test]
async fn admin_endpoints_report_health_readiness_and_metrics() {
    let setup = start(&[]).await;
    let token = setup.sim.issue_token();
    let admin = |path: &str| client().get(setup.proxy.admin_url(path)).send();
    let health = admin("/healthz").await.unwrap();
    assert_eq!(health.status(), 200);
    let ready = admin("/readyz").await.unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(setup.sim.verify_calls(), 0, "readiness spends no token");

    let response = client()
        .get(setup.proxy.url("/"))
        .header(TOKEN_HEADER, &token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let metrics = admin("/metrics").await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains("conneqt_guard_requests_total{outcome=\"forwarded\"} 1"),
        "{metrics}"
    );
    assert!(!metrics.contains(&token));
}

#[tokio::test]
async fn admin_invalidate_and_invalidate_all_make_the_next_request_verified_again() {
    let setup = start(&[]).await;
    let (first, second) = (setup.sim.issue_token(), setup.sim.issue_token());
    let get = |token: &str| {
        client()
            .get(setup.proxy.url("/"))
            .header(TOKEN_HEADER, token)
            .send()
    };
    let admin_post = |path: &str, token: Option<&str>| {
        let request = client().post(setup.proxy.admin_url(path));
        match token {
            Some(token) => request.header(TOKEN_HEADER, token),
            None => request,
        }
        .send()
    };
    for token in [&first, &second] {
        assert_eq!(get(token).await.unwrap().status(), 200);
        setup.sim.revoke(token);
        assert_eq!(get(token).await.unwrap().status(), 200, "still cached");
    }
    assert_eq!(setup.sim.verify_calls(), 2);
    assert_eq!(setup.backend.calls(), 4);

    // A request without the token, or with it twice, changes nothing.
    let missing = admin_post("/invalidate", None).await.unwrap();
    assert_eq!(missing.status(), 400);
    let twice = client()
        .post(setup.proxy.admin_url("/invalidate"))
        .header(TOKEN_HEADER, &first)
        .header(TOKEN_HEADER, &first)
        .send()
        .await
        .unwrap();
    assert_eq!(twice.status(), 400);
    assert!(!twice.text().await.unwrap().contains(&first));
    assert_eq!(get(&first).await.unwrap().status(), 200, "still cached");

    let one = admin_post("/invalidate", Some(&first)).await.unwrap();
    assert_eq!(one.status(), 204);
    assert_eq!(get(&first).await.unwrap().status(), 410, "verified again");
    assert_eq!(
        get(&second).await.unwrap().status(),
        200,
        "the other is still cached"
    );
    assert_eq!(setup.sim.verify_calls(), 3);

    let all = admin_post("/invalidate-all", None).await.unwrap();
    assert_eq!(all.status(), 204);
    assert_eq!(get(&second).await.unwrap().status(), 410, "verified again");
    assert_eq!(setup.sim.verify_calls(), 4);
    assert_eq!(
        setup.backend.calls(),
        6,
        "no revoked token reached the backend"
    );
    assert_eq!(admin_post("/elsewhere", None).await.unwrap().status(), 404);
}

/// A port that was free a moment ago: nothing listens there.
async fn closed_port() -> std::net::SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Asserts that a run printed no `listening on` line (the simulator's, the admin's or the
/// listener's): it bound nothing a client could reach.
fn assert_never_listened(exited: &Exited) {
    assert!(
        !exited.stdout.contains("listening on"),
        "stdout {:?}, stderr:\n{}",
        exited.stdout,
        exited.stderr
    );
}

#[tokio::test]
async fn a_key_conneqt_refuses_exits_1_at_start_up_with_the_reason_and_never_listens() {
    let sim = Simulator::start().await.unwrap();
    let base_url = sim.base_url();
    let cases = [
        ("sekrit-wrong-key", ConnectionStatus::KeyRejected),
        (
            sim.unauthorised_api_key(),
            ConnectionStatus::KeyNotAuthorised,
        ),
    ];
    for (key, status) in cases {
        for mode in [
            &["proxy", "--backend", "http://127.0.0.1:9"][..],
            &["forward-auth"],
        ] {
            let mut args = mode.to_vec();
            args.extend(["--base-url", &base_url, "--api-key", key]);
            let exited = Sidecar::run_to_exit(&args, &[]).await;
            assert_eq!(exited.status.code(), Some(1), "{mode:?}: {}", exited.stderr);
            let expected = format!("error: cannot start: {status}");
            assert!(
                exited.stderr.contains(&expected),
                "{mode:?}: {expected:?} missing in:\n{}",
                exited.stderr
            );
            assert!(!exited.stderr.contains(key), "{mode:?}: the key was shown");
            assert_never_listened(&exited);
        }
    }
    assert_eq!(sim.verify_calls(), 0, "the start-up check spends no token");
}

#[tokio::test]
async fn an_upstream_that_cannot_be_reached_at_start_up_is_no_reason_not_to_start() {
    let closed = closed_port().await;
    let base_url = format!("http://{closed}");
    let proxy = Sidecar::start(&[
        "proxy",
        "--backend",
        "http://127.0.0.1:9",
        "--base-url",
        &base_url,
        "--api-key",
        "sekrit-key",
    ])
    .await;
    let ready = client()
        .get(proxy.admin_url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let reason = ready.text().await.unwrap();
    assert!(reason.contains("could not be checked"), "{reason}");
    assert!(!reason.contains("sekrit-key"), "{reason}");
    // It serves: a token it cannot verify is the guard's 503, not a refused connection.
    let response = client()
        .get(proxy.url("/"))
        .header(TOKEN_HEADER, uuid::Uuid::new_v4().to_string())
        .send()
        .await
        .unwrap();
    let body = problem(response, 503).await;
    assert_eq!(body["type"], "tag:conneqt-guard,2026:upstream-unavailable");
}

#[tokio::test]
async fn the_simulator_switch_with_an_upstream_is_a_usage_error_even_from_the_environment() {
    /// Extra flags, environment, and the flag the error names beside `--simulator`.
    type Case = (
        &'static [&'static str],
        &'static [(&'static str, &'static str)],
        &'static str,
    );
    let backend = ["proxy", "--backend", "http://127.0.0.1:9"];
    let cases: [Case; 4] = [
        (
            &["--simulator", "--base-url", "https://int.conneqt.health"],
            &[],
            "--base-url",
        ),
        (
            &["--api-key", "sekrit-key", "--simulator"],
            &[],
            "--api-key",
        ),
        (
            &["--simulator"],
            &[("CONNEQT_BASE_URL", "https://int.conneqt.health")],
            "--base-url",
        ),
        (
            &["--simulator"],
            &[("CONNEQT_API_KEY", "sekrit-key")],
            "--api-key",
        ),
    ];
    for (extra, env, named) in cases {
        let args: Vec<&str> = backend.iter().chain(extra).copied().collect();
        let exited = Sidecar::run_to_exit(&args, env).await;
        assert_eq!(
            exited.status.code(),
            Some(2),
            "{args:?} {env:?}: {}",
            exited.stderr
        );
        let stderr = &exited.stderr;
        assert!(stderr.contains("cannot be used with"), "{stderr}");
        assert!(
            stderr.contains("--simulator") && stderr.contains(named),
            "{stderr}"
        );
        assert!(!stderr.contains("sekrit-key"), "the key was shown");
        assert_never_listened(&exited);
    }
}

#[tokio::test]
async fn a_bad_backend_exits_1_with_its_message_before_anything_listens() {
    let cases = [
        ("ftp://127.0.0.1:3000", "must start with http://"),
        ("http://exa mple", "is not a URL"),
        (
            "http://user:pw@127.0.0.1:3000",
            "must not contain credentials",
        ),
    ];
    for (backend, expected) in cases {
        for mode in [
            &["--simulator"][..],
            &["--base-url", "http://127.0.0.1:9", "--api-key", "k"],
        ] {
            let mut args = vec!["proxy", "--backend", backend];
            args.extend_from_slice(mode);
            let exited = Sidecar::run_to_exit(&args, &[]).await;
            assert_eq!(exited.status.code(), Some(1), "{args:?}: {}", exited.stderr);
            assert!(
                exited.stderr.contains("error: --backend") && exited.stderr.contains(expected),
                "{args:?}: {}",
                exited.stderr
            );
            assert_never_listened(&exited);
        }
    }
}

#[tokio::test]
async fn sigterm_as_soon_as_listening_on_is_printed_is_a_clean_exit_0() {
    let sim = Simulator::start().await.unwrap();
    let base_url = sim.base_url();
    for round in 0..6 {
        let mut sidecar = if round % 2 == 0 {
            Sidecar::proxy(&sim, "http://127.0.0.1:9", &[]).await
        } else {
            Sidecar::start(&[
                "forward-auth",
                "--base-url",
                &base_url,
                "--api-key",
                sim.api_key(),
            ])
            .await
        };
        sidecar.terminate();
        let status = sidecar.exit_status().await;
        assert_eq!(
            status.code(),
            Some(0),
            "round {round}: {status:?}: {}",
            sidecar.stderr()
        );
    }
}

const TIMEOUT_FLAGS: [&str; 5] = [
    "--request-head-timeout",
    "--request-body-timeout",
    "--backend-connect-timeout",
    "--backend-response-timeout",
    "--backend-body-timeout",
];

#[tokio::test]
async fn each_timeout_flag_refuses_zero_naming_itself_and_takes_other_durations() {
    for flag in TIMEOUT_FLAGS {
        for zero in ["0s", "0ms"] {
            let args = [
                "proxy",
                "--backend",
                "http://127.0.0.1:9",
                "--simulator",
                flag,
                zero,
            ];
            let exited = Sidecar::run_to_exit(&args, &[]).await;
            assert_eq!(exited.status.code(), Some(2), "{args:?}: {}", exited.stderr);
            assert!(
                exited.stderr.contains(flag) && exited.stderr.contains("more than zero"),
                "{args:?}: {}",
                exited.stderr
            );
            assert_never_listened(&exited);
        }
        // The same refusal from the environment variable.
        let variable = format!(
            "CONNEQT_GUARD_{}",
            flag.trim_start_matches("--")
                .replace('-', "_")
                .to_uppercase()
        );
        let args = ["proxy", "--backend", "http://127.0.0.1:9", "--simulator"];
        let exited = Sidecar::run_to_exit(&args, &[(&variable, "0s")]).await;
        assert_eq!(
            exited.status.code(),
            Some(2),
            "{variable}: {}",
            exited.stderr
        );
        assert!(
            exited.stderr.contains(flag),
            "{variable}: {}",
            exited.stderr
        );
    }

    // Durations above zero are taken, and the proxy serves.
    let mut extra = Vec::new();
    for (flag, value) in TIMEOUT_FLAGS.iter().zip(["5s", "10s", "500ms", "1m", "2m"]) {
        extra.extend([*flag, value]);
    }
    let setup = start(&extra).await;
    let token = setup.sim.issue_token();
    let response = client()
        .get(setup.proxy.url("/"))
        .header(TOKEN_HEADER, &token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "hello from the backend");
}

#[tokio::test]
async fn a_wrong_setting_exits_non_zero_with_the_library_message_naming_it() {
    let cases: [(&[&str], &str); 4] = [
        (&["--cache-ttl", "0s"], "`cache_ttl`"),
        (&["--verify-path", "no-slash"], "`verify_path`"),
        (
            &["--max-concurrent-verifications", "0"],
            "`max_concurrent_verifications`",
        ),
        (&["--cache-ttl", "30"], "is not a duration"),
    ];
    for (extra, expected) in cases {
        let mut args = vec![
            "proxy",
            "--backend",
            "http://127.0.0.1:9",
            "--base-url",
            "https://int.conneqt.health",
            "--api-key",
            "sekrit-key",
        ];
        args.extend_from_slice(extra);
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_conneqt-guard"))
            .args(&args)
            .env_remove("CONNEQT_API_KEY")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("sekrit-key"), "{stderr}");
    }
    // A base URL without a scheme, and none at all.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_conneqt-guard"))
        .args([
            "forward-auth",
            "--api-key",
            "k",
            "--base-url",
            "int.conneqt.health",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("`base_url`"), "{stderr}");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_conneqt-guard"))
        .args(["forward-auth", "--api-key", "k"])
        .env_remove("CONNEQT_BASE_URL")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("`base_url` is required"), "{stderr}");
}

#[tokio::test]
async fn help_documents_every_setting_and_its_default_and_never_shows_the_api_key() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_conneqt-guard"))
        .args(["proxy", "--help"])
        .env("CONNEQT_API_KEY", "sekrit-key-from-env")
        .env("CONNEQT_UPSTREAM_PROXY", "http://user:sekrit-pw@proxy")
        .output()
        .unwrap();
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for expected in [
        "--backend",
        "--base-url",
        "CONNEQT_BASE_URL",
        "--api-key",
        "CONNEQT_API_KEY",
        "--cache-ttl",
        "[default: 30s]",
        "--gone-ttl",
        "[default: 10m]",
        "--upstream-timeout",
        "[default: 2s]",
        "--verify-path",
        "[default: /api/v1/messages/instant/access/token/verify]",
        "--max-concurrent-verifications",
        "[default: 64]",
        "--stale-if-error",
        "--listen",
        "[default: 127.0.0.1:8080]",
        "--admin-listen",
        "[default: 127.0.0.1:9090]",
        "--shutdown-timeout",
        "[default: 10s]",
        "--simulator",
        "--request-head-timeout",
        "CONNEQT_GUARD_REQUEST_HEAD_TIMEOUT",
        "--request-body-timeout",
        "CONNEQT_GUARD_REQUEST_BODY_TIMEOUT",
        "--backend-connect-timeout",
        "CONNEQT_GUARD_BACKEND_CONNECT_TIMEOUT",
        "--backend-response-timeout",
        "CONNEQT_GUARD_BACKEND_RESPONSE_TIMEOUT",
        "--backend-body-timeout",
        "CONNEQT_GUARD_BACKEND_BODY_TIMEOUT",
        "[default: 60s]",
    ] {
        assert!(help.contains(expected), "{expected} missing in:\n{help}");
    }
    assert!(!help.contains("sekrit"), "{help}");
}

#[tokio::test]
async fn strip_and_skip_flags_reach_the_layer() {
    let setup = start(&[
        "--strip-token-header",
        "--skip-path-prefix",
        "/status,/other",
    ])
    .await;
    let token = setup.sim.issue_token();

    // Stripped: the backend never sees the token.
    let response = client()
        .get(setup.proxy.url("/headers"))
        .header(TOKEN_HEADER, &token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen: serde_json::Value = response.json().await.unwrap();
    assert!(seen.get(TOKEN_HEADER).is_none(), "{seen}");

    // Skipped: no token needed, no upstream call.
    let calls = setup.sim.verify_calls();
    let response = client()
        .get(setup.proxy.url("/status/200"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(setup.sim.verify_calls(), calls);
    // Not skipped: still guarded.
    let response = client()
        .get(setup.proxy.url("/headers"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(setup.backend.calls(), 2);
}

/// The library's grammar on the command line and in the environment: `1m30s`, `1s500ms` and
/// `=1` booleans, which the sidecar used to refuse, reach the layer.
#[tokio::test]
async fn the_librarys_durations_and_booleans_reach_the_layer_from_flags_and_variables() {
    let sim = Simulator::start().await.unwrap();
    let backend = Backend::start().await;
    let proxy = Sidecar::proxy_with_env(
        &sim,
        &backend.url(),
        &["--cache-ttl", "1m30s", "--upstream-retry=false"],
        &[
            ("CONNEQT_UPSTREAM_TIMEOUT", "1s500ms"),
            ("CONNEQT_ACCEPT_OPAQUE_TOKENS", "1"),
            ("CONNEQT_STRIP_TOKEN_HEADER", "1"),
        ],
    )
    .await;

    // Opaque tokens accepted: a non-UUID token is asked about upstream (which refuses it),
    // instead of being turned away as malformed without a call.
    let response = client()
        .get(proxy.url("/headers"))
        .header(TOKEN_HEADER, "opaque-token-not-a-uuid")
        .send()
        .await
        .unwrap();
    assert_ne!(response.status(), 200);
    assert_eq!(sim.verify_calls(), 1);

    // Stripped: the backend never sees a verified token.
    let token = sim.issue_token();
    let response = client()
        .get(proxy.url("/headers"))
        .header(TOKEN_HEADER, &token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen: serde_json::Value = response.json().await.unwrap();
    assert!(seen.get(TOKEN_HEADER).is_none(), "{seen}");

    // `--upstream-retry=false`: one 503 upstream is the answer, not retried.
    let other = sim.issue_token();
    sim.fail_next(1, Fault::Status(503));
    let response = client()
        .get(proxy.url("/headers"))
        .header(TOKEN_HEADER, &other)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(sim.verify_calls_for(&other), 1);
}

/// With retries on (the default), the same 503 is retried and the request passes.
#[tokio::test]
async fn upstream_retry_is_on_by_default_and_its_flag_takes_the_librarys_booleans() {
    let setup = start(&[
        "--upstream-retry=1",
        "--refresh-ahead=0",
        "--refresh-ahead-share",
        "0.5",
    ])
    .await;
    let token = setup.sim.issue_token();
    setup.sim.fail_next(1, Fault::Status(503));
    let response = client()
        .get(setup.proxy.url("/headers"))
        .header(TOKEN_HEADER, &token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(setup.sim.verify_calls_for(&token), 2);
}

/// A value the library refuses is refused by the sidecar too, from a flag or a variable, with
/// the library's message naming the setting.
#[tokio::test]
async fn values_the_library_refuses_are_refused_naming_the_setting() {
    let args = [
        "proxy",
        "--backend",
        "http://127.0.0.1:9",
        "--base-url",
        "https://int.conneqt.health",
        "--api-key",
        "sekrit-key",
    ];
    /// Flags, variables, and what the error must name.
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case<'_>; 4] = [
        (
            &[],
            &[("CONNEQT_UPSTREAM_RETRY", "yes")],
            "`upstream_retry`",
        ),
        (&["--refresh-ahead=yes"], &[], "`refresh_ahead`"),
        (
            &["--refresh-ahead-share", "1.5"],
            &[],
            "`refresh_ahead_share`",
        ),
        (&[], &[("CONNEQT_CACHE_TTL", "1m30")], "`cache_ttl`"),
    ];
    for (extra, env, expected) in cases {
        let mut all = args.to_vec();
        all.extend_from_slice(extra);
        let exited = Sidecar::run_to_exit(&all, env).await;
        assert_eq!(
            exited.status.code(),
            Some(1),
            "{all:?} {env:?}: {}",
            exited.stderr
        );
        assert!(
            exited.stderr.contains(expected),
            "{all:?} {env:?}: {}",
            exited.stderr
        );
        assert!(!exited.stderr.contains("sekrit"), "{}", exited.stderr);
        assert_never_listened(&exited);
    }
}

/// Reads a response or request head (up to the blank line), byte by byte so nothing after it
/// is consumed.
async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).await.unwrap(), 1, "closed mid-head");
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

/// A backend that answers every WebSocket handshake with `101` and then echoes bytes; records
/// the handshakes it saw.
async fn websocket_echo_backend() -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let head = read_head(&mut stream).await;
                record.lock().unwrap().push(head);
                stream
                    .write_all(
                        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                          Connection: Upgrade\r\n\
                          Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
                    )
                    .await
                    .unwrap();
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    (url, seen)
}

const HANDSHAKE: &str = "GET /chat HTTP/1.1\r\nHost: chat.example\r\nConnection: Upgrade\r\n\
    Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
    Sec-WebSocket-Version: 13\r\n";

#[tokio::test]
async fn a_websocket_handshake_with_a_valid_token_becomes_a_tunnel_and_without_one_is_refused() {
    let sim = Simulator::start().await.unwrap();
    let (backend, seen) = websocket_echo_backend().await;
    let proxy = Sidecar::proxy(&sim, &backend, &[]).await;
    let token = sim.issue_token();

    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    let request = format!("{HANDSHAKE}{TOKEN_HEADER}: {token}\r\n\r\n");
    client.write_all(request.as_bytes()).await.unwrap();
    let head = read_head(&mut client).await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("\r\nupgrade: websocket\r\n"), "{head}");
    assert!(lower.contains("\r\nconnection: upgrade\r\n"), "{head}");
    assert!(
        head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "{head}"
    );
    // What follows is not HTTP: bytes pass both ways as they are.
    for frame in [&b"\x81\x05hello"[..], b"\x82\x03\r\n\r"] {
        client.write_all(frame).await.unwrap();
        let mut echoed = vec![0; frame.len()];
        client.read_exact(&mut echoed).await.unwrap();
        assert_eq!(echoed, frame);
    }
    let handshakes = seen.lock().unwrap().clone();
    assert_eq!(handshakes.len(), 1);
    let backend_saw = handshakes[0].to_ascii_lowercase();
    assert!(
        backend_saw.contains("\r\nupgrade: websocket\r\n"),
        "{backend_saw}"
    );
    assert!(
        backend_saw.contains("\r\nconnection: upgrade\r\n"),
        "{backend_saw}"
    );
    assert!(backend_saw.contains("sec-websocket-key: dghlihnhbxbszsbub25jzq=="));
    assert_eq!(sim.verify_calls(), 1);

    // No token, or a revoked one: the guard's answer, and the backend never sees a handshake.
    let revoked = sim.issue_token();
    sim.revoke(&revoked);
    for (extra, status) in [
        (String::new(), "401"),
        (format!("{TOKEN_HEADER}: {revoked}\r\n"), "410"),
    ] {
        let mut client = TcpStream::connect(proxy.addr).await.unwrap();
        let request = format!("{HANDSHAKE}{extra}\r\n");
        client.write_all(request.as_bytes()).await.unwrap();
        let head = read_head(&mut client).await;
        assert!(head.starts_with(&format!("HTTP/1.1 {status} ")), "{head}");
        assert!(!head.to_ascii_lowercase().contains("upgrade"), "{head}");
    }
    assert_eq!(seen.lock().unwrap().len(), 1);
    assert_eq!(sim.verify_calls(), 2);
}

#[tokio::test]
async fn a_rejected_request_whose_large_body_is_never_read_still_gets_its_answer() {
    let setup = start(&[]).await;
    let revoked = setup.sim.issue_token();
    setup.sim.revoke(&revoked);
    for (token, status) in [(None, "401"), (Some(revoked.as_str()), "410")] {
        // A client that sends its whole body before it reads anything: the proxy answers
        // without reading the body, and must not reset the connection under the client.
        let mut client = TcpStream::connect(setup.proxy.addr).await.unwrap();
        let body = vec![b'x'; 16 * 1024 * 1024];
        let token = token.map_or(String::new(), |t| format!("{TOKEN_HEADER}: {t}\r\n"));
        let head = format!(
            "POST /echo HTTP/1.1\r\nHost: x\r\n{token}Content-Length: {}\r\n\r\n",
            body.len()
        );
        client.write_all(head.as_bytes()).await.unwrap();
        client
            .write_all(&body)
            .await
            .expect("the whole body can be sent");
        let mut answer = Vec::new();
        client
            .read_to_end(&mut answer)
            .await
            .expect("the answer arrives, then a clean close, not a reset");
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status} ")),
            "{answer}"
        );
        assert!(answer.contains("\r\nconnection: close\r\n"), "{answer}");
    }
    assert_eq!(setup.backend.calls(), 0);
    assert_eq!(setup.sim.verify_calls(), 1);
}

/// The README's behaviour table ([`crate::behaviour::CASES`]) through `conneqt-guard proxy`,
/// over HTTP/1.1 in front of the counting axum backend and over gRPC (h2c) in front of a
/// counting tonic health server. A fresh simulator, backend and proxy per case. The backend
/// cannot see a `VerifiedToken`, so only its received count is checked.
mod behaviour {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::task::JoinHandle;
    use tonic::metadata::MetadataMap;

    use super::{Channel, HealthCheckRequest, HealthClient, Server, TcpIncoming};
    use crate::behaviour::{
        GRPC_SKIP_PREFIX, Outcome, Request, Runs, SKIP_PREFIX, Transport, UPSTREAM_TIMEOUT,
        run_table,
    };
    use crate::sidecar::{Backend, Sidecar};
    use conneqt_guard_simulator::Simulator;

    /// `conneqt-guard proxy` in front of `backend`, set up as the table needs.
    async fn proxy(sim: &Simulator, base_url: &str, backend: &str, skip: &str) -> Sidecar {
        let timeout = format!("{}ms", UPSTREAM_TIMEOUT.as_millis());
        Sidecar::start(&[
            "proxy",
            "--backend",
            backend,
            "--base-url",
            base_url,
            "--api-key",
            sim.api_key(),
            "--upstream-timeout",
            &timeout,
            "--skip-path-prefix",
            skip,
        ])
        .await
    }

    struct Http1 {
        backend: Backend,
        proxy: Sidecar,
    }

    impl Transport for Http1 {
        async fn send(&self, request: &Request) -> Outcome {
            Outcome::Http(request.send_http(&self.proxy.url("")).await)
        }

        fn service_runs(&self) -> Runs {
            Runs {
                total: self.backend.calls(),
                verified: None,
            }
        }
    }

    #[tokio::test]
    async fn the_table_over_the_proxy() {
        run_table("sidecar proxy", async |sim, base_url| {
            let backend = Backend::start().await;
            let proxy = proxy(sim, base_url, &backend.url(), SKIP_PREFIX).await;
            Http1 { backend, proxy }
        })
        .await;
    }

    struct Grpc {
        calls: Arc<AtomicUsize>,
        backend: JoinHandle<Result<(), tonic::transport::Error>>,
        client: HealthClient<Channel>,
        _proxy: Sidecar,
    }

    impl Drop for Grpc {
        fn drop(&mut self) {
            self.backend.abort();
        }
    }

    impl Transport for Grpc {
        async fn send(&self, request: &Request) -> Outcome {
            let message = tonic::Request::from_parts(
                MetadataMap::from_headers(request.headers()),
                tonic::Extensions::default(),
                HealthCheckRequest::default(),
            );
            let mut client = self.client.clone();
            let result = if request.skipped {
                client.watch(message).await.map(drop)
            } else {
                client.check(message).await.map(drop)
            };
            Outcome::Grpc(result)
        }

        fn service_runs(&self) -> Runs {
            Runs {
                total: self.calls.load(Ordering::SeqCst),
                verified: None,
            }
        }
    }

    #[tokio::test]
    async fn the_table_over_the_proxy_for_grpc() {
        run_table("sidecar proxy, gRPC", async |sim, base_url| {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let calls = Arc::new(AtomicUsize::new(0));
            let counter = calls.clone();
            let (_reporter, health) = tonic_health::server::health_reporter();
            let backend = tokio::spawn(
                Server::builder()
                    .layer(tower::util::MapRequestLayer::new(
                        move |request: http::Request<tonic::body::Body>| {
                            counter.fetch_add(1, Ordering::SeqCst);
                            request
                        },
                    ))
                    .add_service(health)
                    .serve_with_incoming(TcpIncoming::from(listener)),
            );
            let proxy = proxy(sim, base_url, &format!("http://{addr}"), GRPC_SKIP_PREFIX).await;
            let channel = Channel::from_shared(proxy.url(""))
                .unwrap()
                .connect()
                .await
                .unwrap();
            Grpc {
                calls,
                backend,
                client: HealthClient::new(channel),
                _proxy: proxy,
            }
        })
        .await;
    }
}
