//! The shared tier against a real `redis-server` on loopback (see `tests/it/redis_server.rs`).
//! Each test starts its own server; none sleeps for an event it can await.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::redis_server::RedisServer;
use super::*;
use crate::token::TokenHasher;

/// The deadline of the tests about deadlines (the default's order of magnitude).
const TIMEOUT: Duration = Duration::from_millis(50);
/// The deadline of the other tests, which must not fail when a starved machine misses 50 ms.
const RELAXED: Duration = Duration::from_secs(1);
/// What a bound on elapsed time allows beyond the deadline: scheduling on a busy 2-core box.
const MARGIN: Duration = Duration::from_millis(60);
const TOKEN: &str = "ea4f820e-f352-4515-af73-630220045ef0";

struct Replica {
    tier: SharedVerdicts,
    notices: mpsc::UnboundedReceiver<(Notice, Instant)>,
}

impl Replica {
    async fn up(url: &str, cluster_key: &[u8]) -> Self {
        Self::up_with(url, cluster_key, RELAXED).await
    }

    async fn up_with(url: &str, cluster_key: &[u8], timeout: Duration) -> Self {
        let replica = Self::lazy_with(url, cluster_key, timeout);
        replica.tier.check().await.expect("check");
        assert!(replica.tier.is_up());
        replica
    }

    fn lazy(url: &str, cluster_key: &[u8]) -> Self {
        Self::lazy_with(url, cluster_key, RELAXED)
    }

    fn lazy_with(url: &str, cluster_key: &[u8], timeout: Duration) -> Self {
        let (sender, notices) = mpsc::unbounded_channel();
        let tier = SharedVerdicts::new(
            SharedSettings {
                url: url.to_owned(),
                namespace: namespace(cluster_key),
                timeout,
                lease: Duration::from_millis(300),
            },
            Arc::new(move |notice| {
                let _ = sender.send((notice, Instant::now()));
            }),
        )
        .expect("a valid URL");
        Self { tier, notices }
    }

    /// Drops the notices so far.
    fn drain(&mut self) {
        while self.notices.try_recv().is_ok() {}
    }

    /// The next notice that satisfies `wanted`, within `within`.
    async fn notice(&mut self, within: Duration, wanted: impl Fn(&Notice) -> bool) -> Instant {
        let deadline = Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.notices.recv()).await {
                Ok(Some((notice, at))) if wanted(&notice) => return at,
                Ok(Some(_)) => continue,
                Ok(None) => panic!("notices closed"),
                Err(_) => panic!("no such notice within {within:?}"),
            }
        }
    }

    /// Waits (bounded) until the tier says it is up again.
    async fn until_up(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.tier.is_up() {
            assert!(Instant::now() < deadline, "not up again within {within:?}");
            // An up-transition always delivers EvictAll; wait for any notice, briefly.
            let _ = tokio::time::timeout(Duration::from_millis(50), self.notices.recv()).await;
        }
    }
}

fn hash(token: &str) -> TokenHash {
    TokenHasher::from_cluster_key(b"cluster-key").hash(token.as_bytes())
}

fn other(n: u32) -> TokenHash {
    hash(&format!("ea4f820e-f352-4515-af73-6302{n:08x}"))
}

#[tokio::test]
async fn a_put_verdict_is_read_back_with_its_remaining_ttl() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let a = Replica::up(&redis.url(), b"cluster-key").await;
    let key = hash(TOKEN);
    assert_eq!(a.tier.get(&key).await, Ok(None));
    a.tier
        .put(&key, SharedVerdict::Valid, Duration::from_secs(30))
        .await
        .unwrap();
    let (verdict, ttl) = a.tier.get(&key).await.unwrap().expect("stored");
    assert_eq!(verdict, SharedVerdict::Valid);
    assert!(
        ttl <= Duration::from_secs(30) && ttl > Duration::from_secs(29),
        "{ttl:?}"
    );
    a.tier
        .put(&other(1), SharedVerdict::Gone, Duration::from_millis(600))
        .await
        .unwrap();
    let (verdict, ttl) = a.tier.get(&other(1)).await.unwrap().expect("stored");
    assert_eq!(verdict, SharedVerdict::Gone);
    assert!(ttl <= Duration::from_millis(600), "{ttl:?}");
}

#[tokio::test]
async fn a_late_valid_never_overwrites_a_gone() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let a = Replica::up(&redis.url(), b"cluster-key").await;
    let key = hash(TOKEN);
    a.tier
        .put(&key, SharedVerdict::Gone, Duration::from_secs(600))
        .await
        .unwrap();
    a.tier
        .put(&key, SharedVerdict::Valid, Duration::from_secs(30))
        .await
        .unwrap();
    let (verdict, ttl) = a.tier.get(&key).await.unwrap().unwrap();
    assert_eq!(verdict, SharedVerdict::Gone);
    assert!(
        ttl > Duration::from_secs(590),
        "the gone verdict's TTL is kept: {ttl:?}"
    );
    // A valid one is replaced by a gone one.
    a.tier
        .put(&other(2), SharedVerdict::Valid, Duration::from_secs(30))
        .await
        .unwrap();
    a.tier
        .put(&other(2), SharedVerdict::Gone, Duration::from_secs(600))
        .await
        .unwrap();
    assert_eq!(
        a.tier.get(&other(2)).await.unwrap().unwrap().0,
        SharedVerdict::Gone
    );
}

#[tokio::test]
async fn a_lease_is_exclusive_released_by_put_and_expires() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let a = Replica::up(&redis.url(), b"cluster-key").await;
    let b = Replica::up(&redis.url(), b"cluster-key").await;
    let key = hash(TOKEN);
    assert_eq!(a.tier.lease(&key).await, Ok(true));
    assert_eq!(b.tier.lease(&key).await, Ok(false));
    assert_eq!(a.tier.lease(&key).await, Ok(false), "not re-entrant either");
    a.tier
        .put(&key, SharedVerdict::Valid, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(b.tier.lease(&key).await, Ok(true), "put released it");
    // B never puts: the lease (300 ms) expires on its own.
    let taken = Instant::now();
    while !a.tier.lease(&key).await.unwrap() {
        assert!(
            taken.elapsed() < Duration::from_secs(2),
            "the lease never expired"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        taken.elapsed() >= Duration::from_millis(250),
        "{:?}",
        taken.elapsed()
    );
    assert_eq!(a.tier.release(&key).await, Ok(()));
    assert_eq!(b.tier.lease(&key).await, Ok(true), "release gave it back");
}

#[tokio::test]
async fn wait_for_sees_the_winners_put_and_gives_up_when_the_lease_goes() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let a = Replica::up(&redis.url(), b"cluster-key").await;
    let b = Replica::up(&redis.url(), b"cluster-key").await;
    let key = hash(TOKEN);
    assert!(a.tier.lease(&key).await.unwrap());
    assert!(!b.tier.lease(&key).await.unwrap());
    let waiter = {
        let tier = b.tier.clone();
        tokio::spawn(async move {
            let found = tier
                .wait_for(&key, Instant::now() + Duration::from_secs(2))
                .await;
            (found, Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(30)).await; // the "upstream call"
    let put_at = Instant::now();
    a.tier
        .put(&key, SharedVerdict::Valid, Duration::from_secs(30))
        .await
        .unwrap();
    let (found, seen_at) = waiter.await.unwrap();
    assert_eq!(found.unwrap().unwrap().0, SharedVerdict::Valid);
    let lag = seen_at - put_at;
    eprintln!("wait_for saw the winner's put {lag:?} after it");
    assert!(lag < Duration::from_millis(50), "{lag:?}");

    // A winner that gives up (release) lets the waiter go at once, with nothing.
    let key = other(3);
    assert!(a.tier.lease(&key).await.unwrap());
    let tier = b.tier.clone();
    let waiter = tokio::spawn(async move {
        tier.wait_for(&key, Instant::now() + Duration::from_secs(2))
            .await
    });
    a.tier.release(&key).await.unwrap();
    let started = Instant::now();
    assert_eq!(waiter.await.unwrap(), Ok(None));
    assert!(started.elapsed() < Duration::from_secs(1));

    // And the deadline bounds the wait when the winner never answers.
    let key = other(4);
    assert!(a.tier.lease(&key).await.unwrap());
    let started = Instant::now();
    let deadline = started + Duration::from_millis(100);
    assert_eq!(b.tier.wait_for(&key, deadline).await, Ok(None));
    assert!(started.elapsed() < Duration::from_millis(100) + TIMEOUT + MARGIN);
}

#[tokio::test]
async fn invalidate_on_one_replica_evicts_on_another_within_100ms() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let a = Replica::up(&redis.url(), b"cluster-key").await;
    let mut b = Replica::up(&redis.url(), b"cluster-key").await;
    let key = hash(TOKEN);
    a.tier
        .put(&key, SharedVerdict::Valid, Duration::from_secs(30))
        .await
        .unwrap();
    let mut lags = Vec::new();
    for _ in 0..20 {
        b.drain();
        let epoch = b.tier.epoch();
        let sent = Instant::now();
        a.tier.invalidate(&key).await.unwrap();
        let seen = b
            .notice(Duration::from_millis(100), |n| *n == Notice::Evict(key))
            .await;
        assert!(b.tier.epoch() > epoch, "the epoch moved before the notice");
        lags.push(seen - sent);
    }
    assert_eq!(a.tier.get(&key).await, Ok(None), "gone from Redis too");
    lags.sort();
    eprintln!(
        "invalidation notice latency: p50 {:?}, max {:?}",
        lags[lags.len() / 2],
        lags[lags.len() - 1]
    );
    assert!(lags[lags.len() - 1] < Duration::from_millis(100));
}

#[tokio::test]
async fn invalidate_all_clears_the_namespace_and_evicts_everything_everywhere() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let a = Replica::up(&redis.url(), b"cluster-key").await;
    let mut b = Replica::up(&redis.url(), b"cluster-key").await;
    let neighbour = Replica::up(&redis.url(), b"another environment").await;
    // More verdicts than one SCAN batch, written straight in as the tier writes them.
    let mut fill = redis::pipe();
    for n in 0..2500 {
        let key = format!(
            "conneqt-guard:{}:v:{}",
            namespace(b"cluster-key"),
            other(n).to_hex()
        );
        fill.cmd("SET")
            .arg(key)
            .arg("v")
            .arg("PX")
            .arg(30_000)
            .ignore();
    }
    fill.query::<()>(&mut redis.connection()).unwrap();
    assert!(b.tier.get(&other(2499)).await.unwrap().is_some());
    neighbour
        .tier
        .put(&other(1), SharedVerdict::Valid, Duration::from_secs(30))
        .await
        .unwrap();
    b.drain();
    a.tier.invalidate_all().await.unwrap();
    b.notice(Duration::from_millis(100), |n| *n == Notice::EvictAll)
        .await;
    for n in [0, 1, 1234, 2499] {
        assert_eq!(b.tier.get(&other(n)).await, Ok(None));
    }
    assert!(
        neighbour.tier.get(&other(1)).await.unwrap().is_some(),
        "another namespace is untouched"
    );
}

#[tokio::test]
async fn a_gone_put_by_one_replica_evicts_it_on_another() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let a = Replica::up(&redis.url(), b"cluster-key").await;
    let mut b = Replica::up(&redis.url(), b"cluster-key").await;
    let key = hash(TOKEN);
    b.drain();
    a.tier
        .put(&key, SharedVerdict::Valid, Duration::from_secs(30))
        .await
        .unwrap();
    a.tier
        .put(&key, SharedVerdict::Gone, Duration::from_secs(600))
        .await
        .unwrap();
    b.notice(Duration::from_millis(100), |n| *n == Notice::Evict(key))
        .await;
    // Only the gone verdict was announced.
    assert!(b.notices.try_recv().is_err());
}

#[tokio::test]
async fn two_namespaces_on_one_redis_are_isolated() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let prod = Replica::up(&redis.url(), b"prod key").await;
    let mut test = Replica::up(&redis.url(), b"test key").await;
    let key = hash(TOKEN);
    prod.tier
        .put(&key, SharedVerdict::Valid, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(test.tier.get(&key).await, Ok(None));
    assert!(
        test.tier.lease(&key).await.unwrap(),
        "leases are per namespace too"
    );
    test.drain();
    prod.tier.invalidate(&key).await.unwrap();
    prod.tier
        .put(&key, SharedVerdict::Gone, Duration::from_secs(30))
        .await
        .unwrap();
    // A message on prod's channel never reaches test: give it the time one would take.
    let heard = tokio::time::timeout(Duration::from_millis(100), test.notices.recv()).await;
    assert!(heard.is_err(), "{heard:?}");
    assert_ne!(namespace(b"prod key"), namespace(b"test key"));
    assert_eq!(namespace(b"prod key").len(), 16);
}

#[tokio::test]
async fn a_killed_subscription_evicts_everything_and_resubscribes() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let a = Replica::up(&redis.url(), b"cluster-key").await;
    let mut b = Replica::up(&redis.url(), b"cluster-key").await;
    b.drain();
    assert!(redis.kill_pubsub_clients() >= 2);
    b.notice(Duration::from_millis(500), |n| *n == Notice::EvictAll)
        .await;
    b.until_up(Duration::from_secs(5)).await;
    let mut a = a;
    a.until_up(Duration::from_secs(5)).await;
    b.drain();
    let key = hash(TOKEN);
    a.tier.invalidate(&key).await.unwrap();
    b.notice(Duration::from_millis(100), |n| *n == Notice::Evict(key))
        .await;
}

#[tokio::test]
async fn redis_stopped_fails_within_the_deadline_then_at_once_and_comes_back_after_a_restart() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let mut a = Replica::up_with(&redis.url(), b"cluster-key", TIMEOUT).await;
    let b = Replica::up(&redis.url(), b"cluster-key").await;
    let key = hash(TOKEN);
    a.tier
        .put(&key, SharedVerdict::Valid, Duration::from_secs(30))
        .await
        .unwrap();
    a.drain();
    redis.stop();
    let started = Instant::now();
    let first = a.tier.get(&key).await;
    let elapsed = started.elapsed();
    assert_eq!(first, Err(Unavailable));
    assert!(elapsed < TIMEOUT + MARGIN, "{elapsed:?}");
    a.notice(Duration::from_millis(500), |n| *n == Notice::EvictAll)
        .await;
    assert!(!a.tier.is_up());
    // Open circuit: no I/O, no waiting.
    let started = Instant::now();
    for _ in 0..100 {
        assert_eq!(a.tier.get(&key).await, Err(Unavailable));
        assert_eq!(a.tier.lease(&key).await, Err(Unavailable));
    }
    assert!(
        started.elapsed() < Duration::from_millis(20),
        "{:?}",
        started.elapsed()
    );

    redis.restart();
    a.until_up(Duration::from_secs(10)).await;
    let mut b = b;
    b.until_up(Duration::from_secs(10)).await;
    // Sharing resumes: a verdict put by one is read by the other, invalidations arrive.
    a.tier
        .put(&key, SharedVerdict::Valid, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(
        b.tier.get(&key).await.unwrap().unwrap().0,
        SharedVerdict::Valid
    );
    b.drain();
    a.tier.invalidate(&key).await.unwrap();
    b.notice(Duration::from_millis(100), |n| *n == Notice::Evict(key))
        .await;
}

#[tokio::test]
async fn a_paused_redis_is_unavailable_within_the_deadline() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mut a = Replica::up_with(&redis.url(), b"cluster-key", TIMEOUT).await;
    let key = hash(TOKEN);
    a.drain();
    redis.pause(Duration::from_millis(400));
    let started = Instant::now();
    assert_eq!(a.tier.get(&key).await, Err(Unavailable));
    let elapsed = started.elapsed();
    assert!(
        elapsed >= TIMEOUT && elapsed < TIMEOUT + MARGIN,
        "{elapsed:?}"
    );
    a.notice(Duration::from_millis(100), |n| *n == Notice::EvictAll)
        .await;
    a.until_up(Duration::from_secs(5)).await;
    assert_eq!(a.tier.get(&key).await, Ok(None));
}

#[tokio::test]
async fn a_wrong_password_is_auth_refused_and_never_quoted() {
    let Some(redis) = RedisServer::start_with_password("right-horse-battery") else {
        return;
    };
    let wrong = Replica::lazy(&redis.url_with_password("wrong-staple-sekrit"), b"k");
    let problem = wrong.tier.check().await.unwrap_err();
    assert!(
        matches!(problem, SharedProblem::AuthRefused(_)),
        "{problem:?}"
    );
    let shown = format!("{problem} {problem:?} {:?}", wrong.tier);
    assert!(
        !shown.contains("sekrit") && !shown.contains("right-horse"),
        "{shown}"
    );
    assert!(!wrong.tier.is_up());
    // No password at all is refused too; the right one works.
    let none = Replica::lazy(&format!("redis://127.0.0.1:{}", redis.port()), b"k");
    assert!(matches!(
        none.tier.check().await,
        Err(SharedProblem::AuthRefused(_))
    ));
    let right = Replica::up(&redis.url(), b"k").await;
    assert_eq!(right.tier.get(&hash(TOKEN)).await, Ok(None));
    // Nobody listening: unreachable, not refused.
    let port = redis.port();
    drop(redis);
    let gone = Replica::lazy(&format!("redis://127.0.0.1:{port}"), b"k");
    assert!(matches!(
        gone.tier.check().await,
        Err(SharedProblem::Unreachable(_))
    ));
}

#[tokio::test]
async fn redis_never_holds_the_token() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let a = Replica::up(&redis.url(), b"cluster-key").await;
    let key = hash(TOKEN);
    assert!(a.tier.lease(&key).await.unwrap());
    a.tier
        .put(&key, SharedVerdict::Gone, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(a.tier.lease(&key).await.unwrap());
    let everything = redis.keys_and_values();
    assert!(everything.len() >= 2, "{everything:?}");
    let compact = TOKEN.replace('-', "");
    for (key, value) in &everything {
        let value = String::from_utf8_lossy(value);
        for needle in [TOKEN, compact.as_str()] {
            assert!(!key.contains(needle) && !value.contains(needle), "{key}");
        }
        assert!(
            key.starts_with(&format!("conneqt-guard:{}:", namespace(b"cluster-key"))),
            "{key}"
        );
    }
}

#[test]
fn urls_are_checked_without_quoting_them() {
    assert_eq!(check_url("redis://127.0.0.1:6379"), Ok(()));
    assert_eq!(check_url("redis://user:pw@redis.internal/2"), Ok(()));
    assert_eq!(check_url("rediss://:pw@redis.internal:6380"), Ok(()));
    for bad in [
        "http://user:sekrit@redis.internal",
        "redis.internal:6379",
        "unix:///run/redis.sock",
        "rediss://:sekrit@redis.internal:6380/#insecure",
        "redis://:sekrit@redis.internal/notanumber",
        "",
    ] {
        let problem = check_url(bad).unwrap_err();
        assert!(!problem.contains("sekrit"), "{problem}");
        assert!(
            problem.contains("redis://") || problem.contains("#insecure"),
            "{bad:?}: {problem}"
        );
    }
    let settings = SharedSettings {
        url: "redis://:sekrit@redis.internal".into(),
        namespace: namespace(b"k"),
        timeout: TIMEOUT,
        lease: TIMEOUT,
    };
    assert!(!format!("{settings:?}").contains("sekrit"));
    let tier = SharedVerdicts::new(settings, Arc::new(|_| {})).unwrap();
    assert!(!format!("{tier:?}").contains("sekrit"));
    assert!(!tier.is_up(), "down until the first confirmation");
    let keys = [
        default_cluster_key("k", "https://a"),
        default_cluster_key("k", "https://b"),
    ];
    assert_ne!(keys[0], keys[1]);
}

/// Loopback figures for the report: an L2 get's round trip, p50 and p99 (printed, and bounded
/// loosely so that a pathological regression fails).
#[tokio::test]
async fn l2_get_round_trip_on_loopback() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let a = Replica::up(&redis.url(), b"cluster-key").await;
    let key = hash(TOKEN);
    a.tier
        .put(&key, SharedVerdict::Valid, Duration::from_secs(30))
        .await
        .unwrap();
    let mut times = Vec::with_capacity(2000);
    for _ in 0..2000 {
        let started = std::time::Instant::now();
        assert!(a.tier.get(&key).await.unwrap().is_some());
        times.push(started.elapsed());
    }
    times.sort();
    let (p50, p99) = (times[times.len() / 2], times[times.len() * 99 / 100]);
    eprintln!("L2 get round trip on loopback: p50 {p50:?}, p99 {p99:?}");
    assert!(p50 < Duration::from_millis(5), "{p50:?}");
}

/// `rediss://` goes through rustls with ring (no aws-lc in this workspace): against a TLS
/// redis-server whose self-signed certificate no root vouches for, the handshake runs and is
/// refused, and the check says "unreachable", not a panic and not "refused credentials".
#[tokio::test]
async fn rediss_speaks_tls_through_rustls_and_an_untrusted_certificate_is_unreachable() {
    let Some(openssl) = super::system::program("openssl", "openssl") else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("conneqt-guard-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = std::process::Command::new(openssl)
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(made.success(), "openssl req");
    let Some((_redis, tls_port)) = RedisServer::start_with_tls(&cert, &key) else {
        return;
    };
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", tls_port)).is_ok(),
        "the TLS port listens"
    );
    let tier = Replica::lazy(&format!("rediss://:sekrit@localhost:{tls_port}"), b"k");
    let problem = tier.tier.check().await.unwrap_err();
    assert!(
        matches!(problem, SharedProblem::Unreachable(_)),
        "{problem:?}"
    );
    eprintln!("rediss:// with an untrusted certificate: {problem}");
    assert!(
        format!("{problem}").contains("certificate"),
        "the TLS handshake ran: {problem}"
    );
    assert!(!format!("{problem}").contains("sekrit"));
    assert!(
        rustls::crypto::CryptoProvider::get_default().is_some(),
        "a default provider is in place"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_valid_verdict_under_way_during_an_invalidation_is_not_stored() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let a = Replica::up(&redis.url(), b"cluster-key").await;
    let b = Replica::up(&redis.url(), b"cluster-key").await;
    let key = hash(TOKEN);
    // B took the lease and asked the upstream; meanwhile the user logged out on A.
    assert!(b.tier.lease(&key).await.unwrap());
    a.tier.invalidate(&key).await.unwrap();
    b.tier
        .put(&key, SharedVerdict::Valid, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(a.tier.get(&key).await, Ok(None), "the logout stands");
    assert!(
        a.tier.lease(&key).await.unwrap(),
        "and the lease was released"
    );
    // A gone verdict is stored whatever the mark.
    a.tier
        .put(&key, SharedVerdict::Gone, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(
        a.tier.get(&key).await.unwrap().unwrap().0,
        SharedVerdict::Gone
    );

    // The same after invalidate_all, for every token.
    let other_key = other(7);
    let marked = std::time::Instant::now();
    a.tier.invalidate_all().await.unwrap();
    b.tier
        .put(&other_key, SharedVerdict::Valid, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(a.tier.get(&other_key).await, Ok(None));

    // Once the mark has lapsed (one lease, 300 ms here), valid verdicts are shared again.
    let lapsed = marked + Duration::from_millis(300);
    loop {
        b.tier
            .put(&other_key, SharedVerdict::Valid, Duration::from_secs(30))
            .await
            .unwrap();
        if a.tier.get(&other_key).await.unwrap().is_some() {
            break;
        }
        assert!(
            std::time::Instant::now() < lapsed + Duration::from_secs(5),
            "the mark never lapsed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        std::time::Instant::now() >= lapsed,
        "the mark lapsed too soon"
    );
}
