//! How the guard treats a struggling upstream: one retry within the deadline, a bound on
//! concurrent verify calls, and a circuit breaker. What the client got, whether the inner
//! service ran, and how many upstream calls were made.

use crate::support;
use std::sync::Arc;
use std::time::Duration;

use crate::support::{problem, start_with};
use conneqt_guard_simulator::Fault;

#[tokio::test]
async fn a_dropped_connection_or_gateway_error_is_retried_once_and_the_request_passes() {
    for fault in [
        Fault::DropConnection,
        Fault::Garbage,
        Fault::Status(502),
        Fault::Status(503),
        Fault::Status(504),
    ] {
        let h = start_with(|b| b).await;
        let token = h.simulator.issue_token();
        h.simulator.fail_next(1, fault.clone());

        assert_eq!(h.get(Some(&token)).await.status(), 200, "{fault:?}");
        assert_eq!(h.inner_calls(), 1, "{fault:?}");
        assert_eq!(h.simulator.verify_calls_for(&token), 2, "{fault:?}");
    }
}

#[tokio::test]
async fn only_one_retry_is_made() {
    let h = start_with(|b| b).await;
    let token = h.simulator.issue_token();
    h.simulator.fail_next(2, Fault::Status(503));

    problem(h.get(Some(&token)).await, 503).await;
    assert_eq!(h.simulator.verify_calls_for(&token), 2);
    assert_eq!(h.inner_calls(), 0);
}

#[tokio::test]
async fn a_500_is_not_retried() {
    let h = start_with(|b| b).await;
    let token = h.simulator.issue_token();
    h.simulator.fail_next(1, Fault::Status(500));

    problem(h.get(Some(&token)).await, 503).await;
    assert_eq!(h.simulator.verify_calls_for(&token), 1);
    assert_eq!(h.inner_calls(), 0);
}

#[tokio::test]
async fn retry_can_be_turned_off() {
    let h = start_with(|b| b.upstream_retry(false)).await;
    let token = h.simulator.issue_token();
    h.simulator.fail_next(1, Fault::Status(503));

    problem(h.get(Some(&token)).await, 503).await;
    assert_eq!(h.simulator.verify_calls_for(&token), 1);
}

#[tokio::test]
async fn no_retry_is_made_when_the_deadline_leaves_no_time() {
    // The first attempt takes the simulator's latency (most of the deadline); no room remains.
    let h = start_with(|b| b.upstream_timeout(Duration::from_millis(400))).await;
    let token = h.simulator.issue_token();
    h.simulator.set_latency(Duration::from_millis(380));
    h.simulator.fail_next(1, Fault::Status(503));

    problem(h.get(Some(&token)).await, 503).await;
    assert_eq!(h.simulator.verify_calls_for(&token), 1);
}

#[tokio::test]
async fn verdicts_are_never_retried() {
    let h = start_with(|b| b.accept_opaque_tokens(true)).await;
    let revoked = h.simulator.issue_token();
    h.simulator.revoke(&revoked);
    problem(h.get(Some(&revoked)).await, 410).await;
    problem(h.get(Some("not-a-uuid-token")).await, 401).await;
    assert_eq!(h.simulator.verify_calls_for(&revoked), 1);
    assert_eq!(h.simulator.verify_calls_for("not-a-uuid-token"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_verifications_never_exceed_the_bound() {
    let h = Arc::new(start_with(|b| b.max_concurrent_verifications(4)).await);
    h.simulator.set_latency(Duration::from_millis(20));
    let tokens: Vec<String> = (0..40).map(|_| h.simulator.issue_token()).collect();

    let requests: Vec<_> = tokens
        .into_iter()
        .map(|token| {
            let h = h.clone();
            tokio::spawn(async move { h.get(Some(&token)).await.status() })
        })
        .collect();
    for request in requests {
        assert_eq!(request.await.unwrap(), 200);
    }

    assert_eq!(h.upstream_calls(), 40);
    assert!(
        h.simulator.max_concurrent_verify_calls() <= 4,
        "{}",
        h.simulator.max_concurrent_verify_calls()
    );
    assert!(
        h.simulator.max_concurrent_verify_calls() >= 2,
        "the requests did overlap"
    );
}

#[tokio::test]
async fn an_open_circuit_fails_fast_but_cached_tokens_keep_working_then_a_probe_closes_it() {
    let h = start_with(|b| {
        b.circuit_breaker_threshold(3)
            .circuit_breaker_cool_down(Duration::from_millis(400))
            .upstream_retry(false)
    })
    .await;
    let cached = h.simulator.issue_token();
    assert_eq!(h.get(Some(&cached)).await.status(), 200);

    h.simulator.set_fault(Fault::Status(500));
    for _ in 0..3 {
        let token = h.simulator.issue_token();
        problem(h.get(Some(&token)).await, 503).await;
    }
    assert_eq!(h.upstream_calls(), 4);

    // Open: no upstream call, a Retry-After for the cool-down, and cached tokens still pass.
    let fresh = h.simulator.issue_token();
    let response = h.get(Some(&fresh)).await;
    assert_eq!(response.headers()["retry-after"], "1");
    problem(response, 503).await;
    assert_eq!(h.upstream_calls(), 4);
    assert_eq!(h.get(Some(&cached)).await.status(), 200);
    assert_eq!(h.inner_calls(), 2);

    // After the cool-down (wall-clock time is the event here), one probe goes through.
    h.simulator.clear_fault();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(h.get(Some(&fresh)).await.status(), 200);
    assert_eq!(h.upstream_calls(), 5);
    let another = h.simulator.issue_token();
    assert_eq!(h.get(Some(&another)).await.status(), 200, "closed again");
}

#[tokio::test]
async fn a_failed_probe_reopens_the_circuit() {
    let h = start_with(|b| {
        b.circuit_breaker_threshold(1)
            .circuit_breaker_cool_down(Duration::from_millis(300))
            .upstream_retry(false)
    })
    .await;
    h.simulator.set_fault(Fault::Status(500));
    problem(h.get(Some(&h.simulator.issue_token())).await, 503).await;
    tokio::time::sleep(Duration::from_millis(400)).await;

    problem(h.get(Some(&h.simulator.issue_token())).await, 503).await;
    assert_eq!(h.upstream_calls(), 2, "the probe went through");
    problem(h.get(Some(&h.simulator.issue_token())).await, 503).await;
    assert_eq!(h.upstream_calls(), 2, "open again: no call");
}

/// Repeats `request` until it answers `status`, for outcomes that land in the background
/// (a refresh's verdict). Bounded: fails after 2 s.
async fn eventually(h: &support::Harness, token: &str, status: u16) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        if h.get(Some(token)).await.status() == status {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never answered {status}"
        );
        tokio::task::yield_now().await;
    }
}

// Refresh-ahead and stale-if-error are about the age of verdicts, so these tests let
// wall-clock time pass on purpose, with TTLs of a few hundred milliseconds and wide margins.

#[tokio::test]
async fn a_verdict_used_late_in_its_life_is_refreshed_in_the_background_without_making_the_request_wait()
 {
    // Refresh once a verdict is 600 ms old; verdicts live 1 s.
    let h = start_with(|b| b.cache_ttl(Duration::from_secs(1)).refresh_ahead_share(0.6)).await;
    let token = h.simulator.issue_token();
    assert_eq!(h.get(Some(&token)).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(700)).await;

    // The upstream is held: a request that waited on it could not complete.
    h.simulator.pause();
    assert_eq!(h.get(Some(&token)).await.status(), 200);
    assert_eq!(h.get(Some(&token)).await.status(), 200);
    h.simulator.wait_for_verify_calls(2).await;
    assert_eq!(
        h.simulator.verify_calls_for(&token),
        2,
        "one refresh at a time"
    );
    h.simulator.resume();

    // Past the first verdict's expiry (1 s), the refreshed one (about 400 ms old, so not yet
    // due for its own refresh) is served without a new call.
    tokio::time::sleep(Duration::from_millis(400)).await;
    eventually(&h, &token, 200).await;
    assert_eq!(h.simulator.verify_calls_for(&token), 2);
    assert_eq!(h.inner_calls(), 4);
}

#[tokio::test]
async fn a_410_from_a_refresh_evicts_the_token_and_the_next_request_is_turned_away() {
    let h = start_with(|b| b.cache_ttl(Duration::from_secs(2)).refresh_ahead_share(0.1)).await;
    let token = h.simulator.issue_token();
    assert_eq!(h.get(Some(&token)).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.simulator.revoke(&token);

    assert_eq!(
        h.get(Some(&token)).await.status(),
        200,
        "served while refreshing"
    );
    h.simulator.wait_for_verify_calls(2).await;
    eventually(&h, &token, 410).await;
    assert_eq!(h.simulator.verify_calls_for(&token), 2);
}

#[tokio::test]
async fn without_refresh_ahead_an_old_verdict_is_not_refreshed() {
    let h = start_with(|b| b.cache_ttl(Duration::from_secs(2)).refresh_ahead(false)).await;
    let token = h.simulator.issue_token();
    assert_eq!(h.get(Some(&token)).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(1700)).await;
    assert_eq!(h.get(Some(&token)).await.status(), 200);
    assert_eq!(h.simulator.verify_calls_for(&token), 1);
}

#[tokio::test]
async fn stale_if_error_serves_an_expired_valid_verdict_while_the_upstream_is_down() {
    let h = start_with(|b| {
        b.cache_ttl(Duration::from_millis(300))
            .refresh_ahead(false)
            .stale_if_error(Duration::from_secs(30))
            .upstream_retry(false)
    })
    .await;
    let token = h.simulator.issue_token();
    let never_seen = h.simulator.issue_token();
    assert_eq!(h.get(Some(&token)).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(400)).await;

    h.simulator.set_fault(Fault::Status(500));
    assert_eq!(
        h.get(Some(&token)).await.status(),
        200,
        "stale verdict used"
    );
    assert_eq!(
        h.simulator.verify_calls_for(&token),
        2,
        "the upstream was asked first"
    );
    problem(h.get(Some(&never_seen)).await, 503).await;
    assert_eq!(h.inner_calls(), 2);
}

#[tokio::test]
async fn stale_if_error_never_overrides_a_verdict_and_is_off_by_default() {
    // Off by default: an expired verdict and a failing upstream give 503.
    let h = start_with(|b| b.cache_ttl(Duration::from_millis(300)).refresh_ahead(false)).await;
    let token = h.simulator.issue_token();
    assert_eq!(h.get(Some(&token)).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(400)).await;
    h.simulator.set_fault(Fault::Status(500));
    problem(h.get(Some(&token)).await, 503).await;

    // On, but the upstream answers 410: the token is refused.
    let h = start_with(|b| {
        b.cache_ttl(Duration::from_millis(300))
            .refresh_ahead(false)
            .stale_if_error(Duration::from_secs(30))
    })
    .await;
    let token = h.simulator.issue_token();
    assert_eq!(h.get(Some(&token)).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(400)).await;
    h.simulator.revoke(&token);
    problem(h.get(Some(&token)).await, 410).await;
    assert_eq!(h.inner_calls(), 1);
}

#[tokio::test]
async fn stale_if_error_ends_after_its_grace() {
    let h = start_with(|b| {
        b.cache_ttl(Duration::from_millis(200))
            .refresh_ahead(false)
            .stale_if_error(Duration::from_millis(200))
            .upstream_retry(false)
    })
    .await;
    let token = h.simulator.issue_token();
    assert_eq!(h.get(Some(&token)).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(600)).await;
    h.simulator.set_fault(Fault::Status(500));
    problem(h.get(Some(&token)).await, 503).await;
}
