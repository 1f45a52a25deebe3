//! Instructions per request under callgrind: what a cache hit costs at the floor (issue 10).
//!
//! Run with
//!
//! ```not_rust
//! cargo bench --bench instructions
//! CONNEQT_CALLGRIND_ANNOTATE=1 cargo bench --bench instructions   # keep the hit's profile
//! cargo bench --bench instructions -- a_inner c_guard               # only these variants
//! ```
//!
//! With `CONNEQT_CALLGRIND_ANNOTATE=1` it keeps the N = 12,000 callgrind files of the guard hit
//! (with and without the shared tier) and of the inner service alone and prints their paths;
//! `callgrind_annotate <file>` then lists the functions by their own (self) cost, which divided
//! by 12,000 is per request, and two side by side show where the hit's extra instructions go.
//!
//! It needs `valgrind` on `PATH` (`apt-get install valgrind`); without it, it says so and exits
//! successfully. `cargo test --benches` runs each variant a few times in-process instead (no
//! valgrind), checking that every request is let through and that the guard's hits never reach
//! the upstream.
//!
//! # Why instructions
//!
//! Wall-clock figures on a shared machine swing by 40 % from one run to the next (CPU
//! frequency, noisy neighbours), which drowns the few-percent changes a hot-path refactor makes.
//! The number of instructions executed barely moves: from run to run of one build, (a) counts
//! the same to the instruction and (b) nearly so, and the guard's variants move by steps of
//! 8 instructions per request, within about 1 % (the token hash key is drawn at random per
//! process, so each run's token lands elsewhere in the cache's table, a probe more or less), so two
//! versions of the hit path can be compared by a run or two each. Another build of the same
//! code can differ by a few percent (inlining, code layout), so compare builds, not runs of
//! this bench across toolchain or dependency updates. It is a proxy: it does not see
//! memory latency (a lookup in a big table costs more cycles per instruction once the table
//! no longer fits in the CPU caches) nor branch mispredictions. `benches/per_request.rs`
//! gives the wall clock.
//!
//! # What is measured
//!
//! Each variant sends N requests in-process with `tower::ServiceExt::oneshot` on a
//! current-thread tokio runtime, each on its own clone of the service, to a trivial inner
//! service that answers `200 OK` (`Ok200` in `benches/support`):
//!
//! - `a_inner_alone`: the inner service alone; the floor.
//! - `b_validate_request_header`: behind tower-http's `ValidateRequestHeaderLayer` comparing
//!   the token header with a fixed value; the floor for *any* header check.
//! - `c_guard_cache_hit`: behind `AccessTokenLayer`, one token, warmed with one request first.
//! - `d_guard_cache_hit_10k`, `d_guard_cache_hit_100k`: the same, with the cache also holding
//!   10,000 or 100,000 other valid verdicts (`cache_capacity` set so that they all stay), to
//!   show the hit is flat with scale. Not 1,000,000: each verdict is one real verification,
//!   and under valgrind the 100,000 take about two minutes of the bench's budget of about
//!   three (on the shared 2-core machine this was written on), so a million would take about
//!   twenty. `benches/memory.rs` fills a million natively.
//! - `e_guard_cache_hit_redis`: the hit of (c) with the shared verdict tier configured
//!   (`redis_url`, issue 11) on a `redis-server` the bench starts on a free loopback port
//!   (`tests/it/redis_server.rs`), whose URL it passes to the child: an L1 hit must cost what
//!   it costs without the tier. Skipped, with a line saying so, where `redis-server` is not
//!   installed. The child connects (`check_connection`) from a runtime on a thread of its own,
//!   so the tier's background work (its heartbeat `PING` every second, the connection's
//!   driver) runs there and not on the measured thread: callgrind counts per thread, and the
//!   hit path itself never touches Redis. Its Redis deadline is 10 s rather than 50 ms, so that
//!   valgrind's slowness cannot open the tier's circuit (which would empty L1) mid-run.
//!
//! The bench runs itself once per variant under
//! `valgrind --tool=callgrind --collect-atstart=no --toggle-collect=...`, which sends N = 2,000
//! and then N = 12,000 requests, and reads the `totals:` line of the callgrind output file of
//! each (see the handshake below). Callgrind counts only inside `measured_requests`, and not in
//! `untimed_input`, which clones the service and builds the request just before each call, nor
//! in `untimed_drop`, which drops the response just after, as `per_request` leaves them out of
//! its timings. Building each request just before its call, rather than all of them up front,
//! keeps the allocator's behaviour that of a server (the memory of one request reused for
//! the next); with 12,000 requests built up front, freeing them costs several hundred
//! instructions more per request, and more the more there are.
//!
//! The figure per request is `(I(12,000) − I(2,000)) / 10,000`: what each run spends once
//! (entering the runtime, starting and ending the loop) cancels out, and what only the first
//! run spends (state initialised on first use) comes to a fraction of an instruction per
//! request.
//!
//! Instrumentation starts off in each child (`--instr-atstart=no`), so the setup (a cache
//! fill is one real verification over loopback HTTP per token) runs at valgrind's
//! uninstrumented speed. Then the child and the bench take turns over its stdin and stdout:
//! the child says `ready`, the bench switches instrumentation on (`callgrind_control -i on`)
//! and says `go`; the child sends the N = 2,000 requests and says `measured`; the bench dumps
//! the counts so far (`callgrind_control -d`) and says `go`; the child sends the N = 12,000
//! requests and exits, which writes the second file. So each variant's setup runs once.
//!
//! The upstream is `benches/upstream`'s minimal verify endpoint (it answers `200` to any
//! token), served by the bench's own process, natively, rather than the simulator inside the
//! child: that halves the work valgrind has to run through during a fill. Before and after its
//! measured requests, the child reads the upstream's verify-call count, and exits with an
//! error if a single measured request reached the upstream.

#[path = "../tests/it/redis_server.rs"]
mod redis_server;
// Only `Ok200`, `call`, `request` and the header name are needed here.
#[allow(dead_code)]
mod support;
#[path = "../tests/it/system.rs"]
mod system;
mod upstream;

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use conneqt_guard::{AccessTokenLayer, AccessTokenService};
use http_body_util::Full;
use tokio::runtime::Runtime;
use tower::Layer as _;
use tower_http::validate_request::{
    RequiredHeaderValue, ValidateRequestHeader, ValidateRequestHeaderLayer,
};

use support::{Body, Ok200, TOKEN_HEADER, call, request};
use upstream::TinyUpstream;

/// The two run lengths; their difference is what the figures are per.
const SHORT: usize = 2_000;
const LONG: usize = 12_000;

/// The sizes of the filled caches of variant (d). See the module docs for why not 1,000,000.
/// 10,000 too, as a point between, for a few seconds more.
const FILLED: [usize; 2] = [10_000, 100_000];

/// Verifications in flight at once while filling a cache (the layer's default bound).
const FILL_CONCURRENCY: usize = 64;

/// Set to keep the N = 12,000 callgrind files of the guard hit and of the inner service alone
/// (its baseline), for `callgrind_annotate`.
const ANNOTATE_ENV: &str = "CONNEQT_CALLGRIND_ANNOTATE";

/// The argument that makes this binary a measured child:
/// `--callgrind-child <variant> <short> <long> <upstream base URL> [<redis URL>]`.
const CHILD_ARG: &str = "--callgrind-child";

/// What one child measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    InnerAlone,
    ValidateHeader,
    GuardHit,
    /// A hit with this many other verdicts in the cache.
    GuardHitFilled(usize),
    /// The plain hit with the shared tier (`redis_url`) configured.
    GuardHitShared,
}

impl Variant {
    fn all() -> Vec<Variant> {
        let mut all = vec![
            Variant::InnerAlone,
            Variant::ValidateHeader,
            Variant::GuardHit,
        ];
        all.extend(FILLED.map(Variant::GuardHitFilled));
        all.push(Variant::GuardHitShared);
        all
    }

    fn name(self) -> String {
        match self {
            Variant::InnerAlone => "a_inner_alone".to_owned(),
            Variant::ValidateHeader => "b_validate_request_header".to_owned(),
            Variant::GuardHit => "c_guard_cache_hit".to_owned(),
            Variant::GuardHitFilled(filled) => format!("d_guard_cache_hit_{}", short(filled)),
            Variant::GuardHitShared => "e_guard_cache_hit_redis".to_owned(),
        }
    }

    fn parse(name: &str) -> Option<Variant> {
        Variant::all().into_iter().find(|v| v.name() == name)
    }
}

/// `10_000` as `10k`, `1_000_000` as `1m`.
fn short(count: usize) -> String {
    if count >= 1_000_000 && count.is_multiple_of(1_000_000) {
        format!("{}m", count / 1_000_000)
    } else if count >= 1_000 && count.is_multiple_of(1_000) {
        format!("{}k", count / 1_000)
    } else {
        count.to_string()
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(CHILD_ARG) {
        return child(&args[2..]);
    }
    // `cargo bench` passes `--bench`; `cargo test --benches` does not.
    let benchmarking =
        args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--test" || a == "--list");
    if benchmarking {
        bench(&args)
    } else {
        smoke();
        ExitCode::SUCCESS
    }
}

/// A service under test.
enum Subject {
    Inner(Ok200),
    Validate(ValidateRequestHeader<Ok200, RequiredHeaderValue<Full<Bytes>>>),
    Guard(AccessTokenService<Ok200>),
}

/// A variant set up: the service, its token, and the runtime the requests run on.
struct Setup {
    runtime: Runtime,
    subject: Subject,
    token: String,
    /// With the shared tier: the runtime its connection and heartbeat run on.
    _tier_runtime: Option<Runtime>,
}

impl Setup {
    /// Builds the variant's service; the guard's ones against the upstream at `base_url`,
    /// warmed with one request for their token (and filled, for (d)); (e)'s with the shared
    /// tier on the Redis at `redis_url`.
    fn new(variant: Variant, base_url: &str, redis_url: Option<&str>) -> Setup {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("bench runtime");
        let token = uuid::Uuid::new_v4().hyphenated().to_string();
        let mut tier_runtime = None;
        let subject = match variant {
            Variant::InnerAlone => Subject::Inner(Ok200),
            Variant::ValidateHeader => Subject::Validate(
                ValidateRequestHeaderLayer::has_header_value(TOKEN_HEADER, &token)
                    .expect("a valid header name")
                    .layer(Ok200),
            ),
            Variant::GuardHit | Variant::GuardHitFilled(_) => {
                let filled = match variant {
                    Variant::GuardHitFilled(filled) => filled,
                    _ => 0,
                };
                let layer = guard(base_url, filled);
                fill(&runtime, &layer, filled);
                let service = layer.layer(Ok200);
                runtime.block_on(call(service.clone(), request(&token)));
                Subject::Guard(service)
            }
            Variant::GuardHitShared => {
                let redis_url = redis_url.expect("(e) is given a Redis URL");
                let layer = AccessTokenLayer::builder()
                    .base_url(base_url)
                    .api_key(upstream::API_KEY)
                    .cache_ttl(Duration::from_secs(3600))
                    .redis_url(redis_url)
                    .cluster_key("instructions bench cluster key")
                    .redis_timeout(Duration::from_secs(10))
                    .build()
                    .expect("guard settings are valid");
                // The tier starts (connection, subscription, heartbeat) on the runtime that
                // first uses it: this one, on a thread of its own.
                let tier = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name("redis-tier")
                    .enable_all()
                    .build()
                    .expect("tier runtime");
                let status = tier.block_on(layer.check_connection());
                assert!(status.is_ok(), "the shared tier's start-up check: {status}");
                tier_runtime = Some(tier);
                let service = layer.layer(Ok200);
                runtime.block_on(call(service.clone(), request(&token)));
                Subject::Guard(service)
            }
        };
        Setup {
            runtime,
            subject,
            token,
            _tier_runtime: tier_runtime,
        }
    }

    /// Sends `n` requests (built before, responses dropped after, both outside
    /// [`measured_requests`]).
    fn run(&self, n: usize) {
        let runtime = &self.runtime;
        match &self.subject {
            Subject::Inner(service) => run_with(runtime, n, &self.token, || *service),
            Subject::Validate(service) => run_with(runtime, n, &self.token, || service.clone()),
            Subject::Guard(service) => run_with(runtime, n, &self.token, || service.clone()),
        }
    }
}

/// A guard against the upstream at `base_url`, with room for `filled` verdicts besides the
/// measured one. Default settings otherwise, except a TTL that outlives the run.
fn guard(base_url: &str, filled: usize) -> AccessTokenLayer {
    let mut builder = AccessTokenLayer::builder()
        .base_url(base_url)
        .api_key(upstream::API_KEY)
        .cache_ttl(Duration::from_secs(3600));
    if filled > 0 {
        builder = builder.cache_capacity(u64::try_from(filled + 1).expect("fits"));
    }
    builder.build().expect("guard settings are valid")
}

/// One request with a fresh token through `layer` for each of `count` tokens,
/// [`FILL_CONCURRENCY`] at a time: each is a real verification by the upstream.
fn fill(runtime: &Runtime, layer: &AccessTokenLayer, count: usize) {
    let service = layer.layer(Ok200);
    let left = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(count));
    runtime.block_on(async {
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..FILL_CONCURRENCY.min(count) {
            let (service, left) = (service.clone(), left.clone());
            workers.spawn(async move {
                use std::sync::atomic::Ordering::SeqCst;
                while left
                    .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                    .is_ok()
                {
                    let token = uuid::Uuid::new_v4().hyphenated().to_string();
                    call(service.clone(), request(&token)).await;
                }
            });
        }
        while let Some(done) = workers.join_next().await {
            done.expect("a fill worker panicked");
        }
    });
}

/// Sends `n` requests through clones of the service `make` makes, one after the other, each
/// built just before it is sent and its response dropped just after, as a server would.
fn run_with<S, B>(runtime: &Runtime, n: usize, token: &str, make: impl Fn() -> S)
where
    S: tower::Service<http::Request<Body>, Response = http::Response<B>>,
    S::Error: std::fmt::Debug,
{
    measured_requests(runtime, n, || untimed_input(&make, token));
}

/// Callgrind counts in here (`--toggle-collect`), except in the `untimed_*` functions.
#[inline(never)]
fn measured_requests<S, B>(
    runtime: &Runtime,
    n: usize,
    input: impl Fn() -> (S, http::Request<Body>),
) where
    S: tower::Service<http::Request<Body>, Response = http::Response<B>>,
    S::Error: std::fmt::Debug,
{
    runtime.block_on(async {
        for _ in 0..n {
            let (service, request) = input();
            let response = call(service, request).await;
            untimed_drop(response);
        }
    });
}

/// The service clone and the request for one measured request; not counted (callgrind
/// toggles collection off on entering it and back on on leaving it).
#[inline(never)]
fn untimed_input<S>(make: &impl Fn() -> S, token: &str) -> (S, http::Request<Body>) {
    (make(), request(token))
}

/// Drops one response; not counted, like [`untimed_input`].
#[inline(never)]
fn untimed_drop<T>(value: T) {
    drop(std::hint::black_box(value));
}

/// `--callgrind-child <variant> <short> <long> <base URL> [<redis URL>]`: set up, then the handshake of the
/// module docs around the two measured runs; exits with an error if the upstream was asked.
fn child(args: &[String]) -> ExitCode {
    let variant = args.first().and_then(|name| Variant::parse(name));
    let counts = [args.get(1), args.get(2)].map(|n| n.and_then(|n| n.parse::<usize>().ok()));
    let (Some(variant), [Some(short_run), Some(long_run)], Some(base_url)) =
        (variant, counts, args.get(3))
    else {
        eprintln!("usage: {CHILD_ARG} <variant> <short> <long> <upstream base URL> [<redis URL>]");
        return ExitCode::from(2);
    };
    let started = Instant::now();
    let setup = Setup::new(variant, base_url, args.get(4).map(String::as_str));
    let upstream_calls = || upstream::remote_verify_calls(base_url).expect("the upstream's count");
    let calls_before = upstream_calls();
    println!("ready {}", started.elapsed().as_millis());
    let go = || {
        let mut line = String::new();
        let ok = std::io::stdin().read_line(&mut line).is_ok() && line.trim() == "go";
        if !ok {
            eprintln!("{CHILD_ARG}: expected `go` on stdin, got {line:?}");
        }
        ok
    };
    if !go() {
        return ExitCode::from(2);
    }
    setup.run(short_run);
    println!("measured");
    if !go() {
        return ExitCode::from(2);
    }
    setup.run(long_run);
    let reached = upstream_calls() - calls_before;
    if reached != 0 {
        eprintln!(
            "{}: {reached} of {} measured requests reached the upstream; they should all have \
             been cache hits",
            variant.name(),
            short_run + long_run
        );
        return ExitCode::from(3);
    }
    println!("done");
    ExitCode::SUCCESS
}

/// `cargo test --benches`: each variant a few times, in-process, no valgrind.
fn smoke() {
    let upstream = TinyUpstream::start();
    let mut variants = Variant::all();
    // One small fill exercises the path of every (d).
    variants.retain(|v| !matches!(v, Variant::GuardHitFilled(_)));
    variants.push(Variant::GuardHitFilled(100));
    let redis = shared_tier_redis(&mut variants);
    for variant in variants {
        let calls_before = upstream.verify_calls();
        let setup = Setup::new(
            variant,
            &upstream.base_url(),
            redis.as_ref().map(|r| r.url()).as_deref(),
        );
        let setup_calls = upstream.verify_calls() - calls_before;
        // `call` asserts that each answer is `200 OK`.
        setup.run(5);
        let calls = upstream.verify_calls() - calls_before;
        let expected = match variant {
            Variant::InnerAlone | Variant::ValidateHeader => 0,
            Variant::GuardHit | Variant::GuardHitShared => 1,
            Variant::GuardHitFilled(filled) => filled + 1,
        };
        assert_eq!(
            (setup_calls, calls),
            (expected, expected),
            "{}: the upstream should have been asked once per token, never for a hit",
            variant.name()
        );
        println!("{}: ok", variant.name());
    }
}

/// One variant's two counts, and how long it took.
struct Measured {
    short: u64,
    long: u64,
    /// The child's setup time under valgrind, as it reported it.
    setup: Duration,
    /// The N = [`LONG`] file.
    long_file: PathBuf,
}

fn bench(args: &[String]) -> ExitCode {
    let started = Instant::now();
    if !on_path("valgrind") || !on_path("callgrind_control") {
        println!(
            "instructions: valgrind is missing (no valgrind or callgrind_control on PATH): \
             nothing measured; apt-get install valgrind"
        );
        return ExitCode::SUCCESS;
    }
    let dir = std::env::temp_dir().join(format!("conneqt-guard-callgrind-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let annotate = std::env::var_os(ANNOTATE_ENV).is_some_and(|v| !v.is_empty() && v != "0");
    let exe = std::env::current_exe().expect("the bench's own path");
    let upstream = TinyUpstream::start();

    // `cargo bench --bench instructions -- c_guard` measures only the variants whose names
    // contain one of the words after `--`.
    let words: Vec<&String> = args
        .iter()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let mut variants = Variant::all();
    variants.retain(|v| words.is_empty() || words.iter().any(|w| v.name().contains(w.as_str())));
    let redis = shared_tier_redis(&mut variants);
    let redis_url = redis.as_ref().map(|r| r.url());

    println!("Each variant under callgrind, N = {SHORT} then N = {LONG} requests:");
    let mut rows = Vec::new();
    for variant in variants {
        let run_started = Instant::now();
        let measured = match run_child(
            &exe,
            &dir,
            variant,
            &upstream.base_url(),
            redis_url.as_deref(),
        ) {
            Ok(measured) => measured,
            Err(problem) => {
                eprintln!("instructions: {}: {problem}", variant.name());
                return ExitCode::FAILURE;
            }
        };
        println!(
            "  {:<28} {:>12} and {:>12} instructions ({:.1} s, of which setup {:.1} s)",
            variant.name(),
            measured.short,
            measured.long,
            run_started.elapsed().as_secs_f64(),
            measured.setup.as_secs_f64()
        );
        if annotate
            && matches!(
                variant,
                Variant::GuardHit | Variant::InnerAlone | Variant::GuardHitShared
            )
        {
            println!(
                "  kept for annotation: callgrind_annotate {}",
                measured.long_file.display()
            );
        } else {
            let _ = std::fs::remove_file(&measured.long_file);
        }
        let per_request =
            measured.long.saturating_sub(measured.short) as f64 / (LONG - SHORT) as f64;
        rows.push((variant, per_request));
    }
    if !annotate {
        let _ = std::fs::remove_dir(&dir);
    }
    report(&rows);
    println!(
        "instructions: the whole run took {:.0} s",
        started.elapsed().as_secs_f64()
    );
    ExitCode::SUCCESS
}

fn report(rows: &[(Variant, f64)]) {
    let get = |wanted: Variant| {
        rows.iter()
            .find(|(variant, _)| *variant == wanted)
            .map(|(_, figure)| *figure)
    };
    let inner = get(Variant::InnerAlone);
    println!();
    println!(
        "Instructions per request, (I({LONG}) - I({SHORT})) / {}:",
        LONG - SHORT
    );
    println!(
        "  {:<28} {:>12} {:>18}",
        "variant", "per request", "over inner alone"
    );
    for (variant, figure) in rows {
        let over = inner.map_or_else(|| "-".to_owned(), |inner| format!("{:.1}", figure - inner));
        println!("  {:<28} {figure:>12.1} {over:>18}", variant.name());
    }
    println!();
    let hit = get(Variant::GuardHit);
    if let (Some(hit), Some(validate)) = (hit, get(Variant::ValidateHeader)) {
        println!("  hit / ValidateRequestHeader ratio: {:.2}", hit / validate);
    }
    if let (Some(hit), Some(inner)) = (hit, inner) {
        println!("  hit / inner alone ratio:           {:.2}", hit / inner);
    }
    for filled in FILLED {
        if let (Some(hit), Some(big)) = (hit, get(Variant::GuardHitFilled(filled))) {
            println!(
                "  hit with {:>4} other verdicts cached vs plain hit: {:+.2} % ({big:.1} vs {hit:.1})",
                short(filled),
                (big / hit - 1.0) * 100.0
            );
        }
    }
    println!(
        "  (not 1m: a million verifications under valgrind do not fit the bench's time budget)"
    );
    if let (Some(hit), Some(shared)) = (hit, get(Variant::GuardHitShared)) {
        println!(
            "  hit with the shared tier (redis_url) configured vs plain hit: {:+.2} % ({shared:.1} vs {hit:.1}; ratio {:.3})",
            (shared / hit - 1.0) * 100.0,
            shared / hit
        );
    }
    println!();
}

/// A `redis-server` of the bench's own for variant (e), if (e) is among `variants`; where
/// redis-server is missing, says so in one line and drops (e).
fn shared_tier_redis(variants: &mut Vec<Variant>) -> Option<redis_server::RedisServer> {
    if !variants.contains(&Variant::GuardHitShared) {
        return None;
    }
    let redis = if on_path("redis-server") || Path::new("/usr/bin/redis-server").is_file() {
        redis_server::RedisServer::start()
    } else {
        None
    };
    if redis.is_none() {
        println!(
            "instructions: {}: skipped, redis-server is not installed (apt-get install redis-server)",
            Variant::GuardHitShared.name()
        );
        variants.retain(|v| *v != Variant::GuardHitShared);
    }
    redis
}

/// Runs one variant's child under callgrind, through the handshake, and reads both counts.
fn run_child(
    exe: &Path,
    dir: &Path,
    variant: Variant,
    base_url: &str,
    redis_url: Option<&str>,
) -> Result<Measured, String> {
    let long_file = dir.join(format!("{}.callgrind", variant.name()));
    // The dump asked for after the short run gets `.1` appended; the final one is the file.
    let short_file = PathBuf::from(format!("{}.1", long_file.display()));
    let mut child = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", long_file.display()))
        .arg("--instr-atstart=no")
        .arg("--collect-atstart=no")
        .arg("--toggle-collect=*measured_requests*")
        .arg("--toggle-collect=*untimed_input*")
        .arg("--toggle-collect=*untimed_drop*")
        .arg(exe)
        .args([
            CHILD_ARG,
            &variant.name(),
            &SHORT.to_string(),
            &LONG.to_string(),
            base_url,
        ])
        .args(redis_url.filter(|_| variant == Variant::GuardHitShared))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("could not start valgrind: {e}"))?;
    // Valgrind's own chatter goes to stderr; read it in the background so it cannot block.
    let mut stderr = child.stderr.take().expect("piped");
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
        text
    });
    let stdout = BufReader::new(child.stdout.take().expect("piped"));
    let stdin = child.stdin.take().expect("piped");
    let talked = handshake(&child, stdout, stdin);
    let status = child
        .wait()
        .map_err(|e| format!("waiting for valgrind: {e}"))?;
    let stderr = stderr.join().unwrap_or_default();
    let setup = match talked {
        Ok(setup) if status.success() => setup,
        Ok(_) => return Err(format!("the child failed ({status}):\n{stderr}")),
        Err(problem) => {
            return Err(format!(
                "{problem}; the child ended with {status}:\n{stderr}"
            ));
        }
    };
    let short = read_total(&short_file)?;
    let _ = std::fs::remove_file(&short_file);
    let long = read_total(&long_file)?;
    Ok(Measured {
        short,
        long,
        setup,
        long_file,
    })
}

/// The bench's side of the handshake of the module docs; the setup time the child reported.
fn handshake(
    child: &Child,
    mut stdout: BufReader<ChildStdout>,
    mut stdin: ChildStdin,
) -> Result<Duration, String> {
    let pid = child.id().to_string();
    let mut expect = |word: &str| {
        let mut line = String::new();
        let _ = stdout.read_line(&mut line);
        let mut words = line.split_whitespace();
        if words.next() == Some(word) {
            Ok(words.next().map(str::to_owned))
        } else {
            Err(format!("the child did not say {word:?} (it said {line:?})"))
        }
    };
    let control = |option: &str| -> Result<(), String> {
        let output = Command::new("callgrind_control")
            .args([option, &pid])
            .output()
            .map_err(|e| format!("could not run callgrind_control: {e}"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "callgrind_control {option} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    };
    let setup_ms = expect("ready")?;
    control("--instr=on")?;
    writeln!(stdin, "go").map_err(|e| e.to_string())?;
    expect("measured")?;
    control("--dump")?;
    writeln!(stdin, "go").map_err(|e| e.to_string())?;
    expect("done")?;
    Ok(Duration::from_millis(
        setup_ms.and_then(|ms| ms.parse().ok()).unwrap_or(0),
    ))
}

/// The `totals:` (or `summary:`) figure of a callgrind output file: instructions executed
/// while collection was on.
fn read_total(path: &Path) -> Result<u64, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("could not read {}: {e}", path.display()))?;
    text.lines()
        .find_map(|line| {
            line.strip_prefix("totals:")
                .or_else(|| line.strip_prefix("summary:"))
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|figure| figure.parse().ok())
        .ok_or_else(|| format!("no totals line in {}", path.display()))
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}
