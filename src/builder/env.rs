//! [`AccessTokenLayerBuilder::from_env`]: settings from `CONNEQT_*` environment variables.
//!
//! Reading goes through a lookup function, so the tests can hand it a map instead of changing
//! the process environment (which tests running in parallel share).

use super::settings::ROWS;
use super::{AccessTokenLayerBuilder, BuildError};
use crate::layer::AccessTokenLayer;

/// Where [`AccessTokenLayerBuilder::read`] gets its values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    /// `CONNEQT_*` variables, or a lookup standing in for them: errors name the variable.
    Environment,
    /// The sidecar's flags (or their variables): errors name the setting, as setters' do.
    Flags,
}

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
    /// | `CONNEQT_REDIS_URL` | [`redis_url`](Self::redis_url) (feature `redis`) | URL (never quoted in errors) |
    /// | `CONNEQT_CLUSTER_KEY` | [`cluster_key`](Self::cluster_key) (feature `redis`) | text, 16 bytes or more (never quoted in errors) |
    /// | `CONNEQT_REDIS_TIMEOUT` | [`redis_timeout`](Self::redis_timeout) (feature `redis`) | duration |
    /// | `CONNEQT_REDIS_LEASE` | [`redis_lease`](Self::redis_lease) (feature `redis`) | duration |
    ///
    /// A duration is whole numbers with units `h`, `m`, `s`, `ms`, largest first: `30s`,
    /// `500ms`, `10m`, `1h`, `1m30s`, `1s500ms`. A boolean is `true`, `false`, `1` or `0`.
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

    /// [`from_env`](Self::from_env) over any source of variables: `lookup` is asked for each
    /// `CONNEQT_*` name and returns its value, if any. Everything `from_env` says holds,
    /// including the errors naming the variable. The `conneqt-guard` sidecar hands its flags
    /// to the library this way, so both read values with the same grammar.
    ///
    /// ```
    /// use std::collections::HashMap;
    /// use conneqt_guard::AccessTokenLayerBuilder;
    ///
    /// let vars = HashMap::from([
    ///     ("CONNEQT_BASE_URL", "https://int.conneqt.health"),
    ///     ("CONNEQT_API_KEY", "my-key"),
    ///     ("CONNEQT_CACHE_TTL", "1m30s"),
    /// ]);
    /// let lookup = |name: &str| vars.get(name).map(|value| value.to_string());
    /// let guard = AccessTokenLayerBuilder::from_lookup(lookup).build()?;
    /// # let _ = guard;
    ///
    /// let vars = HashMap::from([("CONNEQT_UPSTREAM_RETRY", "yes")]);
    /// let lookup = |name: &str| vars.get(name).map(|value| value.to_string());
    /// let error = AccessTokenLayerBuilder::from_lookup(lookup).build().unwrap_err();
    /// assert_eq!(error.environment_variable(), Some("CONNEQT_UPSTREAM_RETRY"));
    /// assert_eq!(error.setting(), "upstream_retry");
    /// # Ok::<(), conneqt_guard::BuildError>(())
    /// ```
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Self {
        Self::read(lookup, Source::Environment)
    }

    /// The rows' values from `lookup`; errors name the variable if they come from `source`'s
    /// environment, else only the setting.
    pub(crate) fn read(lookup: impl Fn(&str) -> Option<String>, source: Source) -> Self {
        let mut builder = Self::default();
        for row in ROWS {
            let Some(raw) = lookup(row.variable).filter(|raw| !raw.is_empty()) else {
                continue;
            };
            match row.parse_checked(&raw) {
                Ok(value) => row.set(&mut builder.settings, value),
                Err(problem) => {
                    builder.env_error.get_or_insert(BuildError {
                        setting: row.name,
                        variable: (source == Source::Environment).then_some(row.variable),
                        problem,
                        source: None,
                    });
                }
            }
        }
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use super::super::settings::parse_duration;
    use super::*;

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
        assert_eq!(builder.settings.cache_ttl, Duration::from_secs(30));
        assert!(!builder.settings.strip_token_header);
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
            builder.settings.base_url.as_deref(),
            Some("https://h.example/conneqt")
        );
        assert_eq!(
            builder.settings.api_key.as_deref(),
            Some("sekrit-env-key-0123")
        );
        assert_eq!(builder.settings.verify_path.as_deref(), Some("/v2/verify"));
        assert_eq!(builder.settings.cache_ttl, Duration::from_secs(90));
        assert_eq!(builder.settings.gone_ttl, Duration::from_secs(3600));
        assert_eq!(
            builder.settings.upstream_timeout,
            Duration::from_millis(500)
        );
        assert_eq!(builder.settings.cache_capacity, 42);
        assert_eq!(builder.settings.gone_capacity, 7);
        assert!(builder.settings.accept_opaque_tokens);
        assert_eq!(
            builder.settings.upstream_proxy.as_deref(),
            Some("http://proxy.internal:3128")
        );
        assert_eq!(
            builder.settings.skip_path_prefixes,
            ["/health", "/metrics/"]
        );
        assert!(builder.settings.strip_token_header);
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
        assert!(!builder.settings.refresh_ahead);
        assert_eq!(builder.settings.refresh_ahead_share, 0.5);
        assert_eq!(
            builder.settings.stale_if_error,
            Some(Duration::from_secs(120))
        );
        assert_eq!(builder.settings.max_concurrent_verifications, 16);
        assert!(!builder.settings.upstream_retry);
        assert_eq!(builder.settings.circuit_breaker_threshold, 3);
        assert_eq!(
            builder.settings.circuit_breaker_cool_down,
            Duration::from_secs(10)
        );
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
            assert_eq!(builder.settings.strip_token_header, expected, "{raw}");
            assert_eq!(builder.settings.accept_opaque_tokens, expected, "{raw}");
        }
    }

    #[test]
    fn an_empty_variable_counts_as_unset() {
        let builder = with_required(&[(CACHE_TTL, ""), (SKIP_PATH_PREFIXES, "")]);
        assert!(builder.env_error.is_none());
        assert_eq!(builder.settings.cache_ttl, Duration::from_secs(30));
        assert!(builder.settings.skip_path_prefixes.is_empty());
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
                "is out of range: must be at least 1ms",
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
        assert_eq!(builder.settings.cache_ttl, Duration::from_secs(5));
        assert_eq!(
            builder.settings.base_url.as_deref(),
            Some("https://other.example")
        );
        assert_eq!(builder.settings.skip_path_prefixes, ["/health", "/metrics"]);
        builder.build().unwrap();
    }

    #[test]
    fn a_setter_error_still_names_the_setting_not_a_variable() {
        let error = with_required(&[]).cache_capacity(0).build().unwrap_err();
        assert_eq!(error.environment_variable(), None);
        assert!(error.to_string().contains("setting `cache_capacity`"));
    }

    /// The layer built from variables guards a real app against the simulator, over HTTP.
    #[tokio::test]
    async fn a_layer_from_the_environment_guards_requests_against_the_simulator() {
        use axum::{Router, routing::get};

        let simulator = conneqt_guard_simulator::Simulator::start().await.unwrap();
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
        let _ = rustls::crypto::ring::default_provider().install_default();
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
