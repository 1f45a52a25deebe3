//! Configuration: infallible setters, one fallible [`build`](AccessTokenLayerBuilder::build).

use std::error::Error;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;

use crate::cache::{CacheSettings, VerdictCache};
use crate::guard::Guard;
use crate::layer::AccessTokenLayer;
use crate::skip::{self, SkipRules};
use crate::token::{TokenFormat, TokenHasher};
use crate::upstream::{ApiKey, Resilience, Upstream};

mod env;
mod settings;
pub mod sidecar;

use settings::{ROWS, Settings};

/// The vendor's connection-check endpoint, relative to the base URL.
pub(crate) const TEST_PATH: &str = "/api/v1/test";

/// Builds an [`AccessTokenLayer`]. Made by [`AccessTokenLayer::builder`].
///
/// Setters never fail; [`build`](Self::build) checks everything and names the first setting
/// that is wrong. Only [`base_url`](Self::base_url) and [`api_key`](Self::api_key) are
/// required; each setter documents its default.
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
    /// Every setting of the table (`settings.rs`), as setters and `from_env` left it.
    settings: Settings,
    /// The skip rules that are not settings of the table: predicates, CORS preflight.
    skip: SkipRules,
    /// The first problem found by `from_env`.
    env_error: Option<BuildError>,
}

impl Default for AccessTokenLayerBuilder {
    fn default() -> Self {
        Self {
            settings: Settings::with_defaults(),
            skip: SkipRules::default(),
            env_error: None,
        }
    }
}

impl AccessTokenLayerBuilder {
    /// The Conneqt base URL, e.g. `https://int.conneqt.health` (the integration environment).
    /// `http` or `https`, a host, optionally a path prefix; no credentials, query or fragment.
    /// Required.
    pub fn base_url(mut self, url: impl Into<String>) -> Self {
        self.settings.base_url = Some(url.into());
        self
    }

    /// The key Quicksilva issued to your system, sent as the `ApiKey` header. Never logged or
    /// shown in `Debug` output or errors. Required.
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.settings.api_key = Some(key.into());
        self
    }

    /// The verify endpoint's path, appended to the base URL. Starts with `/`. Default:
    /// `/api/v1/messages/instant/access/token/verify`, from the vendor's example request.
    pub fn verify_path(mut self, path: impl Into<String>) -> Self {
        self.settings.verify_path = Some(path.into());
        self
    }

    /// How long a `200 OK` verdict is trusted without asking again. This is also the longest a
    /// revoked token can go on being accepted. Between 1 ms and 7 days; default 30 s.
    pub fn cache_ttl(mut self, ttl: Duration) -> Self {
        self.settings.cache_ttl = ttl;
        self
    }

    /// How long a `410 Gone` verdict is remembered, so a client retrying with a dead token
    /// does not reach the upstream each time. Between 1 ms and 7 days; default 10 minutes.
    pub fn gone_ttl(mut self, ttl: Duration) -> Self {
        self.settings.gone_ttl = ttl;
        self
    }

    /// The deadline for one whole upstream call: connecting, sending and reading the answer.
    /// Past it the request gets `503`. Between 1 ms and 5 minutes; default 2 s.
    pub fn upstream_timeout(mut self, timeout: Duration) -> Self {
        self.settings.upstream_timeout = timeout;
        self
    }

    /// The most valid tokens remembered at once. At least 1; default 100,000.
    ///
    /// The table is split into up to 64 shards of equal size (each at least 256 entries), so
    /// a shard the tokens' hashes happen to favour starts reusing the slots of verdicts not
    /// used lately a little before the whole table is full: size it with some headroom over
    /// the tokens you expect to be active (memory is taken as entries arrive, not up front).
    pub fn cache_capacity(mut self, tokens: u64) -> Self {
        self.settings.cache_capacity = tokens;
        self
    }

    /// The most gone tokens remembered at once, kept apart from the valid ones so a flood of
    /// dead tokens cannot evict live ones. At least 1; default 100,000.
    pub fn gone_capacity(mut self, tokens: u64) -> Self {
        self.settings.gone_capacity = tokens;
        self
    }

    /// Accept any token of 1 to 256 visible ASCII characters instead of only UUIDs (the
    /// vendor documents UUIDs; use this only if your tokens are not). Default `false`.
    pub fn accept_opaque_tokens(mut self, accept: bool) -> Self {
        self.settings.accept_opaque_tokens = accept;
        self
    }

    /// Send upstream calls through this HTTP(S) proxy, e.g. `http://proxy.internal:3128`.
    /// Without it (the default), calls go direct: `HTTP_PROXY`-style variables are
    /// deliberately ignored so that where the API key goes never depends on the environment.
    pub fn upstream_proxy(mut self, url: impl Into<String>) -> Self {
        self.settings.upstream_proxy = Some(url.into());
        self
    }

    /// Whether a valid verdict that is used when older than
    /// [`refresh_ahead_share`](Self::refresh_ahead_share) of `cache_ttl` is re-verified in the
    /// background while the request is served from the cache (at most one refresh per token
    /// at a time). A `410` from the refresh evicts the token, so its next request is turned
    /// away. Result: a token in steady use never makes a request wait on the upstream after
    /// its first verification. Default `true`.
    pub fn refresh_ahead(mut self, enabled: bool) -> Self {
        self.settings.refresh_ahead = enabled;
        self
    }

    /// The share of `cache_ttl` after which a used verdict is refreshed. Between 0 and 1,
    /// exclusive; default 0.8.
    pub fn refresh_ahead_share(mut self, share: f64) -> Self {
        self.settings.refresh_ahead_share = share;
        self
    }

    /// **Opt-in** (off by default). When the upstream cannot give a verdict (timeout, refused,
    /// `5xx`, undocumented status, circuit open; never on `400`, `401`, `403` or `410`), a
    /// token whose valid verdict expired less than `grace` ago is still let through, and a
    /// warning is logged. This trades revocation latency (a revoked token can pass for up to
    /// `cache_ttl + grace` while the upstream is down) for availability. Between 1 ms and 7
    /// days.
    pub fn stale_if_error(mut self, grace: Duration) -> Self {
        self.settings.stale_if_error = Some(grace);
        self
    }

    /// The most upstream verify calls in flight at once, across all clones of the layer.
    /// Beyond it, verifications wait for a slot until their `upstream_timeout` deadline, then
    /// get `503`. Protects the upstream from a flood of distinct well-formed tokens. At least
    /// 1; default 64.
    pub fn max_concurrent_verifications(mut self, calls: usize) -> Self {
        self.settings.max_concurrent_verifications = u64::try_from(calls).unwrap_or(u64::MAX);
        self
    }

    /// Whether a verify call that failed with a connection error or a `502`/`503`/`504` is
    /// tried once more, after a jittered pause of about 50 ms, if time remains before the
    /// `upstream_timeout` deadline. Documented verdicts (`200`, `400`, `401`, `403`, `410`),
    /// `500` and timeouts are never retried. Default `true`.
    pub fn upstream_retry(mut self, retry: bool) -> Self {
        self.settings.upstream_retry = retry;
        self
    }

    /// After this many consecutive upstream failures (timeouts, connection errors, `5xx`,
    /// undocumented statuses), verifications fail fast with `503` and a `Retry-After` for the
    /// [cool-down](Self::circuit_breaker_cool_down); then one probe is let through, and its
    /// result closes or re-opens the circuit. Tokens with a cached good verdict keep working
    /// throughout. At least 1; default 5.
    pub fn circuit_breaker_threshold(mut self, failures: u32) -> Self {
        self.settings.circuit_breaker_threshold = u64::from(failures);
        self
    }

    /// How long the circuit stays open before a probe. Between 1 ms and 1 hour; default 5 s.
    pub fn circuit_breaker_cool_down(mut self, cool_down: Duration) -> Self {
        self.settings.circuit_breaker_cool_down = cool_down;
        self
    }

    /// Shares verdicts and revocations with the other replicas through this Redis (the
    /// shared tier; needs this crate's `redis` cargo feature, else `build()` says so):
    /// `redis://[user:password@]host[:port][/db]` or `rediss://` for TLS. One endpoint (a
    /// standalone Redis or Valkey, or a managed one behind one address). Never printed or
    /// logged. Unset by default: each replica caches alone.
    ///
    /// A cache hit never touches Redis. A miss reads Redis once; a miss there lets one replica
    /// ask Conneqt while the others wait for its verdict; `invalidate`, `invalidate_all` and
    /// a `410` reach every replica within milliseconds. When Redis is down or slow the replica
    /// verifies on its own (never passing a request on Redis's word alone). See the README's
    /// "Running several replicas".
    pub fn redis_url(mut self, url: impl Into<String>) -> Self {
        self.settings.redis_url = Some(url.into());
        self
    }

    /// The secret every replica of one deployment shares: it keys the token hashes stored in
    /// Redis (so a dump of Redis cannot be matched against tokens) and names their namespace
    /// (so two environments on one Redis never share verdicts). Never printed or logged. By
    /// default derived from `api_key` and `base_url`, which the replicas of one deployment
    /// share; set it when they differ, or to keep the API key out of the derivation.
    pub fn cluster_key(mut self, key: impl Into<String>) -> Self {
        self.settings.cluster_key = Some(key.into());
        self
    }

    /// The deadline of one Redis round trip; past it (or on any Redis error) the replica
    /// verifies on its own until Redis answers its heartbeat again. Between 1 ms and 10 s;
    /// default 50 ms.
    pub fn redis_timeout(mut self, timeout: Duration) -> Self {
        self.settings.redis_timeout = timeout;
        self
    }

    /// How long one replica holds a token's lease while it asks Conneqt (the others wait for
    /// its verdict that long at most, then ask themselves), and how long an invalidation keeps
    /// a verification under way from storing its valid verdict. Longer than a verify call
    /// takes. Between 1 ms and 5 min; default 2 s.
    pub fn redis_lease(mut self, lease: Duration) -> Self {
        self.settings.redis_lease = lease;
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
        let mut settings = self.settings;
        for row in ROWS {
            row.check(&mut settings)
                .map_err(|problem| BuildError::new(row.name, problem))?;
        }
        let checked = "checked by its row";
        let base = parse_base_url(settings.base_url.as_deref().expect(checked))
            .map_err(|problem| BuildError::new("base_url", problem))?;
        let verify_path = settings.verify_path.as_deref().expect(checked);
        let verify_url = join(&base, verify_path, "verify_path")?;
        let test_url = join(&base, TEST_PATH, "base_url")?;
        let api_key = ApiKey::new(
            HeaderValue::from_str(settings.api_key.as_deref().expect(checked))
                .map_err(|_| BuildError::new("api_key", "is not a valid header value"))?,
        );
        let mut skip = self.skip;
        for prefix in settings.skip_path_prefixes {
            skip.add_prefix(prefix);
        }
        let tls = crate::upstream::tls::client_config().map_err(|error| {
            BuildError::new("HTTP client", "could not set up TLS").with_source(error)
        })?;
        let mut client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(settings.upstream_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("conneqt-guard/", env!("CARGO_PKG_VERSION")))
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(60))
            .no_proxy();
        if let Some(proxy) = &settings.upstream_proxy {
            // Not quoted: a proxy URL may carry credentials.
            let proxy = reqwest::Proxy::all(proxy.as_str()).map_err(|error| {
                BuildError::new("upstream_proxy", PROXY_PROBLEM).with_source(error.without_url())
            })?;
            client = client.proxy(proxy);
        }
        let client = client.build().map_err(|error| {
            BuildError::new("HTTP client", "could not be created").with_source(error)
        })?;

        let in_range = "in range, checked by its row";
        let resilience = Resilience {
            max_concurrent: usize::try_from(settings.max_concurrent_verifications).expect(in_range),
            retry: settings.upstream_retry,
            breaker_threshold: u32::try_from(settings.circuit_breaker_threshold).expect(in_range),
            breaker_cool_down: settings.circuit_breaker_cool_down,
        };
        crate::telemetry::describe();
        let upstream = Upstream::new(
            client,
            verify_url,
            test_url,
            api_key,
            settings.upstream_timeout,
            resilience,
        );
        let refresh_after = settings
            .refresh_ahead
            .then(|| settings.cache_ttl.mul_f64(settings.refresh_ahead_share));
        let cache = VerdictCache::new(CacheSettings {
            cache_ttl: settings.cache_ttl,
            valid_capacity: settings.cache_capacity,
            gone_ttl: settings.gone_ttl,
            gone_capacity: settings.gone_capacity,
            refresh_after,
            stale_grace: settings.stale_if_error,
        });
        #[cfg(feature = "redis")]
        let (hasher, shared) = match settings.redis_url.take() {
            Some(url) => {
                let cluster_key = match &settings.cluster_key {
                    Some(key) => key.as_bytes().to_vec(),
                    None => crate::shared::default_cluster_key(
                        settings.api_key.as_deref().expect(checked),
                        base.as_str(),
                    )
                    .to_vec(),
                };
                let verdicts = crate::shared::SharedVerdicts::new(
                    crate::shared::SharedSettings {
                        url,
                        namespace: crate::shared::namespace(&cluster_key),
                        timeout: settings.redis_timeout,
                        lease: settings.redis_lease,
                    },
                    evict_from(&cache),
                )
                .map_err(|problem| BuildError::new("redis_url", problem))?;
                let tier = crate::shared::SharedTier {
                    verdicts,
                    cache_ttl: settings.cache_ttl,
                    gone_ttl: settings.gone_ttl,
                    refresh_after,
                    lease: settings.redis_lease,
                };
                (TokenHasher::from_cluster_key(&cluster_key), Some(tier))
            }
            None => (process_hasher()?, None),
        };
        #[cfg(not(feature = "redis"))]
        let hasher = process_hasher()?;
        Ok(AccessTokenLayer::new(Guard {
            token_format: if settings.accept_opaque_tokens {
                TokenFormat::Opaque
            } else {
                TokenFormat::Uuid
            },
            hasher,
            cache,
            upstream: Arc::new(upstream),
            skip,
            strip_token_header: settings.strip_token_header,
            #[cfg(feature = "redis")]
            shared,
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
        self.settings.skip_path_prefixes.push(prefix.into());
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
        self.settings.strip_token_header = strip;
        self
    }
}

/// `upstream_proxy`'s problem, which never quotes the value.
const PROXY_PROBLEM: &str = "is not a valid proxy URL (e.g. http://proxy.internal:3128)";

/// Without the shared tier, tokens are keyed with this process's random secret.
fn process_hasher() -> Result<TokenHasher, BuildError> {
    TokenHasher::for_process().map_err(|error| {
        BuildError::new(
            "token hash key",
            format!("could not be drawn from the OS random source ({error})"),
        )
    })
}

/// What the shared tier's notices do: evict from this replica's cache.
#[cfg(feature = "redis")]
fn evict_from(cache: &VerdictCache) -> Arc<dyn Fn(crate::shared::Notice) + Send + Sync> {
    let cache = cache.clone();
    Arc::new(move |notice| match notice {
        crate::shared::Notice::Evict(key) => cache.invalidate(&key),
        crate::shared::Notice::EvictAll => cache.invalidate_all(),
    })
}

fn parse_base_url(raw: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(raw)
        .map_err(|error| format!("{raw:?} is not an absolute URL ({error})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "{raw:?} must use http or https, not {:?}",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{raw:?} has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        // Do not echo it: the credentials may be secret.
        return Err("must not contain credentials; the API key goes in api_key".to_owned());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("{raw:?} must not have a query or fragment"));
    }
    Ok(url)
}

fn check_base_url(raw: &str) -> Result<(), String> {
    parse_base_url(raw).map(drop)
}

fn check_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') || path.contains(['?', '#']) || path.chars().any(char::is_whitespace)
    {
        return Err(format!(
            "{path:?} must start with '/' and have no spaces, query or fragment"
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

/// `api_key`'s problems never quote the key.
fn check_api_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("is empty".to_owned());
    }
    if key.trim() != key {
        return Err("has leading or trailing whitespace (a copy-paste mistake?)".to_owned());
    }
    if HeaderValue::from_str(key).is_err()
        || !key.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
    {
        return Err("may contain only visible ASCII characters and spaces".to_owned());
    }
    Ok(())
}

fn check_proxy(raw: &str) -> Result<(), String> {
    reqwest::Proxy::all(raw)
        .map(drop)
        .map_err(|_| PROXY_PROBLEM.to_owned())
}

impl fmt::Debug for AccessTokenLayerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessTokenLayerBuilder")
            .field("settings", &self.settings)
            .field("skip", &self.skip)
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
                "at least 1ms",
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
                "at least 1ms",
            ),
            (
                good().circuit_breaker_threshold(0),
                "circuit_breaker_threshold",
                "at least 1",
            ),
            (
                good().circuit_breaker_cool_down(Duration::ZERO),
                "circuit_breaker_cool_down",
                "at least 1ms",
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
        let path = Settings::with_defaults().verify_path.unwrap();
        let url = join(&base, &path, "verify_path").unwrap();
        assert_eq!(
            url.as_str(),
            "https://h.example/conneqt/api/v1/messages/instant/access/token/verify"
        );
    }
}
