//! Programs from the machine that some tests need: nginx and Caddy (the sidecar's tests run
//! the shipped proxy configs behind them), `redis-server` (the shared verdict tier's tests).
//! Shared by the library's and the sidecar's tests with `#[path]`. A test whose program is
//! missing skips, and the test process says once per program, on stderr, what to install
//! (written past libtest's output capture, so `cargo test` shows it), unless `CONNEQT_REQUIRE_SYSTEM_TESTS=1` (CI sets it), which turns the skip into a
//! failure.

#![allow(dead_code, unreachable_pub)]

use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

/// Set to `1` to make a missing program fail the test instead of skipping it.
pub const REQUIRE_ENV: &str = "CONNEQT_REQUIRE_SYSTEM_TESTS";

/// `name` from `PATH` (or `/usr/sbin`, `/usr/local/sbin`, `/usr/bin`, where Debian puts it), or
/// `None` after saying (once per program and process, on stderr) what is missing and the
/// `apt-get` line that installs it. Panics with that message instead when [`REQUIRE_ENV`] is `1`.
pub fn program(name: &str, apt_package: &str) -> Option<PathBuf> {
    let required = std::env::var(REQUIRE_ENV).is_ok_and(|value| value == "1");
    program_or_skip(name, apt_package, required, |message| {
        say_once(name, message)
    })
}

fn program_or_skip(
    name: &str,
    apt_package: &str,
    required: bool,
    say: impl FnOnce(&str),
) -> Option<PathBuf> {
    if let Some(found) = find(name) {
        return Some(found);
    }
    let message = format!(
        "skipped: the tests that run against a real {name} (`{name}` is not installed); \
         install it with `apt-get install -y {apt_package}`"
    );
    if required {
        panic!("{message} ({REQUIRE_ENV}=1, so a missing program is a failure)");
    }
    say(&message);
    None
}

/// Writes `message` to the process's stderr unless it was written for `name` already. Not
/// `eprintln!`, which libtest captures and shows only for failing tests.
fn say_once(name: &str, message: &str) {
    static SAID: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut said = SAID
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !said.iter().any(|n| n == name) {
        said.push(name.to_owned());
        let _ = writeln!(std::io::stderr(), "{message}");
    }
}

fn find(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .chain([
            "/usr/sbin".into(),
            "/usr/local/sbin".into(),
            "/usr/bin".into(),
        ])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

#[test]
fn a_missing_program_is_a_skip_or_when_required_a_failure() {
    let missing = "conneqt-guard-no-such-program";
    assert_eq!(
        program_or_skip(missing, "no-such-package", false, |_| {}),
        None
    );
    let failure =
        std::panic::catch_unwind(|| program_or_skip(missing, "no-such-package", true, |_| {}))
            .expect_err("a required program that is missing fails the test");
    let message = failure.downcast_ref::<String>().unwrap();
    assert!(
        message.contains("apt-get install -y no-such-package"),
        "{message}"
    );
    assert!(find("sh").is_some(), "finds a program that is there");
}
