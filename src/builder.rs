//! Configuration: infallible setters, one fallible [`build`](AccessTokenLayerBuilder::build).

use std::error::Error;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;

use crate::cache::{CacheSettings, VerdictCache};
use crate::layer::{AccessTokenLayer, Shared};
use crate::skip::{self, SkipRules};
use crate::token::{TokenFormat, TokenHasher};
use crate::upstream::{ApiKey, Resilience, Upstream};

mod env;

/// Default for [`AccessTokenLayerBuilder::cache_ttl`]: 30 seconds.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(30);
/// Default for [`AccessTokenLayerBuilder::gone_ttl`]: 10 minutes.
pub const DEFAULT_GONE_TTL: Duration = Duration::from_secs(600);
/// Default for [`AccessTokenLayerBuilder::upstream_timeout`]: 2 seconds.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Default for [`AccessTokenLayerBuilder::cache_capacity`]: 100,000 valid tokens.
pub const DEFAULT_CACHE_CAPACITY: u64 = 100_000;
/// Default for [`AccessTokenLayerBuilder::gone_capacity`]: 100,000 gone tokens.
pub const DEFAULT_GONE_CAPACITY: u64 = 100_000;
/// Default for [`AccessTokenLayerBuilder::verify_path`], from the vendor's example request.
pub const DEFAULT_VERIFY_PATH: &str = "/api/v1/messages/instant/access/token/verify";
/// Default for [`AccessTokenLayerBuilder::max_concurrent_verifications`]: 64.
pub const DEFAULT_MAX_CONCURRENT_VERIFICATIONS: usize = 64;
/// Default for [`AccessTokenLayerBuilder::circuit_breaker_threshold`]: 5 failures in a row.
pub const DEFAULT_CIRCUIT_BREAKER_THRESHOLD: u32 = 5;
/// Default for [`AccessTokenLayerBuilder::circuit_breaker_cool_down`]: 5 seconds.
pub const DEFAULT_CIRCUIT_BREAKER_COOL_DOWN: Duration = Duration::from_secs(5);
/// Default for [`AccessTokenLayerBuilder::refresh_ahead_share`]: 0.8 of `cache_ttl`.
pub const DEFAULT_REFRESH_AHEAD_SHARE: f64 = 0.8;
/// The vendor's connection-check endpoint, relative to the base URL.
pub(crate) const TEST_PATH: &str = "/api/v1/test";

/// The longest a verdict may be trusted or remembered (7 days). Longer is almost certainly a
/// unit mistake, and moka panics on durations of centuries.
const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 60 * 60);
/// The longest an upstream call may take (5 minutes).
const MAX_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// The longest cool-down of the circuit breaker (1 hour).
const MAX_COOL_DOWN: Duration = Duration::from_secs(60 * 60);

/// Builds an [`AccessTokenLayer`]. Made by [`AccessTokenLayer::builder`].
///
/// Setters never fail; [`build`](Self::build) checks everything and names the first setting
/// that is wrong. Only `base_url` and `api_key` are required.
///
/// | setting | default |
/// |---|---|
/// | [`base_url`](Self::base_url) | required |
/// | [`api_key`](Self::api_key) | required |
/// | [`verify_path`](Self::verify_path) | [`DEFAULT_VERIFY_PATH`] |
/// | [`cache_ttl`](Self::cache_ttl) | [`DEFAULT_CACHE_TTL`] (30 s) |
/// | [`gone_ttl`](Self::gone_ttl) | [`DEFAULT_GONE_TTL`] (10 min) |
/// | [`upstream_timeout`](Self::upstream_timeout) | [`DEFAULT_UPSTREAM_TIMEOUT`] (2 s) |
/// | [`cache_capacity`](Self::cache_capacity) | [`DEFAULT_CACHE_CAPACITY`] |
/// | [`gone_capacity`](Self::gone_capacity) | [`DEFAULT_GONE_CAPACITY`] |
/// | [`accept_opaque_tokens`](Self::accept_opaque_tokens) | `false` (tokens must be UUIDs) |
/// | [`upstream_proxy`](Self::upstream_proxy) | none (system proxy variables are ignored) |
/// | [`refresh_ahead`](Self::refresh_ahead) | `true` |
/// | [`refresh_ahead_share`](Self::refresh_ahead_share) | [`DEFAULT_REFRESH_AHEAD_SHARE`] (0.8) |
/// | [`stale_if_error`](Self::stale_if_error) | off |
/// | [`max_concurrent_verifications`](Self::max_concurrent_verifications) | [`DEFAULT_MAX_CONCURRENT_VERIFICATIONS`] (64) |
/// | [`upstream_retry`](Self::upstream_retry) | `true` (one retry within `upstream_timeout`) |
/// | [`circuit_breaker_threshold`](Self::circuit_breaker_threshold) | [`DEFAULT_CIRCUIT_BREAKER_THRESHOLD`] (5) |
/// | [`circuit_breaker_cool_down`](Self::circuit_breaker_cool_down) | [`DEFAULT_CIRCUIT_BREAKER_COOL_DOWN`] (5 s) |
/// | [`skip_path_prefix`](Self::skip_path_prefix), [`skip_if`](Self::skip_if), [`skip_grpc_health_checks`](Self::skip_grpc_health_checks), [`skip_cors_preflight`](Self::skip_cors_preflight) | nothing is skipped |
/// | [`strip_token_header`](Self::strip_token_header) | `false` (the inner service sees the header) |
///
/// [`from_env`](Self::from_env) starts from `CONNEQT_*` environment variables instead.
///
/// ```
/// use std::time::Duration;
/// use conneqt_guard::AccessTokenLayer;
///
/// let error = AccessTokenLayer::builder()
///     .base_url("int.conneqt.health") // no scheme
///     .api_key("my-key")
///     .build()
///     .unwrap_err();
/// assert_eq!(error.setting(), "base_url");
///
/// let error = AccessTokenLayer::builder()
///     .base_url("https://int.conneqt.health")
///     .api_key("my-key")
///     .cache_ttl(Duration::ZERO)
///     .build()
///     .unwrap_err();
/// assert_eq!(error.setting(), "cache_ttl");
/// ```
#[must_use]
pub struct AccessTokenLayerBuilder {
    base_url: Option<String>,
    api_key: Option<String>,
    verify_path: String,
    cache_ttl: Duration,
    gone_ttl: Duration,
    upstream_timeout: Duration,
    cache_capacity: u64,
    gone_capacity: u64,
    token_format: TokenFormat,
    upstream_proxy: Option<String>,
    max_concurrent_verifications: usize,
    upstream_retry: bool,
    refresh_ahead: bool,
    refresh_ahead_share: f64,
    stale_if_error: Option<Duration>,
    circuit_breaker_threshold: u32,
    circuit_breaker_cool_down: Duration,
    // Skip rules, credential stripping, and the first problem found by `from_env`.
    skip: SkipRules,
    strip_token_header: bool,
    env_error: Option<BuildError>,
}

impl Default for AccessTokenLayerBuilder {
    fn default() -> Self {
        Self {
            base_url: None,
            api_key: None,
            verify_path: DEFAULT_VERIFY_PATH.to_owned(),
            cache_ttl: DEFAULT_CACHE_TTL,
            gone_ttl: DEFAULT_GONE_TTL,
            upstream_timeout: DEFAULT_UPSTREAM_TIMEOUT,
            cache_capacity: DEFAULT_CACHE_CAPACITY,
            gone_capacity: DEFAULT_GONE_CAPACITY,
            token_format: TokenFormat::Uuid,
            upstream_proxy: None,
            max_concurrent_verifications: DEFAULT_MAX_CONCURRENT_VERIFICATIONS,
            upstream_retry: true,
            refresh_ahead: true,
            refresh_ahead_share: DEFAULT_REFRESH_AHEAD_SHARE,
            stale_if_error: None,
            circuit_breaker_threshold: DEFAULT_CIRCUIT_BREAKER_THRESHOLD,
            circuit_breaker_cool_down: DEFAULT_CIRCUIT_BREAKER_COOL_DOWN,
            skip: SkipRules::default(),
            strip_token_header: false,
            env_error: None,
        }
    }
}

impl AccessTokenLayerBuilder {
    /// The Conneqt base URL, e.g. `https://int.conneqt.health` (the integration environment).
    /// `http` or `https`, a host, optionally a path prefix; no credentials, query or fragment.
    pub fn base_url(mut self, url: impl Into<String>) -> Self {
        self.base_url = Some(url.into());
        self
    }

    /// The key Quicksilva issued to your system, sent as the `ApiKey` header. Never logged or
    /// shown in `Debug` output or errors.
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    /// The verify endpoint's path, appended to the base URL. Starts with `/`.
    pub fn verify_path(mut self, path: impl Into<String>) -> Self {
        self.verify_path = path.into();
        self
    }

    /// How long a `200 OK` verdict is trusted without asking again. This is also the longest a
    /// revoked token can go on being accepted. Between 1 ms and 7 days.
    pub fn cache_ttl(mut self, ttl: Duration) -> Self {
        self.cache_ttl = ttl;
        self
    }

    /// How long a `410 Gone` verdict is remembered, so a client retrying with a dead token
    /// does not reach the upstream each time. Between 1 ms and 7 days.
    pub fn gone_ttl(mut self, ttl: Duration) -> Self {
        self.gone_ttl = ttl;
        self
    }

    /// The deadline for one whole upstream call: connecting, sending and reading the answer.
    /// Past it the request gets `503`. Between 1 ms and 5 minutes.
    pub fn upstream_timeout(mut self, timeout: Duration) -> Self {
        self.upstream_timeout = timeout;
        self
    }

    /// The most valid tokens remembered at once. At least 1.
    pub fn cache_capacity(mut self, tokens: u64) -> Self {
        self.cache_capacity = tokens;
        self
    }

    /// The most gone tokens remembered at once, kept apart from the valid ones so a flood of
    /// dead tokens cannot evict live ones. At least 1.
    pub fn gone_capacity(mut self, tokens: u64) -> Self {
        self.gone_capacity = tokens;
        self
    }

    /// Accept any token of 1 to 256 visible ASCII characters instead of only UUIDs (the
    /// vendor documents UUIDs; use this only if your tokens are not).
    pub fn accept_opaque_tokens(mut self, accept: bool) -> Self {
        self.token_format = if accept {
            TokenFormat::Opaque
        } else {
            TokenFormat::Uuid
        };
        self
    }

    /// Send upstream calls through this HTTP(S) proxy, e.g. `http://proxy.internal:3128`.
    /// Without it, calls go direct: `HTTP_PROXY`-style variables are deliberately ignored so
    /// that where the API key goes never depends on the environment.
    pub fn upstream_proxy(mut self, url: impl Into<String>) -> Self {
        self.upstream_proxy = Some(url.into());
        self
    }

    /// Whether a valid verdict that is used when older than
    /// [`refresh_ahead_share`](Self::refresh_ahead_share) of `cache_ttl` is re-verified in the
    /// background while the request is served from the cache (at most one refresh per token
    /// at a time). A `410` from the refresh evicts the token, so its next request is turned
    /// away. Result: a token in steady use never makes a request wait on the upstream after
    /// its first verification.
    pub fn refresh_ahead(mut self, enabled: bool) -> Self {
        self.refresh_ahead = enabled;
        self
    }

    /// The share of `cache_ttl` after which a used verdict is refreshed. Between 0 and 1,
    /// exclusive.
    pub fn refresh_ahead_share(mut self, share: f64) -> Self {
        self.refresh_ahead_share = share;
        self
    }

    /// **Opt-in.** When the upstream cannot give a verdict (timeout, refused, `5xx`,
    /// undocumented status, circuit open; never on `400`, `401`, `403` or `410`), a token whose
    /// valid verdict expired less than `grace` ago is still let through, and a warning is
    /// logged. This trades revocation latency (a revoked token can pass for up to
    /// `cache_ttl + grace` while the upstream is down) for availability. Between 1 ms and 7 days.
    pub fn stale_if_error(mut self, grace: Duration) -> Self {
        self.stale_if_error = Some(grace);
        self
    }

    /// The most upstream verify calls in flight at once, across all clones of the layer.
    /// Beyond it, verifications wait for a slot until their `upstream_timeout` deadline, then
    /// get `503`. Protects the upstream from a flood of distinct well-formed tokens. At least 1.
    pub fn max_concurrent_verifications(mut self, calls: usize) -> Self {
        self.max_concurrent_verifications = calls;
        self
    }

    /// Whether a verify call that failed with a connection error or a `502`/`503`/`504` is
    /// tried once more, after a jittered pause of about 50 ms, if time remains before the
    /// `upstream_timeout` deadline. Documented verdicts (`200`, `400`, `401`, `403`, `410`),
    /// `500` and timeouts are never retried.
    pub fn upstream_retry(mut self, retry: bool) -> Self {
        self.upstream_retry = retry;
        self
    }

    /// After this many consecutive upstream failures (timeouts, connection errors, `5xx`,
    /// undocumented statuses), verifications fail fast with `503` and a `Retry-After` for the
    /// [cool-down](Self::circuit_breaker_cool_down); then one probe is let through, and its
    /// result closes or re-opens the circuit. Tokens with a cached good verdict keep working
    /// throughout. At least 1.
    pub fn circuit_breaker_threshold(mut self, failures: u32) -> Self {
        self.circuit_breaker_threshold = failures;
        self
    }

    /// How long the circuit stays open before a probe. Between 1 ms and 1 hour.
    pub fn circuit_breaker_cool_down(mut self, cool_down: Duration) -> Self {
        self.circuit_breaker_cool_down = cool_down;
        self
    }

    /// Checks the settings and builds the layer.
    ///
    /// Does no I/O: a wrong key or an unreachable upstream show up on the first request (or
    /// earlier, if you call [`AccessTokenLayer::check_connection`]).
    pub fn build(self) -> Result<AccessTokenLayer, BuildError> {
        if let Some(error) = self.env_error {
            return Err(error);
        }
        let base_url = self.base_url.as_deref().ok_or_else(|| {
            BuildError::new("base_url", "is required (e.g. https://int.conneqt.health)")
        })?;
        let base = parse_base_url(base_url)?;
        check_path(&self.verify_path)?;
        let verify_url = join(&base, &self.verify_path, "verify_path")?;
        let test_url = join(&base, TEST_PATH, "base_url")?;
        let api_key = api_key(self.api_key.as_deref())?;
        check_duration("cache_ttl", self.cache_ttl, MAX_TTL)?;
        check_duration("gone_ttl", self.gone_ttl, MAX_TTL)?;
        check_duration(
            "upstream_timeout",
            self.upstream_timeout,
            MAX_UPSTREAM_TIMEOUT,
        )?;
        if self.cache_capacity == 0 {
            return Err(BuildError::new("cache_capacity", "must be at least 1"));
        }
        if self.gone_capacity == 0 {
            return Err(BuildError::new("gone_capacity", "must be at least 1"));
        }
        if !(1..=tokio::sync::Semaphore::MAX_PERMITS).contains(&self.max_concurrent_verifications) {
            return Err(BuildError::new(
                "max_concurrent_verifications",
                format!(
                    "must be at least 1, got {}",
                    self.max_concurrent_verifications
                ),
            ));
        }
        if !(self.refresh_ahead_share > 0.0 && self.refresh_ahead_share < 1.0) {
            return Err(BuildError::new(
                "refresh_ahead_share",
                format!(
                    "must be between 0 and 1, exclusive, got {}",
                    self.refresh_ahead_share
                ),
            ));
        }
        if let Some(grace) = self.stale_if_error {
            check_duration("stale_if_error", grace, MAX_TTL)?;
        }
        if self.circuit_breaker_threshold == 0 {
            return Err(BuildError::new(
                "circuit_breaker_threshold",
                "must be at least 1",
            ));
        }
        check_duration(
            "circuit_breaker_cool_down",
            self.circuit_breaker_cool_down,
            MAX_COOL_DOWN,
        )?;
        for prefix in self.skip.prefixes() {
            skip::check_prefix(prefix)
                .map_err(|problem| BuildError::new("skip_path_prefix", problem))?;
        }
        let hasher = TokenHasher::for_process().map_err(|error| {
            BuildError::new(
                "token hash key",
                format!("could not be drawn from the OS random source ({error})"),
            )
        })?;

        let mut client = reqwest::Client::builder()
            .connect_timeout(self.upstream_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("conneqt-guard/", env!("CARGO_PKG_VERSION")))
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(60))
            .no_proxy();
        if let Some(proxy) = &self.upstream_proxy {
            let proxy = reqwest::Proxy::all(proxy.as_str()).map_err(|error| {
                BuildError::new(
                    "upstream_proxy",
                    format!("{proxy:?} is not a valid proxy URL"),
                )
                .with_source(error.without_url())
            })?;
            client = client.proxy(proxy);
        }
        let client = client.build().map_err(|error| {
            BuildError::new("HTTP client", "could not be created").with_source(error)
        })?;

        let resilience = Resilience {
            max_concurrent: self.max_concurrent_verifications,
            retry: self.upstream_retry,
            breaker_threshold: self.circuit_breaker_threshold,
            breaker_cool_down: self.circuit_breaker_cool_down,
        };
        crate::telemetry::describe();
        let upstream = Upstream::new(
            client,
            verify_url,
            test_url,
            api_key,
            self.upstream_timeout,
            resilience,
        );
        let cache = VerdictCache::new(CacheSettings {
            cache_ttl: self.cache_ttl,
            valid_capacity: self.cache_capacity,
            gone_ttl: self.gone_ttl,
            gone_capacity: self.gone_capacity,
            refresh_after: self
                .refresh_ahead
                .then(|| self.cache_ttl.mul_f64(self.refresh_ahead_share)),
            stale_grace: self.stale_if_error,
        });
        Ok(AccessTokenLayer::from_shared(Shared {
            token_format: self.token_format,
            hasher,
            cache,
            upstream: Arc::new(upstream),
            skip: self.skip,
            strip_token_header: self.strip_token_header,
        }))
    }
}

/// Requests that pass unverified, and what the inner service sees.
impl AccessTokenLayerBuilder {
    /// Lets requests whose path starts with `prefix` through unverified, e.g. `/health`.
    /// May be called several times; a request is skipped when any rule matches.
    ///
    /// The prefix matches whole path segments: `/health` skips `/health` and `/health/live` but
    /// **not** `/healthcheck-admin`; a prefix ending in `/`, such as `/health/`, skips only what
    /// is below it. The path is compared as the layer sees it (inside `Router::nest`, the
    /// part below the nest point), byte for byte and case-sensitively: `/Health` and
    /// `/%68ealth` are not `/health`, and are verified.
    ///
    /// **Ambiguous paths fail closed.** A path is skipped only if *every* common reading of it
    /// stays below the prefix: the path as sent, percent-decoded once and twice, each also with
    /// `\` read as `/` (Windows-style backends) and with `;` parameters dropped from each
    /// segment (Tomcat, Jetty: `/a;x=1/b` is `/a/b`). A reading with a `.` or `..` segment or
    /// a control byte (such as a decoded `%00`), or a path still percent-encoded after two
    /// decodings, does not stay below it. So with `skip_path_prefix("/public")`,
    /// `/public/..;/secret`, `/public/..%2fsecret` and `/public/..\secret` are verified like
    /// any other request (not rejected: just not skipped), while `/public/v1.2/x` and
    /// `/public/a%20b` are skipped. A path with no `%`, `\`, `;` or control byte has no other
    /// reading and is checked as sent, without allocating.
    ///
    /// `build()` refuses a prefix that is empty, does not start with `/`, is `/` alone, or
    /// contains spaces, `?`, `#`, `*`, or dot segments or control characters in any of the
    /// readings above (such a prefix could never skip anything).
    ///
    /// A skipped request reaches your service **without** a [`VerifiedToken`](crate::VerifiedToken),
    /// even if it carries a token (which is not verified), and costs no upstream call: handlers
    /// on skipped routes must not expect one (in axum, no `Extension<VerifiedToken>` there).
    ///
    /// ```
    /// use axum::{Router, routing::get};
    /// use conneqt_guard::AccessTokenLayer;
    /// # use axum::body::Body;
    /// # use http::Request;
    /// # use tower::ServiceExt;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let guard = AccessTokenLayer::builder()
    ///     .base_url("https://int.conneqt.health")
    ///     .api_key("my-key")
    ///     .skip_path_prefix("/health")
    ///     .build()?;
    /// let app = Router::new()
    ///     .route("/health/live", get(|| async { "up" }))
    ///     .route("/healthcheck-admin", get(|| async { "admin" }))
    ///     .layer(guard);
    ///
    /// // Skipped: no token needed, and Conneqt is not asked.
    /// let request = Request::get("/health/live").body(Body::empty())?;
    /// assert_eq!(app.clone().oneshot(request).await?.status(), 200);
    ///
    /// // Not a whole-segment match: guarded as usual.
    /// let request = Request::get("/healthcheck-admin").body(Body::empty())?;
    /// assert_eq!(app.oneshot(request).await?.status(), 401);
    /// # Ok(())
    /// # }
    /// ```
    pub fn skip_path_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.skip.add_prefix(prefix.into());
        self
    }

    /// Lets requests through unverified when `predicate` returns `true` for the request head
    /// (method, URI, headers, extensions). May be called several times; a request is skipped
    /// when any rule matches. Mind that clients control the method, path and headers: decide
    /// on what an attacker cannot forge. Skipped requests carry no
    /// [`VerifiedToken`](crate::VerifiedToken), as with [`skip_path_prefix`](Self::skip_path_prefix).
    ///
    /// ```
    /// use axum::{Router, routing::get};
    /// use conneqt_guard::AccessTokenLayer;
    /// use http::Method;
    /// # use axum::body::Body;
    /// # use http::Request;
    /// # use tower::ServiceExt;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let guard = AccessTokenLayer::builder()
    ///     .base_url("https://int.conneqt.health")
    ///     .api_key("my-key")
    ///     .skip_if(|head| head.method == Method::GET && head.uri.path() == "/metrics")
    ///     .build()?;
    /// let app = Router::new()
    ///     .route("/metrics", get(|| async { "# metrics" }).post(|| async { "reset" }))
    ///     .layer(guard);
    ///
    /// let request = Request::get("/metrics").body(Body::empty())?;
    /// assert_eq!(app.clone().oneshot(request).await?.status(), 200);
    /// let request = Request::post("/metrics").body(Body::empty())?;
    /// assert_eq!(app.oneshot(request).await?.status(), 401);
    /// # Ok(())
    /// # }
    /// ```
    pub fn skip_if<F>(mut self, predicate: F) -> Self
    where
        F: Fn(&http::request::Parts) -> bool + Send + Sync + 'static,
    {
        self.skip.add_predicate(Arc::new(predicate));
        self
    }

    /// Lets the standard gRPC health service (`grpc.health.v1.Health`, as served by
    /// `tonic-health`) through unverified, so load balancers and Kubernetes probes need no
    /// token. The same as `skip_path_prefix("/grpc.health.v1.Health/")`.
    pub fn skip_grpc_health_checks(self) -> Self {
        self.skip_path_prefix(skip::GRPC_HEALTH_PREFIX)
    }

    /// Lets CORS preflight requests through unverified: `OPTIONS` with an
    /// `Access-Control-Request-Method` header, which browsers send without custom headers, so
    /// without the token. A plain `OPTIONS` without that header is still verified. Needed when
    /// the CORS handling sits inside this layer; a `tower_http::cors::CorsLayer` added outside
    /// it answers preflights itself.
    pub fn skip_cors_preflight(mut self) -> Self {
        self.skip.skip_cors_preflight();
        self
    }

    /// Removes the `Conneqt-Instant-Access-Token` header before the inner service sees the
    /// request (default `false`), so it cannot be logged or forwarded further in by accident.
    /// Handlers still get the token as [`VerifiedToken::as_str`](crate::VerifiedToken::as_str).
    /// Skipped requests lose the header too. When off, the header is kept and marked sensitive.
    pub fn strip_token_header(mut self, strip: bool) -> Self {
        self.strip_token_header = strip;
        self
    }
}

fn parse_base_url(raw: &str) -> Result<reqwest::Url, BuildError> {
    let invalid = |problem: String| BuildError::new("base_url", problem);
    let url = reqwest::Url::parse(raw)
        .map_err(|error| invalid(format!("{raw:?} is not an absolute URL ({error})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(format!(
            "{raw:?} must use http or https, not {:?}",
            url.scheme()
        )));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid(format!("{raw:?} has no host")));
    }
    if !url.username().is_empty() || url.password().is_some() {
        // Do not echo it: the credentials may be secret.
        return Err(invalid(
            "must not contain credentials; the API key goes in api_key".to_owned(),
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid(format!(
            "{raw:?} must not have a query or fragment"
        )));
    }
    Ok(url)
}

fn check_path(path: &str) -> Result<(), BuildError> {
    if !path.starts_with('/') || path.contains(['?', '#']) || path.chars().any(char::is_whitespace)
    {
        return Err(BuildError::new(
            "verify_path",
            format!("{path:?} must start with '/' and have no spaces, query or fragment"),
        ));
    }
    Ok(())
}

fn join(
    base: &reqwest::Url,
    path: &str,
    setting: &'static str,
) -> Result<reqwest::Url, BuildError> {
    let joined = format!("{}{path}", base.as_str().trim_end_matches('/'));
    reqwest::Url::parse(&joined).map_err(|error| {
        BuildError::new(setting, format!("{joined:?} is not a valid URL ({error})"))
    })
}

fn api_key(key: Option<&str>) -> Result<ApiKey, BuildError> {
    let key = key.ok_or_else(|| BuildError::new("api_key", "is required"))?;
    if key.is_empty() {
        return Err(BuildError::new("api_key", "is empty"));
    }
    if key.trim() != key {
        return Err(BuildError::new(
            "api_key",
            "has leading or trailing whitespace (a copy-paste mistake?)",
        ));
    }
    let value = HeaderValue::from_str(key)
        .ok()
        .filter(|_| key.bytes().all(|b| b.is_ascii_graphic() || b == b' '))
        .ok_or_else(|| {
            BuildError::new(
                "api_key",
                "may contain only visible ASCII characters and spaces",
            )
        })?;
    Ok(ApiKey::new(value))
}

fn check_duration(setting: &'static str, value: Duration, max: Duration) -> Result<(), BuildError> {
    if value < Duration::from_millis(1) {
        return Err(BuildError::new(
            setting,
            format!("must be at least 1 ms, got {value:?}"),
        ));
    }
    if value > max {
        return Err(BuildError::new(
            setting,
            format!("must be at most {max:?}, got {value:?}"),
        ));
    }
    Ok(())
}

impl fmt::Debug for AccessTokenLayerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessTokenLayerBuilder")
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("verify_path", &self.verify_path)
            .field("cache_ttl", &self.cache_ttl)
            .field("gone_ttl", &self.gone_ttl)
            .field("upstream_timeout", &self.upstream_timeout)
            .field("cache_capacity", &self.cache_capacity)
            .field("gone_capacity", &self.gone_capacity)
            .field("token_format", &self.token_format)
            .field(
                "upstream_proxy",
                &self.upstream_proxy.as_ref().map(|_| "<set>"),
            )
            .field(
                "max_concurrent_verifications",
                &self.max_concurrent_verifications,
            )
            .field("upstream_retry", &self.upstream_retry)
            .field("refresh_ahead", &self.refresh_ahead)
            .field("refresh_ahead_share", &self.refresh_ahead_share)
            .field("stale_if_error", &self.stale_if_error)
            .field("circuit_breaker_threshold", &self.circuit_breaker_threshold)
            .field("circuit_breaker_cool_down", &self.circuit_breaker_cool_down)
            .field("skip", &self.skip)
            .field("strip_token_header", &self.strip_token_header)
            .field("env_error", &self.env_error)
            .finish()
    }
}

/// A setting given to [`AccessTokenLayerBuilder`] is wrong.
///
/// Its message names the setting and what is wrong with it (quoting the value, unless it may
/// be secret, as the API key and proxy credentials are).
pub struct BuildError {
    setting: &'static str,
    /// Set when the value came from this environment variable (see `from_env`).
    variable: Option<&'static str>,
    problem: String,
    source: Option<Box<dyn Error + Send + Sync>>,
}

impl BuildError {
    fn new(setting: &'static str, problem: impl Into<String>) -> Self {
        Self {
            setting,
            variable: None,
            problem: problem.into(),
            source: None,
        }
    }

    fn with_source(mut self, source: impl Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// The name of the builder method whose value is wrong, e.g. `"base_url"`.
    ///
    /// For a bad environment variable, the setting it feeds (e.g. `"cache_ttl"` for
    /// `CONNEQT_CACHE_TTL`); see [`environment_variable`](Self::environment_variable).
    pub fn setting(&self) -> &str {
        self.setting
    }

    /// The environment variable whose value is wrong, when the problem was found by
    /// [`AccessTokenLayerBuilder::from_env`], e.g. `Some("CONNEQT_CACHE_TTL")`.
    pub fn environment_variable(&self) -> Option<&str> {
        self.variable
    }
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(variable) = self.variable {
            return write!(
                f,
                "conneqt-guard environment variable `{variable}`: {}",
                self.problem
            );
        }
        write!(
            f,
            "conneqt-guard setting `{}` {}",
            self.setting, self.problem
        )
    }
}

impl fmt::Debug for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BuildError")
            .field("setting", &self.setting)
            .field("variable", &self.variable)
            .field("problem", &self.problem)
            .finish_non_exhaustive()
    }
}

impl Error for BuildError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> AccessTokenLayerBuilder {
        AccessTokenLayer::builder()
            .base_url("https://int.conneqt.health")
            .api_key("sekrit-key-0123")
    }

    fn error(builder: AccessTokenLayerBuilder) -> BuildError {
        builder.build().expect_err("build should fail")
    }

    #[test]
    fn good_settings_build() {
        let layer = good().build().unwrap();
        assert!(format!("{layer:?}").contains("int.conneqt.health"));
    }

    #[test]
    fn each_bad_setting_is_named_with_its_problem() {
        let cases: Vec<(AccessTokenLayerBuilder, &str, &str)> = vec![
            (
                AccessTokenLayer::builder().api_key("k"),
                "base_url",
                "required",
            ),
            (
                good().base_url("int.conneqt.health"),
                "base_url",
                "not an absolute URL",
            ),
            (
                good().base_url("ftp://int.conneqt.health"),
                "base_url",
                "http or https",
            ),
            (
                good().base_url("https://user:pw@int.conneqt.health"),
                "base_url",
                "credentials",
            ),
            (
                good().base_url("https://int.conneqt.health/?x=1"),
                "base_url",
                "query",
            ),
            (
                good().verify_path("api/v1/verify"),
                "verify_path",
                "start with '/'",
            ),
            (good().verify_path("/verify?x"), "verify_path", "query"),
            (
                AccessTokenLayer::builder().base_url("https://h"),
                "api_key",
                "required",
            ),
            (good().api_key(""), "api_key", "empty"),
            (good().api_key(" key"), "api_key", "whitespace"),
            (good().api_key("ke\u{7f}y"), "api_key", "visible ASCII"),
            (good().api_key("kéy"), "api_key", "visible ASCII"),
            (
                good().cache_ttl(Duration::ZERO),
                "cache_ttl",
                "at least 1 ms",
            ),
            (
                good().gone_ttl(Duration::from_secs(u64::MAX)),
                "gone_ttl",
                "at most",
            ),
            (
                good().upstream_timeout(Duration::from_nanos(10)),
                "upstream_timeout",
                "at least",
            ),
            (
                good().upstream_timeout(Duration::from_secs(3600)),
                "upstream_timeout",
                "at most",
            ),
            (good().cache_capacity(0), "cache_capacity", "at least 1"),
            (good().gone_capacity(0), "gone_capacity", "at least 1"),
            (
                good().upstream_proxy("not a url"),
                "upstream_proxy",
                "not a valid proxy",
            ),
            (
                good().max_concurrent_verifications(0),
                "max_concurrent_verifications",
                "at least 1",
            ),
            (
                good().refresh_ahead_share(1.0),
                "refresh_ahead_share",
                "between 0 and 1",
            ),
            (
                good().refresh_ahead_share(f64::NAN),
                "refresh_ahead_share",
                "between 0 and 1",
            ),
            (
                good().stale_if_error(Duration::ZERO),
                "stale_if_error",
                "at least 1 ms",
            ),
            (
                good().circuit_breaker_threshold(0),
                "circuit_breaker_threshold",
                "at least 1",
            ),
            (
                good().circuit_breaker_cool_down(Duration::ZERO),
                "circuit_breaker_cool_down",
                "at least 1 ms",
            ),
        ];
        for (builder, setting, problem) in cases {
            let error = error(builder);
            assert_eq!(error.setting(), setting, "{error}");
            let message = error.to_string();
            assert!(
                message.contains(setting) && message.contains(problem),
                "{message}"
            );
        }
    }

    #[test]
    fn the_api_key_never_appears_in_errors_or_debug_output() {
        let key = "sekrit-key-0123";
        let builder = good().base_url("https://user:topsecret@h");
        assert!(!format!("{builder:?}").contains(key));
        let failure = error(builder);
        let shown = format!("{failure} {failure:?}");
        assert!(
            !shown.contains(key) && !shown.contains("topsecret"),
            "{shown}"
        );
        let layer = good().build().unwrap();
        assert!(!format!("{layer:?}").contains(key));
        let failure = error(good().api_key("sekrit\u{1}"));
        assert!(!failure.to_string().contains("sekrit"));
    }

    #[test]
    fn a_base_path_prefix_is_kept() {
        let base = parse_base_url("https://h.example/conneqt/").unwrap();
        let url = join(&base, DEFAULT_VERIFY_PATH, "verify_path").unwrap();
        assert_eq!(
            url.as_str(),
            "https://h.example/conneqt/api/v1/messages/instant/access/token/verify"
        );
    }
}
