//! [`AccessTokenService`]: the middleware service the layer wraps around yours.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;

use crate::future::{ResponseFuture, decide_cached};
use crate::layer::Shared;
use crate::reject::{Rejection, ResponseFormat};
use crate::telemetry::{self, Outcome};
use crate::token::{self, Taken};
use crate::verdict::VerifiedToken;

/// Verifies each request's access token before calling the inner service.
///
/// Made by [`AccessTokenLayer`](crate::AccessTokenLayer); see the [crate documentation](crate).
#[derive(Clone, Debug)]
pub struct AccessTokenService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> AccessTokenService<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Self { inner, shared }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for AccessTokenService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
{
    type Response = Response<crate::body::ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // 0. Requests a skip rule lets through go straight to the inner service, which is
        // ready, without a `VerifiedToken`.
        let (mut request, skipped) = self.shared.skip.check(request);
        if let Some(rule) = skipped {
            tracing::trace!(method = %request.method(), %rule, "conneqt-guard: request passed unverified (skip rule)");
            token::conceal(request.headers_mut(), self.shared.strip_token_header);
            telemetry::request(Outcome::Skipped);
            return ResponseFuture::forwarding(self.inner.call(request));
        }

        // 1. The token's form and key; junk is refused without touching the cache or the
        // upstream. The header is concealed (stripped or marked sensitive) as the token is
        // taken, so neither the hit nor the miss path forwards it in the clear.
        // 2. A cached verdict that can be had at once (the common case) is found while the
        // token is still in the header map, and needs no future of our own: forward to the
        // inner service, which is ready, with the token copied inline, or reject.
        let shared = &*self.shared;
        let taken = token::take(
            request.headers_mut(),
            shared.token_format,
            shared.strip_token_header,
            &shared.hasher,
            |value, key| {
                let (verdict, how) = shared.cache.lookup_now(&key)?;
                let fingerprint = key.fingerprint();
                Some(
                    decide_cached(verdict, fingerprint, how)
                        .map(|()| VerifiedToken::copied(value, fingerprint)),
                )
            },
        );
        let presented = match taken {
            Ok(Taken::Presented(presented)) => presented,
            Ok(Taken::Answered(Ok(token))) => {
                request.extensions_mut().insert(token);
                return ResponseFuture::forwarding(self.inner.call(request));
            }
            Ok(Taken::Answered(Err(rejection))) => {
                let format = ResponseFormat::of(&request);
                return ResponseFuture::rejected(rejection.into_response(format));
            }
            Err(problem) => {
                tracing::debug!(reason = ?problem, "conneqt-guard: refused a request before verification");
                let rejection = Rejection::token_problem(problem);
                telemetry::request(Outcome::Rejected(rejection.reason()));
                let format = ResponseFormat::of(&request);
                return ResponseFuture::rejected(rejection.into_response(format));
            }
        };

        // Take the inner service that was polled ready, leaving a clone in its place: a clone
        // may not be ready, and calling it would break services such as `Buffer`.
        // https://docs.rs/tower/latest/tower/trait.Service.html#be-careful-when-cloning-inner-services
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);

        // 2-4. Cache, upstream and verdict, in the future. How a rejection would be written is
        // decided now, while the request is at hand.
        let format = ResponseFormat::of(&request);
        ResponseFuture::checking(self.shared.clone(), presented, inner, request, format)
    }
}
