//! `conneqt-guard forward-auth`: answers a proxy's auth sub-request. The guard wraps [`Allow`],
//! which answers `200` with the token's fingerprint; [`ForwardAuth`] around the guard makes
//! every rejection a plain HTTP status and labels it with `X-Conneqt-Guard-Status` and
//! `X-Conneqt-Guard-Reason`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use conneqt_guard::{RejectionReason, VerifiedToken};
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response};
use http_body_util::Empty;
use tower_service::Service;

/// The token's fingerprint (a keyed hash, never the token), for the proxy to pass on.
pub(crate) const FINGERPRINT_HEADER: HeaderName =
    HeaderName::from_static("x-conneqt-token-fingerprint");
/// The status the guard meant, on every rejection, for proxies that rewrite statuses (nginx
/// turns anything but 2xx, 401 and 403 into 500).
pub(crate) const STATUS_HEADER: HeaderName = HeaderName::from_static("x-conneqt-guard-status");
/// Why, as [`RejectionReason::as_str`] (`missing_token`, `token_gone`, ...), on every rejection.
pub(crate) const REASON_HEADER: HeaderName = HeaderName::from_static("x-conneqt-guard-reason");

/// The service behind the guard: reached only with a verified token, so it says yes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Allow;

impl<B> Service<Request<B>> for Allow {
    type Response = Response<Empty<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let mut response = Response::new(Empty::new());
        if let Some(token) = request.extensions().get::<VerifiedToken>()
            && let Ok(value) = HeaderValue::from_str(&token.fingerprint().to_string())
        {
            response.headers_mut().insert(FINGERPRINT_HEADER, value);
        }
        std::future::ready(Ok(response))
    }
}

/// Wraps the guarded [`Allow`]: drops the sub-request's `Content-Type` before the guard sees
/// it, and adds [`STATUS_HEADER`] and [`REASON_HEADER`] to the guard's rejections.
///
/// Without the first step a gRPC request's rejection would be a trailers-only gRPC status,
/// which is HTTP `200`: every auth proxy would read that as "allow".
#[derive(Clone, Debug)]
pub(crate) struct ForwardAuth<S> {
    inner: S,
}

impl<S> ForwardAuth<S> {
    pub(crate) fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for ForwardAuth<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        request.headers_mut().remove(header::CONTENT_TYPE);
        let future = self.inner.call(request);
        Box::pin(async move {
            let mut response = future.await?;
            if let Some(reason) = response.extensions().get::<RejectionReason>().copied() {
                let status = HeaderValue::from(response.status().as_u16());
                let headers = response.headers_mut();
                headers.insert(STATUS_HEADER, status);
                headers.insert(REASON_HEADER, HeaderValue::from_static(reason.as_str()));
            }
            Ok(response)
        })
    }
}
