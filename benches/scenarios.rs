//! Operational scenarios, measured rather than micro-benchmarked: refresh-ahead under a hot
//! token, and a flood of unknown tokens against the concurrency bound.
//!
//! Run with `cargo bench --bench scenarios`. It prints its figures; it asserts nothing about
//! time (the machine is shared and noisy), only reports.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use conneqt_guard::AccessTokenLayer;
use conneqt_guard_simulator::Simulator;
use http::{Request, Response};
use tower::{Layer, Service, ServiceExt};

// Only `percentile` is needed here.
#[allow(dead_code)]
mod support;
use support::percentile;

const TOKEN_HEADER: &str = "conneqt-instant-access-token";

fn inner()
-> impl Service<Request<()>, Response = Response<String>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    tower::service_fn(|_: Request<()>| async { Ok::<_, Infallible>(Response::new(String::new())) })
}

fn request(token: &str) -> Request<()> {
    Request::get("/messages")
        .header(TOKEN_HEADER, token)
        .body(())
        .expect("a valid request")
}

struct HotTokenRun {
    requests: usize,
    waited: usize,
    upstream_calls: usize,
    latencies: Vec<Duration>,
}

/// One token used every millisecond for `duration`, with the upstream `latency` away.
async fn hot_token(
    refresh_ahead: bool,
    cache_ttl: Duration,
    latency: Duration,
    duration: Duration,
) -> HotTokenRun {
    let simulator = Simulator::start().await.expect("simulator");
    simulator.set_latency(latency);
    let guard = AccessTokenLayer::builder()
        .base_url(simulator.base_url())
        .api_key(simulator.api_key())
        .cache_ttl(cache_ttl)
        .refresh_ahead(refresh_ahead)
        .build()
        .expect("guard");
    let mut service = guard.layer(inner());
    let token = simulator.issue_token();
    let mut latencies = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let end = Instant::now() + duration;
    while Instant::now() < end {
        tick.tick().await;
        let started = Instant::now();
        let response = service
            .ready()
            .await
            .unwrap()
            .call(request(&token))
            .await
            .unwrap();
        latencies.push(started.elapsed());
        assert_eq!(response.status(), 200);
    }
    let waited = latencies.iter().filter(|l| **l >= latency / 2).count();
    latencies.sort();
    HotTokenRun {
        requests: latencies.len(),
        waited,
        upstream_calls: simulator.verify_calls(),
        latencies,
    }
}

fn report_hot(name: &str, run: &HotTokenRun) {
    let l = &run.latencies;
    println!(
        "  {name:<22} requests {:>5}  waited on upstream {:>3}  upstream calls {:>3}  p50 {:>9.1?}  p99 {:>9.1?}  p99.9 {:>9.1?}  max {:>9.1?}",
        run.requests,
        run.waited,
        run.upstream_calls,
        percentile(l, 0.50),
        percentile(l, 0.99),
        percentile(l, 0.999),
        l[l.len() - 1],
    );
}

/// `tokens` distinct well-formed unknown tokens from `tasks` tasks, while one hot valid token
/// is used continuously.
async fn flood(tokens: usize, tasks: usize, bound: usize, latency: Duration) {
    let simulator = Arc::new(Simulator::start().await.expect("simulator"));
    simulator.set_latency(latency);
    let guard = AccessTokenLayer::builder()
        .base_url(simulator.base_url())
        .api_key(simulator.api_key())
        .max_concurrent_verifications(bound)
        .build()
        .expect("guard");
    let hot = simulator.issue_token();
    let service = guard.layer(inner());
    assert_eq!(
        service
            .clone()
            .oneshot(request(&hot))
            .await
            .unwrap()
            .status(),
        200
    );

    let next = Arc::new(AtomicUsize::new(0));
    let statuses = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<
        u16,
        usize,
    >::new()));
    let started = Instant::now();
    let workers: Vec<_> = (0..tasks)
        .map(|_| {
            let service = service.clone();
            let next = next.clone();
            let statuses = statuses.clone();
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < tokens {
                    let token = uuid::Uuid::new_v4().to_string();
                    let status = service
                        .clone()
                        .oneshot(request(&token))
                        .await
                        .unwrap()
                        .status();
                    *statuses.lock().unwrap().entry(status.as_u16()).or_default() += 1;
                }
            })
        })
        .collect();
    let flood_done = Arc::new(tokio::sync::Notify::new());
    let hot_task = {
        let service = service.clone();
        let done = flood_done.clone();
        tokio::spawn(async move {
            let (mut ok, mut failed, mut latencies) = (0usize, 0usize, Vec::new());
            loop {
                let started = Instant::now();
                let status = service
                    .clone()
                    .oneshot(request(&hot))
                    .await
                    .unwrap()
                    .status();
                latencies.push(started.elapsed());
                if status == 200 {
                    ok += 1
                } else {
                    failed += 1
                }
                tokio::select! {
                    _ = done.notified() => break,
                    _ = tokio::time::sleep(Duration::from_millis(1)) => {}
                }
            }
            latencies.sort();
            (ok, failed, latencies)
        })
    };
    for worker in workers {
        worker.await.unwrap();
    }
    let elapsed = started.elapsed();
    flood_done.notify_one();
    let (ok, failed, latencies) = hot_task.await.unwrap();
    println!(
        "  {tokens} unknown tokens from {tasks} tasks, bound {bound}, upstream latency {latency:?}: done in {elapsed:.2?}"
    );
    println!(
        "    upstream calls {}, max in flight at the upstream {} (bound {bound}), statuses {:?}",
        simulator.verify_calls(),
        simulator.max_concurrent_verify_calls(),
        statuses.lock().unwrap()
    );
    println!(
        "    hot valid token: {ok} ok, {failed} failed; p50 {:.1?}, p99 {:.1?}, max {:.1?}",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies[latencies.len() - 1]
    );
}

fn main() {
    // `cargo test --benches` runs bench targets with `--test`-ish arguments; only run for real
    // under `cargo bench` (which passes `--bench`).
    if !std::env::args().any(|arg| arg == "--bench") {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let ttl = Duration::from_millis(200);
        let latency = Duration::from_millis(20);
        let duration = ttl * 12;
        println!("Hot token, cache_ttl {ttl:?}, upstream latency {latency:?}, one request per ms for {duration:?}:");
        let with = hot_token(true, ttl, latency, duration).await;
        let without = hot_token(false, ttl, latency, duration).await;
        report_hot("with refresh-ahead", &with);
        report_hot("without refresh-ahead", &without);

        println!("Flood:");
        flood(10_000, 200, 64, Duration::from_millis(5)).await;
    });
}
