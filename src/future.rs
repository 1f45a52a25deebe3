//! The response future of [`AccessTokenService`](crate::AccessTokenService).
//!
//! [`ResponseFuture`] sequences what the guard (`src/guard.rs`) decides: a request the guard
//! settled in `call` starts in `Forwarding` or `Rejected`; otherwise `Checking` awaits the
//! guard's verification (the only boxed part). `Forwarding` drives the inner
//! service's own future, unboxed; `Rejected` hands back a rendered rejection.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::body::ResponseBody;
use crate::guard::{Decision, Guard};
use crate::reject::ResponseFormat;
use crate::token::PresentedToken;

type Check = Pin<Box<dyn Future<Output = Decision> + Send>>;

pin_project! {
    /// The response future of [`AccessTokenService`](crate::AccessTokenService).
    pub struct ResponseFuture<S, ReqBody>
    where
        S: Service<Request<ReqBody>>,
    {
        #[pin]
        state: State<S, ReqBody>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, ReqBody>
    where
        S: Service<Request<ReqBody>>,
    {
        Checking {
            check: Check,
            // Boxed, like the check itself, so that the future stays small (and cheap to move)
            // on the cache-hit path, which never builds this state.
            pending: Option<Box<(S, Request<ReqBody>)>>,
            format: ResponseFormat,
        },
        Forwarding {
            #[pin]
            future: S::Future,
        },
        Rejected {
            response: Option<Box<Response<Full<Bytes>>>>,
        },
    }
}

impl<S, ReqBody> ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>>,
{
    pub(crate) fn checking(
        guard: Arc<Guard>,
        presented: PresentedToken,
        inner: S,
        request: Request<ReqBody>,
        format: ResponseFormat,
    ) -> Self {
        Self {
            state: State::Checking {
                check: Box::pin(guard.verify(presented)),
                pending: Some(Box::new((inner, request))),
                format,
            },
        }
    }

    pub(crate) fn forwarding(future: S::Future) -> Self {
        Self {
            state: State::Forwarding { future },
        }
    }

    pub(crate) fn rejected(response: Response<Full<Bytes>>) -> Self {
        Self {
            state: State::Rejected {
                response: Some(Box::new(response)),
            },
        }
    }
}

impl<S, ReqBody, ResBody> Future for ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Output = Result<Response<ResponseBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Checking {
                    check,
                    pending,
                    format,
                } => {
                    let decision = ready!(check.as_mut().poll(cx));
                    let format = *format;
                    let (mut inner, mut request) = *pending
                        .take()
                        .expect("ResponseFuture polled after completion");
                    match decision {
                        Decision::Forward(token) => {
                            request.extensions_mut().insert(token);
                            let future = inner.call(request);
                            this.state.set(State::Forwarding { future });
                        }
                        Decision::Reject(rejection) => {
                            let response = rejection.into_response(format);
                            this.state.set(State::Rejected {
                                response: Some(Box::new(response)),
                            });
                        }
                    }
                }
                StateProj::Forwarding { future } => {
                    let response = ready!(future.poll(cx))?;
                    return Poll::Ready(Ok(response.map(ResponseBody::inner)));
                }
                StateProj::Rejected { response } => {
                    let response = response
                        .take()
                        .expect("ResponseFuture polled after completion");
                    return Poll::Ready(Ok((*response).map(ResponseBody::rejection)));
                }
            }
        }
    }
}

impl<S, ReqBody> fmt::Debug for ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Checking { .. } => "Checking",
            State::Forwarding { .. } => "Forwarding",
            State::Rejected { .. } => "Rejected",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
