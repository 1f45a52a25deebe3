//! Command-line and environment settings, mirroring the library's builder.

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use conneqt_guard::{
    AccessTokenLayer, AccessTokenLayerBuilder, DEFAULT_CACHE_CAPACITY, DEFAULT_CACHE_TTL,
    DEFAULT_CIRCUIT_BREAKER_COOL_DOWN, DEFAULT_CIRCUIT_BREAKER_THRESHOLD, DEFAULT_GONE_CAPACITY,
    DEFAULT_GONE_TTL, DEFAULT_MAX_CONCURRENT_VERIFICATIONS, DEFAULT_UPSTREAM_TIMEOUT,
    DEFAULT_VERIFY_PATH,
};

/// Verifies Quicksilva Conneqt instant-messaging access tokens in front of any HTTP or gRPC
/// service: as a reverse proxy (`proxy`) or as the auth service of nginx `auth_request`,
/// Traefik `ForwardAuth` or Envoy `ext_authz` (`forward-auth`).
///
/// Every setting can also be given as the environment variable named beside it. Durations are
/// written like `500ms`, `30s`, `10m`, `1h`. Logs go to stderr (filter with `RUST_LOG`); the
/// token and the API key are never logged.
#[derive(Debug, Parser)]
#[command(name = "conneqt-guard", version)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) mode: Mode,
}

/// The two ways to run.
#[derive(Debug, Subcommand)]
pub(crate) enum Mode {
    /// A reverse proxy: every request needs a verified token before it is forwarded to the
    /// backend (HTTP/1.1 and h2c, so gRPC passes through).
    Proxy(ProxyArgs),
    /// An auth service for a proxy's sub-request: `200` (with `X-Conneqt-Token-Fingerprint`)
    /// for a verified token, else the guard's rejection with `X-Conneqt-Guard-Status`.
    ForwardAuth(ForwardAuthArgs),
}

/// Settings of `proxy`.
#[derive(Debug, Args)]
pub(crate) struct ProxyArgs {
    /// The service to protect, e.g. `http://127.0.0.1:3000` (plain HTTP; a path prefix is
    /// kept). gRPC requests reach it over HTTP/2 (h2c), everything else over HTTP/1.1.
    #[arg(long, env = "CONNEQT_GUARD_BACKEND")]
    pub(crate) backend: String,
    /// Where the proxy listens (`127.0.0.1:0` picks a free port; the address is printed as
    /// `listening on ADDR`).
    #[arg(long, env = "CONNEQT_GUARD_LISTEN", default_value = "127.0.0.1:8080")]
    pub(crate) listen: SocketAddr,
    /// How long a client connection may stay idle between two requests, and may take to send a
    /// whole request head (nginx `client_header_timeout`). More than zero.
    #[arg(long, env = "CONNEQT_GUARD_REQUEST_HEAD_TIMEOUT", default_value = "60s", value_parser = positive_duration)]
    pub(crate) request_head_timeout: HumanDuration,
    /// How long a client may stay idle between two reads of a request body (nginx
    /// `client_body_timeout`); then `408`, or a close once the answer has started. More than
    /// zero.
    #[arg(long, env = "CONNEQT_GUARD_REQUEST_BODY_TIMEOUT", default_value = "60s", value_parser = positive_duration)]
    pub(crate) request_body_timeout: HumanDuration,
    /// How long connecting to the backend may take (nginx `proxy_connect_timeout`); then `504`.
    /// More than zero.
    #[arg(long, env = "CONNEQT_GUARD_BACKEND_CONNECT_TIMEOUT", default_value = "60s", value_parser = positive_duration)]
    pub(crate) backend_connect_timeout: HumanDuration,
    /// How long the backend may take from the request sent to its response head (nginx
    /// `proxy_read_timeout`); then `504`. More than zero.
    #[arg(long, env = "CONNEQT_GUARD_BACKEND_RESPONSE_TIMEOUT", default_value = "60s", value_parser = positive_duration)]
    pub(crate) backend_response_timeout: HumanDuration,
    /// How long the backend may stay idle between two reads of a response body (nginx
    /// `proxy_read_timeout`); then the client's connection is closed, as the answer has
    /// started. More than zero.
    #[arg(long, env = "CONNEQT_GUARD_BACKEND_BODY_TIMEOUT", default_value = "60s", value_parser = positive_duration)]
    pub(crate) backend_body_timeout: HumanDuration,
    #[command(flatten)]
    pub(crate) common: Common,
}

impl ProxyArgs {
    /// The proxy's timeouts from their flags.
    pub(crate) fn timeouts(&self) -> crate::proxy::Timeouts {
        crate::proxy::Timeouts {
            request_head: self.request_head_timeout.0,
            request_body: self.request_body_timeout.0,
            backend_connect: self.backend_connect_timeout.0,
            backend_response: self.backend_response_timeout.0,
            backend_body: self.backend_body_timeout.0,
        }
    }
}

/// Settings of `forward-auth`.
#[derive(Debug, Args)]
pub(crate) struct ForwardAuthArgs {
    /// Where the auth service listens (`127.0.0.1:0` picks a free port; the address is printed
    /// as `listening on ADDR`).
    #[arg(long, env = "CONNEQT_GUARD_LISTEN", default_value = "127.0.0.1:8081")]
    pub(crate) listen: SocketAddr,
    #[command(flatten)]
    pub(crate) common: Common,
}

/// Settings both modes share: the guard's own, the admin listener and shutdown.
#[derive(Debug, Args)]
pub(crate) struct Common {
    /// Conneqt's base URL, e.g. `https://int.conneqt.health`. Required unless `--simulator`.
    #[arg(long, env = "CONNEQT_BASE_URL")]
    pub(crate) base_url: Option<String>,
    /// The API key Quicksilva issued to your system, sent as `ApiKey`. Required unless
    /// `--simulator`. Never printed or logged.
    #[arg(long, env = "CONNEQT_API_KEY", hide_env_values = true)]
    pub(crate) api_key: Option<String>,
    /// The verify endpoint's path, appended to the base URL.
    #[arg(long, env = "CONNEQT_VERIFY_PATH", default_value = DEFAULT_VERIFY_PATH)]
    pub(crate) verify_path: String,
    /// How long a valid verdict is trusted; also the longest a revoked token goes on working.
    #[arg(long, env = "CONNEQT_CACHE_TTL", default_value_t = HumanDuration(DEFAULT_CACHE_TTL))]
    pub(crate) cache_ttl: HumanDuration,
    /// How long a revoked (`410`) verdict is remembered.
    #[arg(long, env = "CONNEQT_GONE_TTL", default_value_t = HumanDuration(DEFAULT_GONE_TTL))]
    pub(crate) gone_ttl: HumanDuration,
    /// The deadline for one whole upstream verify call.
    #[arg(long, env = "CONNEQT_UPSTREAM_TIMEOUT", default_value_t = HumanDuration(DEFAULT_UPSTREAM_TIMEOUT))]
    pub(crate) upstream_timeout: HumanDuration,
    /// Upstream verify calls in flight at once.
    #[arg(long, env = "CONNEQT_MAX_CONCURRENT_VERIFICATIONS", default_value_t = DEFAULT_MAX_CONCURRENT_VERIFICATIONS)]
    pub(crate) max_concurrent_verifications: usize,
    /// Opt-in grace: while the upstream is unavailable, a token whose valid verdict expired
    /// less than this long ago still passes [default: off].
    #[arg(long, env = "CONNEQT_STALE_IF_ERROR")]
    pub(crate) stale_if_error: Option<HumanDuration>,
    /// Valid tokens remembered at once.
    #[arg(long, env = "CONNEQT_CACHE_CAPACITY", default_value_t = DEFAULT_CACHE_CAPACITY)]
    pub(crate) cache_capacity: u64,
    /// Revoked tokens remembered at once.
    #[arg(long, env = "CONNEQT_GONE_CAPACITY", default_value_t = DEFAULT_GONE_CAPACITY)]
    pub(crate) gone_capacity: u64,
    /// Accept any 1-256 visible-ASCII token instead of only UUIDs.
    #[arg(long, env = "CONNEQT_ACCEPT_OPAQUE_TOKENS")]
    pub(crate) accept_opaque_tokens: bool,
    /// Proxy mode: remove the token header before forwarding, so the backend never sees it.
    #[arg(long, env = "CONNEQT_STRIP_TOKEN_HEADER")]
    pub(crate) strip_token_header: bool,
    /// Requests whose path starts with this prefix (on whole segments) pass unverified, e.g.
    /// `/healthz`. Repeat the flag, or separate prefixes with commas [default: none].
    #[arg(
        long = "skip-path-prefix",
        env = "CONNEQT_SKIP_PATH_PREFIXES",
        value_delimiter = ','
    )]
    pub(crate) skip_path_prefixes: Vec<String>,
    /// An HTTP(S) proxy for upstream calls [default: none; HTTP_PROXY is ignored]. May hold
    /// credentials, so its value is never printed.
    #[arg(long, env = "CONNEQT_UPSTREAM_PROXY", hide_env_values = true)]
    pub(crate) upstream_proxy: Option<String>,
    /// Consecutive upstream failures that open the circuit breaker.
    #[arg(long, env = "CONNEQT_CIRCUIT_BREAKER_THRESHOLD", default_value_t = DEFAULT_CIRCUIT_BREAKER_THRESHOLD)]
    pub(crate) circuit_breaker_threshold: u32,
    /// How long an open circuit fails fast before one probe is let through.
    #[arg(long, env = "CONNEQT_CIRCUIT_BREAKER_COOL_DOWN", default_value_t = HumanDuration(DEFAULT_CIRCUIT_BREAKER_COOL_DOWN))]
    pub(crate) circuit_breaker_cool_down: HumanDuration,
    /// The admin listener: `/healthz`, `/readyz` (checks the API key with Conneqt's
    /// `/api/v1/test`) and `/metrics` (Prometheus). Printed as `admin listening on ADDR`.
    #[arg(
        long,
        env = "CONNEQT_GUARD_ADMIN_LISTEN",
        default_value = "127.0.0.1:9090"
    )]
    pub(crate) admin_listen: SocketAddr,
    /// Threads serving connections, each with its own event loop (a connection stays on the
    /// thread that accepted it) [default: one per CPU].
    #[arg(long, env = "CONNEQT_GUARD_WORKERS")]
    pub(crate) workers: Option<NonZeroUsize>,
    /// After SIGTERM or SIGINT: how long in-flight requests may take to finish.
    #[arg(long, env = "CONNEQT_GUARD_SHUTDOWN_TIMEOUT", default_value_t = HumanDuration(Duration::from_secs(10)))]
    pub(crate) shutdown_timeout: HumanDuration,
    /// Start the embedded Conneqt simulator and verify against it; prints a valid and a revoked
    /// token to try. For demos and tests only. Cannot be combined with `--base-url` or
    /// `--api-key`, also when they come from `CONNEQT_BASE_URL` or `CONNEQT_API_KEY`: unset
    /// those to use the simulator.
    #[arg(long, conflicts_with_all = ["base_url", "api_key"])]
    pub(crate) simulator: bool,
}

impl Common {
    /// `--workers`, or one per CPU.
    pub(crate) fn workers(&self) -> NonZeroUsize {
        self.workers
            .unwrap_or_else(|| std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN))
    }

    /// The library builder with every setting applied; `build()` then checks them all.
    pub(crate) fn builder(&self) -> AccessTokenLayerBuilder {
        let mut builder = AccessTokenLayer::builder()
            .verify_path(&self.verify_path)
            .cache_ttl(self.cache_ttl.0)
            .gone_ttl(self.gone_ttl.0)
            .upstream_timeout(self.upstream_timeout.0)
            .max_concurrent_verifications(self.max_concurrent_verifications)
            .cache_capacity(self.cache_capacity)
            .gone_capacity(self.gone_capacity)
            .accept_opaque_tokens(self.accept_opaque_tokens)
            .circuit_breaker_threshold(self.circuit_breaker_threshold)
            .circuit_breaker_cool_down(self.circuit_breaker_cool_down.0)
            .strip_token_header(self.strip_token_header);
        for prefix in &self.skip_path_prefixes {
            builder = builder.skip_path_prefix(prefix.trim());
        }
        if let Some(url) = &self.base_url {
            builder = builder.base_url(url);
        }
        if let Some(key) = &self.api_key {
            builder = builder.api_key(key);
        }
        if let Some(grace) = self.stale_if_error {
            builder = builder.stale_if_error(grace.0);
        }
        if let Some(proxy) = &self.upstream_proxy {
            builder = builder.upstream_proxy(proxy);
        }
        builder
    }
}

/// A duration written with a unit: `250ms`, `30s`, `10m`, `1h`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct HumanDuration(pub(crate) Duration);

impl FromStr for HumanDuration {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("{text:?} has no unit: write e.g. 500ms, 30s, 10m or 1h"))?;
        let (number, unit) = text.split_at(split);
        let number: u64 = number
            .parse()
            .map_err(|_| format!("{text:?} does not start with a whole number"))?;
        let millis_per_unit: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            _ => {
                return Err(format!(
                    "{text:?}: unknown unit {unit:?} (use ms, s, m or h)"
                ));
            }
        };
        number
            .checked_mul(millis_per_unit)
            .map(|millis| Self(Duration::from_millis(millis)))
            .ok_or_else(|| format!("{text:?} is too long"))
    }
}

/// A [`HumanDuration`] that must be more than zero (clap names the flag in the error).
fn positive_duration(text: &str) -> Result<HumanDuration, String> {
    let duration: HumanDuration = text.parse()?;
    if duration.0.is_zero() {
        return Err("must be more than zero".to_owned());
    }
    Ok(duration)
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let millis = self.0.as_millis();
        let (value, unit) = match millis {
            0 => (0, "s"),
            m if m % 3_600_000 == 0 => (m / 3_600_000, "h"),
            m if m % 60_000 == 0 => (m / 60_000, "m"),
            m if m % 1_000 == 0 => (m / 1_000, "s"),
            m => (m, "ms"),
        };
        write!(f, "{value}{unit}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Duration, String> {
        text.parse::<HumanDuration>().map(|d| d.0)
    }

    #[test]
    fn durations_with_units_parse() {
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn durations_without_a_known_unit_are_refused_with_a_hint() {
        for bad in [
            "30",
            "",
            "s",
            "1.5s",
            "10 parsecs",
            "-1s",
            "99999999999999999999h",
        ] {
            let error = parse(bad).unwrap_err();
            assert!(error.contains(&format!("{:?}", bad.trim())), "{error}");
        }
        assert!(parse("30").unwrap_err().contains("no unit"));
        assert!(parse("3d").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn durations_display_in_the_largest_exact_unit_and_round_trip() {
        for (duration, shown) in [
            (DEFAULT_CACHE_TTL, "30s"),
            (DEFAULT_GONE_TTL, "10m"),
            (Duration::from_millis(1500), "1500ms"),
            (Duration::from_secs(7200), "2h"),
        ] {
            assert_eq!(HumanDuration(duration).to_string(), shown);
            assert_eq!(parse(shown), Ok(duration));
        }
    }

    fn proxy_args(extra: &[&str]) -> Result<ProxyArgs, clap::Error> {
        let args = [
            "conneqt-guard",
            "proxy",
            "--backend",
            "http://127.0.0.1:3000",
        ];
        let cli = Cli::try_parse_from(args.iter().chain(extra))?;
        match cli.mode {
            Mode::Proxy(args) => Ok(args),
            Mode::ForwardAuth(_) => unreachable!("parsed `proxy`"),
        }
    }

    #[test]
    fn the_timeout_flags_fill_the_proxys_timeouts_and_default_to_a_minute() {
        // `--help` shows `[default: 60s]`; the value is `Timeouts::default()`'s.
        assert_eq!(
            proxy_args(&[]).unwrap().timeouts(),
            crate::proxy::Timeouts::default()
        );
        let args = proxy_args(&[
            "--request-head-timeout",
            "1s",
            "--request-body-timeout",
            "2s",
            "--backend-connect-timeout",
            "3s",
            "--backend-response-timeout",
            "4s",
            "--backend-body-timeout",
            "500ms",
        ])
        .unwrap();
        let timeouts = args.timeouts();
        assert_eq!(timeouts.request_head, Duration::from_secs(1));
        assert_eq!(timeouts.request_body, Duration::from_secs(2));
        assert_eq!(timeouts.backend_connect, Duration::from_secs(3));
        assert_eq!(timeouts.backend_response, Duration::from_secs(4));
        assert_eq!(timeouts.backend_body, Duration::from_millis(500));
    }

    #[test]
    fn a_zero_timeout_is_a_usage_error_naming_the_flag() {
        for flag in [
            "--request-head-timeout",
            "--request-body-timeout",
            "--backend-connect-timeout",
            "--backend-response-timeout",
            "--backend-body-timeout",
        ] {
            let error = proxy_args(&[flag, "0ms"]).unwrap_err();
            assert_eq!(error.kind(), clap::error::ErrorKind::ValueValidation);
            let message = error.to_string();
            assert!(message.contains(flag), "{message}");
            assert!(message.contains("more than zero"), "{message}");
        }
    }

    #[test]
    fn the_simulator_switch_conflicts_with_an_upstream() {
        for extra in [
            &["--simulator", "--base-url", "https://int.conneqt.health"][..],
            &["--api-key", "k", "--simulator"],
        ] {
            let error = proxy_args(extra).unwrap_err();
            assert_eq!(error.kind(), clap::error::ErrorKind::ArgumentConflict);
        }
        assert!(proxy_args(&["--simulator"]).unwrap().common.simulator);
    }

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
