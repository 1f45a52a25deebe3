//! Programs from the machine that some tests need: nginx and Caddy (the sidecar's tests run
//! the shipped proxy configs behind them), `redis-server` (the shared verdict tier's tests).
//! Shared by the library's and the sidecar's tests with `#[path]`. A test whose program is
//! missing skips with one line on stderr saying what to
//! install, unless `CONNEQT_REQUIRE_SYSTEM_TESTS=1` (CI sets it), which turns the skip into a
//! failure.

#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;

/// Set to `1` to make a missing program fail the test instead of skipping it.
pub const REQUIRE_ENV: &str = "CONNEQT_REQUIRE_SYSTEM_TESTS";

/// `name` from `PATH` (or `/usr/sbin`, `/usr/local/sbin`, `/usr/bin`, where Debian puts it), or
/// `None` after printing one line on stderr: what is missing and the `apt-get` line that
/// installs it. Panics with that message instead when [`REQUIRE_ENV`] is `1`.
pub fn program(name: &str, apt_package: &str) -> Option<PathBuf> {
    let required = std::env::var(REQUIRE_ENV).is_ok_and(|value| value == "1");
    program_or_skip(name, apt_package, required)
}

fn program_or_skip(name: &str, apt_package: &str, required: bool) -> Option<PathBuf> {
    if let Some(found) = find(name) {
        return Some(found);
    }
    let message = format!(
        "skipped: `{name}` is not installed (this test runs against a real {name}); \
         install it with `apt-get install -y {apt_package}`"
    );
    if required {
        panic!("{message} ({REQUIRE_ENV}=1, so a missing program is a failure)");
    }
    eprintln!("{message}");
    None
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
    assert_eq!(program_or_skip(missing, "no-such-package", false), None);
    let failure = std::panic::catch_unwind(|| program_or_skip(missing, "no-such-package", true))
        .expect_err("a required program that is missing fails the test");
    let message = failure.downcast_ref::<String>().unwrap();
    assert!(
        message.contains("apt-get install -y no-such-package"),
        "{message}"
    );
    assert!(find("sh").is_some(), "finds a program that is there");
}
