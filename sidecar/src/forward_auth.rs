//! `conneqt-guard forward-auth`: answers a proxy's auth sub-request. [`ForwardAuth`] asks the
//! guard ([`AccessTokenLayer::authorize`]) and answers `200` with the token's fingerprint, or
//! the guard's rejection as a plain HTTP status labelled with `X-Conneqt-Guard-Status` and
//! `X-Conneqt-Guard-Reason`.
//!
//! The guard checks the request the client sent, not the sub-request: nginx `auth_request`,
//! Traefik `ForwardAuth` and Caddy `forward_auth` send a sub-request of their own (another path,
//! usually `GET`) and describe the original in `X-Forwarded-Method` and `X-Forwarded-Uri`, so
//! [`ForwardAuth`] gives the guard that method and that path and query, and the skip rules
//! (`--skip-path-prefix`, ...) apply to the original path. Without those headers (Envoy
//! `ext_authz`, whose sub-request carries the original method and path) the sub-request is
//! checked as it is. The headers are trusted, so only the proxy may reach this listener: the
//! shipped proxy configurations overwrite whatever a client sent in them.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use conneqt_guard::{AccessTokenLayer, RejectionReason, VerifiedToken};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::Full;
use tower_service::Service;

use crate::http1;
use crate::proxy::problem_json;

/// The token's fingerprint (a keyed hash, never the token), for the proxy to pass on.
pub(crate) const FINGERPRINT_HEADER: HeaderName =
    HeaderName::from_static("x-conneqt-token-fingerprint");
/// The status the guard meant, on every rejection, for proxies that rewrite statuses (nginx
/// turns anything but 2xx, 401 and 403 into 500).
pub(crate) const STATUS_HEADER: HeaderName = HeaderName::from_static("x-conneqt-guard-status");
/// Why, as [`RejectionReason::as_str`] (`missing_token`, `token_gone`, ...), on every rejection.
pub(crate) const REASON_HEADER: HeaderName = HeaderName::from_static("x-conneqt-guard-reason");
/// The original request's method, as nginx (with the shipped config), Traefik and Caddy send it.
const X_FORWARDED_METHOD: HeaderName = HeaderName::from_static("x-forwarded-method");
/// The original request's target (origin form: path and query), as nginx (with the shipped
/// config: `$request_uri`), Traefik and Caddy send it.
const X_FORWARDED_URI: HeaderName = HeaderName::from_static("x-forwarded-uri");
/// [`REASON_HEADER`] of a sub-request whose `X-Forwarded-*` headers are unusable.
const MALFORMED_REQUEST: HeaderValue = HeaderValue::from_static("malformed_request");

/// The forward-auth service: gives the guard the original request's method and target (from
/// `X-Forwarded-Method` and `X-Forwarded-Uri`, when present), drops the sub-request's
/// `Content-Type` before the guard sees it, and answers `200` with [`FINGERPRINT_HEADER`] when
/// the guard lets the request through, or the guard's rejection with [`STATUS_HEADER`] and
/// [`REASON_HEADER`] added.
///
/// A sub-request whose `X-Forwarded-Method` or `X-Forwarded-Uri` is present but unusable
/// (repeated, not a method, not an origin-form path) gets `400` problem+json
/// (`tag:conneqt-guard,2026:malformed-request`) without reaching the guard: failing closed,
/// since the path it names could decide a skip rule.
///
/// Without the `Content-Type` step a gRPC request's rejection would be a trailers-only gRPC
/// status, which is HTTP `200`: every auth proxy would read that as "allow".
#[derive(Clone, Debug)]
pub(crate) struct ForwardAuth {
    guard: AccessTokenLayer,
}

impl ForwardAuth {
    pub(crate) fn new(guard: AccessTokenLayer) -> Self {
        Self { guard }
    }
}

impl<B: Send + 'static> Service<Request<B>> for ForwardAuth {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        if let Err(detail) = use_original_request(&mut request) {
            tracing::debug!(detail, "forward-auth sub-request refused: answering 400");
            return Box::pin(std::future::ready(Ok(malformed_request(detail))));
        }
        request.headers_mut().remove(header::CONTENT_TYPE);
        let guard = self.guard.clone();
        Box::pin(async move {
            Ok(match guard.authorize(request).await {
                Ok(request) => allowed(request.extensions().get::<VerifiedToken>()),
                Err(mut rejection) => {
                    let status = HeaderValue::from(rejection.status().as_u16());
                    let reason = rejection.extensions().get::<RejectionReason>().copied();
                    let headers = rejection.headers_mut();
                    headers.insert(STATUS_HEADER, status);
                    if let Some(reason) = reason {
                        headers.insert(REASON_HEADER, HeaderValue::from_static(reason.as_str()));
                    }
                    rejection
                }
            })
        })
    }
}

/// `200`, with the token's fingerprint when there is one (none when a skip rule matched).
fn allowed(token: Option<&VerifiedToken>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::default());
    if let Some(token) = token
        && let Ok(value) = HeaderValue::from_str(&token.fingerprint().to_string())
    {
        response.headers_mut().insert(FINGERPRINT_HEADER, value);
    }
    response
}

/// Replaces the sub-request's method and target with the original request's, from
/// `X-Forwarded-Method` and `X-Forwarded-Uri`; each header that is absent leaves the
/// sub-request's own (Envoy sends the original method and path as the sub-request's). Checks
/// both headers before changing anything; the error is the problem's `detail`.
fn use_original_request<B>(request: &mut Request<B>) -> Result<(), &'static str> {
    // The proxy forwards the original request's headers to the backend, aliases included:
    // one that a CGI-style backend reads as the token would be a token nobody verified.
    if request
        .headers()
        .keys()
        .any(|name| http1::aliases_token(name.as_str().as_bytes()))
    {
        return Err(
            "A header spelt like the token header with '_' is not accepted: \
                    some backends read it as the token.",
        );
    }
    let method = match single(request.headers(), &X_FORWARDED_METHOD) {
        Err(()) => return Err("The proxy sent X-Forwarded-Method more than once."),
        Ok(None) => None,
        Ok(Some(value)) => Some(
            Method::from_bytes(value.as_bytes())
                .map_err(|_| "The proxy's X-Forwarded-Method is not an HTTP method.")?,
        ),
    };
    let target = match single(request.headers(), &X_FORWARDED_URI) {
        Err(()) => return Err("The proxy sent X-Forwarded-Uri more than once."),
        Ok(None) => None,
        Ok(Some(value)) => Some(origin_form(value.as_bytes()).ok_or(
            "The proxy's X-Forwarded-Uri is not an origin-form request target \
             (a path starting with '/', optionally with a query).",
        )?),
    };
    if let Some(method) = method {
        *request.method_mut() = method;
    }
    if let Some(target) = target {
        *request.uri_mut() = Uri::from(target);
    }
    Ok(())
}

/// The header's value if it appears at most once; `Err` if it appears more often.
fn single<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Result<Option<&'a HeaderValue>, ()> {
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    match values.next() {
        Some(_) => Err(()),
        None => Ok(first),
    }
}

/// `bytes` as an origin-form request target (RFC 9112 section 3.2.1: an absolute path, then
/// optionally `?` and a query), or `None`. Refused: anything not starting with `/` (a relative
/// path, an absolute URI, `*`, empty), a fragment, and any byte the guard's HTTP parser would
/// refuse in a request line it received itself.
fn origin_form(bytes: &[u8]) -> Option<PathAndQuery> {
    if bytes.first() != Some(&b'/') || bytes.contains(&b'#') {
        return None;
    }
    PathAndQuery::try_from(bytes).ok()
}

/// `400` problem+json for a sub-request that cannot be used, labelled like the guard's own
/// rejections.
fn malformed_request(detail: &'static str) -> Response<Full<Bytes>> {
    let mut response = problem_json(StatusCode::BAD_REQUEST, "malformed-request", detail);
    let headers = response.headers_mut();
    headers.insert(STATUS_HEADER, HeaderValue::from(400_u16));
    headers.insert(REASON_HEADER, MALFORMED_REQUEST);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub_request(headers: &[(&str, &str)]) -> Request<()> {
        let mut request = Request::get("/_conneqt_guard?x=1").body(()).unwrap();
        for (name, value) in headers {
            request.headers_mut().append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        request
    }

    #[test]
    fn the_original_method_and_target_replace_the_sub_requests() {
        let mut request = sub_request(&[
            ("x-forwarded-method", "POST"),
            ("x-forwarded-uri", "/healthz/live?verbose=1"),
        ]);
        use_original_request(&mut request).unwrap();
        assert_eq!(request.method(), Method::POST);
        assert_eq!(request.uri(), "/healthz/live?verbose=1");
        assert_eq!(request.uri().path(), "/healthz/live");

        // Ambiguous paths are passed on byte for byte, for the skip rules to judge.
        for target in ["/healthz/..%2fsecret", "/healthz/..;/secret", "//healthz"] {
            let mut request = sub_request(&[("x-forwarded-uri", target)]);
            use_original_request(&mut request).unwrap();
            assert_eq!(request.uri().path(), target);
            assert_eq!(request.method(), Method::GET);
        }
    }

    #[test]
    fn without_the_headers_the_sub_request_is_checked_as_it_is() {
        let mut request = sub_request(&[]);
        *request.method_mut() = Method::DELETE;
        use_original_request(&mut request).unwrap();
        assert_eq!(request.method(), Method::DELETE);
        assert_eq!(request.uri(), "/_conneqt_guard?x=1");
    }

    #[test]
    fn unusable_headers_are_refused_and_change_nothing() {
        let cases: [&[(&str, &str)]; 11] = [
            &[("x-forwarded-uri", "healthz")],
            &[("x-forwarded-uri", "")],
            &[("x-forwarded-uri", "*")],
            &[("x-forwarded-uri", "http://example.org/healthz")],
            &[("x-forwarded-uri", "/healthz#frag")],
            &[("x-forwarded-uri", "/health z")],
            &[
                ("x-forwarded-uri", "/healthz"),
                ("x-forwarded-uri", "/healthz"),
            ],
            &[("x-forwarded-method", "GE T")],
            &[("x-forwarded-method", "")],
            &[("x-forwarded-method", "GET"), ("x-forwarded-method", "GET")],
            &[("conneqt_instant_access_token", "t")],
        ];
        for headers in cases {
            let mut request = sub_request(headers);
            // A valid partner header is not applied either.
            if !headers
                .iter()
                .any(|(name, _)| *name == "x-forwarded-method")
            {
                request
                    .headers_mut()
                    .insert(X_FORWARDED_METHOD, HeaderValue::from_static("POST"));
            }
            assert!(use_original_request(&mut request).is_err(), "{headers:?}");
            assert_eq!(request.method(), Method::GET, "{headers:?}");
            assert_eq!(request.uri(), "/_conneqt_guard?x=1", "{headers:?}");
        }
    }

    #[test]
    fn the_malformed_request_problem_is_labelled() {
        let response = malformed_request("why");
        assert_eq!(response.status(), 400);
        assert_eq!(response.headers()[&STATUS_HEADER], "400");
        assert_eq!(response.headers()[&REASON_HEADER], "malformed_request");
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        assert_eq!(response.headers()[header::CACHE_CONTROL], "no-store");
    }
}
