//! What the guard costs per request, next to the baselines it should be judged against.
//!
//! Run with
//!
//! ```not_rust
//! cargo bench --bench per_request
//! ```
//!
//! One criterion group, `per_request`, measured in one run, each request sent in-process with
//! `tower::ServiceExt::oneshot` on a current-thread tokio runtime (the request is built
//! outside the timed part):
//!
//! - `a_inner_alone`: a trivial service that answers `200 OK` at once; the floor.
//! - `b_validate_request_header`: the same behind tower-http's `ValidateRequestHeaderLayer`
//!   comparing the token header with a fixed value; the floor for *any* header check.
//! - `c_guard_cache_hit`: the same behind `AccessTokenLayer`, with the token's verdict already
//!   cached (one request warms it before measuring).
//! - `d_guard_cache_miss`: the same behind a second `AccessTokenLayer` (its own cache), where
//!   every request carries a token the guard has never seen, issued by the simulator in the
//!   untimed setup. Each is a real miss: one `GET` to the simulator over loopback HTTP, which
//!   runs on its own runtime thread as a real upstream would. A fresh token, rather than
//!   `invalidate_all` before each call, keeps the measured path exactly the first-sight path.
//!
//! After the group, the bench times (a), (b) and (c) again itself, interleaved in rounds with a
//! fixed number of requests each, and prints the medians and the ratios
//! `hit / ValidateRequestHeader` and `hit / inner alone`. Interleaving makes the ratios robust
//! to drift between criterion's benchmarks (CPU frequency, noisy neighbours), and needs no
//! criterion output files. Where criterion's own estimates are on disk, it prints those ratios
//! too, for comparison.

// All but `percentile` (for the scenario benches) is used here.
#[allow(dead_code)]
mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use criterion::{BatchSize, Criterion};
use tower::Layer as _;
use tower_http::validate_request::ValidateRequestHeaderLayer;

use support::{Fixture, Ok200, TOKEN_HEADER, call, request};

const GROUP: &str = "per_request";
const INNER_ALONE: &str = "a_inner_alone";
const VALIDATE_HEADER: &str = "b_validate_request_header";
const GUARD_HIT: &str = "c_guard_cache_hit";
const GUARD_MISS: &str = "d_guard_cache_miss";

/// The hand-timed comparison: this many rounds of this many requests per variant.
const ROUNDS: usize = 9;
const REQUESTS_PER_ROUND: usize = 20_000;
const BATCH: usize = 500;

fn main() {
    // About 4 × (1 s warm-up + 4 s measuring) plus analysis, then ~2 s of hand timing.
    let mut criterion = Criterion::default()
        .sample_size(50)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .without_plots()
        .configure_from_args();
    let fixture = Fixture::start();
    let started = SystemTime::now();

    per_request(&mut criterion, &fixture);
    criterion.final_summary();

    // `cargo bench` passes `--bench`; `cargo test --benches` does not, and criterion then only
    // checks that each benchmark runs once, so the comparison is skipped too.
    let args: Vec<String> = std::env::args().collect();
    let benchmarking =
        args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--test" || a == "--list");
    if benchmarking {
        compare(&fixture, started);
    }
}

fn per_request(criterion: &mut Criterion, fixture: &Fixture) {
    let sim = fixture.simulator();
    let token = sim.issue_token();

    let inner = Ok200;
    let validate = ValidateRequestHeaderLayer::has_header_value(TOKEN_HEADER, &token)
        .expect("a valid header name")
        .layer(Ok200);
    let hit = fixture.guard().layer(Ok200);
    fixture.runtime.block_on(call(hit.clone(), request(&token)));
    let miss = fixture.guard().layer(Ok200);

    let mut group = criterion.benchmark_group(GROUP);
    let runtime = &fixture.runtime;
    group.bench_function(INNER_ALONE, |b| {
        b.to_async(runtime).iter_batched(
            || (inner, request(&token)),
            |(service, request)| call(service, request),
            BatchSize::SmallInput,
        );
    });
    group.bench_function(VALIDATE_HEADER, |b| {
        b.to_async(runtime).iter_batched(
            || (validate.clone(), request(&token)),
            |(service, request)| call(service, request),
            BatchSize::SmallInput,
        );
    });
    group.bench_function(GUARD_HIT, |b| {
        b.to_async(runtime).iter_batched(
            || (hit.clone(), request(&token)),
            |(service, request)| call(service, request),
            BatchSize::SmallInput,
        );
    });
    let calls_before = sim.verify_calls();
    let mut misses = 0_usize;
    group.bench_function(GUARD_MISS, |b| {
        b.to_async(runtime).iter_batched(
            || {
                misses += 1;
                (miss.clone(), request(&sim.issue_token()))
            },
            |(service, request)| call(service, request),
            BatchSize::SmallInput,
        );
    });
    group.finish();

    let upstream_calls = sim.verify_calls() - calls_before;
    println!("{GUARD_MISS}: {misses} requests, {upstream_calls} upstream verify calls");
    assert_eq!(
        upstream_calls, misses,
        "every miss request should have reached the upstream"
    );
}

/// Times (a), (b) and (c) again, interleaved, and prints medians and ratios.
fn compare(fixture: &Fixture, started: SystemTime) {
    let token = fixture.simulator().issue_token();
    let validate = ValidateRequestHeaderLayer::has_header_value(TOKEN_HEADER, &token)
        .expect("a valid header name")
        .layer(Ok200);
    let hit = fixture.guard().layer(Ok200);
    let runtime = &fixture.runtime;
    runtime.block_on(call(hit.clone(), request(&token)));

    let mut inner_ns = Vec::with_capacity(ROUNDS);
    let mut validate_ns = Vec::with_capacity(ROUNDS);
    let mut hit_ns = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        inner_ns.push(time_round(runtime, &token, || Ok200));
        validate_ns.push(time_round(runtime, &token, || validate.clone()));
        hit_ns.push(time_round(runtime, &token, || hit.clone()));
    }
    let (inner, validate, hit) = (median(inner_ns), median(validate_ns), median(hit_ns));

    println!();
    println!(
        "Hand-timed, interleaved: median of {ROUNDS} rounds x {REQUESTS_PER_ROUND} requests each"
    );
    println!("  (a) inner alone:             {inner:>9.1} ns/request");
    println!("  (b) ValidateRequestHeader:   {validate:>9.1} ns/request");
    println!("  (c) AccessTokenLayer, hit:   {hit:>9.1} ns/request");
    println!("  hit / ValidateRequestHeader ratio: {:.2}", hit / validate);
    println!("  hit / inner alone ratio:           {:.2}", hit / inner);

    if let Some(estimates) = criterion_estimates(started) {
        let [inner, validate, hit, miss] = estimates;
        println!("Criterion's own slope estimates from this run (target/criterion/{GROUP}):");
        println!("  (a) {inner:.1} ns, (b) {validate:.1} ns, (c) {hit:.1} ns, (d) {miss:.1} ns");
        println!("  hit / ValidateRequestHeader ratio: {:.2}", hit / validate);
        println!("  hit / inner alone ratio:           {:.2}", hit / inner);
        println!("  miss / hit ratio:                  {:.1}", miss / hit);
    }
}

/// One round: [`REQUESTS_PER_ROUND`] requests in batches of [`BATCH`]. Each batch's services
/// and requests are built, and its responses dropped, outside the timed part; small batches
/// keep that memory in cache and reused, as criterion's `BatchSize::SmallInput` does.
fn time_round<S, B>(runtime: &tokio::runtime::Runtime, token: &str, make: impl Fn() -> S) -> f64
where
    S: tower::Service<http::Request<support::Body>, Response = http::Response<B>>,
    S::Error: std::fmt::Debug,
{
    let mut elapsed = Duration::ZERO;
    let mut responses = Vec::with_capacity(BATCH);
    runtime.block_on(async {
        for _ in 0..REQUESTS_PER_ROUND / BATCH {
            let inputs: Vec<_> = (0..BATCH).map(|_| (make(), request(token))).collect();
            let start = Instant::now();
            for (service, request) in inputs {
                responses.push(call(service, request).await);
            }
            elapsed += start.elapsed();
            std::hint::black_box(&mut responses).clear();
        }
    });
    elapsed.as_nanos() as f64 / (REQUESTS_PER_ROUND / BATCH * BATCH) as f64
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Criterion's slope estimates (ns per request) for (a) to (d), if this run (not an earlier
/// one) wrote them where criterion writes by default.
fn criterion_estimates(started: SystemTime) -> Option<[f64; 4]> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let read = |id: &str| -> Option<f64> {
        let path = target
            .join("criterion")
            .join(GROUP)
            .join(id)
            .join("new/estimates.json");
        let written = std::fs::metadata(&path).and_then(|m| m.modified()).ok()?;
        if written < started {
            return None;
        }
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
        let estimate = json
            .get("slope")
            .filter(|slope| !slope.is_null())
            .or(json.get("mean"))?;
        estimate.get("point_estimate")?.as_f64()
    };
    Some([
        read(INNER_ALONE)?,
        read(VALIDATE_HEADER)?,
        read(GUARD_HIT)?,
        read(GUARD_MISS)?,
    ])
}
