//! The guard: the request's path in one place, skip → token → cache → upstream → verdict.
//!
//! [`Guard::start`] runs the steps that need no waiting, in `call`, while the request is at
//! hand: a skip rule, the token's form and key, and a verdict already in the cache (the common
//! case). What is left, the cache's wait and on a miss the upstream call, is
//! [`Guard::verify`]. The tower adaptors ([`AccessTokenService`](crate::AccessTokenService) and
//! its future) and [`AccessTokenLayer::authorize`](crate::AccessTokenLayer::authorize) only
//! sequence these two and hand the request on or render the rejection.

use std::future::Future;
use std::sync::Arc;

use http::Request;
use tracing::Instrument;

use crate::cache::{Asked, CacheResult, Learned, VerdictCache};
use crate::reject::Rejection;
use crate::skip::SkipRules;
use crate::telemetry::{self, Outcome};
use crate::token::{self, Fingerprint, PresentedToken, Taken, TokenFormat, TokenHash, TokenHasher};
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
    /// The verdicts other replicas share, when `redis_url` is set.
    #[cfg(feature = "redis")]
    pub(crate) shared: Option<crate::shared::SharedTier>,
}

/// What [`Guard::start`] could tell at once.
#[derive(Debug)]
pub(crate) enum Start {
    /// Hand the request on: a skip rule matched (no [`VerifiedToken`]), or the cache holds a
    /// valid verdict (the request's extensions now hold the [`VerifiedToken`]).
    Forward,
    /// Turn it away: a token problem, or a rejection the cache remembers.
    Reject(Rejection),
    /// Ask [`Guard::verify`].
    Verify(PresentedToken),
}

/// What [`Guard::verify`] concluded.
#[derive(Debug)]
pub(crate) enum Decision {
    Forward(VerifiedToken),
    Reject(Rejection),
}

impl Guard {
    /// Steps 0 to 2 without waiting: skip rules, the token, and a verdict the cache can give
    /// at once. The token header is concealed (stripped or marked sensitive) on every path, so
    /// none forwards it in the clear. The request is worked on in place: on a hit it is never
    /// moved (each move of a `Request` is a `memcpy`).
    #[inline]
    pub(crate) fn start<B>(&self, request: &mut Request<B>) -> Start {
        // 0. Requests a skip rule lets through go on without a `VerifiedToken`.
        if let Some(rule) = self.skip.check(request) {
            tracing::trace!(method = %request.method(), %rule, "conneqt-guard: request passed unverified (skip rule)");
            token::conceal(request.headers_mut(), self.strip_token_header);
            telemetry::request(Outcome::Skipped);
            return Start::Forward;
        }

        // 1. The token's form and key; junk is refused without touching the cache or the
        // upstream.
        // 2. A cached verdict is found while the token is still in the header map, so a hit
        // copies the token inline into its `VerifiedToken`.
        let taken = token::take(
            request.headers_mut(),
            self.token_format,
            self.strip_token_header,
            &self.hasher,
            |value, key| {
                let (verdict, how) = self.cache.lookup_now(&key)?;
                let fingerprint = key.fingerprint();
                Some(
                    judge(Ok(verdict), fingerprint, how)
                        .map(|()| VerifiedToken::copied(value, fingerprint)),
                )
            },
        );
        match taken {
            Ok(Taken::Presented(presented)) => Start::Verify(presented),
            Ok(Taken::Answered(Ok(token))) => {
                request.extensions_mut().insert(token);
                Start::Forward
            }
            Ok(Taken::Answered(Err(rejection))) => Start::Reject(rejection),
            Err(problem) => {
                tracing::debug!(reason = ?problem, "conneqt-guard: refused a request before verification");
                let rejection = Rejection::token_problem(problem);
                telemetry::request(Outcome::Rejected(rejection.reason()));
                Start::Reject(rejection)
            }
        }
    }

    /// Steps 2 to 4 for a token [`start`](Self::start) could not settle: the cache (waiting
    /// for a verification in flight), the upstream on a miss, and the decision.
    pub(crate) async fn verify(self: Arc<Self>, presented: PresentedToken) -> Decision {
        let key = presented.hash();
        let span = tracing::debug_span!(
            "conneqt_guard.verify",
            token = %key.fingerprint(),
            cache = tracing::field::Empty,
            upstream = tracing::field::Empty,
        );
        self.verify_in(presented).instrument(span).await
    }

    /// Step 3 for one token, as a future that owns what it needs, for the cache to run (on a
    /// miss) or spawn (to refresh ahead): the shared tier's verdict when there is one, else
    /// the upstream's.
    fn verification(
        &self,
        presented: &PresentedToken,
        asked: Asked,
    ) -> impl Future<Output = Result<Learned, UpstreamError>> + Send + 'static {
        let upstream = self.upstream.clone();
        let token = presented.clone();
        #[cfg(feature = "redis")]
        let shared = self.shared.clone();
        // Only the shared tier tells a refresh from a miss.
        #[cfg(not(feature = "redis"))]
        let _ = asked;
        // The call runs in its own task; carry the request's span into it.
        async move {
            let verify = upstream.verify(&token);
            #[cfg(feature = "redis")]
            if let Some(shared) = shared {
                return shared.verify(token.hash(), asked, verify).await;
            }
            verify.await.map(Learned::from)
        }
        .in_current_span()
    }

    /// Forgets the verdict for `key` here and, with the shared tier, on every replica.
    pub(crate) async fn invalidate(&self, key: TokenHash) {
        self.cache.invalidate(&key);
        #[cfg(feature = "redis")]
        if let Some(shared) = &self.shared {
            shared
                .invalidate(crate::shared::Invalidation::One(key))
                .await;
        }
    }

    /// Forgets every verdict here and, with the shared tier, on every replica.
    pub(crate) async fn invalidate_all(&self) {
        self.cache.invalidate_all();
        #[cfg(feature = "redis")]
        if let Some(shared) = &self.shared {
            shared.invalidate(crate::shared::Invalidation::All).await;
        }
    }

    async fn verify_in(&self, presented: PresentedToken) -> Decision {
        let key = presented.hash();
        let (result, cache) = self
            .cache
            .get_or_verify(key, |asked| self.verification(&presented, asked))
            .await;
        let (result, cache) = match result {
            // Stale-if-error: only when the upstream could not answer, never on a verdict or
            // on a problem with our own key.
            Err(error) if !error.is_key_problem() && self.cache.has_last_good(&key) => {
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
}

/// Turns the verdict (or the failure to get one) into forward-or-reject, and logs it with the
/// token's fingerprint, never the token.
fn decide(
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
