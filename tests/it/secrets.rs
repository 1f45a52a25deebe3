//! The access token and the API key never appear in logs, errors, problem bodies or `Debug`
//! output, whatever path the request takes.

use crate::support;
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::support::{TOKEN_HEADER, start_with};
use conneqt_guard_simulator::Fault;

/// Everything every tracing event in this test process wrote, at TRACE level.
fn captured() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || Capture(writer.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one subscriber per process");
        logs
    })
    .clone()
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logs_text() -> String {
    String::from_utf8_lossy(&captured().lock().unwrap()).into_owned()
}

#[tokio::test]
async fn no_path_writes_the_token_or_the_api_key_anywhere() {
    let logs = captured();
    let h = start_with(|b| {
        b.upstream_timeout(Duration::from_millis(300))
            .accept_opaque_tokens(true)
    })
    .await;
    let valid = h.simulator.issue_token();
    let revoked = h.simulator.issue_token();
    h.simulator.revoke(&revoked);
    let refused = "opaque-secret-token-4711";
    let mut bodies = String::new();

    for token in [valid.as_str(), revoked.as_str(), refused] {
        let response = h.get(Some(token)).await;
        bodies.push_str(&format!("{:?}", response.headers()));
        bodies.push_str(&response.text().await.unwrap());
    }
    // Upstream failures log at warn/error level, with the fingerprint.
    let failing = h.simulator.issue_token();
    h.simulator.set_fault(Fault::Status(500));
    bodies.push_str(&h.get(Some(&failing)).await.text().await.unwrap());
    h.simulator.set_fault(Fault::Garbage);
    bodies.push_str(&h.get(Some(&failing)).await.text().await.unwrap());
    h.simulator.clear_fault();

    let logs_now = logs_text();
    assert!(!logs_now.is_empty(), "the capture works");
    assert!(
        logs_now.contains("could not verify token"),
        "failures are logged: {logs_now}"
    );
    for secret in [
        valid.as_str(),
        revoked.as_str(),
        refused,
        failing.as_str(),
        h.simulator.api_key(),
    ] {
        assert!(!logs_now.contains(secret), "a secret is in the logs");
        assert!(!bodies.contains(secret), "a secret is in a response");
    }
    let debug = format!("{:?}", h.guard);
    assert!(
        !debug.contains(h.simulator.api_key()),
        "the API key is in Debug output"
    );
    drop(logs);
}

#[tokio::test]
async fn a_rejected_api_key_is_logged_at_error_level_without_the_key() {
    captured();
    let simulator = conneqt_guard_simulator::Simulator::start().await.unwrap();
    let key = "wrong-but-secret-key-9876";
    let guard = conneqt_guard::AccessTokenLayer::builder()
        .base_url(simulator.base_url())
        .api_key(key)
        .build()
        .unwrap();
    let app = support::serve(guard).await;
    let token = simulator.issue_token();
    let response = support::client()
        .get(app.url("/messages"))
        .header(TOKEN_HEADER, &token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 500);

    let logs = logs_text();
    let line = logs
        .lines()
        .find(|line| line.contains("refused our ApiKey"))
        .expect("an error line about the key");
    assert!(line.contains("ERROR"), "{line}");
    assert!(!logs.contains(key) && !logs.contains(&token));
}

#[tokio::test]
async fn verified_token_debug_shows_only_the_fingerprint() {
    use http::Request;
    use tower::{Layer, ServiceExt};
    let h = start_with(|b| b).await;
    let token = h.simulator.issue_token();
    let service = h
        .guard
        .layer(tower::service_fn(|request: Request<()>| async move {
            let verified = request
                .extensions()
                .get::<conneqt_guard::VerifiedToken>()
                .cloned();
            Ok::<_, std::convert::Infallible>(http::Response::new(format!("{verified:?}")))
        }));
    let response = service
        .oneshot(
            Request::get("/")
                .header(TOKEN_HEADER, &token)
                .body(())
                .unwrap(),
        )
        .await
        .unwrap();
    let shown = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    let shown = String::from_utf8(shown.to_vec()).unwrap();
    assert!(
        shown.starts_with("Some(VerifiedToken { fingerprint: Fingerprint("),
        "{shown}"
    );
    assert!(!shown.contains(&token));
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn with_the_shared_tier_no_token_redis_password_or_cluster_key_is_written_anywhere() {
    use crate::redis_server::RedisServer;
    use conneqt_guard::ConnectionStatus;

    let password = "redis-password-5150";
    let Some(redis) = RedisServer::start_with_password(password) else {
        return;
    };
    captured();
    let cluster_key = "cluster-key-secret-8086";
    let h = start_with(|b| {
        b.redis_url(redis.url_with_password(password))
            .cluster_key(cluster_key)
    })
    .await;
    assert!(h.guard.check_connection().await.is_ok());
    let valid = h.simulator.issue_token();
    let revoked = h.simulator.issue_token();
    h.simulator.revoke(&revoked);
    let mut bodies = String::new();
    for token in [&valid, &revoked] {
        bodies.push_str(&h.get(Some(token)).await.text().await.unwrap());
    }
    h.guard.invalidate(&valid).await;
    // Redis down: the tier's warnings are logged, still without secrets.
    let mut redis = redis;
    redis.stop();
    bodies.push_str(&h.get(Some(&valid)).await.text().await.unwrap());

    // A wrong password: refused at the start-up check, and the message quotes neither.
    let wrong = "wrong-redis-password-1999";
    let refused = conneqt_guard::AccessTokenLayer::builder()
        .base_url(h.simulator.base_url())
        .api_key(h.simulator.api_key())
        .redis_url(format!("redis://:{wrong}@127.0.0.1:{}", redis.port()))
        .build()
        .unwrap();
    redis.restart();
    let status = refused.check_connection().await;
    assert!(
        matches!(status, ConnectionStatus::RedisRefused { .. }),
        "{status:?}"
    );
    let shown = format!("{status} {status:?} {refused:?} {:?}", h.guard);

    let logs = logs_text();
    assert!(
        logs.contains("Redis"),
        "the tier's events are logged: {logs}"
    );
    for secret in [
        valid.as_str(),
        revoked.as_str(),
        password,
        wrong,
        cluster_key,
        h.simulator.api_key(),
    ] {
        assert!(!logs.contains(secret), "a secret is in the logs");
        assert!(!bodies.contains(secret), "a secret is in a response");
        assert!(
            !shown.contains(secret),
            "a secret is in Debug or Display: {shown}"
        );
    }
}
