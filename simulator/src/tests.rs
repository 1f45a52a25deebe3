//! Tests of the simulator over real HTTP.

use std::time::{Duration, Instant};

use reqwest::{Client, RequestBuilder, Response, StatusCode};
use serde_json::Value;

use super::routes::{ISSUE_PATH, TEST_PATH, VALIDATION_ERROR_TYPE, VERIFY_PATH};
use super::{Fault, Simulator};

const JSON_UTF8: &str = "application/json; charset=utf-8";

fn client() -> Client {
    // reqwest is built without a TLS provider of its own (see Cargo.toml).
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::builder().no_proxy().build().expect("client")
}

/// A well-formed verify request for `token`, as the guard sends it.
fn verify(client: &Client, sim: &Simulator, token: &str) -> RequestBuilder {
    client
        .get(format!("{}{VERIFY_PATH}", sim.base_url()))
        .header("ApiKey", sim.api_key())
        .header("Content-Type", JSON_UTF8)
        .header("Conneqt-Instant-Access-Token", token)
}

/// A verify request with only the given headers.
fn bare_verify(client: &Client, sim: &Simulator, headers: &[(&str, &str)]) -> RequestBuilder {
    headers.iter().fold(
        client.get(format!("{}{VERIFY_PATH}", sim.base_url())),
        |request, (name, value)| request.header(*name, *value),
    )
}

async fn problem(response: Response, status: u16) -> Value {
    assert_eq!(response.status().as_u16(), status);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let body: Value = response.json().await.expect("problem json");
    assert_eq!(body["status"], status);
    assert!(body["title"].as_str().is_some_and(|t| !t.is_empty()));
    let instance = body["instance"].as_str().expect("instance");
    let uuid = instance
        .strip_prefix("urn:uuid:")
        .expect("urn:uuid: prefix");
    assert!(uuid::Uuid::try_parse(uuid).is_ok(), "{instance}");
    body
}

async fn validation_problem(response: Response, name: &str, reason: &str) {
    let body = problem(response, 400).await;
    assert_eq!(body["type"], VALIDATION_ERROR_TYPE);
    assert_eq!(body["title"], "Request Validation Error");
    assert_eq!(
        body["invalidParameters"],
        serde_json::json!([{ "name": name, "reason": reason }])
    );
}

async fn plain_problem(response: Response, status: u16) {
    let body = problem(response, status).await;
    assert!(body.get("invalidParameters").is_none(), "{body}");
}

#[tokio::test]
async fn verify_check_order() {
    let sim = Simulator::start().await.unwrap();
    let client = client();
    let token = sim.issue_token();
    let key = sim.api_key().to_owned();
    let forbidden_key = sim.unauthorised_api_key().to_owned();
    let send = |headers: &[(&str, &str)]| bare_verify(&client, &sim, headers).send();

    // 401: missing key (even with everything else wrong), wrong key.
    plain_problem(send(&[]).await.unwrap(), 401).await;
    let wrong = [
        ("ApiKey", "not-the-key"),
        ("Content-Type", JSON_UTF8),
        ("Conneqt-Instant-Access-Token", &token),
    ];
    plain_problem(send(&wrong).await.unwrap(), 401).await;

    // 403: known but unauthorised key, checked before content type and token.
    plain_problem(send(&[("ApiKey", &forbidden_key)]).await.unwrap(), 403).await;

    // 400: content type, missing token, empty token, non-UUID tokens.
    let bad_type = [
        ("ApiKey", key.as_str()),
        ("Content-Type", "text/plain"),
        ("Conneqt-Instant-Access-Token", &token),
    ];
    let reason = "Content-Type must be application/json";
    validation_problem(send(&bad_type).await.unwrap(), "Content-Type", reason).await;
    let no_type = [
        ("ApiKey", key.as_str()),
        ("Conneqt-Instant-Access-Token", &token),
    ];
    validation_problem(send(&no_type).await.unwrap(), "Content-Type", reason).await;

    let no_token = [("ApiKey", key.as_str()), ("Content-Type", JSON_UTF8)];
    let provided = "Access token must be provided";
    validation_problem(send(&no_token).await.unwrap(), "AccessToken", provided).await;
    let response = verify(&client, &sim, "").send().await.unwrap();
    validation_problem(response, "AccessToken", provided).await;

    let invalid = "Access token is not in a valid format";
    let simple = token.replace('-', "");
    for bad in ["not-a-uuid", simple.as_str(), &format!("{{{token}}}")] {
        let response = verify(&client, &sim, bad).send().await.unwrap();
        validation_problem(response, "AccessToken", invalid).await;
    }

    // 200 issued (content type matched case-insensitively, hex case ignored), 410 otherwise.
    let response = verify(&client, &sim, &token).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.bytes().await.unwrap().is_empty());
    let upper = [
        ("ApiKey", key.as_str()),
        ("Content-Type", "Application/JSON"),
        ("Conneqt-Instant-Access-Token", &token.to_uppercase()),
    ];
    assert_eq!(send(&upper).await.unwrap().status(), StatusCode::OK);

    let unknown = uuid::Uuid::new_v4().to_string();
    let response = verify(&client, &sim, &unknown).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::GONE);
    assert!(response.bytes().await.unwrap().is_empty());

    sim.revoke(&token);
    let response = verify(&client, &sim, &token).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::GONE);

    // Another token is unaffected by the revocation.
    let other = sim.issue_token();
    assert_ne!(other, token);
    let response = verify(&client, &sim, &other).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn issue_token_over_http_then_verify() {
    let sim = Simulator::start().await.unwrap();
    let client = client();
    let issue = |key: &str, content_type: &str, body: &'static str| {
        client
            .post(format!("{}{ISSUE_PATH}", sim.base_url()))
            .header("ApiKey", key)
            .header("Content-Type", content_type)
            .body(body)
            .send()
    };

    let response = issue(sim.api_key(), JSON_UTF8, r#"{"accessCode": "JH23MA1Z"}"#)
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    let token = body["token"].as_str().expect("token").to_owned();
    let parsed = uuid::Uuid::try_parse(&token).expect("uuid token");
    assert_eq!(parsed.get_version_num(), 4);
    let response = verify(&client, &sim, &token).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // Token issue is not a verify call.
    assert_eq!(sim.verify_calls(), 1);

    let body = r#"{"accessCode": "JH23MA1Z"}"#;
    plain_problem(issue("wrong", JSON_UTF8, body).await.unwrap(), 401).await;
    let forbidden = sim.unauthorised_api_key();
    plain_problem(issue(forbidden, JSON_UTF8, body).await.unwrap(), 403).await;
    let response = issue(sim.api_key(), "text/plain", body).await.unwrap();
    validation_problem(
        response,
        "Content-Type",
        "Content-Type must be application/json",
    )
    .await;

    let provided = "Access code must be provided";
    let format = "Access code must be 8 characters, each A-Z or 0-9";
    for (body, reason) in [
        ("{}", provided),
        ("not json", provided),
        (r#"{"accessCode": ""}"#, provided),
        (r#"{"accessCode": "JH23MA1"}"#, format),
        (r#"{"accessCode": "JH23MA1Z9"}"#, format),
        (r#"{"accessCode": "jh23ma1z"}"#, format),
        (r#"{"accessCode": 12345678}"#, format),
    ] {
        let response = issue(sim.api_key(), JSON_UTF8, body).await.unwrap();
        validation_problem(response, "AccessCode", reason).await;
    }
}

#[tokio::test]
async fn test_connection_endpoint() {
    let sim = Simulator::start().await.unwrap();
    let client = client();
    let url = format!("{}{TEST_PATH}", sim.base_url());
    let send = |key: Option<&str>| {
        let request = client.get(&url);
        match key {
            Some(key) => request.header("ApiKey", key),
            None => request,
        }
        .send()
    };
    assert_eq!(send(Some(sim.api_key())).await.unwrap().status(), 200);
    plain_problem(send(None).await.unwrap(), 401).await;
    plain_problem(send(Some("wrong")).await.unwrap(), 401).await;
    plain_problem(send(Some(sim.unauthorised_api_key())).await.unwrap(), 403).await;
}

#[tokio::test]
async fn other_paths_are_not_found() {
    let sim = Simulator::start().await.unwrap();
    let client = client();
    for path in ["/", "/api/v1/other", "/API/V1/TEST"] {
        let response = client
            .get(format!("{}{path}", sim.base_url()))
            .header("ApiKey", sim.api_key())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
    }
    assert_eq!(sim.verify_calls(), 0);
}

#[tokio::test]
async fn counts_and_records_verify_requests() {
    let sim = Simulator::start().await.unwrap();
    let client = client();
    let first = sim.issue_token();
    let second = sim.issue_token();
    assert_eq!(sim.verify_calls(), 0);
    assert_eq!(sim.verify_calls_for(&first), 0);

    for token in [&first, &second, &first] {
        verify(&client, &sim, token).send().await.unwrap();
    }
    // A rejected request (no key) still counts.
    bare_verify(&client, &sim, &[("Conneqt-Instant-Access-Token", &first)])
        .send()
        .await
        .unwrap();
    // A request with a query string and no token header.
    client
        .get(format!("{}{VERIFY_PATH}?trace=1", sim.base_url()))
        .header("ApiKey", sim.api_key())
        .send()
        .await
        .unwrap();

    assert_eq!(sim.verify_calls(), 5);
    assert_eq!(sim.verify_calls_for(&first), 3);
    assert_eq!(sim.verify_calls_for(&second), 1);
    assert_eq!(sim.verify_calls_for("never-sent"), 0);

    let recorded = sim.recorded_requests();
    assert_eq!(recorded.len(), 5);
    let request = &recorded[1];
    assert_eq!(request.method, http::Method::GET);
    assert_eq!(request.path, VERIFY_PATH);
    assert_eq!(request.headers["apikey"], sim.api_key());
    assert_eq!(request.headers["content-type"], JSON_UTF8);
    assert_eq!(request.headers["conneqt-instant-access-token"], *second);
    assert!(request.body.is_empty());
    assert!(recorded[3].headers.get("apikey").is_none());
    assert_eq!(recorded[4].path, format!("{VERIFY_PATH}?trace=1"));
}

#[tokio::test]
async fn records_method_and_body_of_odd_requests() {
    let sim = Simulator::start().await.unwrap();
    let client = client();
    let token = sim.issue_token();
    let response = client
        .post(format!("{}{VERIFY_PATH}", sim.base_url()))
        .header("ApiKey", sim.api_key())
        .header("Conneqt-Instant-Access-Token", &token)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    let recorded = sim.recorded_requests();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].method, http::Method::POST);
    assert_eq!(&recorded[0].body[..], b"{}");
    assert_eq!(sim.verify_calls_for(&token), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_requests_until_resume() {
    let sim = Simulator::start().await.unwrap();
    let client = client();
    let token = sim.issue_token();
    sim.pause();

    let requests: Vec<_> = (0..3)
        .map(|_| tokio::spawn(verify(&client, &sim, &token).send()))
        .collect();
    // Counted on arrival, although none can be answered yet.
    sim.wait_for_verify_calls(3).await;
    assert_eq!(sim.verify_calls_for(&token), 3);
    assert!(requests.iter().all(|request| !request.is_finished()));

    // A fault set while requests wait applies when they are released.
    sim.set_fault(Fault::Status(503));
    sim.resume();
    for request in requests {
        let response = request.await.unwrap().unwrap();
        plain_problem(response, 503).await;
    }
    sim.clear_fault();

    // After resume, later requests pass straight through.
    let response = verify(&client, &sim, &token).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn paused_request_completes_only_after_resume() {
    let sim = Simulator::start().await.unwrap();
    let client = client();
    let token = sim.issue_token();
    sim.pause();

    let mut request = std::pin::pin!(verify(&client, &sim, &token).send());
    // Drive the request until the simulator has it; it must not have been answered.
    tokio::select! {
        _ = &mut request => panic!("answered while paused"),
        () = sim.wait_for_verify_calls(1) => {}
    }
    sim.resume();
    assert_eq!(request.await.unwrap().status(), StatusCode::OK);
}

#[tokio::test]
async fn latency_delays_verify_answers_only() {
    let sim = Simulator::start().await.unwrap();
    let client = client();
    let token = sim.issue_token();
    let latency = Duration::from_millis(150);
    sim.set_latency(latency);

    let started = Instant::now();
    let response = verify(&client, &sim, &token).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(started.elapsed() >= latency);

    // The issue endpoint is not delayed: it answers while a verify is still in its delay.
    let delayed = tokio::spawn(verify(&client, &sim, &token).send());
    sim.wait_for_verify_calls(2).await;
    let response = client
        .get(format!("{}{TEST_PATH}", sim.base_url()))
        .header("ApiKey", sim.api_key())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(delayed.await.unwrap().unwrap().status(), StatusCode::OK);

    sim.set_latency(Duration::ZERO);
    let response = verify(&client, &sim, &token).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn fault_status_codes() {
    let sim = Simulator::start().await.unwrap();
    let client = client();
    let token = sim.issue_token();

    sim.set_fault(Fault::Status(500));
    let response = verify(&client, &sim, &token).send().await.unwrap();
    let body = problem(response, 500).await;
    assert_eq!(body["title"], "Internal Server Error");

    for code in [204, 302, 200] {
        sim.set_fault(Fault::Status(code));
        let response = verify(&client, &sim, &token).send().await.unwrap();
        assert_eq!(response.status().as_u16(), code);
        assert!(response.headers().get("location").is_none());
        assert!(response.bytes().await.unwrap().is_empty());
    }

    sim.set_fault(Fault::Status(418));
    let response = verify(&client, &sim, &token).send().await.unwrap();
    plain_problem(response, 418).await;

    // Not a possible final status: answered as 500.
    sim.set_fault(Fault::Status(42));
    let response = verify(&client, &sim, &token).send().await.unwrap();
    plain_problem(response, 500).await;

    // Faults do not touch the other endpoints.
    let response = client
        .get(format!("{}{TEST_PATH}", sim.base_url()))
        .header("ApiKey", sim.api_key())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    sim.clear_fault();
    let response = verify(&client, &sim, &token).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(sim.verify_calls_for(&token), 7);
}

#[tokio::test]
async fn fault_hang_times_out_the_client() {
    let sim = Simulator::start().await.unwrap();
    let client = client();
    let token = sim.issue_token();
    sim.set_fault(Fault::Hang);
    let err = verify(&client, &sim, &token)
        .timeout(Duration::from_millis(200))
        .send()
        .await
        .expect_err("hung request must time out");
    assert!(err.is_timeout(), "{err:?}");
    assert_eq!(sim.verify_calls(), 1);

    sim.clear_fault();
    let response = verify(&client, &sim, &token).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn fault_drop_connection_gives_no_response() {
    let sim = Simulator::start().await.unwrap();
    let client = client();
    let token = sim.issue_token();
    // Warm a pooled connection first: the fault must act per request, on a reused connection.
    let response = verify(&client, &sim, &token).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    sim.set_fault(Fault::DropConnection);
    for _ in 0..2 {
        let err = verify(&client, &sim, &token)
            .send()
            .await
            .expect_err("dropped connection must fail");
        assert!(!err.is_timeout() && !err.is_status(), "{err:?}");
    }

    sim.clear_fault();
    let response = verify(&client, &sim, &token).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn fault_garbage_is_not_http() {
    let sim = Simulator::start().await.unwrap();
    let client = client();
    let token = sim.issue_token();
    sim.set_fault(Fault::Garbage);
    let err = verify(&client, &sim, &token)
        .send()
        .await
        .expect_err("garbage must fail");
    assert!(!err.is_timeout() && !err.is_status(), "{err:?}");

    // The bytes on the wire really are the garbage.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(sim.addr()).await.unwrap();
    let request = format!(
        "GET {VERIFY_PATH} HTTP/1.1\r\nHost: {}\r\nConneqt-Instant-Access-Token: {token}\r\n\r\n",
        sim.addr()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    assert_eq!(answer, b"not http at all\r\n\r\n");

    sim.clear_fault();
    let response = verify(&client, &sim, &token).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn wait_for_verify_calls_resolves() {
    let sim = Simulator::start().await.unwrap();
    let client = client();
    let token = sim.issue_token();
    // Already satisfied.
    sim.wait_for_verify_calls(0).await;

    let waiter = sim.wait_for_verify_calls(2);
    let requests = async {
        for _ in 0..2 {
            verify(&client, &sim, &token).send().await.unwrap();
        }
    };
    tokio::join!(waiter, requests);
    assert_eq!(sim.verify_calls(), 2);
    sim.wait_for_verify_calls(2).await;
}

#[tokio::test]
async fn drop_refuses_connections() {
    let sim = Simulator::start().await.unwrap();
    let addr = sim.addr();
    assert_eq!(sim.base_url(), format!("http://127.0.0.1:{}", addr.port()));
    tokio::net::TcpStream::connect(addr)
        .await
        .expect("listening");

    drop(sim);
    let err = tokio::net::TcpStream::connect(addr)
        .await
        .expect_err("port must be closed");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
}

#[tokio::test]
async fn debug_hides_keys() {
    let sim = Simulator::start().await.unwrap();
    let debug = format!("{sim:?}");
    assert!(debug.contains(&sim.addr().to_string()), "{debug}");
    assert!(!debug.contains(sim.api_key()));
    assert!(!debug.contains(sim.unauthorised_api_key()));
    assert_ne!(sim.api_key(), sim.unauthorised_api_key());
}
