//! Three replicas on one Redis (the shared verdict tier, issue 11), measured: upstream calls per
//! token under a hot-token load, the latency of an L2 hit, and how long an invalidation takes
//! to be enforced by the other replicas.
//!
//! Run with `cargo bench -p conneqt-guard-benches --bench replicas`. It prints its figures; it
//! asserts nothing about time (the machine is shared and noisy), only reports. Without
//! `redis-server` on the machine (`apt-get install redis-server`) it says so in one line and
//! exits successfully.
//!
//! # Set-up
//!
//! One `redis-server` of the bench's own on a free loopback port (`tests/it/redis_server.rs`),
//! one [`Simulator`] on a runtime and thread of its own (as the upstream would be another
//! process) with a verify latency of [`UPSTREAM_LATENCY`], and three replicas in this process:
//! each its own `AccessTokenLayer` (its own L1 cache, its own Redis connection and
//! subscription) over a trivial inner service, called in-process with
//! `tower::ServiceExt::oneshot` as `scenarios.rs` does; no HTTP server between the caller and
//! the layer (the sidecar's figures, over HTTP, come from `replicas_sidecar.sh`). Every
//! request goes through one replica's layer, so "replica A then replica B" is exactly what a
//! load balancer spreading requests over three processes would produce, minus the network
//! hop to the replica.
//!
//! # What is measured
//!
//! 1. **Upstream calls per token per TTL.** `cache_ttl` [`HOT_TTL`], refresh-ahead on (the
//!    default, at 0.8 of the TTL), for [`HOT_RUN`]: one hot token and [`WARM_TOKENS`] warm
//!    ones requested continuously, round-robin over the three replicas: every millisecond,
//!    [`HOT_WORKERS`] times, the hot token to one replica and the next warm token to the next.
//!    Open loop: a tick's requests are sent whether or not earlier ones were answered, as
//!    independent clients would send them (in a closed loop a slow miss delays every later
//!    request; without the tier, 150 token-replica pairs at a 20 ms miss each then take longer
//!    than the TTL to go round, so every entry expires before its next use). Reported per
//!    token: the simulator's verify calls, per TTL window, against the target `1 + expiries`
//!    (one first verification, then at most one per TTL), and when the hot token's calls came;
//!    and the same load on three replicas without the tier (each its own cache).
//! 2. **L2 hit latency.** Replica A verifies [`LATENCY_TOKENS`] tokens (at no upstream
//!    latency: set-up); then replica B asks for each once (an L1 miss answered from Redis:
//!    one round trip), and at once again (an L1 hit), timed the same way, one request at a
//!    time. For contrast, a miss in both tiers (L2 read, lease, upstream, L2 write) on
//!    replica C, at the simulator's latency and at none. And, as a reference for the L2 hit,
//!    the one Redis round trip it makes (`GET` + `PTTL` pipelined) sent bare through
//!    redis-rs's `ConnectionManager` on the same runtime. The bench's runtime has two worker
//!    threads; the L2 figures are measured again on a current-thread runtime (each of the
//!    sidecar's workers runs one), where no hand-over between threads sits on the path.
//! 3. **Invalidation to enforcement.** For [`INVALIDATED_TOKENS`] tokens, one at a time: every
//!    replica has the valid verdict cached, the simulator revokes the token, replica 0 calls
//!    `invalidate`, and replicas 1 and 2 are asked (in turn, without pause) until each answers
//!    `410` (both polled at once, each in a loop of its own). Reported from just before
//!    `invalidate`: when the first request that no longer found the verdict in L1 was sent
//!    (the pub/sub notice had arrived), and when its `410` came back (that request also
//!    verified the token again, once for both replicas, at the upstream's latency). Measured
//!    at the simulator's latency and at none. Caching each token on every replica is done at
//!    no latency, to save time (set-up, not measured).

#[path = "../tests/it/redis_server.rs"]
mod redis_server;
// Only `Ok200`, `request`, `percentile` and the header name are needed here.
#[allow(dead_code)]
mod support;
#[path = "../tests/it/system.rs"]
mod system;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use conneqt_guard::{AccessTokenLayer, AccessTokenService};
use conneqt_guard_simulator::Simulator;
use tokio::runtime::Runtime;
use tower::{Layer as _, ServiceExt as _};

use redis_server::RedisServer;
use support::{Ok200, percentile, request};

/// The simulator's verify latency: small, but enough to see who waits on the upstream.
const UPSTREAM_LATENCY: Duration = Duration::from_millis(20);
/// The replicas.
const REPLICAS: usize = 3;
/// The cluster key every replica of the bench shares.
const CLUSTER_KEY: &str = "replicas bench cluster key";

/// Scenario 1: the TTL, the run's length, the warm tokens besides the hot one, the workers.
const HOT_TTL: Duration = Duration::from_secs(2);
const HOT_RUN: Duration = Duration::from_secs(10);
const WARM_TOKENS: usize = 50;
const HOT_WORKERS: usize = 3;
/// The layer's default `refresh_ahead_share`.
const REFRESH_SHARE: f64 = 0.8;

/// Scenario 2: tokens verified by replica A and then asked of replica B; misses timed.
const LATENCY_TOKENS: usize = 2_000;
const MISSES: usize = 200;

/// Scenario 3: tokens invalidated one after the other.
const INVALIDATED_TOKENS: usize = 200;
/// How long one replica may take to enforce an invalidation before the bench gives up on it
/// (reported as a miss of the target, not a failure).
const ENFORCE_AT_MOST: Duration = Duration::from_secs(5);

fn main() {
    // `cargo test --benches` runs bench targets without `--bench`; only run under `cargo bench`.
    if !std::env::args().any(|arg| arg == "--bench") {
        return;
    }
    if !on_path("redis-server") && !std::path::Path::new("/usr/bin/redis-server").is_file() {
        println!(
            "replicas: redis-server is not installed, nothing measured; apt-get install redis-server"
        );
        return;
    }
    let redis = RedisServer::start().expect("redis-server is installed");
    let upstream = Upstream::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let started = Instant::now();
    runtime.block_on(async {
        let sim = upstream.sim();
        println!(
            "Three replicas in one process (in-process tower calls), one redis-server {} and one \
             simulator on loopback, upstream latency {UPSTREAM_LATENCY:?}, {} cores:",
            redis_version(&redis),
            std::thread::available_parallelism().map_or(0, |n| n.get()),
        );
        println!();
        hot_tokens(sim, &redis).await;
        println!();
        l2_latency(sim, &redis, Flavour::MultiThread).await;
        println!();
        invalidation(sim, &redis).await;
    });
    println!();
    // Scenario 2 again on a current-thread runtime, as each of the sidecar's workers runs one:
    // no hand-over between worker threads on the L2 hit's path.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(l2_latency(upstream.sim(), &redis, Flavour::CurrentThread));
    println!();
    println!(
        "replicas: the whole run took {:.0} s",
        started.elapsed().as_secs_f64()
    );
}

/// One replica: its layer (for `invalidate`) and the service it guards.
struct Replica {
    guard: AccessTokenLayer,
    service: AccessTokenService<Ok200>,
}

impl Replica {
    async fn status(&self, token: &str) -> u16 {
        self.service
            .clone()
            .oneshot(request(token))
            .await
            .expect("the service never fails")
            .status()
            .as_u16()
    }

    /// The status and how long the call took (the request is built before the clock starts).
    async fn timed(&self, token: &str) -> (u16, Duration) {
        let (service, request) = (self.service.clone(), request(token));
        let started = Instant::now();
        let response = service.oneshot(request).await.expect("never fails");
        (response.status().as_u16(), started.elapsed())
    }
}

/// [`REPLICAS`] replicas on the simulator, with the tier (on `redis`) or without, each with
/// `cache_ttl`; each checked (with the tier, that also waits until it is subscribed).
async fn replicas(sim: &Simulator, redis: Option<&RedisServer>, ttl: Duration) -> Vec<Replica> {
    let mut replicas = Vec::new();
    for _ in 0..REPLICAS {
        let mut builder = AccessTokenLayer::builder()
            .base_url(sim.base_url())
            .api_key(sim.api_key())
            .cache_ttl(ttl);
        if let Some(redis) = redis {
            builder = builder.redis_url(redis.url()).cluster_key(CLUSTER_KEY);
        }
        let guard = builder.build().expect("valid settings");
        let status = guard.check_connection().await;
        assert!(status.is_ok(), "{status}");
        let service = guard.layer(Ok200);
        replicas.push(Replica { guard, service });
    }
    replicas
}

/// Scenario 1, with and without the tier.
async fn hot_tokens(sim: &Simulator, redis: &RedisServer) {
    let windows = HOT_RUN.as_secs_f64() / HOT_TTL.as_secs_f64();
    println!(
        "1. Upstream calls per token: cache_ttl {HOT_TTL:?}, refresh-ahead on (default), {HOT_RUN:?} \
         ({windows:.0} TTL windows), one hot and {WARM_TOKENS} warm tokens, round-robin over \
         {REPLICAS} replicas; target per token <= 1 + {windows:.0} expiries = {:.0} calls",
        1.0 + windows
    );
    println!(
        "  {:<30} {:>9} {:>10} {:>11} {:>14} {:>14} {:>9} {:>9}",
        "", "requests", "non-200", "hot calls", "hot per TTL", "warm per TTL", "p50", "p99"
    );
    for (name, tier) in [
        ("shared tier (one Redis)", Some(redis)),
        ("no tier (3 separate caches)", None),
    ] {
        let run = hot_run(sim, tier).await;
        let warm_mean = run.warm_calls.iter().sum::<usize>() as f64 / run.warm_calls.len() as f64;
        let warm_max = run.warm_calls.iter().max().copied().unwrap_or(0);
        let non_200: usize = run
            .statuses
            .iter()
            .filter(|(status, _)| **status != 200)
            .map(|(_, n)| n)
            .sum();
        println!(
            "  {name:<30} {:>9} {non_200:>10} {:>11} {:>14.2} {:>14} {:>9.1?} {:>9.1?}",
            run.requests,
            run.hot_calls,
            run.hot_calls as f64 / windows,
            format!("{:.2} (max {warm_max})", warm_mean / windows),
            percentile(&run.latencies, 0.50),
            percentile(&run.latencies, 0.99),
        );
        if non_200 > 0 {
            println!("    statuses: {:?}", run.statuses);
        }
        let times: Vec<String> = run
            .hot_call_times
            .iter()
            .map(|t| format!("{:.2}", t.as_secs_f64()))
            .collect();
        println!(
            "    the hot token's calls, seconds into the run: {}",
            times.join(", ")
        );
    }
    let refresh_every = HOT_TTL.mul_f64(REFRESH_SHARE);
    println!(
        "  (calls per TTL: a token's verify calls over the run divided by the {windows:.0} windows; \
         \"warm\" is the mean over the {WARM_TOKENS} warm tokens, max = the most any one made. \
         Refresh-ahead re-verifies a token in use once it is {REFRESH_SHARE} of the TTL old, so a \
         token in steady use with the tier makes 1 + {HOT_RUN:?} / {refresh_every:?} = {:.0} calls)",
        1.0 + (HOT_RUN.as_secs_f64() / refresh_every.as_secs_f64()).floor()
    );
}

struct HotRun {
    requests: usize,
    statuses: BTreeMap<u16, usize>,
    hot_calls: usize,
    /// When each of the hot token's calls was seen, from the start of the run.
    hot_call_times: Vec<Duration>,
    warm_calls: Vec<usize>,
    latencies: Vec<Duration>,
}

async fn hot_run(sim: &Simulator, tier: Option<&RedisServer>) -> HotRun {
    let replicas = Arc::new(replicas(sim, tier, HOT_TTL).await);
    let hot = Arc::new(sim.issue_token());
    let warm: Vec<Arc<String>> = (0..WARM_TOKENS)
        .map(|_| Arc::new(sim.issue_token()))
        .collect();
    let mut statuses = BTreeMap::<u16, usize>::new();
    let mut latencies = Vec::new();
    let mut record = |(status, took): (u16, Duration)| {
        *statuses.entry(status).or_default() += 1;
        latencies.push(took);
    };
    // Open loop: the requests of a tick are sent whether or not those of earlier ticks have
    // been answered, as independent clients would send them.
    let mut in_flight = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let begin = Instant::now();
    let end = begin + HOT_RUN;
    let mut step = 0usize;
    // When the hot token's verify calls reached the upstream (to the tick).
    let mut hot_call_times = Vec::new();
    while Instant::now() < end {
        tick.tick().await;
        let calls = sim.verify_calls_for(&hot);
        if calls > hot_call_times.len() {
            hot_call_times.resize(calls, begin.elapsed());
        }
        for _ in 0..HOT_WORKERS {
            let warm_token = &warm[step % warm.len()];
            for (replica, token) in [(step, &hot), (step + 1, warm_token)] {
                let (replicas, token) = (replicas.clone(), token.clone());
                in_flight.spawn(async move { replicas[replica % REPLICAS].timed(&token).await });
            }
            step += 1;
        }
        while let Some(done) = in_flight.try_join_next() {
            record(done.expect("a request panicked"));
        }
    }
    while let Some(done) = in_flight.join_next().await {
        record(done.expect("a request panicked"));
    }
    latencies.sort();
    HotRun {
        requests: latencies.len(),
        statuses,
        hot_calls: sim.verify_calls_for(&hot),
        hot_call_times,
        warm_calls: warm.iter().map(|t| sim.verify_calls_for(t)).collect(),
        latencies,
    }
}

/// The runtime a scenario runs on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Flavour {
    /// Two worker threads (the bench's main runtime).
    MultiThread,
    /// One thread (as each sidecar worker).
    CurrentThread,
}

/// Scenario 2 (the misses only on the multi-thread runtime).
async fn l2_latency(sim: &Simulator, redis: &RedisServer, flavour: Flavour) {
    let replicas = replicas(sim, Some(redis), Duration::from_secs(600)).await;
    let tokens: Vec<String> = (0..LATENCY_TOKENS).map(|_| sim.issue_token()).collect();
    // Replica A's verifications are set-up, not measured: no latency, to save time.
    sim.set_latency(Duration::ZERO);
    for token in &tokens {
        assert_eq!(replicas[0].status(token).await, 200);
    }
    sim.set_latency(UPSTREAM_LATENCY);
    let calls_before = sim.verify_calls();
    let (mut l2, mut l1) = (Vec::new(), Vec::new());
    for token in &tokens {
        let (status, took) = replicas[1].timed(token).await;
        assert_eq!(status, 200);
        l2.push(took);
        let (status, took) = replicas[1].timed(token).await;
        assert_eq!(status, 200);
        l1.push(took);
    }
    let reached = sim.verify_calls() - calls_before;
    let mut misses = Vec::new();
    let miss_latencies = match flavour {
        Flavour::MultiThread => vec![UPSTREAM_LATENCY, Duration::ZERO],
        Flavour::CurrentThread => vec![],
    };
    for latency in miss_latencies {
        sim.set_latency(latency);
        let mut timings = Vec::new();
        for _ in 0..MISSES {
            let token = sim.issue_token();
            let (status, took) = replicas[2].timed(&token).await;
            assert_eq!(status, 200);
            timings.push(took);
        }
        misses.push((latency, timings));
    }
    sim.set_latency(UPSTREAM_LATENCY);

    match flavour {
        Flavour::MultiThread => println!(
            "2. Latency on loopback, one request at a time (replica A verified {LATENCY_TOKENS} tokens; \
             replica B asks for each: L2 hit, then at once again: L1 hit); target L2 hit p50 < 100 µs"
        ),
        Flavour::CurrentThread => println!(
            "2b. The same on a current-thread runtime (as each sidecar worker runs), misses left out"
        ),
    }
    println!(
        "  {:<44} {:>6} {:>9} {:>9} {:>9} {:>9}",
        "", "n", "p50", "p90", "p99", "max"
    );
    row("L1 hit (replica B, second request)", &mut l1);
    row("L2 hit (replica B, first request)", &mut l2);
    for (latency, timings) in &mut misses {
        row(
            &format!("miss in both tiers, upstream latency {latency:?}"),
            timings,
        );
    }
    let mut bare = bare_redis_round_trips(redis, &tokens).await;
    row("for reference: a bare GET + PTTL (redis-rs)", &mut bare);
    println!(
        "  (upstream calls made by replica B's {LATENCY_TOKENS} L2 hits: {reached}; the reference \
         row is the L2 hit's one round trip alone, pipelined as the tier sends it, through \
         redis-rs's ConnectionManager on this runtime, without the guard)"
    );
}

/// One `GET` + `PTTL` pipeline per token, as the tier's L2 read sends it (on keys that are not
/// there: the round trip is the same), timed one at a time.
async fn bare_redis_round_trips(redis: &RedisServer, tokens: &[String]) -> Vec<Duration> {
    let client = redis::Client::open(redis.url()).expect("our own URL");
    let mut manager = redis::aio::ConnectionManager::new(client)
        .await
        .expect("a connection");
    let mut timings = Vec::with_capacity(tokens.len());
    for (i, _) in tokens.iter().enumerate() {
        let key = format!("conneqt-guard:bench:v:{i:032x}");
        let started = Instant::now();
        let (value, ttl): (Option<Vec<u8>>, i64) = redis::pipe()
            .get(&key)
            .pttl(&key)
            .query_async(&mut manager)
            .await
            .expect("GET + PTTL");
        timings.push(started.elapsed());
        std::hint::black_box((value, ttl));
    }
    timings
}

/// Scenario 3, at the simulator's latency and at none.
async fn invalidation(sim: &Simulator, redis: &RedisServer) {
    println!(
        "3. Invalidation to enforcement: {INVALIDATED_TOKENS} tokens, one at a time; every replica \
         has the token cached, the simulator revokes it, replica 0 calls invalidate, replicas 1 \
         and 2 are asked until each answers 410; target p99 < 100 ms"
    );
    println!(
        "  {:<44} {:>6} {:>9} {:>9} {:>9} {:>9}",
        "from just before invalidate() to", "n", "p50", "p90", "p99", "max"
    );
    for latency in [UPSTREAM_LATENCY, Duration::ZERO] {
        let replicas = replicas(sim, Some(redis), Duration::from_secs(600)).await;
        let calls_before = sim.verify_calls();
        let (mut noticed, mut enforced, mut invalidate_took) = (Vec::new(), Vec::new(), Vec::new());
        let mut late = 0;
        for _ in 0..INVALIDATED_TOKENS {
            let token = sim.issue_token();
            // Caching it everywhere is set-up, not measured: no latency, to save time.
            sim.set_latency(Duration::ZERO);
            for replica in &replicas {
                assert_eq!(replica.status(&token).await, 200);
            }
            sim.set_latency(latency);
            sim.revoke(&token);
            let started = Instant::now();
            replicas[0].guard.invalidate(&token).await;
            invalidate_took.push(started.elapsed());
            // Replicas 1 and 2 polled at once, each in a loop of its own.
            let (one, two) = tokio::join!(
                until_gone(&replicas[1], &token, started),
                until_gone(&replicas[2], &token, started)
            );
            for result in [one, two] {
                match result {
                    Some((asked, answered)) => {
                        noticed.push(asked);
                        enforced.push(answered);
                    }
                    None => late += 1,
                }
            }
        }
        let calls = sim.verify_calls() - calls_before;
        println!("  upstream latency {latency:?}:");
        row("  invalidate() returned (replica 0)", &mut invalidate_took);
        row("  a replica's L1 no longer had the verdict", &mut noticed);
        row("  the replica answered 410", &mut enforced);
        println!(
            "    (upstream calls: {calls} for {INVALIDATED_TOKENS} tokens, 2 each expected: the \
             first verification, then one re-verification shared by replicas 1 and 2{})",
            if late > 0 {
                format!("; {late} replica answers still 200 after {ENFORCE_AT_MOST:?}")
            } else {
                String::new()
            }
        );
    }
    sim.set_latency(UPSTREAM_LATENCY);
}

/// Asks `replica` for `token` until it answers `410`: when (since `started`) the request that
/// got the `410` was sent and when it was answered; `None` past [`ENFORCE_AT_MOST`].
async fn until_gone(
    replica: &Replica,
    token: &str,
    started: Instant,
) -> Option<(Duration, Duration)> {
    loop {
        let asked = started.elapsed();
        if asked > ENFORCE_AT_MOST {
            return None;
        }
        match replica.status(token).await {
            410 => return Some((asked, started.elapsed())),
            status => assert_eq!(status, 200, "a cached valid verdict, until the notice"),
        }
        tokio::task::yield_now().await;
    }
}

/// The simulator on a runtime and thread of its own, as the upstream would be another process.
struct Upstream {
    sim: Option<Simulator>,
    runtime: Runtime,
}

impl Upstream {
    fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("simulator")
            .enable_all()
            .build()
            .expect("simulator runtime");
        let sim = runtime.block_on(Simulator::start()).expect("simulator");
        sim.set_latency(UPSTREAM_LATENCY);
        Self {
            sim: Some(sim),
            runtime,
        }
    }

    fn sim(&self) -> &Simulator {
        self.sim.as_ref().expect("present until drop")
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _entered = self.runtime.enter();
        drop(self.sim.take());
    }
}

/// One line of a latency table: the count, p50, p90, p99 and the maximum.
fn row(name: &str, timings: &mut [Duration]) {
    timings.sort();
    println!(
        "  {name:<44} {:>6} {:>9.1?} {:>9.1?} {:>9.1?} {:>9.1?}",
        timings.len(),
        percentile(timings, 0.50),
        percentile(timings, 0.90),
        percentile(timings, 0.99),
        timings[timings.len() - 1],
    );
}

/// `7.0.15`, from `INFO server`.
fn redis_version(redis: &RedisServer) -> String {
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query(&mut redis.connection())
        .unwrap_or_default();
    info.lines()
        .find_map(|line| line.strip_prefix("redis_version:"))
        .map_or_else(|| "?".to_owned(), |v| v.trim().to_owned())
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}
