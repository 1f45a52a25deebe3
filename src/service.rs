//! [`AccessTokenService`]: the middleware service the layer wraps around yours.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;

use crate::future::ResponseFuture;
use crate::guard::{Guard, Start};
use crate::reject::ResponseFormat;

/// Verifies each request's access token before calling the inner service.
///
/// Made by [`AccessTokenLayer`](crate::AccessTokenLayer); see the [crate documentation](crate).
#[derive(Clone, Debug)]
pub struct AccessTokenService<S> {
    inner: S,
    guard: Arc<Guard>,
}

impl<S> AccessTokenService<S> {
    pub(crate) fn new(inner: S, guard: Arc<Guard>) -> Self {
        Self { inner, guard }
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

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        // Skip rules, the token and a verdict the cache has at once (the common case) need no
        // future of our own: call the inner service, which is ready, or reject.
        let presented = match self.guard.start(&mut request) {
            Start::Forward => return ResponseFuture::forwarding(self.inner.call(request)),
            Start::Reject(rejection) => {
                let format = ResponseFormat::of(&request);
                return ResponseFuture::rejected(rejection.into_response(format));
            }
            Start::Verify(presented) => presented,
        };

        // Take the inner service that was polled ready, leaving a clone in its place: a clone
        // may not be ready, and calling it would break services such as `Buffer`.
        // https://docs.rs/tower/latest/tower/trait.Service.html#be-careful-when-cloning-inner-services
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);

        // The cache's wait and the upstream, in the future. How a rejection would be written
        // is decided now, while the request is at hand.
        let format = ResponseFormat::of(&request);
        ResponseFuture::checking(self.guard.clone(), presented, inner, request, format)
    }
}
