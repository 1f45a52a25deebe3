//! Several replicas, one cache: layers that share a real `redis-server` (started on a free
//! loopback port) and one simulator. Each replica is its own `AccessTokenLayer` (its own L1
//! cache and its own Redis connections) behind its own server, as separate processes would be.
//!
//! Skipped, with one line saying what to install, where `redis-server` is missing (unless
//! `CONNEQT_REQUIRE_SYSTEM_TESTS=1`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use conneqt_guard::{AccessTokenLayer, AccessTokenLayerBuilder};
use conneqt_guard_simulator::Simulator;

use crate::redis_server::RedisServer;
use crate::support::{self, App, TOKEN_HEADER};

/// How long a revocation may take to reach every replica (the issue's target).
const ENFORCED_WITHIN: Duration = Duration::from_millis(100);

struct Cluster {
    sim: Arc<Simulator>,
    redis: RedisServer,
    replicas: Vec<Replica>,
    client: reqwest::Client,
}

struct Replica {
    guard: AccessTokenLayer,
    app: App,
}

/// `n` replicas on one simulator and one Redis, each built by `configure` from the shared
/// settings (simulator, Redis URL, cluster key). `None` when redis-server is missing.
async fn cluster(
    n: usize,
    configure: impl Fn(AccessTokenLayerBuilder) -> AccessTokenLayerBuilder,
) -> Option<Cluster> {
    let redis = RedisServer::start()?;
    let sim = Arc::new(Simulator::start().await.unwrap());
    let mut replicas = Vec::new();
    for _ in 0..n {
        let builder = support::builder_for(&sim)
            .redis_url(redis.url())
            .cluster_key("replicas test cluster key");
        let guard = configure(builder).build().unwrap();
        // As the sidecar does at start-up: the tier is reachable and accepts us.
        assert!(guard.check_connection().await.is_ok());
        let app = support::serve(guard.clone()).await;
        replicas.push(Replica { guard, app });
    }
    Some(Cluster {
        sim,
        redis,
        replicas,
        client: support::client(),
    })
}

impl Cluster {
    async fn status(&self, replica: usize, token: &str) -> u16 {
        self.client
            .get(self.replicas[replica].app.url("/messages"))
            .header(TOKEN_HEADER, token)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    fn inner_calls(&self) -> usize {
        self.replicas.iter().map(|r| r.app.inner_calls()).sum()
    }

    /// Asks `replica` until it answers `status`, at most `within` (then panics); how long
    /// it took.
    async fn until(&self, replica: usize, token: &str, status: u16, within: Duration) -> Duration {
        let start = Instant::now();
        loop {
            if self.status(replica, token).await == status {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < within,
                "replica {replica} did not answer {status} within {within:?}"
            );
            tokio::task::yield_now().await;
        }
    }

    /// Every replica has the token's valid verdict in its own cache.
    async fn warm(&self, token: &str) {
        for replica in 0..self.replicas.len() {
            assert_eq!(self.status(replica, token).await, 200);
        }
    }
}

#[tokio::test]
async fn sixty_requests_with_one_token_over_three_replicas_make_one_upstream_call() {
    let Some(c) = cluster(3, |b| b).await else {
        return;
    };
    let token = c.sim.issue_token();
    for i in 0..60 {
        assert_eq!(c.status(i % 3, &token).await, 200, "request {i}");
    }
    assert_eq!(c.sim.verify_calls(), 1);
    assert_eq!(c.inner_calls(), 60);
}

#[tokio::test]
async fn thirty_concurrent_first_requests_over_three_replicas_make_one_upstream_call() {
    let Some(c) = cluster(3, |b| b).await else {
        return;
    };
    // Slow enough that every request arrives while the first verification is under way.
    c.sim.set_latency(Duration::from_millis(300));
    let token = c.sim.issue_token();
    let requests: Vec<_> = (0..30)
        .map(|i| {
            let request = c
                .client
                .get(c.replicas[i % 3].app.url("/messages"))
                .header(TOKEN_HEADER, &token);
            tokio::spawn(async move { request.send().await.unwrap().status() })
        })
        .collect();
    for request in requests {
        assert_eq!(request.await.unwrap(), 200);
    }
    assert_eq!(c.sim.verify_calls(), 1);
    assert_eq!(c.inner_calls(), 30);
}

#[tokio::test]
async fn invalidate_on_one_replica_is_enforced_on_every_replica() {
    let Some(c) = cluster(3, |b| b.cache_ttl(Duration::from_secs(600))).await else {
        return;
    };
    let token = c.sim.issue_token();
    c.warm(&token).await;
    c.sim.revoke(&token);
    for replica in 0..3 {
        assert_eq!(c.status(replica, &token).await, 200, "still cached");
    }
    assert_eq!(c.sim.verify_calls(), 1);

    c.replicas[0].guard.invalidate(&token).await;
    for replica in [1, 2, 0] {
        let took = c.until(replica, &token, 410, ENFORCED_WITHIN).await;
        eprintln!("replica {replica}: invalidation enforced after {took:?}");
    }
    // Verified again once for the three of them; the 410 is shared.
    assert_eq!(c.sim.verify_calls(), 2);
    assert_eq!(
        c.inner_calls(),
        6,
        "no request with the revoked token reached the service"
    );
}

#[tokio::test]
async fn invalidate_all_on_one_replica_is_enforced_on_every_replica() {
    let Some(c) = cluster(3, |b| b.cache_ttl(Duration::from_secs(600))).await else {
        return;
    };
    let tokens = [c.sim.issue_token(), c.sim.issue_token()];
    for token in &tokens {
        c.warm(token).await;
        c.sim.revoke(token);
    }
    c.replicas[2].guard.invalidate_all().await;
    for token in &tokens {
        for replica in 0..3 {
            c.until(replica, token, 410, ENFORCED_WITHIN).await;
        }
    }
    assert_eq!(c.sim.verify_calls(), 4);
    assert_eq!(
        c.inner_calls(),
        6,
        "no request with a revoked token reached the service"
    );
}

#[tokio::test]
async fn a_gone_found_by_one_replicas_refresh_reaches_the_others_before_their_entries_expire() {
    // Refresh after 100 ms; entries live 10 minutes, so only the revocation can end them.
    let Some(c) = cluster(3, |b| {
        b.cache_ttl(Duration::from_secs(600))
            .refresh_ahead(true)
            .refresh_ahead_share(0.000_2)
    })
    .await
    else {
        return;
    };
    let token = c.sim.issue_token();
    c.warm(&token).await;
    c.sim.revoke(&token);
    // Replica 0 serves the cached verdict while its refresh learns the 410.
    c.until(0, &token, 410, Duration::from_secs(5)).await;
    let calls = c.sim.verify_calls();
    for replica in [1, 2] {
        let took = c.until(replica, &token, 410, ENFORCED_WITHIN).await;
        eprintln!("replica {replica}: 410 from replica 0's refresh after {took:?}");
    }
    assert_eq!(
        c.sim.verify_calls(),
        calls,
        "the others read the 410 from Redis"
    );
    let forwarded = c.inner_calls();
    for replica in 0..3 {
        assert_eq!(c.status(replica, &token).await, 410);
    }
    assert_eq!(
        c.inner_calls(),
        forwarded,
        "the 410s never reach the service"
    );
    assert_eq!(c.sim.verify_calls(), calls, "and cost no upstream call");
}

#[tokio::test]
async fn with_redis_down_or_slow_valid_tokens_pass_revoked_ones_do_not_and_sharing_resumes() {
    let redis_timeout = Duration::from_millis(50);
    let Some(mut c) = cluster(3, |b| b.redis_timeout(redis_timeout)).await else {
        return;
    };
    let valid = c.sim.issue_token();
    let revoked = c.sim.issue_token();
    c.warm(&valid).await;
    c.sim.revoke(&revoked);
    // The longest a request may take: the Redis deadline, the upstream call, and slack for a
    // loaded 2-core machine (a bound against hanging on Redis, not a speed test).
    let bound = redis_timeout + Duration::from_millis(1500);

    for outage in ["down", "slow"] {
        match outage {
            "down" => c.redis.stop(),
            _ => c.redis.pause(Duration::from_secs(3)),
        }
        let fresh = c.sim.issue_token();
        for replica in 0..3 {
            for (token, expected) in [(&valid, 200), (&fresh, 200), (&revoked, 410)] {
                let (start, forwarded) = (Instant::now(), c.inner_calls());
                assert_eq!(c.status(replica, token).await, expected, "{outage}");
                assert!(
                    start.elapsed() < bound,
                    "{outage}: took {:?}",
                    start.elapsed()
                );
                let reached = usize::from(expected == 200);
                assert_eq!(c.inner_calls(), forwarded + reached, "{outage}");
            }
        }
        if outage == "down" {
            c.redis.restart();
        }
        // Sharing resumes: a new token used on one replica and then another costs one call.
        let resumed = Instant::now();
        loop {
            let probe = c.sim.issue_token();
            assert_eq!(c.status(0, &probe).await, 200);
            assert_eq!(c.status(1, &probe).await, 200);
            if c.sim.verify_calls_for(&probe) == 1 {
                break;
            }
            assert!(
                resumed.elapsed() < Duration::from_secs(10),
                "{outage}: sharing never resumed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!("{outage}: sharing resumed after {:?}", resumed.elapsed());
    }
    let forwarded = c.inner_calls();
    assert_eq!(c.status(2, &revoked).await, 410);
    assert_eq!(
        c.inner_calls(),
        forwarded,
        "the revoked token never reached the service"
    );
}

#[tokio::test]
async fn a_replica_that_missed_the_invalidation_message_does_not_serve_the_token() {
    let Some(c) = cluster(2, |b| b.cache_ttl(Duration::from_secs(600))).await else {
        return;
    };
    let token = c.sim.issue_token();
    c.warm(&token).await;
    c.sim.revoke(&token);
    // Cut every subscriber: the message below may be lost.
    assert!(c.redis.kill_pubsub_clients() >= 2);
    c.replicas[0].guard.invalidate(&token).await;
    c.until(1, &token, 410, Duration::from_secs(2)).await;
    assert_eq!(c.inner_calls(), 2);
}

#[tokio::test]
async fn two_cluster_keys_on_one_redis_never_share_verdicts_and_the_token_is_never_stored() {
    let Some(c) = cluster(1, |b| b).await else {
        return;
    };
    let other = support::builder_for(&c.sim)
        .redis_url(c.redis.url())
        .cluster_key("another environment")
        .build()
        .unwrap();
    let other = support::serve(other).await;
    let token = c.sim.issue_token();
    assert_eq!(c.status(0, &token).await, 200);
    let response = c
        .client
        .get(other.url("/messages"))
        .header(TOKEN_HEADER, &token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        c.sim.verify_calls(),
        2,
        "each cluster verified the token itself"
    );

    let gone = c.sim.issue_token();
    c.sim.revoke(&gone);
    let forwarded = c.inner_calls();
    assert_eq!(c.status(0, &gone).await, 410);
    assert_eq!(
        c.inner_calls(),
        forwarded,
        "the 410 never reached the service"
    );
    assert_eq!(c.sim.verify_calls_for(&gone), 1);
    let stored = c.redis.keys_and_values();
    assert!(!stored.is_empty(), "the verdicts are in Redis");
    let simple = |t: &str| t.replace('-', "");
    for (key, value) in &stored {
        let value = String::from_utf8_lossy(value);
        for t in [&token, &gone] {
            for form in [t.to_string(), simple(t), t.to_uppercase()] {
                assert!(
                    !key.contains(&form) && !value.contains(&form),
                    "{key}: {value}"
                );
            }
        }
    }
}
