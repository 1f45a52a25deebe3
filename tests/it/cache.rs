//! The verdict cache seen from outside: hits, expiry, coalescing, isolation between tokens,
//! sharing between clones, and request bodies streaming through.

use std::sync::Arc;
use std::time::Duration;

use crate::support::{Seen, TOKEN_HEADER, problem, serve, start, start_with};
use tower::{Layer, ServiceExt};

#[tokio::test]
async fn many_sequential_requests_with_one_token_make_one_upstream_call() {
    let h = start().await;
    let token = h.simulator.issue_token();
    for _ in 0..50 {
        assert_eq!(h.get(Some(&token)).await.status(), 200);
    }
    assert_eq!(h.inner_calls(), 50);
    assert_eq!(h.simulator.verify_calls_for(&token), 1);
}

// TTL tests wait for wall-clock time on purpose: expiry *is* the passage of time, and the
// cache's clock (std's `Instant`) cannot be paused from outside. The TTLs are short and the waits have a wide margin.

#[tokio::test]
async fn a_valid_verdict_expires_after_cache_ttl_and_the_upstream_is_asked_again() {
    let h = start_with(|b| b.cache_ttl(Duration::from_millis(300))).await;
    let token = h.simulator.issue_token();
    assert_eq!(h.get(Some(&token)).await.status(), 200);
    assert_eq!(h.get(Some(&token)).await.status(), 200);
    assert_eq!(h.simulator.verify_calls_for(&token), 1);

    tokio::time::sleep(Duration::from_millis(500)).await;

    assert_eq!(h.get(Some(&token)).await.status(), 200);
    assert_eq!(h.simulator.verify_calls_for(&token), 2);
}

#[tokio::test]
async fn a_revocation_is_seen_once_cache_ttl_has_passed() {
    let h = start_with(|b| b.cache_ttl(Duration::from_millis(300))).await;
    let token = h.simulator.issue_token();
    assert_eq!(h.get(Some(&token)).await.status(), 200);

    h.simulator.revoke(&token);
    // Within cache_ttl the cached verdict is trusted: the documented revocation delay.
    assert_eq!(h.get(Some(&token)).await.status(), 200);

    tokio::time::sleep(Duration::from_millis(500)).await;

    problem(h.get(Some(&token)).await, 410).await;
    assert_eq!(h.inner_calls(), 2);
    assert_eq!(h.simulator.verify_calls_for(&token), 2);
}

#[tokio::test]
async fn a_gone_verdict_expires_after_gone_ttl() {
    let h = start_with(|b| b.gone_ttl(Duration::from_millis(300))).await;
    let token = h.simulator.issue_token();
    h.simulator.revoke(&token);
    problem(h.get(Some(&token)).await, 410).await;
    problem(h.get(Some(&token)).await, 410).await;
    assert_eq!(h.simulator.verify_calls_for(&token), 1);

    tokio::time::sleep(Duration::from_millis(500)).await;

    problem(h.get(Some(&token)).await, 410).await;
    assert_eq!(h.simulator.verify_calls_for(&token), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_first_requests_for_one_token_make_one_upstream_call() {
    let h = Arc::new(start().await);
    let token = h.simulator.issue_token();
    // Hold every verify call at the simulator until all requests are in flight.
    h.simulator.pause();

    let requests: Vec<_> = (0..200)
        .map(|_| {
            let h = h.clone();
            let token = token.clone();
            tokio::spawn(async move { h.get(Some(&token)).await.status() })
        })
        .collect();
    h.simulator.wait_for_verify_calls(1).await;
    h.simulator.resume();

    for request in requests {
        assert_eq!(request.await.unwrap(), 200);
    }
    assert_eq!(h.inner_calls(), 200);
    assert_eq!(h.simulator.verify_calls_for(&token), 1);
}

#[tokio::test]
async fn a_client_hanging_up_does_not_cancel_or_restart_the_verification_others_wait_on() {
    let h = Arc::new(start().await);
    let token = h.simulator.issue_token();
    h.simulator.pause();

    // The first client starts the verification, then hangs up while it is held. It calls the
    // guarded service in-process so that hanging up certainly drops the guard's future (hyper
    // does not always notice a client closing its connection mid-request).
    let impatient = {
        let service = h
            .guard
            .layer(tower::service_fn(|_: http::Request<String>| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(String::from("inner ran")))
            }));
        let request = http::Request::get("/messages")
            .header(TOKEN_HEADER, &token)
            .body(String::new())
            .unwrap();
        tokio::spawn(service.oneshot(request))
    };
    h.simulator.wait_for_verify_calls(1).await;
    impatient.abort();
    assert!(impatient.await.unwrap_err().is_cancelled());

    // A second client for the same token waits on the same verification.
    let patient = {
        let h = h.clone();
        let token = token.clone();
        tokio::spawn(async move { h.get(Some(&token)).await.status() })
    };
    h.simulator.resume();

    assert_eq!(patient.await.unwrap(), 200);
    assert_eq!(h.simulator.verify_calls_for(&token), 1, "not restarted");
    assert_eq!(h.inner_calls(), 1);
}

#[tokio::test]
async fn different_tokens_never_share_verdicts() {
    let h = start().await;
    let good = h.simulator.issue_token();
    let revoked = h.simulator.issue_token();
    h.simulator.revoke(&revoked);

    for _ in 0..3 {
        assert_eq!(h.get(Some(&good)).await.status(), 200);
        problem(h.get(Some(&revoked)).await, 410).await;
    }
    // A token differing in one character is a different token.
    let mut near = good.clone().into_bytes();
    near[0] = if near[0] == b'a' { b'b' } else { b'a' };
    let near = String::from_utf8(near).unwrap();
    problem(h.get(Some(&near)).await, 410).await;

    assert_eq!(h.simulator.verify_calls_for(&good), 1);
    assert_eq!(h.simulator.verify_calls_for(&revoked), 1);
    assert_eq!(h.simulator.verify_calls_for(&near), 1);
    assert_eq!(h.inner_calls(), 3);
}

/// A flood of distinct valid tokens beyond `cache_capacity` evicts the tokens seen once, not
/// the one in use between them: the hot token is verified once, and the table stays at its
/// capacity (the flood's first token has been evicted, so it is asked about again).
#[tokio::test]
async fn a_flood_of_valid_tokens_beyond_the_capacity_keeps_the_hot_token_cached() {
    const CAPACITY: u64 = 50;
    let h = start_with(|b| b.cache_capacity(CAPACITY)).await;
    let hot = h.simulator.issue_token();
    let flood: Vec<String> = (0..CAPACITY * 20)
        .map(|_| h.simulator.issue_token())
        .collect();
    for token in &flood {
        assert_eq!(h.get(Some(token)).await.status(), 200);
        assert_eq!(h.get(Some(&hot)).await.status(), 200);
    }
    assert_eq!(
        h.simulator.verify_calls_for(&hot),
        1,
        "the hot token stayed cached"
    );
    assert!(
        flood
            .iter()
            .all(|token| h.simulator.verify_calls_for(token) == 1)
    );
    assert_eq!(h.get(Some(&flood[0])).await.status(), 200);
    assert_eq!(
        h.simulator.verify_calls_for(&flood[0]),
        2,
        "the table is bounded: the flood's first token was evicted"
    );
    assert_eq!(h.inner_calls(), flood.len() * 2 + 1);
}

#[tokio::test]
async fn clones_of_the_layer_share_one_cache() {
    let h = start().await;
    let other_app = serve(h.guard.clone()).await;
    let token = h.simulator.issue_token();

    assert_eq!(h.get(Some(&token)).await.status(), 200);
    let response = h
        .client
        .get(other_app.url("/messages"))
        .header(TOKEN_HEADER, &token)
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 200);
    assert_eq!(other_app.inner_calls(), 1);
    assert_eq!(h.simulator.verify_calls_for(&token), 1);
}

#[tokio::test]
async fn invalidate_makes_the_next_request_ask_the_upstream_again() {
    let h = start().await;
    let token = h.simulator.issue_token();
    assert_eq!(h.get(Some(&token)).await.status(), 200);

    h.guard.invalidate(&token).await;
    assert_eq!(h.get(Some(&token)).await.status(), 200);
    assert_eq!(h.simulator.verify_calls_for(&token), 2);

    h.guard.invalidate_all().await;
    h.simulator.revoke(&token);
    problem(h.get(Some(&token)).await, 410).await;
    assert_eq!(h.simulator.verify_calls_for(&token), 3);
}

#[tokio::test]
async fn a_multi_megabyte_body_reaches_the_handler_intact() {
    let h = start().await;
    let token = h.simulator.issue_token();
    let body: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let expected = blake3::hash(&body).to_hex().to_string();

    let response = h
        .client
        .post(h.app.url("/messages"))
        .header(TOKEN_HEADER, &token)
        .body(body)
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 200);
    let seen: Seen = response.json().await.unwrap();
    assert_eq!(seen.body_len, 8 * 1024 * 1024);
    assert_eq!(seen.body_blake3, expected);
}

#[tokio::test]
async fn check_connection_tells_a_good_key_from_a_wrong_or_unauthorised_one() {
    use conneqt_guard::{AccessTokenLayer, ConnectionStatus};
    let h = start().await;
    assert_eq!(h.guard.check_connection().await, ConnectionStatus::Ok);

    let with_key = |key: &str| {
        AccessTokenLayer::builder()
            .base_url(h.simulator.base_url())
            .api_key(key)
            .build()
            .unwrap()
    };
    assert_eq!(
        with_key("wrong-key").check_connection().await,
        ConnectionStatus::KeyRejected
    );
    assert_eq!(
        with_key(h.simulator.unauthorised_api_key())
            .check_connection()
            .await,
        ConnectionStatus::KeyNotAuthorised
    );
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let unreachable = AccessTokenLayer::builder()
        .base_url(format!("http://{closed}"))
        .api_key("k")
        .build()
        .unwrap();
    assert!(matches!(
        unreachable.check_connection().await,
        ConnectionStatus::Unreachable { .. }
    ));
    assert_eq!(h.upstream_calls(), 0, "checking the key spends no token");
}
