//! Step 0: requests that pass unverified, such as health checks and CORS preflights.
//!
//! Nothing is skipped unless the builder says so
//! ([`skip_path_prefix`](crate::AccessTokenLayerBuilder::skip_path_prefix),
//! [`skip_if`](crate::AccessTokenLayerBuilder::skip_if),
//! [`skip_grpc_health_checks`](crate::AccessTokenLayerBuilder::skip_grpc_health_checks),
//! [`skip_cors_preflight`](crate::AccessTokenLayerBuilder::skip_cors_preflight)). A skipped
//! request reaches the inner service without a [`VerifiedToken`](crate::VerifiedToken), and
//! costs no cache lookup and no upstream call.
//!
//! # Path prefixes fail closed on ambiguous paths
//!
//! The inner service, or a backend behind the sidecar, may read a path differently from the
//! way it was sent: Tomcat and Jetty drop `;` path parameters (`/public/..;/secret` is
//! `/public/../secret` to them), decode-first routers decode `%2f` to `/` (sometimes twice),
//! and Windows-style backends take `\` for `/`. A prefix therefore skips a path only if
//! **every** common reading of it stays below the prefix, on whole segments:
//!
//! - the path as sent;
//! - percent-decoded once, and twice;
//! - each of those with `\` read as `/`, and with `;` parameters dropped from each segment
//!   (`/a;x=1/b` is `/a/b`), in any combination.
//!
//! A reading with a `.` or `..` segment (or a segment of dots and spaces that starts with a
//! dot, such as `...` or `.. `, which Win32 path handling trims to one), or with a control byte (0x00–0x1F, 0x7F, e.g. from
//! `%00`), does not stay below the prefix, and neither does a path that is still
//! percent-encoded after two decodings (`/public/%25252e%25252e/x`). So with the prefix
//! `/public`, `/public/..;/secret`, `/public/..%2fsecret`, `/public/%252e%252e/secret`,
//! `/public/..\secret` and `/public/.%00./secret` are not skipped: they are verified like any
//! other request (the skip rules never reject anything themselves). `/public/a%20b`,
//! `/public/v1.2/x` and `/public/...x` are skipped.
//!
//! Readings are compared byte for byte, case-sensitively: `/PUBLIC/x` is not below `/public`
//! and is verified, and so is `/%70ublic/x` (its raw reading is not below `/public`).
//! Decoding yields bytes, not necessarily UTF-8, and they are taken as they are: an overlong
//! UTF-8 form such as `%c0%af` is the two bytes 0xC0 0xAF, not `/`, so `/public/..%c0%afx`
//! stays below `/public` in every reading and is skipped (a strict UTF-8 decoder refuses
//! overlong forms, and none of the readings above produces a `/` from them).
//! Each reading of the path is compared with the same reading of the prefix, which matters
//! only for a prefix that itself contains `%`, `;` or `\`; `build()` refuses a prefix that
//! has a dot segment or a control byte in any reading, or is still encoded after two
//! decodings, since it could never skip anything.
//!
//! This costs nothing on the common path: a path with no `%`, `\`, `;` or control byte has no
//! other reading, and is checked as sent without allocating.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use http::request::Parts;
use http::{Method, Request};
use percent_encoding::percent_decode;

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

    /// Whether a rule lets `request` through unverified, and which.
    ///
    /// A predicate sees the request's head as [`Parts`]: only when a predicate is configured
    /// and no cheaper rule matched, the head is moved into a `Parts` for it and back (moves,
    /// not copies), so the request is never taken by value.
    #[inline]
    pub(crate) fn check<B>(&self, request: &mut Request<B>) -> Option<Matched<'_>> {
        if let Some(prefix) = self
            .prefixes
            .iter()
            .find(|p| path_matches(p, request.uri().path()))
        {
            return Some(Matched::PathPrefix(prefix));
        }
        if self.cors_preflight && is_cors_preflight(request) {
            return Some(Matched::CorsPreflight);
        }
        if self.predicates.is_empty() {
            return None;
        }
        let matched = self.check_predicates(request);
        matched.then_some(Matched::Predicate)
    }

    #[inline(never)]
    fn check_predicates<B>(&self, request: &mut Request<B>) -> bool {
        let (mut parts, ()) = Request::new(()).into_parts();
        parts.method = std::mem::take(request.method_mut());
        parts.uri = std::mem::take(request.uri_mut());
        parts.version = request.version();
        parts.headers = std::mem::take(request.headers_mut());
        parts.extensions = std::mem::take(request.extensions_mut());
        let matched = self.predicates.iter().any(|predicate| predicate(&parts));
        *request.method_mut() = parts.method;
        *request.uri_mut() = parts.uri;
        *request.headers_mut() = parts.headers;
        *request.extensions_mut() = parts.extensions;
        matched
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
    if !every_reading_is_plain(prefix.as_bytes()) {
        // Such a prefix could never skip anything: every path below it has the same problem.
        return Err(format!(
            "{prefix:?} must not contain '.' or '..' segments or control characters in any \
             reading (percent-decoded once or twice, ';' parameters dropped, '\\' read as \
             '/'), nor be percent-encoded three times"
        ));
    }
    Ok(())
}

/// Whether `prefix` covers `path`: whether **every** reading of `path` (see the module doc)
/// stays below `prefix`, on whole segments. `/health` covers `/health` and `/health/live` but
/// not `/healthcheck-admin`; `/health/` covers only what is below it. Bytes are compared
/// exactly, so case matters: `/Health` and `/%68ealth` are not `/health`, and are verified.
///
/// Runs on every request once a prefix is configured, so a path with no `%`, `\`, `;` or
/// control byte (nearly all of them) is answered from the raw path alone, without allocating.
///
/// Each reading of `path` is compared with the same reading of `prefix`. Given that the raw
/// path is below the raw prefix on a segment boundary (checked first), that comparison always
/// holds: decoding, `\` as `/` and dropping `;` parameters never remove a `/`, and cannot
/// join bytes across the boundary (a `%XX` escape cannot contain `/`, and a parameter ends at
/// the next `/`). What is left to check is that no reading has a dot segment or a control
/// byte, which [`every_reading_is_plain`] does.
pub(crate) fn path_matches(prefix: &str, path: &str) -> bool {
    let Some(rest) = path.strip_prefix(prefix) else {
        return false;
    };
    let on_boundary = prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/');
    if !on_boundary {
        return false;
    }
    let path = path.as_bytes();
    if !path.iter().copied().any(needs_other_readings) {
        // The fast path: every reading is the raw path, and it has no `%2e` to decode.
        return !path.split(|&b| b == b'/').any(is_dot_segment);
    }
    every_reading_is_plain(path)
}

/// A byte that makes another reading of the path differ from the raw one (or, for a control
/// byte, keeps the path from being skipped as it is).
fn needs_other_readings(byte: u8) -> bool {
    matches!(byte, b'%' | b'\\' | b';') || is_control(byte)
}

fn is_control(byte: u8) -> bool {
    byte < 0x20 || byte == 0x7f
}

/// Whether no reading of `path` has a `.` or `..` segment or a control byte, and two
/// decodings leave nothing to decode.
///
/// The readings are the path as sent and percent-decoded once and twice, each also with `\`
/// read as `/` and with `;` parameters dropped from each segment, in any combination. All of
/// them are covered by checking, for each decoding depth, the segments split on both `/` and
/// `\`, whole and cut at their first `;`: dropping parameters before decoding or before
/// reading `\` as `/` only removes bytes from a `;` up to the next `/`, and cannot create an
/// escape, so it cannot produce a dot segment that these cuts miss. Control bytes are looked
/// for in each decoded path whole.
///
/// A path that is still percent-encoded after two decodings (`%25252e`) is not plain either:
/// a backend that decodes once more would see another path, and no real skipped path is
/// encoded three times.
fn every_reading_is_plain(path: &[u8]) -> bool {
    let mut reading = Cow::Borrowed(path);
    let mut decodings = 0;
    loop {
        if !is_plain(&reading) {
            return false;
        }
        if !has_escape(&reading) {
            return true; // decoding changes nothing (a stray `%`, as in `100%`, stays)
        }
        if decodings == 2 {
            return false;
        }
        reading = Cow::Owned(percent_decode(&reading).collect());
        decodings += 1;
    }
}

/// Whether `bytes` has a `%XX` escape, i.e. whether percent-decoding would change it.
fn has_escape(bytes: &[u8]) -> bool {
    bytes
        .windows(3)
        .any(|w| w[0] == b'%' && w[1].is_ascii_hexdigit() && w[2].is_ascii_hexdigit())
}

/// One reading at one decoding depth: no control byte, and no segment (split on `/` and `\`)
/// that is `.` or `..`, either whole or up to its first `;`.
fn is_plain(reading: &[u8]) -> bool {
    !reading.iter().copied().any(is_control)
        && !reading.split(|&b| b == b'/' || b == b'\\').any(|segment| {
            let name = segment.split(|&b| b == b';').next().unwrap_or(segment);
            is_dot_segment(segment) || is_dot_segment(name)
        })
}

/// `.` and `..`, and any other segment of dots and spaces that starts with a dot (`...`,
/// `.. `): Win32 path handling strips trailing dots and spaces, so a Windows-style backend
/// reads those as `.` or `..` too.
fn is_dot_segment(segment: &[u8]) -> bool {
    segment.first() == Some(&b'.') && segment.iter().all(|&b| b == b'.' || b == b' ')
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

    fn matched(rules: &SkipRules, mut request: Request<()>) -> Option<String> {
        rules.check(&mut request).map(|m| m.to_string())
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
            // Windows-style backends strip trailing dots and spaces: `...` and `.. ` are `..`.
            "/health/.../messages",
            "/health/..%20/messages",
            "/health/.%20./messages",
        ] {
            assert!(!path_matches("/health", path), "{path}");
        }
        // Dots inside a segment are ordinary characters.
        assert!(path_matches("/health", "/health/v1.live"));
        assert!(path_matches("/health", "/health/...x"));
    }

    /// Each of these reads, to some common backend, as a path outside `/public`.
    const AMBIGUOUS: &[&str] = &[
        // The six from the report: Tomcat/Jetty `;`, decode-first routers, Windows backends.
        "/public/..;/secret",
        "/public/..%2fsecret",
        "/public/%2e%2e%2fsecret",
        "/public/..\\secret",
        "/public/%252e%252e/secret",
        "/public/.%00./secret",
        // Upper- and lower-case hex, and the other separators encoded.
        "/public/..%2Fsecret",
        "/public/%2E%2E%2Fsecret",
        "/public/%2e%2E/secret",
        "/public/..%5csecret",
        "/public/..%5Csecret",
        "/public/..%3b/secret",
        "/public/..%3B/secret",
        "/public/..%3bx=1%2fsecret",
        // `;` parameters, on a dot segment or on the prefix itself.
        "/public/..;jsessionid=1/secret",
        "/public/.;x/secret",
        "/public;x/../secret",
        "/public/x/..;",
        // `\` as `/`, raw and decoded, and mixed with parameters.
        "/public/x\\..\\..\\secret",
        "/public/..\\",
        "/public/x;a\\..\\..\\secret",
        "/public/%2e%2e%5c%2e%2e%5csecret",
        // Double encoding, in either style.
        "/public/%252E%252E/secret",
        "/public/..%252fsecret",
        "/public/..%255csecret",
        "/public/..%253b/secret",
        "/public/%25%32%65%25%32%65/secret",
        // Still encoded after two decodings: a third decoding could be anything.
        "/public/%25252e%25252e/secret",
        "/public/a%252520b",
        // Control bytes, decoded once or twice.
        "/public/.%00./secret",
        "/public/%00",
        "/public/x%0d%0aSet-Cookie:%20a=b",
        "/public/a%09b",
        "/public/%1f",
        "/public/%7f",
        "/public/%7F",
        "/public/%2500",
    ];

    #[test]
    fn an_ambiguous_path_is_not_skipped() {
        for path in AMBIGUOUS {
            assert!(!path_matches("/public", path), "{path}");
            assert!(!path_matches("/public/", path), "{path}");
        }
    }

    #[test]
    fn an_ambiguous_path_is_verified_not_rejected_by_the_skip_rules() {
        let mut rules = SkipRules::default();
        rules.add_prefix("/public".to_owned());
        for path in AMBIGUOUS {
            // Every one of them is a valid request target: the rules just do not skip it.
            let request = request(Method::GET, path);
            assert_eq!(request.uri().path(), *path);
            assert_eq!(matched(&rules, request), None, "{path}");
        }
        assert_eq!(
            matched(&rules, request(Method::GET, "/public/x")).as_deref(),
            Some("path prefix /public")
        );
    }

    #[test]
    fn a_path_that_stays_below_the_prefix_in_every_reading_is_still_skipped() {
        for path in [
            "/public",
            "/public/",
            "/public/a/b",
            "/public/v1.2/x",
            "/public/...x",
            "/public/..x/..y",
            "/public/%2e%2ex",
            "/public/a%20b",
            "/public/caf%C3%A9",
            "/public/%ff%fe",
            "/public/100%",
            "/public/100%25",
            "/public/100%2525",
            "/public/%zz",
            "/public/a%2fb",
            "/public/a%5cb",
            "/public/a\\b",
            "/public/a;v=1/b",
            "/public/x%3bv=1",
            "/public/a%252fb",
            // Overlong UTF-8 is bytes, not `/` or `.`: every reading stays below `/public`.
            "/public/..%c0%afx",
            "/public/..%C0%AF..%c0%afsecret",
            "/public/%c0%ae%c0%ae/x",
        ] {
            assert!(path_matches("/public", path), "{path}");
        }
    }

    #[test]
    fn every_reading_is_compared_case_sensitively() {
        for path in [
            "/PUBLIC/x",
            "/Public/x",
            "/%70ublic/x",
            "/%50UBLIC/x",
            "/public%2fx",
            "/public%2Fx",
            "/public%5cx",
            "/public;x/y",
            "/public\\x",
        ] {
            assert!(!path_matches("/public", path), "{path}");
        }
    }

    #[test]
    fn a_prefix_is_compared_with_the_same_reading_of_the_path() {
        // Only a prefix with `%`, `;` or `\` has other readings.
        assert!(path_matches("/a%20b", "/a%20b/x"));
        assert!(path_matches("/a%20b", "/a%20b"));
        assert!(!path_matches("/a%20b", "/a%20b/%2e%2e/x"));
        assert!(path_matches("/a;v=1", "/a;v=1/x"));
        assert!(!path_matches("/a;v=1", "/a;v=1/..;/x"));
        assert!(path_matches("/a\\b", "/a\\b/x"));
        assert!(!path_matches("/a\\b", "/a\\b\\..\\x"));
    }

    #[test]
    fn the_fast_path_agrees_with_the_full_check() {
        for path in [
            "/public",
            "/public/a/b",
            "/public/v1.2/x",
            "/public/..",
            "/public/./x",
            "/public/...",
            "/public//x",
        ] {
            assert!(!path.bytes().any(needs_other_readings), "{path}");
            assert_eq!(
                path_matches("/public", path),
                every_reading_is_plain(path.as_bytes()),
                "{path}"
            );
        }
        for byte in [b'%', b'\\', b';', 0x00, 0x1f, 0x7f] {
            assert!(needs_other_readings(byte), "{byte:#x}");
        }
        for byte in [b'/', b'.', b'a', b'~', b' ', 0x80, 0xff] {
            assert!(!needs_other_readings(byte), "{byte:#x}");
        }
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
            ("/health/%252e%252e", "'..'"),
            ("/health/..;x", "'..'"),
            ("/health\\..", "'..'"),
            ("/health/%00", "control characters"),
            ("/health/%25252e", "three times"),
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
    fn a_predicate_sees_the_request_head_and_the_request_is_left_whole() {
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
        *metrics.version_mut() = http::Version::HTTP_2;
        let rule = rules.check(&mut metrics);
        assert_eq!(rule, Some(Matched::Predicate));
        assert_eq!(metrics.method(), Method::GET);
        assert_eq!(metrics.uri(), "/metrics?x=1");
        assert_eq!(metrics.version(), http::Version::HTTP_2);
        assert_eq!(metrics.headers()["x-probe"], "1");
        assert_eq!(metrics.extensions().get::<u8>(), Some(&7));
        assert_eq!(*metrics.body(), 42);
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
