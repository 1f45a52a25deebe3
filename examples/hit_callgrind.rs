//! Issue 10's measuring harness (not the official bench): N in-process `oneshot` calls on a
//! current-thread runtime, for `valgrind --tool=callgrind`.
//!
//! `hit_callgrind inner|validate|hit N`: N calls (one token, warmed).
//! `hit_callgrind fill N`: fills N distinct valid verdicts (simulator in a child process),
//! prints RSS per verdict, then runs `hit_loop` (10,000 hits over the filled tokens); with
//! `WAIT_FILE` set it prints READY and waits for that file first (for `callgrind_control -i on`).
//! `hit_callgrind sim N`: the child: a simulator that issued N tokens.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::io::{BufRead, Write};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use conneqt_guard::AccessTokenLayer;
use conneqt_guard::simulator::Simulator;
use http::{Request, Response, StatusCode};
use http_body_util::{Empty, Full};
use tower::{Layer, Service, ServiceExt};
use tower_http::validate_request::ValidateRequestHeaderLayer;

const TOKEN_HEADER: &str = "conneqt-instant-access-token";
type Body = Empty<Bytes>;

#[derive(Clone, Copy, Debug)]
struct Ok200;

impl Service<Request<Body>> for Ok200 {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _request: Request<Body>) -> Self::Future {
        ready(Ok(Response::new(Full::new(Bytes::from_static(b"ok")))))
    }
}

fn request(token: &str) -> Request<Body> {
    Request::get("/messages")
        .header(TOKEN_HEADER, token)
        .body(Body::new())
        .expect("a valid request")
}

async fn call<S, B>(service: S, request: Request<Body>) -> StatusCode
where
    S: Service<Request<Body>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
{
    service
        .oneshot(request)
        .await
        .expect("never fails")
        .status()
}

fn guard(base_url: String, api_key: &str, capacity: u64) -> AccessTokenLayer {
    AccessTokenLayer::builder()
        .base_url(base_url)
        .api_key(api_key)
        .cache_ttl(Duration::from_secs(3600))
        .cache_capacity(capacity)
        .build()
        .expect("valid settings")
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("hit");
    let n: usize = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(2000);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    match mode {
        "sim" => sim(n),
        "fill" => fill(&runtime, n),
        _ => one_token(&runtime, mode, n),
    }
}

fn one_token(runtime: &tokio::runtime::Runtime, mode: &str, n: usize) {
    let sim_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let sim = sim_runtime.block_on(Simulator::start()).unwrap();
    let token = sim.issue_token();
    match mode {
        "inner" => runtime.block_on(async {
            for _ in 0..n {
                assert_eq!(call(Ok200, request(&token)).await, 200);
            }
        }),
        "validate" => {
            let validate = ValidateRequestHeaderLayer::has_header_value(TOKEN_HEADER, &token)
                .unwrap()
                .layer(Ok200);
            runtime.block_on(async {
                for _ in 0..n {
                    assert_eq!(call(validate.clone(), request(&token)).await, 200);
                }
            });
        }
        _ => {
            let hit = guard(sim.base_url(), sim.api_key(), 100_000).layer(Ok200);
            runtime.block_on(async {
                assert_eq!(call(hit.clone(), request(&token)).await, 200);
                for _ in 0..n {
                    assert_eq!(call(hit.clone(), request(&token)).await, 200);
                }
            });
        }
    }
    let _entered = sim_runtime.enter();
    drop(sim);
}

fn sim(n: usize) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let sim = runtime.block_on(Simulator::start()).unwrap();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    writeln!(out, "{}", sim.base_url()).unwrap();
    writeln!(out, "{}", sim.api_key()).unwrap();
    for _ in 0..n {
        writeln!(out, "{}", sim.issue_token()).unwrap();
    }
    out.flush().unwrap();
    drop(out);
    // Serve until the parent closes our stdin.
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    let _entered = runtime.enter();
    drop(sim);
}

fn fill(runtime: &tokio::runtime::Runtime, n: usize) {
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["sim", &n.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let base_url = lines.next().unwrap().unwrap();
    let api_key = lines.next().unwrap().unwrap();
    let mut tokens = Vec::with_capacity(n * 36);
    for _ in 0..n {
        tokens.extend_from_slice(lines.next().unwrap().unwrap().as_bytes());
    }
    let token = |i: usize| std::str::from_utf8(&tokens[i * 36..i * 36 + 36]).unwrap();
    let capacity = u64::try_from(n).unwrap().max(1000);
    let layer = guard(base_url, &api_key, capacity);
    let service = layer.layer(Ok200);
    // Warm the connection pool and the runtime before the baseline.
    let spare = runtime.block_on(async {
        for i in 0..n.min(100) {
            assert_eq!(call(service.clone(), request(token(i))).await, 200);
        }
        n.min(100)
    });
    layer.invalidate_all();
    let before = rss_bytes();
    let started = std::time::Instant::now();
    runtime.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..n {
            if set.len() >= 32 {
                assert_eq!(set.join_next().await.unwrap().unwrap(), 200);
            }
            let service = service.clone();
            let request = request(token(i));
            set.spawn(async move { call(service, request).await });
        }
        while let Some(status) = set.join_next().await {
            assert_eq!(status.unwrap(), 200);
        }
    });
    let _ = spare;
    let after = rss_bytes();
    println!(
        "fill {n}: {:.1} s, RSS {} -> {} MB, {:.0} bytes/verdict",
        started.elapsed().as_secs_f64(),
        before >> 20,
        after >> 20,
        (after.saturating_sub(before)) as f64 / n as f64
    );
    if let Ok(wait) = std::env::var("WAIT_FILE") {
        println!("READY");
        std::io::stdout().flush().unwrap();
        while !std::path::Path::new(&wait).exists() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let indices: Vec<usize> = (0..10_000).map(|i| (i * 7919) % n).collect();
    let requests: Vec<Request<Body>> = indices.iter().map(|&i| request(token(i))).collect();
    runtime.block_on(hit_loop(&service, requests));
    drop(child.stdin.take());
    let _ = child.wait();
}

#[inline(never)]
async fn hit_loop<S, B>(service: &S, requests: Vec<Request<Body>>)
where
    S: Service<Request<Body>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
{
    for request in requests {
        assert_eq!(call(service.clone(), request).await, 200);
    }
}
