//! One Conneqt simulator in a process of its own, for benches that run several sidecars
//! against one upstream (`benches/replicas_sidecar.sh`): `conneqt-guard --simulator` embeds a
//! simulator per process, so three sidecars started that way would not share one, and each
//! would count only its own verify calls. Bench tooling, not a bench.
//!
//! Run with
//!
//! ```text
//! cargo run --release -p conneqt-guard-benches --example shared_simulator
//! LATENCY_MS=20 target/release/examples/shared_simulator
//! ```
//!
//! It binds a free port on `127.0.0.1` and prints, one per line,
//! `base_url http://127.0.0.1:PORT`, `api_key KEY` (for the sidecars' `--base-url` and
//! `--api-key`) and `ready`. Then it answers one line on stdout for each command read on stdin:
//!
//! | stdin | stdout |
//! |---|---|
//! | `issue` | `token UUID`: a fresh valid token |
//! | `revoke UUID` | `revoked` |
//! | `calls` | `calls N`: verify calls so far, every token |
//! | `calls UUID` | `calls N`: verify calls so far for that token |
//! | `latency MS` | `latency MS`: the verify latency from now on |
//! | anything else | `error ...` |
//!
//! At the end of stdin it prints `calls N` once more and exits. `LATENCY_MS` sets the verify
//! latency from the start (default 0).

use std::io::{BufRead as _, Write as _};
use std::time::Duration;

use conneqt_guard_simulator::Simulator;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("simulator")
        .enable_all()
        .build()
        .expect("runtime");
    let sim = runtime.block_on(Simulator::start()).expect("simulator");
    let latency = std::env::var("LATENCY_MS")
        .ok()
        .and_then(|ms| ms.parse::<u64>().ok())
        .unwrap_or(0);
    sim.set_latency(Duration::from_millis(latency));
    say(&format!("base_url {}", sim.base_url()));
    say(&format!("api_key {}", sim.api_key()));
    say("ready");
    // The simulator serves on the runtime's worker thread while this one reads commands.
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("issue"), None) => say(&format!("token {}", sim.issue_token())),
            (Some("revoke"), Some(token)) => {
                sim.revoke(token);
                say("revoked");
            }
            (Some("calls"), None) => say(&format!("calls {}", sim.verify_calls())),
            (Some("calls"), Some(token)) => say(&format!("calls {}", sim.verify_calls_for(token))),
            (Some("latency"), Some(ms)) => match ms.parse::<u64>() {
                Ok(ms) => {
                    sim.set_latency(Duration::from_millis(ms));
                    say(&format!("latency {ms}"));
                }
                Err(_) => say("error: latency takes milliseconds"),
            },
            (None, None) => {}
            _ => say(&format!("error: unknown command {line:?}")),
        }
    }
    say(&format!("calls {}", sim.verify_calls()));
    let _entered = runtime.enter();
    drop(sim);
}

/// One line on stdout, flushed; a reader that went away (the script ended) is not an error.
fn say(line: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
}
