//! Bytes of memory per cached valid verdict, at 100,000 and 1,000,000 distinct tokens
//! (issue 10).
//!
//! Run with
//!
//! ```not_rust
//! cargo bench --bench memory
//! cargo bench --bench memory -- 100000   # only the token counts given
//! ```
//!
//! `cargo test --benches` does one small run (2,000 tokens) and checks that the figure is
//! positive and finite.
//!
//! It takes about 4 minutes on an idle 2-core machine, most of it the two fills of a million
//! verifications (about 100 s each, some 10,000 verifications a second); on a busy one, three
//! times as long.
//!
//! # What is measured
//!
//! One layer with default settings (refresh-ahead on, as by default), except a `cache_ttl` of
//! an hour, so that no verdict expires during the fill, and `cache_capacity` twice the number of
//! tokens cached, so that they all stay (the table is sharded and takes memory as entries
//! arrive, so the headroom costs nothing). Then
//! the same with `stale_if_error` on, to show what it adds. Each token is verified once,
//! through the layer, by a real HTTP call to an upstream that answers `200` to any token
//! (`benches/upstream`), [`FILL_CONCURRENCY`] verifications at a time.
//!
//! Each configuration runs in a fresh child process of this bench, so that memory freed by an
//! earlier configuration cannot be reused by a later one, and the upstream runs in the bench's
//! own process, so that none of its memory is counted. The child first verifies [`WARM`]
//! tokens (the connection pool, the runtime, the caches' first tables), takes the "before"
//! figures, verifies the N tokens, pauses, verifies [`SETTLE`] more so that the cache applies its
//! pending writes, takes the "after" figures, and sends every token once more to check that
//! all are still cache hits (no upstream call). Per verdict is
//! `(after − before) / (N + SETTLE)`.
//!
//! Two figures per configuration, from the same run:
//!
//! - **live heap**: the bytes of the allocator's chunks in use (glibc's `mallinfo2()`:
//!   `uordblks + hblkhd`), read from outside by `gdb -p <pid> -batch -ex 'print mallinfo2()'`
//!   while the child waits. That is the bytes the program asked for plus glibc's 8-byte chunk
//!   header and rounding to 16 bytes per allocation. A counting `#[global_allocator]` would
//!   give the asked-for bytes alone, but it needs `unsafe` code, which this crate's lints
//!   forbid (`unsafe_code = "forbid"`), and valgrind's massif, which counts the same without
//!   it, runs a million verifications too slowly. Needs `gdb` and glibc's debug symbols (the
//!   type of `mallinfo2`; `apt-get install gdb libc6-dbg`); without them the bench says so and
//!   reports RSS alone.
//! - **RSS delta**: resident set size after minus before (`VmRSS` in `/proc/self/status`). It
//!   adds what the allocator holds beyond the live chunks (freed chunks not given back to the
//!   system, fragmentation), in whole pages. With gdb, the bench also has the child call
//!   `malloc_trim(0)` after the "after" figures and reads its RSS again: what that gives back
//!   was whole free pages; what stays beyond the live heap is pages that live chunks share
//!   with free ones.

// Only `Ok200`, `call` and `request` are needed here.
#[allow(dead_code)]
mod support;
mod upstream;

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use conneqt_guard::AccessTokenLayer;
use tokio::runtime::Runtime;
use tower::Layer as _;

use support::{Ok200, call, request};
use upstream::TinyUpstream;

/// The token counts measured by `cargo bench`.
const COUNTS: [usize; 2] = [100_000, 1_000_000];
/// The token count of the `cargo test --benches` run.
const SMOKE_COUNT: usize = 2_000;
/// Tokens verified before the "before" figures.
const WARM: usize = 1_000;
/// Tokens verified after the pause, before the "after" figures.
const SETTLE: usize = 64;
/// Verifications in flight at once (the layer's default `max_concurrent_verifications`).
const FILL_CONCURRENCY: usize = 64;

/// The argument that makes this binary a measuring child:
/// `--measure <count> <plain|stale> <upstream base URL>`.
const CHILD_ARG: &str = "--measure";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(CHILD_ARG) {
        return child(&args[2..]);
    }
    // `cargo bench` passes `--bench`; `cargo test --benches` does not.
    let benchmarking =
        args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--test" || a == "--list");
    if benchmarking { bench(&args) } else { smoke() }
}

/// One configuration of the layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Config {
    tokens: usize,
    stale_if_error: bool,
}

impl Config {
    fn mode(self) -> &'static str {
        if self.stale_if_error {
            "stale"
        } else {
            "plain"
        }
    }

    fn stale_label(self) -> &'static str {
        if self.stale_if_error { "on" } else { "off" }
    }

    /// The verdicts counted in the difference.
    fn measured(self) -> usize {
        self.tokens + SETTLE
    }
}

/// The `i`-th token of a run: a well-formed hyphenated UUID, distinct for each `i`.
fn token(prefix: u32, i: usize) -> String {
    format!("{prefix:08x}-0000-4000-8000-{i:012x}")
}

/// `--measure <count> <plain|stale> <base URL>`: fills a layer as the module docs say and
/// reports on stdout, waiting for `go` on stdin after the "before" and "after" lines (the
/// bench reads the heap figures then).
fn child(args: &[String]) -> ExitCode {
    let tokens = args.first().and_then(|n| n.parse::<usize>().ok());
    let stale_if_error = match args.get(1).map(String::as_str) {
        Some("plain") => Some(false),
        Some("stale") => Some(true),
        _ => None,
    };
    let (Some(tokens), Some(stale_if_error), Some(base_url)) =
        (tokens, stale_if_error, args.get(2))
    else {
        eprintln!("usage: {CHILD_ARG} <count> <plain|stale> <upstream base URL>");
        return ExitCode::from(2);
    };
    let config = Config {
        tokens,
        stale_if_error,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let capacity = WARM + config.measured();
    let mut builder = AccessTokenLayer::builder()
        .base_url(base_url)
        .api_key(upstream::API_KEY)
        .cache_ttl(Duration::from_secs(3600))
        // Twice the tokens: the table is sharded, so a full-to-the-last-entry capacity would
        // evict in the shards the hashes favour (memory is taken as entries arrive).
        .cache_capacity(u64::try_from(2 * capacity).expect("fits"));
    if stale_if_error {
        builder = builder.stale_if_error(Duration::from_secs(60));
    }
    let layer = builder.build().expect("guard settings are valid");
    let prefix = uuid::Uuid::new_v4().as_fields().0;
    let calls = || upstream::remote_verify_calls(base_url).expect("the upstream's count");
    let go = || {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).is_ok() && line.trim() == "go"
    };

    fill(&runtime, &layer, prefix, 0..WARM);
    println!("before {}", rss_bytes());
    if !go() {
        return ExitCode::from(2);
    }
    let started = Instant::now();
    fill(&runtime, &layer, prefix, WARM..WARM + tokens);
    let fill_time = started.elapsed();
    // A pause, then more writes: the settle step (a no-op for the cache's own table, kept so
    // the figures include any deferred work a cache implementation might do).
    std::thread::sleep(Duration::from_millis(400));
    fill(&runtime, &layer, prefix, WARM + tokens..capacity);
    println!(
        "after {} {} {}",
        rss_bytes(),
        fill_time.as_millis(),
        valid_entries(&layer).unwrap_or(0)
    );
    if !go() {
        return ExitCode::from(2);
    }
    // Every token once more: all must be hits.
    let calls_before = calls();
    let started = Instant::now();
    fill(&runtime, &layer, prefix, 0..capacity);
    let hits_time = started.elapsed();
    let reached = calls() - calls_before;
    if reached != 0 {
        eprintln!("{reached} of {capacity} cached tokens were verified again: not all stayed");
        return ExitCode::from(3);
    }
    println!("done {}", hits_time.as_millis());
    // Nothing to gain from dropping a million entries one by one.
    std::process::exit(0)
}

/// One request through `layer` for each token of `range`, [`FILL_CONCURRENCY`] at a time.
fn fill(runtime: &Runtime, layer: &AccessTokenLayer, prefix: u32, range: std::ops::Range<usize>) {
    let service = layer.layer(Ok200);
    let next = Arc::new(AtomicUsize::new(range.start));
    runtime.block_on(async {
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..FILL_CONCURRENCY.min(range.len()) {
            let (service, next, end) = (service.clone(), next.clone(), range.end);
            workers.spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= end {
                        break;
                    }
                    call(service.clone(), request(&token(prefix, i))).await;
                }
            });
        }
        while let Some(done) = workers.join_next().await {
            done.expect("a fill worker panicked");
        }
    });
}

/// This process's resident set size, from `VmRSS` in `/proc/self/status`.
fn rss_bytes() -> u64 {
    vm_rss("self").unwrap_or(0)
}

/// The resident set size of process `pid` (or `self`), from `VmRSS` in its `status`.
fn vm_rss(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kib| kib * 1024)
}

/// The number of valid verdicts the cache counts, as the layer's `Debug` output shows it
/// (`valid_entries: N`); `None` if that output changes shape.
fn valid_entries(layer: &AccessTokenLayer) -> Option<u64> {
    let debug = format!("{layer:?}");
    let rest = debug.split("valid_entries: ").nth(1)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The live heap of process `pid`, as glibc counts it (`mallinfo2()`: `uordblks`, the bytes
/// of chunks in use in the arenas, plus `hblkhd`, the bytes of chunks mapped on their own),
/// read with gdb while the process waits.
fn live_heap(pid: u32) -> Result<u64, String> {
    let output = Command::new("gdb")
        .args([
            "-nx",
            "-batch",
            "-p",
            &pid.to_string(),
            "-ex",
            "print mallinfo2()",
        ])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("could not run gdb: {e}"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    let field = |name: &str| {
        let rest = text.split(&format!("{name} = ")).nth(1)?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<u64>().ok()
    };
    match (field("uordblks"), field("hblkhd")) {
        (Some(in_use), Some(mapped)) => Ok(in_use + mapped),
        _ => Err(format!(
            "gdb did not print mallinfo2() (glibc's debug symbols missing? apt-get install \
             libc6-dbg): {}{}",
            text.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        )),
    }
}

/// Has process `pid` call `malloc_trim(0)` (with gdb), which returns every whole free page
/// of glibc's heap to the system, and reads its RSS from `/proc` afterwards.
fn trimmed_rss(pid: u32) -> Option<u64> {
    let output = Command::new("gdb")
        .args([
            "-nx",
            "-batch",
            "-p",
            &pid.to_string(),
            "-ex",
            "print (int) malloc_trim(0)",
        ])
        .stdin(Stdio::null())
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    vm_rss(&pid.to_string())
}

/// What one child run reported.
#[derive(Debug, Default)]
struct Run {
    /// Live heap bytes per verdict, if gdb could read them.
    heap_per_verdict: Option<f64>,
    /// Why not, if not.
    heap_problem: Option<String>,
    /// RSS bytes per verdict.
    rss_per_verdict: f64,
    /// RSS bytes per verdict once glibc has given back the free pages it holds
    /// (`malloc_trim(0)`, called with gdb after the "after" figures).
    rss_trimmed_per_verdict: Option<f64>,
    /// The fill of the N tokens, as the child timed it.
    fill: Duration,
    /// The round of hits over every token, as the child timed it.
    hits: Duration,
    /// The whole child run.
    wall: Duration,
    /// The valid verdicts the cache counted after the fill.
    entries: u64,
}

/// Runs one configuration in a fresh child and reads its figures; with `heap`, reads the live
/// heap with gdb too.
fn run(exe: &Path, config: Config, base_url: &str, heap: bool) -> Result<Run, String> {
    let started = Instant::now();
    let mut child = Command::new(exe)
        .args([
            CHILD_ARG,
            &config.tokens.to_string(),
            config.mode(),
            base_url,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("could not start the child: {e}"))?;
    let mut stderr = child.stderr.take().expect("piped");
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
        text
    });
    let stdout = BufReader::new(child.stdout.take().expect("piped"));
    let stdin = child.stdin.take().expect("piped");
    let talked = talk(&child, stdout, stdin, config, heap);
    let status = child
        .wait()
        .map_err(|e| format!("waiting for the child: {e}"))?;
    let stderr = stderr.join().unwrap_or_default();
    match talked {
        Ok(mut run) if status.success() => {
            run.wall = started.elapsed();
            Ok(run)
        }
        Ok(_) => Err(format!("the child failed ({status}):\n{stderr}")),
        Err(problem) => Err(format!(
            "{problem}; the child ended with {status}:\n{stderr}"
        )),
    }
}

/// The bench's side of the child's protocol: reads "before", "after" and "done", answering
/// `go`, and with `heap` reads the child's live heap before each answer.
fn talk(
    child: &Child,
    mut stdout: BufReader<ChildStdout>,
    mut stdin: ChildStdin,
    config: Config,
    heap: bool,
) -> Result<Run, String> {
    let mut expect = |word: &str| -> Result<Vec<u64>, String> {
        let mut line = String::new();
        let _ = stdout.read_line(&mut line);
        let mut words = line.split_whitespace();
        if words.next() != Some(word) {
            return Err(format!("the child did not say {word:?} (it said {line:?})"));
        }
        Ok(words.filter_map(|w| w.parse().ok()).collect())
    };
    let heap_now = || heap.then(|| live_heap(child.id()));
    let rss_before = expect("before")?.first().copied().unwrap_or(0);
    let heap_before = heap_now();
    writeln!(stdin, "go").map_err(|e| e.to_string())?;
    let after = expect("after")?;
    let heap_after = heap_now();
    let trimmed = if heap { trimmed_rss(child.id()) } else { None };
    writeln!(stdin, "go").map_err(|e| e.to_string())?;
    let hits_ms = expect("done")?.first().copied().unwrap_or(0);

    let [rss_after, fill_ms, entries] = after[..] else {
        return Err(format!("the child's \"after\" line is short: {after:?}"));
    };
    let verdicts = config.measured() as f64;
    let mut run = Run {
        rss_per_verdict: (rss_after as f64 - rss_before as f64) / verdicts,
        fill: Duration::from_millis(fill_ms),
        hits: Duration::from_millis(hits_ms),
        entries,
        rss_trimmed_per_verdict: trimmed
            .map(|trimmed| (trimmed as f64 - rss_before as f64) / verdicts),
        ..Run::default()
    };
    match (heap_before, heap_after) {
        (Some(Ok(before)), Some(Ok(after))) => {
            run.heap_per_verdict = Some((after as f64 - before as f64) / verdicts);
        }
        (Some(Err(problem)), _) | (_, Some(Err(problem))) => run.heap_problem = Some(problem),
        _ => {}
    }
    Ok(run)
}

/// `cargo test --benches`: one small run.
fn smoke() -> ExitCode {
    let upstream = TinyUpstream::start();
    let exe = std::env::current_exe().expect("the bench's own path");
    let config = Config {
        tokens: SMOKE_COUNT,
        stale_if_error: false,
    };
    let heap = on_path("gdb");
    let calls_before = upstream.verify_calls();
    let measured = run(&exe, config, &upstream.base_url(), heap)
        .unwrap_or_else(|problem| panic!("the smoke run failed: {problem}"));
    let verified = upstream.verify_calls() - calls_before;
    println!(
        "memory: {SMOKE_COUNT} tokens: {} bytes of live heap and {:.0} bytes of RSS per verdict; \
         {verified} verifications",
        measured
            .heap_per_verdict
            .map_or_else(|| "(not measured)".to_owned(), |heap| format!("{heap:.0}")),
        measured.rss_per_verdict
    );
    // The live heap is exact; RSS this small is mostly noise, but grows.
    let figure = measured
        .heap_per_verdict
        .unwrap_or(measured.rss_per_verdict);
    assert!(
        figure.is_finite() && figure > 0.0,
        "bytes per verdict should be positive and finite, got {figure}"
    );
    assert_eq!(
        verified,
        WARM + config.measured(),
        "each token should have been verified exactly once"
    );
    ExitCode::SUCCESS
}

fn bench(args: &[String]) -> ExitCode {
    let started = Instant::now();
    let exe = std::env::current_exe().expect("the bench's own path");
    let upstream = TinyUpstream::start();
    let mut heap = on_path("gdb");
    if !heap {
        println!(
            "memory: gdb is missing, so live heap is not measured, only RSS; apt-get install gdb \
             libc6-dbg"
        );
    }
    // `cargo bench --bench memory -- 100000` measures only the counts given.
    let wanted: Vec<usize> = args.iter().skip(1).filter_map(|a| a.parse().ok()).collect();
    let counts: Vec<usize> = if wanted.is_empty() {
        COUNTS.to_vec()
    } else {
        wanted
    };

    println!(
        "Each configuration in a fresh process, filled with {FILL_CONCURRENCY} verifications in \
         flight:"
    );
    let mut rows = Vec::new();
    for &tokens in &counts {
        for stale_if_error in [false, true] {
            let config = Config {
                tokens,
                stale_if_error,
            };
            let mut measured = match run(&exe, config, &upstream.base_url(), heap) {
                Ok(run) => run,
                Err(problem) => {
                    eprintln!("memory: {config:?}: {problem}");
                    return ExitCode::FAILURE;
                }
            };
            if let Some(problem) = measured.heap_problem.take() {
                println!("memory: live heap not measured: {problem}");
                heap = false;
            }
            println!(
                "  {tokens:>9} tokens, stale-if-error {:<3}: {:6.1} s (fill {:6.1} s, {:5.0} \
                 verifications/s; every token again, all hits, {:4.1} s); the cache counts {} valid \
                 entries",
                config.stale_label(),
                measured.wall.as_secs_f64(),
                measured.fill.as_secs_f64(),
                tokens as f64 / measured.fill.as_secs_f64(),
                measured.hits.as_secs_f64(),
                measured.entries
            );
            rows.push((config, measured));
        }
    }

    println!();
    println!(
        "Bytes per cached valid verdict, (after - before) / verdicts added (refresh-ahead on, the \
         default; cache_capacity = twice the tokens cached):"
    );
    println!(
        "  {:>10} {:>15} {:>18} {:>18} {:>24}",
        "tokens", "stale-if-error", "live heap (glibc)", "RSS delta", "RSS after malloc_trim"
    );
    let heap_text = |run: &Run| {
        run.heap_per_verdict
            .map_or_else(|| "-".to_owned(), |heap| format!("{heap:.1}"))
    };
    for (config, measured) in &rows {
        let trimmed = measured
            .rss_trimmed_per_verdict
            .map_or_else(|| "-".to_owned(), |trimmed| format!("{trimmed:.1}"));
        println!(
            "  {:>10} {:>15} {:>18} {:>18.1} {trimmed:>24}",
            config.tokens,
            config.stale_label(),
            heap_text(measured),
            measured.rss_per_verdict
        );
    }
    println!();
    for &tokens in &counts {
        let find = |stale_if_error| {
            rows.iter()
                .find(|(c, _)| c.tokens == tokens && c.stale_if_error == stale_if_error)
                .map(|(_, run)| run)
        };
        if let (Some(off), Some(on)) = (find(false), find(true)) {
            let heap = match (off.heap_per_verdict, on.heap_per_verdict) {
                (Some(off), Some(on)) => format!("{:+.1} bytes of live heap, ", on - off),
                _ => String::new(),
            };
            println!(
                "  stale-if-error adds at {tokens:>9} tokens: {heap}{:+.1} bytes of RSS per \
                 verdict",
                on.rss_per_verdict - off.rss_per_verdict
            );
        }
    }
    println!(
        "  live heap: glibc's chunks in use (mallinfo2 uordblks + hblkhd, read with gdb: the \
         bytes asked for plus 8-16 bytes of chunk overhead per allocation); RSS delta: resident \
         memory (VmRSS)"
    );
    println!();
    println!(
        "memory: the whole run took {:.0} s",
        started.elapsed().as_secs_f64()
    );
    ExitCode::SUCCESS
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}
