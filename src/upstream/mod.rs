//! Step 3: ask Conneqt's verify endpoint about a token.
//!
//! One `GET {base}{verify_path}` with the vendor's three headers and no body, under one
//! deadline (`upstream_timeout`) that covers waiting for a slot, connecting, sending, reading
//! the answer and, for a connection error or a 502/503/504, one retry after a short jittered
//! pause if time remains. At most `max_concurrent_verifications` calls are in flight, and a
//! [`CircuitBreaker`] fails calls fast while the upstream keeps failing. Turning an answer into
//! a [`Verdict`] or an [`UpstreamError`] is the pure function [`classify`].

pub(crate) mod breaker;
pub(crate) mod tls;

use std::fmt;
use std::hash::BuildHasher;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::telemetry::{self, CallEnd};

pub(crate) use breaker::CircuitBreaker;

use bytes::{Bytes, BytesMut};
use http::header::CONTENT_TYPE;
use http::{HeaderName, HeaderValue, StatusCode};
use serde::Deserialize;

use crate::token::{PresentedToken, TOKEN_HEADER};
use crate::verdict::Verdict;

/// The header that carries our system's key.
pub(crate) const API_KEY_HEADER: HeaderName = HeaderName::from_static("apikey");

/// The vendor wants this on every call, body or not.
const JSON_CONTENT_TYPE: HeaderValue = HeaderValue::from_static("application/json; charset=utf-8");

/// The most of a 400 answer's body we read to find the upstream's reasons.
const MAX_PROBLEM_BODY: usize = 16 * 1024;
/// At most this many reasons, each at most this long, are passed on to the client.
const MAX_REASONS: usize = 5;
const MAX_REASON_LEN: usize = 200;

/// The key that identifies our system to Conneqt. `Debug` never shows it.
#[derive(Clone)]
pub(crate) struct ApiKey(HeaderValue);

impl ApiKey {
    pub(crate) fn new(mut value: HeaderValue) -> Self {
        value.set_sensitive(true);
        Self(value)
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The pause before the one retry, before jitter (it is scaled by a random factor in
/// 0.5..1.5 so that callers that failed together do not retry together).
const RETRY_BACKOFF: Duration = Duration::from_millis(50);

/// How hard the upstream may be pushed, and how failures are handled.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Resilience {
    pub(crate) max_concurrent: usize,
    pub(crate) retry: bool,
    pub(crate) breaker_threshold: u32,
    pub(crate) breaker_cool_down: Duration,
}

/// The Conneqt endpoints we call, and the HTTP client (one connection pool) we call them with.
#[derive(Debug)]
pub(crate) struct Upstream {
    client: reqwest::Client,
    verify_url: reqwest::Url,
    test_url: reqwest::Url,
    api_key: ApiKey,
    timeout: Duration,
    limiter: Semaphore,
    retry: bool,
    breaker: CircuitBreaker,
}

/// Why the upstream gave no verdict. None of these is ever cached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum UpstreamError {
    /// No complete answer within `upstream_timeout`.
    Timeout,
    /// Could not connect, or the connection failed mid-call, or the answer was not HTTP.
    /// The message has no URL in it.
    Transport(String),
    /// `401`: the upstream does not accept our `ApiKey`.
    KeyRejected,
    /// `403`: our `ApiKey` is valid but our system is not authorised.
    KeyNotAuthorised,
    /// A `5xx` answer.
    ServerError(u16),
    /// Any status the vendor does not document for this endpoint.
    UnexpectedStatus(u16),
    /// The verification task ended without an answer.
    Aborted,
    /// No slot among `max_concurrent_verifications` came free before the deadline.
    Overloaded,
    /// The circuit breaker is open after repeated failures: not even tried.
    CircuitOpen {
        /// When the next probe may go through.
        retry_after: Duration,
    },
}

impl UpstreamError {
    /// True when the fault is our own configuration (the key), not the upstream's health.
    pub(crate) fn is_key_problem(&self) -> bool {
        matches!(self, Self::KeyRejected | Self::KeyNotAuthorised)
    }

    /// Worth one more try within the deadline: the request probably never reached a healthy
    /// upstream. Never a documented verdict, never a timeout (the deadline is spent).
    fn is_retryable(&self) -> bool {
        matches!(self, Self::Transport(_) | Self::ServerError(502..=504))
    }

    /// When the client may usefully try again, if known.
    pub(crate) fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::CircuitOpen { retry_after } => Some(*retry_after),
            _ => None,
        }
    }
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Timeout => f.write_str("the upstream did not answer in time"),
            Self::Transport(message) => write!(f, "the upstream could not be reached: {message}"),
            Self::KeyRejected => f.write_str("the upstream rejected our ApiKey (401)"),
            Self::KeyNotAuthorised => {
                f.write_str("the upstream says our ApiKey is not authorised (403)")
            }
            Self::ServerError(status) => write!(f, "the upstream failed with status {status}"),
            Self::UnexpectedStatus(status) => {
                write!(f, "the upstream answered with unexpected status {status}")
            }
            Self::Aborted => f.write_str("the verification task ended without an answer"),
            Self::Overloaded => {
                f.write_str("too many verifications in flight; no slot came free in time")
            }
            Self::CircuitOpen { retry_after } => write!(
                f,
                "the circuit breaker is open after repeated upstream failures (next probe in {retry_after:?})"
            ),
        }
    }
}

impl From<crate::cache::VerificationAborted> for UpstreamError {
    fn from(_: crate::cache::VerificationAborted) -> Self {
        Self::Aborted
    }
}

impl From<reqwest::Error> for UpstreamError {
    fn from(error: reqwest::Error) -> Self {
        if error.is_timeout() {
            return Self::Timeout;
        }
        // Keep the cause chain (it says "connection refused" and the like) but never the URL.
        let error = error.without_url();
        let mut message = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        Self::Transport(message)
    }
}

/// What `GET /api/v1/test` said about our key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum KeyCheck {
    Ok,
    Failed(UpstreamError),
}

impl Upstream {
    pub(crate) fn new(
        client: reqwest::Client,
        verify_url: reqwest::Url,
        test_url: reqwest::Url,
        api_key: ApiKey,
        timeout: Duration,
        resilience: Resilience,
    ) -> Self {
        Self {
            client,
            verify_url,
            test_url,
            api_key,
            timeout,
            limiter: Semaphore::new(resilience.max_concurrent),
            retry: resilience.retry,
            breaker: CircuitBreaker::new(
                resilience.breaker_threshold,
                resilience.breaker_cool_down,
            ),
        }
    }

    /// Asks the upstream whether `token` is valid, within the limits above.
    pub(crate) async fn verify(&self, token: &PresentedToken) -> Result<Verdict, UpstreamError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let admission = match self.breaker.admit(Instant::now()) {
            Ok(admission) => admission,
            Err(retry_after) => return Err(UpstreamError::CircuitOpen { retry_after }),
        };
        if admission == breaker::Admission::Probe {
            telemetry::circuit(breaker::CircuitState::HalfOpen);
        }
        let result = self.verify_admitted(token, deadline).await;
        let healthy = match &result {
            Ok(_) => true,
            Err(error) => error.is_key_problem(),
        };
        // Waiting for a slot says nothing about the upstream's health.
        if !matches!(result, Err(UpstreamError::Overloaded)) {
            telemetry::circuit(self.breaker.record(admission, healthy, Instant::now()));
        }
        result
    }

    async fn verify_admitted(
        &self,
        token: &PresentedToken,
        deadline: tokio::time::Instant,
    ) -> Result<Verdict, UpstreamError> {
        let _slot = match tokio::time::timeout_at(deadline, self.limiter.acquire()).await {
            Ok(Ok(slot)) => slot,
            Ok(Err(_closed)) => return Err(UpstreamError::Aborted),
            Err(_elapsed) => return Err(UpstreamError::Overloaded),
        };
        let _in_flight = telemetry::InFlight::enter();
        let first = self.attempt(token, deadline).await;
        match first {
            Err(error) if self.retry && error.is_retryable() => {
                let pause = jittered(RETRY_BACKOFF);
                // Retry only if the pause leaves at least as long again for the call itself.
                if deadline.saturating_duration_since(tokio::time::Instant::now()) < pause * 2 {
                    return Err(error);
                }
                tracing::debug!(error = %error, "conneqt-guard: retrying the upstream call once");
                tokio::time::sleep(pause).await;
                self.attempt(token, deadline).await
            }
            other => other,
        }
    }

    /// One HTTP call, cut off at `deadline`.
    async fn attempt(
        &self,
        token: &PresentedToken,
        deadline: tokio::time::Instant,
    ) -> Result<Verdict, UpstreamError> {
        let call = async {
            let response = self
                .client
                .get(self.verify_url.clone())
                .header(API_KEY_HEADER, self.api_key.0.clone())
                .header(CONTENT_TYPE, JSON_CONTENT_TYPE)
                .header(TOKEN_HEADER, token.header_value().clone())
                .send()
                .await?;
            let status = response.status();
            let body = if status == StatusCode::BAD_REQUEST {
                read_bounded(response, MAX_PROBLEM_BODY).await?
            } else {
                Bytes::new()
            };
            let answer = classify(status, &body, token.header_value().as_bytes());
            Ok::<_, reqwest::Error>((status, answer))
        };
        let started = Instant::now();
        let (end, answer) = match tokio::time::timeout_at(deadline, call).await {
            Ok(Ok((status, answer))) => (CallEnd::Status(status), answer),
            Ok(Err(error)) => match UpstreamError::from(error) {
                UpstreamError::Timeout => (CallEnd::Timeout, Err(UpstreamError::Timeout)),
                other => (CallEnd::Transport, Err(other)),
            },
            Err(_elapsed) => (CallEnd::Timeout, Err(UpstreamError::Timeout)),
        };
        telemetry::upstream_call(end, started.elapsed());
        tracing::Span::current().record("upstream", end.label());
        answer
    }

    /// Calls `GET /api/v1/test` with our key, which checks it without spending a token.
    pub(crate) async fn check_key(&self) -> KeyCheck {
        let call = self
            .client
            .get(self.test_url.clone())
            .header(API_KEY_HEADER, self.api_key.0.clone())
            .send();
        let result = match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(response)) => match response.status() {
                StatusCode::OK => return KeyCheck::Ok,
                StatusCode::UNAUTHORIZED => UpstreamError::KeyRejected,
                StatusCode::FORBIDDEN => UpstreamError::KeyNotAuthorised,
                status if status.is_server_error() => UpstreamError::ServerError(status.as_u16()),
                status => UpstreamError::UnexpectedStatus(status.as_u16()),
            },
            Ok(Err(error)) => UpstreamError::from(error),
            Err(_elapsed) => UpstreamError::Timeout,
        };
        KeyCheck::Failed(result)
    }
}

/// `base` scaled by a random factor in 0.5..1.5.
fn jittered(base: Duration) -> Duration {
    // A fresh RandomState is randomly seeded; hashing the time with it is a cheap random draw.
    let draw = std::collections::hash_map::RandomState::new().hash_one(Instant::now());
    base.mul_f64(0.5 + (draw % 1000) as f64 / 1000.0)
}

async fn read_bounded(mut response: reqwest::Response, limit: usize) -> reqwest::Result<Bytes> {
    let mut body = BytesMut::new();
    while let Some(chunk) = response.chunk().await? {
        let room = limit - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() == limit {
            break;
        }
    }
    Ok(body.freeze())
}

/// Turns the upstream's status (and, for 400, its problem body) into a verdict or an error.
///
/// `token` is only used to scrub it out of any reason the upstream quotes back.
pub(crate) fn classify(
    status: StatusCode,
    body: &[u8],
    token: &[u8],
) -> Result<Verdict, UpstreamError> {
    match status {
        StatusCode::OK => Ok(Verdict::Valid),
        StatusCode::GONE => Ok(Verdict::Gone),
        StatusCode::BAD_REQUEST => Ok(Verdict::NotAccepted {
            reasons: reasons_from_problem(body, token),
        }),
        StatusCode::UNAUTHORIZED => Err(UpstreamError::KeyRejected),
        StatusCode::FORBIDDEN => Err(UpstreamError::KeyNotAuthorised),
        status if status.is_server_error() => Err(UpstreamError::ServerError(status.as_u16())),
        status => Err(UpstreamError::UnexpectedStatus(status.as_u16())),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UpstreamProblem {
    title: Option<String>,
    detail: Option<String>,
    #[serde(default)]
    invalid_parameters: Vec<InvalidParameter>,
}

#[derive(Deserialize)]
struct InvalidParameter {
    name: Option<String>,
    reason: Option<String>,
}

/// The reasons in the vendor's problem body: `name: reason` for each invalid parameter, else
/// the detail or title. Bounded in number and length, and never containing the token.
fn reasons_from_problem(body: &[u8], token: &[u8]) -> Vec<String> {
    let Ok(problem) = serde_json::from_slice::<UpstreamProblem>(body) else {
        return Vec::new();
    };
    let mut reasons: Vec<String> = problem
        .invalid_parameters
        .into_iter()
        .filter_map(|p| match (p.name, p.reason) {
            (Some(name), Some(reason)) => Some(format!("{name}: {reason}")),
            (None, Some(reason)) => Some(reason),
            (Some(name), None) => Some(format!("{name} is invalid")),
            (None, None) => None,
        })
        .collect();
    if reasons.is_empty() {
        reasons.extend(problem.detail.or(problem.title));
    }
    let token = std::str::from_utf8(token).unwrap_or_default();
    reasons
        .into_iter()
        .take(MAX_REASONS)
        .map(|reason| {
            let reason = if token.is_empty() {
                reason
            } else {
                reason.replace(token, "[token]")
            };
            reason
                .chars()
                .filter(|c| !c.is_control())
                .take(MAX_REASON_LEN)
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &[u8] = b"ea4f820e-f352-4515-af73-630220045ef0";

    #[test]
    fn documented_statuses_map_to_verdicts_or_errors() {
        assert_eq!(classify(StatusCode::OK, b"", TOKEN), Ok(Verdict::Valid));
        assert_eq!(classify(StatusCode::GONE, b"", TOKEN), Ok(Verdict::Gone));
        assert_eq!(
            classify(StatusCode::UNAUTHORIZED, b"", TOKEN),
            Err(UpstreamError::KeyRejected)
        );
        assert_eq!(
            classify(StatusCode::FORBIDDEN, b"", TOKEN),
            Err(UpstreamError::KeyNotAuthorised)
        );
        assert_eq!(
            classify(StatusCode::INTERNAL_SERVER_ERROR, b"", TOKEN),
            Err(UpstreamError::ServerError(500))
        );
        assert_eq!(
            classify(StatusCode::BAD_GATEWAY, b"", TOKEN),
            Err(UpstreamError::ServerError(502))
        );
    }

    #[test]
    fn undocumented_statuses_are_errors_never_verdicts() {
        for status in [204, 201, 302, 404, 418, 429] {
            let status = StatusCode::from_u16(status).unwrap();
            assert_eq!(
                classify(status, b"", TOKEN),
                Err(UpstreamError::UnexpectedStatus(status.as_u16()))
            );
        }
    }

    #[test]
    fn bad_request_carries_the_vendors_reasons() {
        let body = br#"{"type":"https//qxlva.com/im1toolbar/documentation/api/v1/validation-error",
            "title":"Request Validation Error","status":400,
            "invalidParameters":[{"name":"AccessToken","reason":"Access token must be provided"}]}"#;
        assert_eq!(
            classify(StatusCode::BAD_REQUEST, body, TOKEN),
            Ok(Verdict::NotAccepted {
                reasons: vec!["AccessToken: Access token must be provided".into()]
            })
        );
    }

    #[test]
    fn bad_request_without_parameters_uses_detail_then_title_and_garbage_gives_none() {
        let with_title = br#"{"title":"Request Validation Error","status":400}"#;
        assert_eq!(
            reasons_from_problem(with_title, TOKEN),
            vec!["Request Validation Error"]
        );
        assert!(reasons_from_problem(b"<html>oops</html>", TOKEN).is_empty());
    }

    #[test]
    fn reasons_never_quote_the_token_and_are_bounded() {
        let body = format!(
            r#"{{"invalidParameters":[{{"name":"AccessToken","reason":"{} is unknown\n{}"}}]}}"#,
            std::str::from_utf8(TOKEN).unwrap(),
            "x".repeat(1000)
        );
        let reasons = reasons_from_problem(body.as_bytes(), TOKEN);
        assert_eq!(reasons.len(), 1);
        assert!(!reasons[0].contains("ea4f820e"), "{}", reasons[0]);
        assert!(reasons[0].starts_with("AccessToken: [token] is unknown"));
        assert_eq!(reasons[0].chars().count(), MAX_REASON_LEN);
    }

    #[test]
    fn only_transport_errors_and_gateway_statuses_are_retried() {
        assert!(UpstreamError::Transport("reset".into()).is_retryable());
        for status in [502, 503, 504] {
            assert!(UpstreamError::ServerError(status).is_retryable());
        }
        for error in [
            UpstreamError::ServerError(500),
            UpstreamError::Timeout,
            UpstreamError::KeyRejected,
            UpstreamError::KeyNotAuthorised,
            UpstreamError::UnexpectedStatus(204),
            UpstreamError::Overloaded,
        ] {
            assert!(!error.is_retryable(), "{error:?}");
        }
    }

    #[test]
    fn jitter_stays_within_half_to_one_and_a_half() {
        for _ in 0..100 {
            let pause = jittered(Duration::from_millis(100));
            assert!(pause >= Duration::from_millis(50) && pause < Duration::from_millis(150));
        }
    }

    #[tokio::test]
    async fn a_verification_that_gets_no_slot_before_its_deadline_is_overloaded() {
        let upstream = Upstream::new(
            reqwest::Client::builder()
                .tls_backend_preconfigured(super::tls::client_config().unwrap())
                .no_proxy()
                .build()
                .unwrap(),
            // Never called: the only slot is held by the test.
            "http://127.0.0.1:9/verify".parse().unwrap(),
            "http://127.0.0.1:9/test".parse().unwrap(),
            ApiKey::new(HeaderValue::from_static("key")),
            Duration::from_millis(50),
            Resilience {
                max_concurrent: 1,
                retry: true,
                breaker_threshold: 1,
                breaker_cool_down: Duration::from_secs(60),
            },
        );
        let token = PresentedToken::new(
            HeaderValue::from_static("ea4f820e-f352-4515-af73-630220045ef0"),
            &crate::token::TokenHasher::for_process().unwrap(),
        );
        let held = upstream.limiter.acquire().await.unwrap();
        assert_eq!(
            upstream.verify(&token).await,
            Err(UpstreamError::Overloaded)
        );
        // Waiting for a slot is not the upstream's fault: the breaker (threshold 1) is closed.
        assert_eq!(
            upstream.breaker.admit(Instant::now()),
            Ok(breaker::Admission::Normal)
        );
        drop(held);
    }

    #[test]
    fn api_key_debug_is_redacted() {
        let key = ApiKey::new(HeaderValue::from_static("secret-key-123"));
        assert_eq!(format!("{key:?}"), "<redacted>");
    }
}
