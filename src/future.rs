//! The response future of [`AccessTokenService`](crate::AccessTokenService).
//!
//! [`ResponseFuture`] sequences the steps of the request's path, in order.
//!
//! A verdict already in the cache is found in `call` itself, which then starts in
//! `Forwarding` or `Rejected`. Otherwise `Checking` runs the cache and, on a miss, the
//! upstream call (the only boxed part);
//! `Forwarding` drives the inner service's own future, unboxed; `Rejected` hands back a
//! rendered rejection.

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
use tracing::Instrument;

use crate::body::ResponseBody;
use crate::cache::CacheResult;
use crate::layer::Shared;
use crate::reject::{Rejection, ResponseFormat};
use crate::telemetry::{self, Outcome};
use crate::token::{Fingerprint, PresentedToken};
use crate::upstream::{Upstream, UpstreamError};
use crate::verdict::{Verdict, VerifiedToken};

/// What the check concluded.
#[derive(Debug)]
pub(crate) enum Decision {
    Forward(VerifiedToken),
    Reject(Rejection),
}

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
        shared: Arc<Shared>,
        presented: PresentedToken,
        inner: S,
        request: Request<ReqBody>,
        format: ResponseFormat,
    ) -> Self {
        Self {
            state: State::Checking {
                check: Box::pin(check(shared, presented)),
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

/// Step 3 for one token, as a future that owns what it needs, for the cache to run (on a miss)
/// or spawn (to refresh ahead).
pub(crate) fn verification(
    upstream: &Arc<Upstream>,
    presented: &PresentedToken,
) -> impl Future<Output = Result<Verdict, UpstreamError>> + Send + 'static {
    let upstream = upstream.clone();
    let token = presented.clone();
    // The call runs in its own task; carry the request's span into it.
    async move { upstream.verify(&token).await }.in_current_span()
}

/// Steps 2 to 4: the cache, the upstream on a miss, and the decision.
async fn check(shared: Arc<Shared>, presented: PresentedToken) -> Decision {
    let key = presented.hash();
    let span = tracing::debug_span!(
        "conneqt_guard.verify",
        token = %key.fingerprint(),
        cache = tracing::field::Empty,
        upstream = tracing::field::Empty,
    );
    check_in(shared, presented).instrument(span).await
}

async fn check_in(shared: Arc<Shared>, presented: PresentedToken) -> Decision {
    let key = presented.hash();
    let (result, cache) = shared
        .cache
        .get_or_verify(key, || verification(&shared.upstream, &presented))
        .await;
    let (result, cache) = match result {
        // Stale-if-error: only when the upstream could not answer, never on a verdict or on
        // a problem with our own key.
        Err(error) if !error.is_key_problem() && shared.cache.has_last_good(&key) => {
            tracing::warn!(
                token = %key.fingerprint(),
                error = %error,
                "conneqt-guard: upstream unavailable; using the token's expired valid verdict (stale_if_error)"
            );
            (Ok(Verdict::Valid), CacheResult::Stale)
        }
        other => (other, cache),
    };
    tracing::Span::current().record("cache", cache.as_str());
    decide(result, presented, cache)
}

/// Turns the verdict (or the failure to get one) into forward-or-reject, and logs it with the
/// token's fingerprint, never the token.
pub(crate) fn decide(
    result: Result<Verdict, UpstreamError>,
    presented: PresentedToken,
    cache: CacheResult,
) -> Decision {
    let fingerprint = presented.hash().fingerprint();
    match judge(result, fingerprint, cache) {
        Ok(()) => Decision::Forward(VerifiedToken::new(presented)),
        Err(rejection) => Decision::Reject(rejection),
    }
}

/// [`decide`] for a verdict found in the cache in `call`, where the token is still in the
/// request: `Ok` to forward (the caller makes the [`VerifiedToken`]).
pub(crate) fn decide_cached(
    verdict: Verdict,
    fingerprint: Fingerprint,
    cache: CacheResult,
) -> Result<(), Rejection> {
    judge(Ok(verdict), fingerprint, cache)
}

/// The decision and its telemetry: the cache and request counters, and the log line.
fn judge(
    result: Result<Verdict, UpstreamError>,
    fingerprint: Fingerprint,
    cache: CacheResult,
) -> Result<(), Rejection> {
    telemetry::cache(cache);
    let decision = decide_quietly(result, fingerprint, cache.as_str());
    telemetry::request(match &decision {
        Ok(()) => Outcome::Forwarded,
        Err(rejection) => Outcome::Rejected(rejection.reason()),
    });
    decision
}

fn decide_quietly(
    result: Result<Verdict, UpstreamError>,
    fingerprint: Fingerprint,
    cache: &'static str,
) -> Result<(), Rejection> {
    match result {
        Ok(Verdict::Valid) => {
            tracing::trace!(token = %fingerprint, cache, "conneqt-guard: token valid");
            Ok(())
        }
        Ok(Verdict::Gone) => {
            tracing::debug!(token = %fingerprint, cache, "conneqt-guard: token gone");
            Err(Rejection::gone())
        }
        Ok(Verdict::NotAccepted { reasons }) => {
            tracing::debug!(token = %fingerprint, ?reasons, "conneqt-guard: upstream did not accept token");
            Err(Rejection::not_accepted(&reasons))
        }
        Err(error) if error.is_key_problem() => {
            tracing::error!(
                token = %fingerprint,
                error = %error,
                "conneqt-guard: Conneqt refused our ApiKey; every request will fail until the key is fixed"
            );
            Err(Rejection::upstream_rejected_api_key())
        }
        Err(error) => {
            tracing::warn!(token = %fingerprint, error = %error, "conneqt-guard: could not verify token");
            Err(Rejection::upstream_unavailable(error.retry_after()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reject::RejectionReason;
    use crate::token::TokenHasher;

    fn presented() -> PresentedToken {
        PresentedToken::new(
            http::HeaderValue::from_static("ea4f820e-f352-4515-af73-630220045ef0"),
            &TokenHasher::for_process().unwrap(),
        )
    }

    fn reason(decision: Decision) -> Option<RejectionReason> {
        match decision {
            Decision::Forward(_) => None,
            Decision::Reject(rejection) => Some(rejection.reason()),
        }
    }

    #[test]
    fn only_a_valid_verdict_forwards() {
        use RejectionReason::*;
        let cases = [
            (Ok(Verdict::Valid), None),
            (Ok(Verdict::Gone), Some(TokenGone)),
            (
                Ok(Verdict::NotAccepted { reasons: vec![] }),
                Some(TokenNotAccepted),
            ),
            (
                Err(UpstreamError::KeyRejected),
                Some(UpstreamRejectedApiKey),
            ),
            (
                Err(UpstreamError::KeyNotAuthorised),
                Some(UpstreamRejectedApiKey),
            ),
            (Err(UpstreamError::Timeout), Some(UpstreamUnavailable)),
            (
                Err(UpstreamError::ServerError(500)),
                Some(UpstreamUnavailable),
            ),
            (
                Err(UpstreamError::UnexpectedStatus(204)),
                Some(UpstreamUnavailable),
            ),
            (
                Err(UpstreamError::Transport("refused".into())),
                Some(UpstreamUnavailable),
            ),
            (Err(UpstreamError::Aborted), Some(UpstreamUnavailable)),
        ];
        for (result, expected) in cases {
            let shown = format!("{result:?}");
            assert_eq!(
                reason(decide(result, presented(), CacheResult::Miss)),
                expected,
                "{shown}"
            );
        }
    }
}
