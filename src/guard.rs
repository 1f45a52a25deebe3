//! [`Guard`]: the request's path in one place (skip → token → cache → upstream → verdict),
//! owning what every step needs. [`AccessTokenLayer`](crate::AccessTokenLayer) holds one in
//! an `Arc`; the tower service and future, and
//! [`AccessTokenLayer::authorize`](crate::AccessTokenLayer::authorize), only sequence it.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use tracing::Instrument;

use crate::cache::{CacheResult, VerdictCache};
use crate::reject::{Rejection, ResponseFormat};
use crate::skip::SkipRules;
use crate::telemetry::{self, Outcome};
use crate::token::{self, PresentedToken, TokenFormat, TokenHasher};
use crate::upstream::{Upstream, UpstreamError};
use crate::verdict::{Verdict, VerifiedToken};

/// Everything the request's path needs, shared by the layer, its clones, and every service
/// and future they make.
#[derive(Debug)]
pub(crate) struct Guard {
    pub(crate) token_format: TokenFormat,
    pub(crate) hasher: TokenHasher,
    pub(crate) cache: VerdictCache,
    pub(crate) upstream: Arc<Upstream>,
    pub(crate) skip: SkipRules,
    pub(crate) strip_token_header: bool,
}

/// What the guard makes of a request before anything needs awaiting.
pub(crate) enum Admission<B> {
    /// Let through: a skip rule matched (no [`VerifiedToken`]), or a cached valid verdict was
    /// at hand (the [`VerifiedToken`] is in the extensions). The token header is concealed.
    Forward(Request<B>),
    /// Refused, rendered in the format the client speaks.
    Reject(Response<Full<Bytes>>),
    /// The verdict needs the cache's slow path or the upstream: run [`check`] on the token,
    /// then [`Decision::apply`] it to the request.
    Check(Pending<B>),
}

/// A request waiting for its verdict: the request (token header already concealed), its
/// token, and how a rejection would be written.
pub(crate) struct Pending<B> {
    pub(crate) request: Request<B>,
    pub(crate) presented: PresentedToken,
    pub(crate) format: ResponseFormat,
}

impl<B> fmt::Debug for Admission<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Forward(_) => "Forward",
            Self::Reject(_) => "Reject",
            Self::Check(_) => "Check",
        })
    }
}

impl Guard {
    /// Steps 0 to 2 as far as they go without waiting: the skip rules, the token's form, and
    /// a cached verdict that can be had at once (the common case).
    pub(crate) fn admit<B>(&self, request: Request<B>) -> Admission<B> {
        // 0. Requests a skip rule lets through pass without a `VerifiedToken`.
        let (mut request, skipped) = self.skip.check(request);
        if let Some(rule) = skipped {
            tracing::trace!(method = %request.method(), %rule, "conneqt-guard: request passed unverified (skip rule)");
            token::conceal(request.headers_mut(), self.strip_token_header);
            telemetry::request(Outcome::Skipped);
            return Admission::Forward(request);
        }

        // 1. The token's form; junk is refused without touching the cache or the upstream.
        // The header is concealed (stripped or marked sensitive) as the token is taken, so
        // neither the hit nor the miss path forwards it in the clear.
        let extracted = token::extract(
            request.headers_mut(),
            self.token_format,
            self.strip_token_header,
        );
        let value = match extracted {
            Ok(value) => value,
            Err(problem) => {
                tracing::debug!(reason = ?problem, "conneqt-guard: refused a request before verification");
                let rejection = Rejection::token_problem(problem);
                telemetry::request(Outcome::Rejected(rejection.reason()));
                let format = ResponseFormat::of(&request);
                return Admission::Reject(rejection.into_response(format));
            }
        };
        let presented = PresentedToken::new(value, &self.hasher);

        // 2. A cached verdict that can be had at once needs no future of our own.
        if let Some((verdict, how)) = self.cache.lookup_now(&presented.hash()) {
            let format = ResponseFormat::of(&request);
            return match decide(Ok(verdict), presented, how).apply(request, format) {
                Ok(request) => Admission::Forward(request),
                Err(response) => Admission::Reject(response),
            };
        }

        // 2-4. Cache, upstream and verdict, awaited by the caller. How a rejection would be
        // written is decided now, while the request is at hand.
        let format = ResponseFormat::of(&request);
        Admission::Check(Pending {
            request,
            presented,
            format,
        })
    }
}

/// What the check concluded.
#[derive(Debug)]
pub(crate) enum Decision {
    Forward(VerifiedToken),
    Reject(Rejection),
}

impl Decision {
    /// Step 5: the request back with its [`VerifiedToken`], or the rejection rendered in
    /// `format`.
    // The rejection is moved once, into the future's `Rejected` state, which boxes it; boxing
    // it here too would add an allocation on the rejection path.
    #[allow(clippy::result_large_err)]
    pub(crate) fn apply<B>(
        self,
        mut request: Request<B>,
        format: ResponseFormat,
    ) -> Result<Request<B>, Response<Full<Bytes>>> {
        match self {
            Self::Forward(token) => {
                request.extensions_mut().insert(token);
                Ok(request)
            }
            Self::Reject(rejection) => Err(rejection.into_response(format)),
        }
    }
}

/// Step 3 for one token, as a future that owns what it needs, for the cache to run (on a miss)
/// or spawn (to refresh ahead).
fn verification(
    upstream: &Arc<Upstream>,
    presented: &PresentedToken,
) -> impl Future<Output = Result<Verdict, UpstreamError>> + Send + 'static {
    let upstream = upstream.clone();
    let token = presented.clone();
    // The call runs in its own task; carry the request's span into it.
    async move { upstream.verify(&token).await }.in_current_span()
}

/// Steps 2 to 4: the cache, the upstream on a miss, and the decision.
pub(crate) async fn check(guard: Arc<Guard>, presented: PresentedToken) -> Decision {
    let key = presented.hash();
    let span = tracing::debug_span!(
        "conneqt_guard.verify",
        token = %key.fingerprint(),
        cache = tracing::field::Empty,
        upstream = tracing::field::Empty,
    );
    check_in(guard, presented).instrument(span).await
}

async fn check_in(guard: Arc<Guard>, presented: PresentedToken) -> Decision {
    let key = presented.hash();
    let (result, cache) = guard
        .cache
        .get_or_verify(key, || verification(&guard.upstream, &presented))
        .await;
    let (result, cache) = match result {
        // Stale-if-error: only when the upstream could not answer, never on a verdict or on
        // a problem with our own key.
        Err(error) if !error.is_key_problem() && guard.cache.has_last_good(&key) => {
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
fn decide(
    result: Result<Verdict, UpstreamError>,
    presented: PresentedToken,
    cache: CacheResult,
) -> Decision {
    let fingerprint = presented.hash().fingerprint();
    telemetry::cache(cache);
    let decision = decide_quietly(result, presented, fingerprint, cache.as_str());
    telemetry::request(match &decision {
        Decision::Forward(_) => Outcome::Forwarded,
        Decision::Reject(rejection) => Outcome::Rejected(rejection.reason()),
    });
    decision
}

fn decide_quietly(
    result: Result<Verdict, UpstreamError>,
    presented: PresentedToken,
    fingerprint: crate::token::Fingerprint,
    cache: &'static str,
) -> Decision {
    match result {
        Ok(Verdict::Valid) => {
            tracing::trace!(token = %fingerprint, cache, "conneqt-guard: token valid");
            Decision::Forward(VerifiedToken::new(presented))
        }
        Ok(Verdict::Gone) => {
            tracing::debug!(token = %fingerprint, cache, "conneqt-guard: token gone");
            Decision::Reject(Rejection::gone())
        }
        Ok(Verdict::NotAccepted { reasons }) => {
            tracing::debug!(token = %fingerprint, ?reasons, "conneqt-guard: upstream did not accept token");
            Decision::Reject(Rejection::not_accepted(&reasons))
        }
        Err(error) if error.is_key_problem() => {
            tracing::error!(
                token = %fingerprint,
                error = %error,
                "conneqt-guard: Conneqt refused our ApiKey; every request will fail until the key is fixed"
            );
            Decision::Reject(Rejection::upstream_rejected_api_key())
        }
        Err(error) => {
            tracing::warn!(token = %fingerprint, error = %error, "conneqt-guard: could not verify token");
            Decision::Reject(Rejection::upstream_unavailable(error.retry_after()))
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
