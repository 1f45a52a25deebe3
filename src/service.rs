//! [`AccessTokenService`]: the middleware service the layer wraps around yours.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;

use crate::future::ResponseFuture;
use crate::guard::{Admission, Guard};

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

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // Steps 0-2 in the guard: a skip rule or a verdict at hand needs no future of our own,
        // so forward to the inner service, which is ready, or reject.
        let pending = match self.guard.admit(request) {
            Admission::Forward(request) => {
                return ResponseFuture::forwarding(self.inner.call(request));
            }
            Admission::Reject(response) => return ResponseFuture::rejected(response),
            Admission::Check(pending) => pending,
        };

        // Take the inner service that was polled ready, leaving a clone in its place: a clone
        // may not be ready, and calling it would break services such as `Buffer`.
        // https://docs.rs/tower/latest/tower/trait.Service.html#be-careful-when-cloning-inner-services
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);

        // 2-4. Cache, upstream and verdict, in the future.
        ResponseFuture::checking(self.guard.clone(), pending, inner)
    }
}
