//! Step 0: requests that pass unverified, such as health checks and CORS preflights.
//!
//! Nothing is skipped unless the builder says so
//! ([`skip_path_prefix`](crate::AccessTokenLayerBuilder::skip_path_prefix),
//! [`skip_if`](crate::AccessTokenLayerBuilder::skip_if),
//! [`skip_grpc_health_checks`](crate::AccessTokenLayerBuilder::skip_grpc_health_checks),
//! [`skip_cors_preflight`](crate::AccessTokenLayerBuilder::skip_cors_preflight)). A skipped
//! request reaches the inner service without a [`VerifiedToken`](crate::VerifiedToken), and
//! costs no cache lookup and no upstream call.

use std::fmt;
use std::sync::Arc;

use http::request::Parts;
use http::{Method, Request};

/// The path prefix of the standard gRPC health service (`grpc.health.v1.Health`).
pub(crate) const GRPC_HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

/// A user predicate over the request head, from
/// [`skip_if`](crate::AccessTokenLayerBuilder::skip_if).
pub(crate) type Predicate = Arc<dyn Fn(&Parts) -> bool + Send + Sync + 'static>;

/// The configured skip rules. Empty (the default) means every request is verified.
#[derive(Clone, Default)]
pub(crate) struct SkipRules {
    prefixes: Vec<String>,
    predicates: Vec<Predicate>,
    cors_preflight: bool,
}

/// Which rule let a request through, for the trace log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Matched<'a> {
    PathPrefix(&'a str),
    CorsPreflight,
    Predicate,
}

impl fmt::Display for Matched<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PathPrefix(prefix) => write!(f, "path prefix {prefix}"),
            Self::CorsPreflight => f.write_str("CORS preflight"),
            Self::Predicate => f.write_str("skip_if predicate"),
        }
    }
}

impl SkipRules {
    pub(crate) fn add_prefix(&mut self, prefix: String) {
        self.prefixes.push(prefix);
    }

    pub(crate) fn add_predicate(&mut self, predicate: Predicate) {
        self.predicates.push(predicate);
    }

    pub(crate) fn skip_cors_preflight(&mut self) {
        self.cors_preflight = true;
    }

    /// The prefixes as configured, for validation in `build()`.
    pub(crate) fn prefixes(&self) -> &[String] {
        &self.prefixes
    }

    /// Whether a rule lets `request` through unverified, and which.
    ///
    /// Takes the request by value because a predicate sees its head as [`Parts`], which only
    /// [`Request::into_parts`] gives; splitting and rejoining are moves, not copies, and happen
    /// only when a predicate is configured and no cheaper rule matched.
    pub(crate) fn check<B>(&self, request: Request<B>) -> (Request<B>, Option<Matched<'_>>) {
        if let Some(prefix) = self
            .prefixes
            .iter()
            .find(|p| path_matches(p, request.uri().path()))
        {
            return (request, Some(Matched::PathPrefix(prefix)));
        }
        if self.cors_preflight && is_cors_preflight(&request) {
            return (request, Some(Matched::CorsPreflight));
        }
        if self.predicates.is_empty() {
            return (request, None);
        }
        let (parts, body) = request.into_parts();
        let matched = self.predicates.iter().any(|predicate| predicate(&parts));
        (
            Request::from_parts(parts, body),
            matched.then_some(Matched::Predicate),
        )
    }
}

impl fmt::Debug for SkipRules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SkipRules")
            .field("prefixes", &self.prefixes)
            .field("predicates", &Predicates(self.predicates.len()))
            .field("cors_preflight", &self.cors_preflight)
            .finish()
    }
}

/// Prints `[<fn>, <fn>]`: closures have no useful `Debug`.
struct Predicates(usize);

impl fmt::Debug for Predicates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries((0..self.0).map(|_| format_args!("<fn>")))
            .finish()
    }
}

/// What is wrong with a configured prefix, if anything.
pub(crate) fn check_prefix(prefix: &str) -> Result<(), String> {
    if prefix.is_empty() {
        return Err("must not be empty (e.g. \"/health\")".to_owned());
    }
    if !prefix.starts_with('/') {
        return Err(format!("{prefix:?} must start with '/'"));
    }
    if prefix.trim_start_matches('/').is_empty() {
        // Fail closed: this would turn the guard off for every request.
        return Err(format!(
            "{prefix:?} would skip every request; remove the layer instead"
        ));
    }
    if prefix.contains(['?', '#', '*']) || prefix.chars().any(|c| c.is_whitespace()) {
        return Err(format!(
            "{prefix:?} must be a literal path with no spaces, query, fragment or '*' \
             (a prefix already matches everything below it)"
        ));
    }
    if has_dot_segment(prefix) {
        return Err(format!("{prefix:?} must not contain '.' or '..' segments"));
    }
    Ok(())
}

/// Whether `prefix` covers `path`, on whole segments: `/health` covers `/health` and
/// `/health/live` but not `/healthcheck-admin`; `/health/` covers only what is below it.
///
/// A path with `.` or `..` segments (plain or percent-encoded) is never covered, so that
/// `/health/../messages` cannot slip past the guard to a router or file server that resolves
/// dot segments. Matching is on the path as sent: `/%68ealth` is not `/health`, and is verified.
pub(crate) fn path_matches(prefix: &str, path: &str) -> bool {
    let Some(rest) = path.strip_prefix(prefix) else {
        return false;
    };
    let on_boundary = prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/');
    on_boundary && !has_dot_segment(path)
}

fn has_dot_segment(path: &str) -> bool {
    path.split('/').any(|segment| {
        let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
        decoded == "." || decoded == ".."
    })
}

/// `OPTIONS` with an `Access-Control-Request-Method` header, as browsers send before a
/// cross-origin request. A plain `OPTIONS` is not a preflight and is verified as usual.
fn is_cors_preflight<B>(request: &Request<B>) -> bool {
    request.method() == Method::OPTIONS
        && request
            .headers()
            .contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: Method, path: &str) -> Request<()> {
        Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .unwrap()
    }

    fn matched(rules: &SkipRules, request: Request<()>) -> Option<String> {
        let (_, matched) = rules.check(request);
        matched.map(|m| m.to_string())
    }

    #[test]
    fn a_prefix_matches_whole_segments_only() {
        let cases = [
            ("/health", "/health", true),
            ("/health", "/health/", true),
            ("/health", "/health/live", true),
            ("/health", "/health/live/deep", true),
            ("/health", "/healthcheck-admin", false),
            ("/health", "/healthz", false),
            ("/health", "/", false),
            ("/health", "/api/health", false),
            ("/health", "//health", false),
            ("/health", "/Health", false),
            ("/health", "/%68ealth", false),
            ("/health/", "/health/live", true),
            ("/health/", "/health/", true),
            ("/health/", "/health", false),
            ("/health/", "/healthcheck-admin", false),
            (GRPC_HEALTH_PREFIX, "/grpc.health.v1.Health/Check", true),
            (GRPC_HEALTH_PREFIX, "/grpc.health.v1.Health/Watch", true),
            (GRPC_HEALTH_PREFIX, "/grpc.health.v1.HealthX/Check", false),
            (GRPC_HEALTH_PREFIX, "/chat.v1.Messages/Send", false),
        ];
        for (prefix, path, expected) in cases {
            assert_eq!(path_matches(prefix, path), expected, "{prefix} vs {path}");
        }
    }

    #[test]
    fn a_path_with_dot_segments_is_never_skipped() {
        for path in [
            "/health/../messages",
            "/health/./live",
            "/health/..",
            "/health/%2e%2e/messages",
            "/health/%2E./messages",
            "/health/.%2e",
        ] {
            assert!(!path_matches("/health", path), "{path}");
        }
        // Dots inside a segment are ordinary characters.
        assert!(path_matches("/health", "/health/v1.live"));
        assert!(path_matches("/health", "/health/...x"));
    }

    #[test]
    fn prefixes_are_checked_at_build() {
        assert_eq!(check_prefix("/health"), Ok(()));
        assert_eq!(check_prefix("/health/"), Ok(()));
        assert_eq!(check_prefix(GRPC_HEALTH_PREFIX), Ok(()));
        for (prefix, problem) in [
            ("", "empty"),
            ("health", "start with '/'"),
            ("/", "every request"),
            ("//", "every request"),
            ("/health/*", "'*'"),
            ("/health?x=1", "query"),
            ("/he alth", "spaces"),
            ("/health/../x", "'..'"),
        ] {
            let error = check_prefix(prefix).expect_err(prefix);
            assert!(error.contains(problem), "{prefix}: {error}");
        }
    }

    #[test]
    fn no_rules_skip_nothing() {
        let rules = SkipRules::default();
        assert_eq!(matched(&rules, request(Method::GET, "/health")), None);
        let preflight = Request::builder()
            .method(Method::OPTIONS)
            .uri("/messages")
            .header("access-control-request-method", "POST")
            .body(())
            .unwrap();
        assert_eq!(matched(&rules, preflight), None);
    }

    #[test]
    fn only_an_options_request_with_a_requested_method_is_a_preflight() {
        let mut rules = SkipRules::default();
        rules.skip_cors_preflight();
        let preflight = |method: Method| {
            Request::builder()
                .method(method)
                .uri("/messages")
                .header("access-control-request-method", "POST")
                .body(())
                .unwrap()
        };
        assert_eq!(
            matched(&rules, preflight(Method::OPTIONS)).as_deref(),
            Some("CORS preflight")
        );
        assert_eq!(matched(&rules, preflight(Method::GET)), None);
        assert_eq!(matched(&rules, request(Method::OPTIONS, "/messages")), None);
    }

    #[test]
    fn a_predicate_sees_the_request_head_and_the_request_comes_back_whole() {
        let mut rules = SkipRules::default();
        rules.add_predicate(Arc::new(|parts: &Parts| {
            parts.method == Method::GET && parts.uri.path() == "/metrics"
        }));
        let mut metrics = Request::builder()
            .uri("/metrics?x=1")
            .header("x-probe", "1")
            .body(42)
            .unwrap();
        metrics.extensions_mut().insert(7_u8);
        let (back, rule) = rules.check(metrics);
        assert_eq!(rule, Some(Matched::Predicate));
        assert_eq!(back.uri(), "/metrics?x=1");
        assert_eq!(back.headers()["x-probe"], "1");
        assert_eq!(back.extensions().get::<u8>(), Some(&7));
        assert_eq!(*back.body(), 42);
        assert_eq!(matched(&rules, request(Method::POST, "/metrics")), None);
    }

    #[test]
    fn debug_output_shows_predicates_as_fn() {
        let mut rules = SkipRules::default();
        rules.add_prefix("/health".to_owned());
        rules.add_predicate(Arc::new(|_: &Parts| true));
        let shown = format!("{rules:?}");
        assert!(shown.contains("\"/health\""), "{shown}");
        assert!(shown.contains("predicates: [<fn>]"), "{shown}");
    }
}
