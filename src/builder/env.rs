//! [`AccessTokenLayerBuilder::from_env`]: settings from `CONNEQT_*` environment variables.
//!
//! Reading goes through a lookup function, so the tests can hand it a map instead of changing
//! the process environment (which tests running in parallel share).

use std::time::Duration;

use super::{
    AccessTokenLayerBuilder, BuildError, MAX_COOL_DOWN, MAX_TTL, MAX_UPSTREAM_TIMEOUT, api_key,
    check_duration, check_path, parse_base_url,
};
use crate::layer::AccessTokenLayer;
use crate::skip;

const BASE_URL: &str = "CONNEQT_BASE_URL";
const API_KEY: &str = "CONNEQT_API_KEY";
const VERIFY_PATH: &str = "CONNEQT_VERIFY_PATH";
const CACHE_TTL: &str = "CONNEQT_CACHE_TTL";
const GONE_TTL: &str = "CONNEQT_GONE_TTL";
const UPSTREAM_TIMEOUT: &str = "CONNEQT_UPSTREAM_TIMEOUT";
const CACHE_CAPACITY: &str = "CONNEQT_CACHE_CAPACITY";
const GONE_CAPACITY: &str = "CONNEQT_GONE_CAPACITY";
const ACCEPT_OPAQUE_TOKENS: &str = "CONNEQT_ACCEPT_OPAQUE_TOKENS";
const UPSTREAM_PROXY: &str = "CONNEQT_UPSTREAM_PROXY";
const SKIP_PATH_PREFIXES: &str = "CONNEQT_SKIP_PATH_PREFIXES";
const STRIP_TOKEN_HEADER: &str = "CONNEQT_STRIP_TOKEN_HEADER";
const REFRESH_AHEAD: &str = "CONNEQT_REFRESH_AHEAD";
const REFRESH_AHEAD_SHARE: &str = "CONNEQT_REFRESH_AHEAD_SHARE";
const STALE_IF_ERROR: &str = "CONNEQT_STALE_IF_ERROR";
const MAX_CONCURRENT_VERIFICATIONS: &str = "CONNEQT_MAX_CONCURRENT_VERIFICATIONS";
const UPSTREAM_RETRY: &str = "CONNEQT_UPSTREAM_RETRY";
const CIRCUIT_BREAKER_THRESHOLD: &str = "CONNEQT_CIRCUIT_BREAKER_THRESHOLD";
const CIRCUIT_BREAKER_COOL_DOWN: &str = "CONNEQT_CIRCUIT_BREAKER_COOL_DOWN";

impl AccessTokenLayerBuilder {
    /// Starts a builder from `CONNEQT_*` environment variables.
    ///
    /// | variable | setting | format |
    /// |---|---|---|
    /// | `CONNEQT_BASE_URL` | [`base_url`](Self::base_url) | URL |
    /// | `CONNEQT_API_KEY` | [`api_key`](Self::api_key) | text (never quoted in errors) |
    /// | `CONNEQT_VERIFY_PATH` | [`verify_path`](Self::verify_path) | path |
    /// | `CONNEQT_CACHE_TTL` | [`cache_ttl`](Self::cache_ttl) | duration |
    /// | `CONNEQT_GONE_TTL` | [`gone_ttl`](Self::gone_ttl) | duration |
    /// | `CONNEQT_UPSTREAM_TIMEOUT` | [`upstream_timeout`](Self::upstream_timeout) | duration |
    /// | `CONNEQT_CACHE_CAPACITY` | [`cache_capacity`](Self::cache_capacity) | whole number |
    /// | `CONNEQT_GONE_CAPACITY` | [`gone_capacity`](Self::gone_capacity) | whole number |
    /// | `CONNEQT_ACCEPT_OPAQUE_TOKENS` | [`accept_opaque_tokens`](Self::accept_opaque_tokens) | boolean |
    /// | `CONNEQT_UPSTREAM_PROXY` | [`upstream_proxy`](Self::upstream_proxy) | URL (never quoted in errors) |
    /// | `CONNEQT_SKIP_PATH_PREFIXES` | [`skip_path_prefix`](Self::skip_path_prefix), once per entry | comma-separated prefixes, e.g. `/health,/metrics` |
    /// | `CONNEQT_STRIP_TOKEN_HEADER` | [`strip_token_header`](Self::strip_token_header) | boolean |
    /// | `CONNEQT_REFRESH_AHEAD` | [`refresh_ahead`](Self::refresh_ahead) | boolean |
    /// | `CONNEQT_REFRESH_AHEAD_SHARE` | [`refresh_ahead_share`](Self::refresh_ahead_share) | number between 0 and 1, e.g. `0.8` |
    /// | `CONNEQT_STALE_IF_ERROR` | [`stale_if_error`](Self::stale_if_error) | duration |
    /// | `CONNEQT_MAX_CONCURRENT_VERIFICATIONS` | [`max_concurrent_verifications`](Self::max_concurrent_verifications) | whole number |
    /// | `CONNEQT_UPSTREAM_RETRY` | [`upstream_retry`](Self::upstream_retry) | boolean |
    /// | `CONNEQT_CIRCUIT_BREAKER_THRESHOLD` | [`circuit_breaker_threshold`](Self::circuit_breaker_threshold) | whole number |
    /// | `CONNEQT_CIRCUIT_BREAKER_COOL_DOWN` | [`circuit_breaker_cool_down`](Self::circuit_breaker_cool_down) | duration |
    ///
    /// A duration is whole numbers with units `h`, `m`, `s`, `ms`, largest first: `30s`,
    /// `500ms`, `10m`, `1h`, `1m30s`. A boolean is `true`, `false`, `1` or `0`.
    ///
    /// An unset variable, or one set to the empty string, leaves the default (`base_url` and
    /// `api_key` stay required). Setters called afterwards override what the environment
    /// said (`skip_path_prefix` adds to its prefixes). A variable that cannot be used is an
    /// error from [`build`](Self::build), whatever setters follow, naming the variable and
    /// its value, e.g. ``conneqt-guard environment variable `CONNEQT_CACHE_TTL`: "30 sec" is
    /// not a duration (use e.g. 30s, 500ms, 10m)``; the API key and proxy values are never
    /// quoted. A value that is not valid Unicode counts as set but unusable.
    ///
    /// ```
    /// use std::time::Duration;
    /// use conneqt_guard::AccessTokenLayerBuilder;
    ///
    /// // In production `CONNEQT_BASE_URL` and `CONNEQT_API_KEY` come from the environment;
    /// // here setters override them, as any setter after `from_env` does.
    /// let guard = AccessTokenLayerBuilder::from_env()
    ///     .base_url("https://int.conneqt.health")
    ///     .api_key("my-key")
    ///     .upstream_timeout(Duration::from_secs(1))
    ///     .build()?; // no I/O
    /// # let _ = guard;
    /// # Ok::<(), conneqt_guard::BuildError>(())
    /// ```
    ///
    /// For a service configured by the environment alone, use
    /// [`AccessTokenLayer::from_env`].
    pub fn from_env() -> Self {
        Self::from_lookup(|name| {
            std::env::var_os(name).map(|value| value.to_string_lossy().into_owned())
        })
    }

    /// [`from_env`](Self::from_env) over any source of variables.
    pub(crate) fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Self {
        let mut env = Reader {
            lookup,
            error: None,
        };
        let mut builder = Self::default();

        if let Some(url) = env.read(BASE_URL, "base_url", |raw| {
            parse_base_url(raw).map(|_| raw.to_owned()).map_err(problem)
        }) {
            builder = builder.base_url(url);
        }
        // `api_key`'s problems never quote the key.
        if let Some(key) = env.read(API_KEY, "api_key", |raw| {
            api_key(Some(raw)).map(|_| raw.to_owned()).map_err(problem)
        }) {
            builder = builder.api_key(key);
        }
        if let Some(path) = env.read(VERIFY_PATH, "verify_path", |raw| {
            check_path(raw).map(|()| raw.to_owned()).map_err(problem)
        }) {
            builder = builder.verify_path(path);
        }
        if let Some(ttl) = env.read(CACHE_TTL, "cache_ttl", |raw| {
            duration_in_range(raw, "cache_ttl", MAX_TTL)
        }) {
            builder = builder.cache_ttl(ttl);
        }
        if let Some(ttl) = env.read(GONE_TTL, "gone_ttl", |raw| {
            duration_in_range(raw, "gone_ttl", MAX_TTL)
        }) {
            builder = builder.gone_ttl(ttl);
        }
        if let Some(timeout) = env.read(UPSTREAM_TIMEOUT, "upstream_timeout", |raw| {
            duration_in_range(raw, "upstream_timeout", MAX_UPSTREAM_TIMEOUT)
        }) {
            builder = builder.upstream_timeout(timeout);
        }
        if let Some(tokens) = env.read(CACHE_CAPACITY, "cache_capacity", capacity) {
            builder = builder.cache_capacity(tokens);
        }
        if let Some(tokens) = env.read(GONE_CAPACITY, "gone_capacity", capacity) {
            builder = builder.gone_capacity(tokens);
        }
        if let Some(accept) = env.read(ACCEPT_OPAQUE_TOKENS, "accept_opaque_tokens", boolean) {
            builder = builder.accept_opaque_tokens(accept);
        }
        if let Some(proxy) = env.read(UPSTREAM_PROXY, "upstream_proxy", |raw| {
            // Not quoted: a proxy URL may carry credentials.
            reqwest::Proxy::all(raw)
                .map(|_| raw.to_owned())
                .map_err(|_| "is not a valid proxy URL (e.g. http://proxy.internal:3128)".into())
        }) {
            builder = builder.upstream_proxy(proxy);
        }
        if let Some(prefixes) = env.read(SKIP_PATH_PREFIXES, "skip_path_prefix", prefixes) {
            builder = prefixes
                .into_iter()
                .fold(builder, AccessTokenLayerBuilder::skip_path_prefix);
        }
        if let Some(strip) = env.read(STRIP_TOKEN_HEADER, "strip_token_header", boolean) {
            builder = builder.strip_token_header(strip);
        }

        if let Some(on) = env.read(REFRESH_AHEAD, "refresh_ahead", boolean) {
            builder = builder.refresh_ahead(on);
        }
        if let Some(share) = env.read(REFRESH_AHEAD_SHARE, "refresh_ahead_share", |raw| match raw
            .parse::<f64>()
        {
            Ok(share) if share > 0.0 && share < 1.0 => Ok(share),
            _ => Err(format!(
                "{raw:?} is not a number between 0 and 1, exclusive (e.g. 0.8)"
            )),
        }) {
            builder = builder.refresh_ahead_share(share);
        }
        if let Some(grace) = env.read(STALE_IF_ERROR, "stale_if_error", |raw| {
            duration_in_range(raw, "stale_if_error", MAX_TTL)
        }) {
            builder = builder.stale_if_error(grace);
        }
        if let Some(calls) = env.read(
            MAX_CONCURRENT_VERIFICATIONS,
            "max_concurrent_verifications",
            |raw| {
                capacity(raw).and_then(|calls| {
                    usize::try_from(calls)
                        .ok()
                        .filter(|calls| *calls <= tokio::sync::Semaphore::MAX_PERMITS)
                        .ok_or_else(|| format!("{raw:?} is out of range"))
                })
            },
        ) {
            builder = builder.max_concurrent_verifications(calls);
        }
        if let Some(retry) = env.read(UPSTREAM_RETRY, "upstream_retry", boolean) {
            builder = builder.upstream_retry(retry);
        }
        if let Some(failures) = env.read(
            CIRCUIT_BREAKER_THRESHOLD,
            "circuit_breaker_threshold",
            |raw| {
                capacity(raw)
                    .and_then(|n| u32::try_from(n).map_err(|_| format!("{raw:?} is out of range")))
            },
        ) {
            builder = builder.circuit_breaker_threshold(failures);
        }
        if let Some(cool_down) = env.read(
            CIRCUIT_BREAKER_COOL_DOWN,
            "circuit_breaker_cool_down",
            |raw| duration_in_range(raw, "circuit_breaker_cool_down", MAX_COOL_DOWN),
        ) {
            builder = builder.circuit_breaker_cool_down(cool_down);
        }

        builder.env_error = env.error;
        builder
    }
}

impl AccessTokenLayer {
    /// Builds a layer from `CONNEQT_*` environment variables alone:
    /// [`AccessTokenLayerBuilder::from_env`] then [`build`](AccessTokenLayerBuilder::build).
    ///
    /// ```no_run
    /// // CONNEQT_BASE_URL=https://int.conneqt.health CONNEQT_API_KEY=... CONNEQT_CACHE_TTL=1m
    /// let guard = conneqt_guard::AccessTokenLayer::from_env()?;
    /// # Ok::<(), conneqt_guard::BuildError>(())
    /// ```
    pub fn from_env() -> Result<Self, BuildError> {
        AccessTokenLayerBuilder::from_env().build()
    }
}

/// Reads variables through `lookup`, remembering the first one that cannot be used.
struct Reader<L> {
    lookup: L,
    error: Option<BuildError>,
}

impl<L: Fn(&str) -> Option<String>> Reader<L> {
    /// The parsed value of `variable`; `None` when it is unset, empty or unusable (the first
    /// unusable one is kept as the error, which names `variable` and feeds `setting`).
    fn read<T>(
        &mut self,
        variable: &'static str,
        setting: &'static str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let raw = (self.lookup)(variable).filter(|raw| !raw.is_empty())?;
        match parse(&raw) {
            Ok(value) => Some(value),
            Err(problem) => {
                self.error.get_or_insert(BuildError {
                    setting,
                    variable: Some(variable),
                    problem,
                    source: None,
                });
                None
            }
        }
    }
}

/// A validator's problem text, to be re-attributed to the variable.
fn problem(error: BuildError) -> String {
    error.problem
}

fn duration_in_range(raw: &str, setting: &'static str, max: Duration) -> Result<Duration, String> {
    let duration = parse_duration(raw)
        .ok_or_else(|| format!("{raw:?} is not a duration (use e.g. 30s, 500ms, 10m)"))?;
    check_duration(setting, duration, max)
        .map_err(|error| format!("{raw:?} is out of range: {}", error.problem))?;
    Ok(duration)
}

fn capacity(raw: &str) -> Result<u64, String> {
    match raw.parse::<u64>() {
        Ok(0) => Err(format!("{raw:?} is out of range: must be at least 1")),
        Ok(tokens) => Ok(tokens),
        Err(_) => Err(format!("{raw:?} is not a whole number (e.g. 100000)")),
    }
}

fn boolean(raw: &str) -> Result<bool, String> {
    match raw {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(format!(
            "{raw:?} is not a boolean (use true, false, 1 or 0)"
        )),
    }
}

/// Comma-separated prefixes; spaces around entries and empty entries are ignored.
fn prefixes(raw: &str) -> Result<Vec<String>, String> {
    raw.split(',')
        .map(str::trim)
        .filter(|prefix| !prefix.is_empty())
        .map(|prefix| skip::check_prefix(prefix).map(|()| prefix.to_owned()))
        .collect()
}

/// Parses `30s`, `500ms`, `10m`, `1h` and combinations such as `1h30m` or `1m30s500ms`:
/// whole numbers, each with a unit, units largest first and at most once. No spaces, signs,
/// fractions or bare numbers; `None` for anything else, or beyond `u64` milliseconds.
pub(crate) fn parse_duration(text: &str) -> Option<Duration> {
    const UNITS: [(&str, u64); 4] = [("h", 3_600_000), ("ms", 1), ("m", 60_000), ("s", 1_000)];
    let mut rest = text;
    let mut total_ms: u64 = 0;
    let mut previous_ms = u64::MAX;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let number: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        // `ms` is tried before `m`, so `5ms` is never read as minutes followed by junk.
        let (unit, unit_ms) = UNITS.into_iter().find(|(unit, _)| rest.starts_with(unit))?;
        if unit_ms >= previous_ms {
            return None;
        }
        previous_ms = unit_ms;
        rest = &rest[unit.len()..];
        total_ms = total_ms.checked_add(number.checked_mul(unit_ms)?)?;
    }
    Some(Duration::from_millis(total_ms))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn lookup(vars: &[(&str, &str)]) -> AccessTokenLayerBuilder {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        AccessTokenLayerBuilder::from_lookup(move |name| vars.get(name).cloned())
    }

    const REQUIRED: [(&str, &str); 2] = [
        (BASE_URL, "https://int.conneqt.health"),
        (API_KEY, "sekrit-env-key-0123"),
    ];

    fn with_required(extra: &[(&'static str, &'static str)]) -> AccessTokenLayerBuilder {
        let mut vars = REQUIRED.to_vec();
        vars.extend_from_slice(extra);
        lookup(&vars)
    }

    #[test]
    fn durations_in_every_documented_form_parse() {
        let cases = [
            ("30s", Duration::from_secs(30)),
            ("500ms", Duration::from_millis(500)),
            ("10m", Duration::from_secs(600)),
            ("1h", Duration::from_secs(3600)),
            ("1m30s", Duration::from_secs(90)),
            ("2s500ms", Duration::from_millis(2500)),
            ("1h30m", Duration::from_secs(5400)),
            ("1h2m3s4ms", Duration::from_millis(3_723_004)),
            ("0s", Duration::ZERO),
            ("007s", Duration::from_secs(7)),
            ("90s", Duration::from_secs(90)),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_duration(text), Some(expected), "{text}");
        }
    }

    #[test]
    fn malformed_durations_are_refused() {
        for text in [
            "",
            "30",
            "30 sec",
            "30 s",
            " 30s",
            "30s ",
            "30S",
            "1.5s",
            "-5s",
            "+5s",
            "s",
            "ms",
            "5d",
            "5us",
            "30s1m",
            "1s1s",
            "1m1h",
            "500ms2s",
            "1h30",
            "1m30s500",
            "99999999999999999999s",
            "18446744073709551615h",
        ] {
            assert_eq!(parse_duration(text), None, "{text:?}");
        }
    }

    #[test]
    fn no_variables_give_the_defaults_and_build_still_requires_url_and_key() {
        let builder = lookup(&[]);
        assert!(builder.env_error.is_none());
        assert_eq!(builder.cache_ttl, super::super::DEFAULT_CACHE_TTL);
        assert!(!builder.strip_token_header);
        let error = builder.build().unwrap_err();
        assert_eq!(error.setting(), "base_url");
        assert_eq!(error.environment_variable(), None);
    }

    #[test]
    fn each_variable_sets_its_setting() {
        let builder = lookup(&[
            (BASE_URL, "https://h.example/conneqt"),
            (API_KEY, "sekrit-env-key-0123"),
            (VERIFY_PATH, "/v2/verify"),
            (CACHE_TTL, "1m30s"),
            (GONE_TTL, "1h"),
            (UPSTREAM_TIMEOUT, "500ms"),
            (CACHE_CAPACITY, "42"),
            (GONE_CAPACITY, "7"),
            (ACCEPT_OPAQUE_TOKENS, "true"),
            (UPSTREAM_PROXY, "http://proxy.internal:3128"),
            (SKIP_PATH_PREFIXES, " /health, /metrics/ ,,"),
            (STRIP_TOKEN_HEADER, "1"),
        ]);
        assert!(builder.env_error.is_none(), "{:?}", builder.env_error);
        assert_eq!(
            builder.base_url.as_deref(),
            Some("https://h.example/conneqt")
        );
        assert_eq!(builder.api_key.as_deref(), Some("sekrit-env-key-0123"));
        assert_eq!(builder.verify_path, "/v2/verify");
        assert_eq!(builder.cache_ttl, Duration::from_secs(90));
        assert_eq!(builder.gone_ttl, Duration::from_secs(3600));
        assert_eq!(builder.upstream_timeout, Duration::from_millis(500));
        assert_eq!(builder.cache_capacity, 42);
        assert_eq!(builder.gone_capacity, 7);
        assert_eq!(builder.token_format, crate::token::TokenFormat::Opaque);
        assert_eq!(
            builder.upstream_proxy.as_deref(),
            Some("http://proxy.internal:3128")
        );
        assert_eq!(builder.skip.prefixes(), ["/health", "/metrics/"]);
        assert!(builder.strip_token_header);
        builder.build().expect("the environment's settings build");
    }

    #[test]
    fn each_resilience_variable_sets_its_setting_and_bad_values_name_the_variable() {
        let builder = with_required(&[
            (REFRESH_AHEAD, "false"),
            (REFRESH_AHEAD_SHARE, "0.5"),
            (STALE_IF_ERROR, "2m"),
            (MAX_CONCURRENT_VERIFICATIONS, "16"),
            (UPSTREAM_RETRY, "0"),
            (CIRCUIT_BREAKER_THRESHOLD, "3"),
            (CIRCUIT_BREAKER_COOL_DOWN, "10s"),
        ]);
        assert!(builder.env_error.is_none(), "{:?}", builder.env_error);
        assert!(!builder.refresh_ahead);
        assert_eq!(builder.refresh_ahead_share, 0.5);
        assert_eq!(builder.stale_if_error, Some(Duration::from_secs(120)));
        assert_eq!(builder.max_concurrent_verifications, 16);
        assert!(!builder.upstream_retry);
        assert_eq!(builder.circuit_breaker_threshold, 3);
        assert_eq!(builder.circuit_breaker_cool_down, Duration::from_secs(10));
        builder.build().expect("the environment's settings build");

        for (variable, raw) in [
            (REFRESH_AHEAD_SHARE, "1.5"),
            (STALE_IF_ERROR, "soon"),
            (MAX_CONCURRENT_VERIFICATIONS, "0"),
            (CIRCUIT_BREAKER_THRESHOLD, "99999999999"),
            (CIRCUIT_BREAKER_COOL_DOWN, "2h"),
            (UPSTREAM_RETRY, "yes"),
        ] {
            let error = with_required(&[(variable, raw)]).build().unwrap_err();
            let message = error.to_string();
            assert!(
                message.contains(variable) && message.contains(raw),
                "{message}"
            );
        }
    }

    #[test]
    fn booleans_accept_true_false_1_and_0() {
        for (raw, expected) in [("true", true), ("1", true), ("false", false), ("0", false)] {
            let builder = with_required(&[(STRIP_TOKEN_HEADER, raw), (ACCEPT_OPAQUE_TOKENS, raw)]);
            assert!(builder.env_error.is_none(), "{raw}");
            assert_eq!(builder.strip_token_header, expected, "{raw}");
            let format = if expected {
                crate::token::TokenFormat::Opaque
            } else {
                crate::token::TokenFormat::Uuid
            };
            assert_eq!(builder.token_format, format, "{raw}");
        }
    }

    #[test]
    fn an_empty_variable_counts_as_unset() {
        let builder = with_required(&[(CACHE_TTL, ""), (SKIP_PATH_PREFIXES, "")]);
        assert!(builder.env_error.is_none());
        assert_eq!(builder.cache_ttl, super::super::DEFAULT_CACHE_TTL);
        assert!(builder.skip.prefixes().is_empty());
    }

    #[test]
    fn a_bad_value_is_a_build_error_naming_the_variable_and_the_value() {
        let cases = [
            (
                BASE_URL,
                "int.conneqt.health",
                "base_url",
                "not an absolute URL",
            ),
            (VERIFY_PATH, "v2/verify", "verify_path", "start with '/'"),
            (
                CACHE_TTL,
                "30 sec",
                "cache_ttl",
                "is not a duration (use e.g. 30s, 500ms, 10m)",
            ),
            (
                CACHE_TTL,
                "0s",
                "cache_ttl",
                "is out of range: must be at least 1 ms",
            ),
            (GONE_TTL, "30", "gone_ttl", "is not a duration"),
            (
                GONE_TTL,
                "200h",
                "gone_ttl",
                "is out of range: must be at most",
            ),
            (
                UPSTREAM_TIMEOUT,
                "1h",
                "upstream_timeout",
                "is out of range",
            ),
            (
                UPSTREAM_TIMEOUT,
                "2 s",
                "upstream_timeout",
                "is not a duration",
            ),
            (
                CACHE_CAPACITY,
                "10k",
                "cache_capacity",
                "is not a whole number",
            ),
            (
                CACHE_CAPACITY,
                "-1",
                "cache_capacity",
                "is not a whole number",
            ),
            (GONE_CAPACITY, "0", "gone_capacity", "must be at least 1"),
            (
                ACCEPT_OPAQUE_TOKENS,
                "yes",
                "accept_opaque_tokens",
                "is not a boolean",
            ),
            (
                STRIP_TOKEN_HEADER,
                "TRUE",
                "strip_token_header",
                "is not a boolean",
            ),
            (
                SKIP_PATH_PREFIXES,
                "/health,metrics",
                "skip_path_prefix",
                "start with '/'",
            ),
            (SKIP_PATH_PREFIXES, "/", "skip_path_prefix", "every request"),
        ];
        for (variable, value, setting, problem) in cases {
            let error = with_required(&[(variable, value)]).build().unwrap_err();
            let message = error.to_string();
            assert_eq!(error.environment_variable(), Some(variable), "{message}");
            assert_eq!(error.setting(), setting, "{message}");
            assert!(
                message.starts_with(&format!(
                    "conneqt-guard environment variable `{variable}`: "
                )),
                "{message}"
            );
            assert!(
                message.contains(&format!("{value:?}")) || variable == SKIP_PATH_PREFIXES,
                "quotes the value: {message}"
            );
            assert!(message.contains(problem), "{message}");
        }
        let error = with_required(&[(CACHE_TTL, "30 sec")]).build().unwrap_err();
        assert_eq!(
            error.to_string(),
            "conneqt-guard environment variable `CONNEQT_CACHE_TTL`: \"30 sec\" is not a \
             duration (use e.g. 30s, 500ms, 10m)"
        );
    }

    #[test]
    fn the_api_key_and_proxy_values_are_never_quoted_in_errors() {
        for key in [" sekrit-env-key ", "sekrit\u{1}key", "sekrit-kéy"] {
            let builder = lookup(&[(BASE_URL, "https://h"), (API_KEY, key)]);
            assert!(!format!("{builder:?}").contains("sekrit"));
            let error = builder.build().unwrap_err();
            let shown = format!("{error} {error:?}");
            assert_eq!(error.environment_variable(), Some(API_KEY));
            assert_eq!(error.setting(), "api_key");
            assert!(!shown.contains("sekrit"), "{shown}");
        }
        let error = with_required(&[(UPSTREAM_PROXY, "not a url sekrit-proxy-pw")])
            .build()
            .unwrap_err();
        assert_eq!(error.environment_variable(), Some(UPSTREAM_PROXY));
        assert!(!format!("{error} {error:?}").contains("sekrit"), "{error}");
    }

    #[test]
    fn the_first_bad_variable_wins_even_if_a_setter_overrides_it() {
        let error = with_required(&[(GONE_TTL, "soon"), (CACHE_CAPACITY, "lots")])
            .gone_ttl(Duration::from_secs(5))
            .build()
            .unwrap_err();
        assert_eq!(error.environment_variable(), Some(GONE_TTL));
    }

    #[test]
    fn setters_after_from_env_override_it_and_prefixes_add_up() {
        let builder = with_required(&[(CACHE_TTL, "10m"), (SKIP_PATH_PREFIXES, "/health")])
            .cache_ttl(Duration::from_secs(5))
            .base_url("https://other.example")
            .skip_path_prefix("/metrics");
        assert_eq!(builder.cache_ttl, Duration::from_secs(5));
        assert_eq!(builder.base_url.as_deref(), Some("https://other.example"));
        assert_eq!(builder.skip.prefixes(), ["/health", "/metrics"]);
        builder.build().unwrap();
    }

    #[test]
    fn a_setter_error_still_names_the_setting_not_a_variable() {
        let error = with_required(&[]).cache_capacity(0).build().unwrap_err();
        assert_eq!(error.environment_variable(), None);
        assert!(error.to_string().contains("setting `cache_capacity`"));
    }

    /// The layer built from variables guards a real app against the simulator, over HTTP.
    #[cfg(feature = "simulator")]
    #[tokio::test]
    async fn a_layer_from_the_environment_guards_requests_against_the_simulator() {
        use axum::{Router, routing::get};

        let simulator = crate::simulator::Simulator::start().await.unwrap();
        let guard = lookup(&[
            (BASE_URL, &simulator.base_url()),
            (API_KEY, simulator.api_key()),
            (SKIP_PATH_PREFIXES, "/health"),
            (STRIP_TOKEN_HEADER, "true"),
        ])
        .build()
        .unwrap();
        let app = Router::new()
            .route(
                "/messages",
                get(|headers: http::HeaderMap| async move {
                    format!(
                        "header seen: {}",
                        headers.contains_key("conneqt-instant-access-token")
                    )
                }),
            )
            .route("/health", get(|| async { "up" }))
            .layer(guard);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let url = |path: &str| format!("http://{addr}{path}");

        let token = simulator.issue_token();
        let ok = client
            .get(url("/messages"))
            .header("conneqt-instant-access-token", &token)
            .send()
            .await
            .unwrap();
        assert_eq!(ok.status(), 200);
        assert_eq!(ok.text().await.unwrap(), "header seen: false");
        assert_eq!(simulator.verify_calls(), 1);

        let missing = client.get(url("/messages")).send().await.unwrap();
        assert_eq!(missing.status(), 401);
        let health = client.get(url("/health")).send().await.unwrap();
        assert_eq!(health.status(), 200);
        assert_eq!(simulator.verify_calls(), 1, "neither asked the upstream");
        server.abort();
    }
}
