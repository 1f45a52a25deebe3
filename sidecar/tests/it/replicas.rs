//! Three `conneqt-guard proxy` processes sharing one real `redis-server` (`--redis-url`) and one
//! simulator: one upstream call between them, and a revocation sent to one admin listener is
//! enforced by all. Skipped, with one line saying what to install, where `redis-server` is
//! missing (unless `CONNEQT_REQUIRE_SYSTEM_TESTS=1`).

use std::time::{Duration, Instant};

use conneqt_guard_simulator::Simulator;

use crate::redis_server::RedisServer;
use crate::sidecar::{Backend, Sidecar};
use crate::support::{TOKEN_HEADER, client};

#[tokio::test]
async fn three_sidecars_on_one_redis_verify_once_and_revoke_everywhere() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let sim = Simulator::start().await.unwrap();
    let backend = Backend::start().await;
    let url = redis.url();
    let flags = [
        "--redis-url",
        url.as_str(),
        "--cluster-key",
        "sidecar test cluster",
    ];
    let mut sidecars = Vec::new();
    for _ in 0..3 {
        sidecars.push(Sidecar::proxy(&sim, &backend.url(), &flags).await);
    }
    let get = |sidecar: &Sidecar, token: &str| {
        client()
            .get(sidecar.url("/headers"))
            .header(TOKEN_HEADER, token)
            .send()
    };

    let token = sim.issue_token();
    for i in 0..30 {
        let response = get(&sidecars[i % 3], &token).await.unwrap();
        assert_eq!(response.status(), 200, "request {i}");
    }
    assert_eq!(
        sim.verify_calls(),
        1,
        "one verification for the three sidecars"
    );
    assert_eq!(backend.calls(), 30);

    // Revoked at Conneqt: still cached everywhere, until an operator says so on one sidecar.
    sim.revoke(&token);
    assert_eq!(get(&sidecars[2], &token).await.unwrap().status(), 200);
    let invalidated = client()
        .post(sidecars[0].admin_url("/invalidate"))
        .header(TOKEN_HEADER, &token)
        .send()
        .await
        .unwrap();
    assert_eq!(invalidated.status(), 204);
    let start = Instant::now();
    for sidecar in &sidecars[1..] {
        loop {
            let status = get(sidecar, &token).await.unwrap().status();
            if status == 410 {
                break;
            }
            assert_eq!(status, 200);
            assert!(
                start.elapsed() < Duration::from_secs(1),
                "not enforced in time"
            );
        }
    }
    eprintln!(
        "revocation enforced on the other sidecars after {:?}",
        start.elapsed()
    );
    assert_eq!(sim.verify_calls(), 2, "verified again once, for all three");
    assert_eq!(
        backend.calls(),
        31,
        "the revoked token reached no backend after it"
    );

    // Neither the token nor anything from it is in Redis, nor in any sidecar's log.
    for (key, value) in redis.keys_and_values() {
        let value = String::from_utf8_lossy(&value);
        assert!(!key.contains(&token) && !value.contains(&token));
    }
    for sidecar in &sidecars {
        assert!(!sidecar.stderr().contains(&token));
    }
}

#[tokio::test]
async fn redis_refusing_the_password_stops_start_up_and_redis_being_down_does_not() {
    let password = "sidecar-redis-password-42";
    let Some(mut redis) = RedisServer::start_with_password(password) else {
        return;
    };
    let sim = Simulator::start().await.unwrap();
    let base_url = sim.base_url();
    let common = ["--base-url", base_url.as_str(), "--api-key", sim.api_key()];

    // A URL that is not Redis's, and a password Redis refuses: exit 1, saying why, without
    // the URL's password.
    let wrong = format!("redis://:wrong-password-77@127.0.0.1:{}", redis.port());
    let not_redis = "http://:wrong-password-77@127.0.0.1:6379".to_owned();
    for (url, expected) in [
        (&wrong, "Redis refused the credentials in redis_url"),
        (&not_redis, "redis_url"),
    ] {
        let mut args = vec!["proxy", "--backend", "http://127.0.0.1:9"];
        args.extend(common);
        args.extend(["--redis-url", url.as_str()]);
        let exited = Sidecar::run_to_exit(&args, &[]).await;
        assert_eq!(exited.status.code(), Some(1), "{}", exited.stderr);
        assert!(exited.stderr.contains(expected), "{}", exited.stderr);
        assert!(
            !exited.stderr.contains("wrong-password-77"),
            "{}",
            exited.stderr
        );
        assert!(!exited.stdout.contains("listening on"));
    }

    // Redis down: the sidecar starts, and verifies on its own.
    redis.stop();
    let backend = Backend::start().await;
    let url = redis.url_with_password(password);
    let sidecar = Sidecar::proxy(&sim, &backend.url(), &["--redis-url", url.as_str()]).await;
    let token = sim.issue_token();
    let response = client()
        .get(sidecar.url("/headers"))
        .header(TOKEN_HEADER, &token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(sim.verify_calls(), 1);
    assert!(!sidecar.stderr().contains(password));
}
