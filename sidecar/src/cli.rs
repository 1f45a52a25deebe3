//! Command-line and environment settings, mirroring the library's builder.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::time::Duration;

use crate::settings;
use clap::{ArgMatches, Args, Command, FromArgMatches, Parser, Subcommand};
use conneqt_guard::AccessTokenLayerBuilder;

/// Verifies Quicksilva Conneqt instant-messaging access tokens in front of any HTTP or gRPC
/// service: as a reverse proxy (`proxy`) or as the auth service of nginx `auth_request`,
/// Traefik `ForwardAuth` or Envoy `ext_authz` (`forward-auth`).
///
/// Every setting can also be given as the environment variable named beside it. Durations are
/// written like `500ms`, `30s`, `1m30s`, `1h`; booleans as `true`, `false`, `1` or `0`. Logs go to stderr (filter with `RUST_LOG`); the
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
    pub(crate) request_head_timeout: Duration,
    /// How long a client may stay idle between two reads of a request body (nginx
    /// `client_body_timeout`); then `408`, or a close once the answer has started. More than
    /// zero.
    #[arg(long, env = "CONNEQT_GUARD_REQUEST_BODY_TIMEOUT", default_value = "60s", value_parser = positive_duration)]
    pub(crate) request_body_timeout: Duration,
    /// How long connecting to the backend may take (nginx `proxy_connect_timeout`); then `504`.
    /// More than zero.
    #[arg(long, env = "CONNEQT_GUARD_BACKEND_CONNECT_TIMEOUT", default_value = "60s", value_parser = positive_duration)]
    pub(crate) backend_connect_timeout: Duration,
    /// How long the backend may take from the request sent to its response head (nginx
    /// `proxy_read_timeout`); then `504`. More than zero.
    #[arg(long, env = "CONNEQT_GUARD_BACKEND_RESPONSE_TIMEOUT", default_value = "60s", value_parser = positive_duration)]
    pub(crate) backend_response_timeout: Duration,
    /// How long the backend may stay idle between two reads of a response body (nginx
    /// `proxy_read_timeout`); then the client's connection is closed, as the answer has
    /// started. More than zero.
    #[arg(long, env = "CONNEQT_GUARD_BACKEND_BODY_TIMEOUT", default_value = "60s", value_parser = positive_duration)]
    pub(crate) backend_body_timeout: Duration,
    #[command(flatten)]
    pub(crate) common: Common,
}

impl ProxyArgs {
    /// The proxy's timeouts from their flags.
    pub(crate) fn timeouts(&self) -> crate::proxy::Timeouts {
        crate::proxy::Timeouts {
            request_head: self.request_head_timeout,
            request_body: self.request_body_timeout,
            backend_connect: self.backend_connect_timeout,
            backend_response: self.backend_response_timeout,
            backend_body: self.backend_body_timeout,
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
    #[command(flatten)]
    pub(crate) guard: GuardSettings,
    /// The admin listener: `/healthz`, `/readyz` (checks the API key with Conneqt's
    /// `/api/v1/test`), `/metrics` (Prometheus), and `POST /invalidate` (the token in its
    /// header) and `POST /invalidate-all`, on every replica with `--redis-url`. Operators
    /// only. Printed as `admin listening on ADDR`.
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
    #[arg(long, env = "CONNEQT_GUARD_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = settings::parse_duration)]
    pub(crate) shutdown_timeout: Duration,
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
        self.guard.0.builder()
    }
}

/// The library's settings, one flag per row of its settings table (`--cache-ttl` and
/// `CONNEQT_CACHE_TTL` for `cache_ttl`), read with the library's grammar.
#[derive(Debug)]
pub(crate) struct GuardSettings(settings::Values);

impl Args for GuardSettings {
    fn augment_args(command: Command) -> Command {
        command.args(settings::args())
    }

    fn augment_args_for_update(command: Command) -> Command {
        Self::augment_args(command)
    }
}

impl FromArgMatches for GuardSettings {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        Ok(Self(settings::values(matches)))
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

/// A duration in the library's grammar that must be more than zero (clap names the flag in
/// the error).
fn positive_duration(text: &str) -> Result<Duration, String> {
    let duration = settings::parse_duration(text)?;
    if duration.is_zero() {
        return Err("must be more than zero".to_owned());
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

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
            "1m30s",
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
        assert_eq!(timeouts.request_head, Duration::from_secs(90));
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
    fn every_library_setting_is_a_flag_with_its_variable_in_each_modes_help() {
        use clap::CommandFactory;
        let mut command = Cli::command();
        for mode in ["proxy", "forward-auth"] {
            let help = command
                .find_subcommand_mut(mode)
                .unwrap()
                .render_long_help()
                .to_string();
            for (name, variable) in settings::names() {
                let flag = format!("--{}", name.replace('_', "-"));
                assert!(help.contains(&flag), "{mode}: {flag} missing in\n{help}");
                assert!(help.contains(variable), "{mode}: {variable} missing");
            }
        }
    }

    #[test]
    fn library_flags_reach_the_builder_in_the_librarys_grammar() {
        let args = proxy_args(&[
            "--cache-ttl",
            "1m30s",
            "--upstream-timeout",
            "1s500ms",
            "--accept-opaque-tokens=1",
            "--strip-token-header",
            "--refresh-ahead=false",
            "--refresh-ahead-share",
            "0.5",
            "--upstream-retry=0",
            "--skip-path-prefix",
            "/a, /b",
            "--skip-path-prefix",
            "/c",
        ])
        .unwrap();
        let shown = format!("{:?}", args.common.builder());
        for expected in [
            "cache_ttl: 90s",
            "upstream_timeout: 1.5s",
            "accept_opaque_tokens: true",
            "strip_token_header: true",
            "refresh_ahead: false",
            "refresh_ahead_share: 0.5",
            "upstream_retry: false",
            r#"skip_path_prefix: ["/a", "/b", "/c"]"#,
            "env_error: None",
        ] {
            assert!(shown.contains(expected), "{expected} missing in {shown}");
        }
    }

    #[test]
    fn the_api_key_and_proxy_never_show_in_debug_output() {
        let args = proxy_args(&[
            "--api-key",
            "sekrit-key",
            "--upstream-proxy",
            "http://user:sekrit@proxy",
        ])
        .unwrap();
        let shown = format!("{args:?} {:?}", args.common.builder());
        assert!(!shown.contains("sekrit"), "{shown}");
    }

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
