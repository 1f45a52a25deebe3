//! RFC 9457 problem details (`application/problem+json`), the format the vendor uses too.

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;

use super::{Rejection, RejectionReason};

/// Seconds a client should wait before retrying after a 503.
pub(crate) const RETRY_AFTER_SECS: u64 = 1;

const PROBLEM_JSON: HeaderValue = HeaderValue::from_static("application/problem+json");
const NO_STORE: HeaderValue = HeaderValue::from_static("no-store");
const CHALLENGE: HeaderValue =
    HeaderValue::from_static("Conneqt-Instant-Access-Token realm=\"conneqt\"");

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    title: &'static str,
    status: u16,
    detail: &'a str,
    instance: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    invalid_parameters: Option<[InvalidParameter; 1]>,
}

#[derive(Serialize)]
struct InvalidParameter {
    name: &'static str,
    reason: &'static str,
}

/// The problem `type` URI and `title` of each reason. The URIs are `tag:` URIs (RFC 4151):
/// stable identifiers that do not pretend to be web pages.
pub(crate) fn type_and_title(reason: RejectionReason) -> (&'static str, &'static str) {
    match reason {
        RejectionReason::MissingToken => (
            "tag:conneqt-guard,2026:missing-token",
            "Access token required",
        ),
        RejectionReason::MalformedToken => (
            "tag:conneqt-guard,2026:malformed-token",
            "Malformed access token",
        ),
        RejectionReason::TokenNotAccepted => (
            "tag:conneqt-guard,2026:token-not-accepted",
            "Access token not accepted",
        ),
        RejectionReason::TokenGone => (
            "tag:conneqt-guard,2026:token-gone",
            "Access token no longer valid",
        ),
        RejectionReason::UpstreamUnavailable => (
            "tag:conneqt-guard,2026:upstream-unavailable",
            "Token verification unavailable",
        ),
        RejectionReason::UpstreamRejectedApiKey => (
            "tag:conneqt-guard,2026:verification-misconfigured",
            "Token verification misconfigured",
        ),
    }
}

pub(crate) fn render(rejection: &Rejection) -> Response<Full<Bytes>> {
    let reason = rejection.reason;
    let status = reason.http_status();
    let (kind, title) = type_and_title(reason);
    let problem = Problem {
        kind,
        title,
        status: status.as_u16(),
        detail: &rejection.detail,
        instance: format!("urn:uuid:{}", uuid::Uuid::new_v4()),
        invalid_parameters: rejection.invalid_parameter.map(|reason| {
            [InvalidParameter {
                name: "Conneqt-Instant-Access-Token",
                reason,
            }]
        }),
    };
    // Serialising a struct of strings and integers cannot fail.
    let body = serde_json::to_vec(&problem).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, PROBLEM_JSON);
    headers.insert(CACHE_CONTROL, NO_STORE);
    if status == StatusCode::UNAUTHORIZED {
        headers.insert(WWW_AUTHENTICATE, CHALLENGE);
    }
    if status == StatusCode::SERVICE_UNAVAILABLE {
        // Whole seconds, rounded up, never 0.
        let seconds = rejection
            .retry_after
            .map_or(RETRY_AFTER_SECS, |wait| {
                wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
            })
            .max(1);
        headers.insert(RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::TokenProblem;
    use http_body_util::BodyExt;

    async fn json(response: Response<Full<Bytes>>) -> serde_json::Value {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn malformed_token_problem_names_the_header_and_the_reason() {
        let response = render(&Rejection::token_problem(TokenProblem::NotUuid));
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(response.headers()[CONTENT_TYPE], "application/problem+json");
        assert!(response.headers().get(WWW_AUTHENTICATE).is_none());
        let body = json(response).await;
        assert_eq!(body["type"], "tag:conneqt-guard,2026:malformed-token");
        assert_eq!(body["status"], 400);
        assert_eq!(
            body["invalidParameters"][0]["name"],
            "Conneqt-Instant-Access-Token"
        );
        assert_eq!(
            body["invalidParameters"][0]["reason"],
            TokenProblem::NotUuid.reason()
        );
        assert!(body["instance"].as_str().unwrap().starts_with("urn:uuid:"));
    }

    #[tokio::test]
    async fn missing_token_is_a_challenge_without_invalid_parameters() {
        let response = render(&Rejection::token_problem(TokenProblem::Missing));
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert!(
            response.headers()[WWW_AUTHENTICATE]
                .to_str()
                .unwrap()
                .starts_with("Conneqt")
        );
        let body = json(response).await;
        assert!(body.get("invalidParameters").is_none());
        assert_eq!(body["title"], "Access token required");
    }

    #[tokio::test]
    async fn unavailable_says_when_to_retry() {
        let response = render(&Rejection::upstream_unavailable(None));
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[RETRY_AFTER], "1");
        let wait = Some(std::time::Duration::from_millis(4200));
        let response = render(&Rejection::upstream_unavailable(wait));
        assert_eq!(response.headers()[RETRY_AFTER], "5", "rounded up");
    }

    #[tokio::test]
    async fn not_accepted_passes_on_the_upstreams_reasons() {
        let response = render(&Rejection::not_accepted(&["AccessToken: expired".into()]));
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let body = json(response).await;
        assert!(
            body["detail"]
                .as_str()
                .unwrap()
                .ends_with("AccessToken: expired")
        );
    }

    #[tokio::test]
    async fn every_instance_is_fresh() {
        let a = json(render(&Rejection::gone())).await;
        let b = json(render(&Rejection::gone())).await;
        assert_ne!(a["instance"], b["instance"]);
    }
}
