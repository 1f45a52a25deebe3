//! Step 5: turning a refusal into a response the client understands.
//!
//! Every way a request can be turned away is a [`Rejection`]: it knows its
//! [`RejectionReason`], and renders either as RFC 9457 `application/problem+json`
//! ([`problem`]) or, for gRPC requests, as a trailers-only gRPC status ([`grpc`]). The reason is
//! also put in the response's extensions so metrics and trace layers can tell rejections apart.

pub(crate) mod grpc;
pub(crate) mod problem;

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;

use crate::token::TokenProblem;

/// Why the guard turned a request away.
///
/// Found in the extensions of every response the guard produced itself, so outer layers can
/// count rejections by reason:
///
/// ```
/// # use conneqt_guard::RejectionReason;
/// # let response = http::Response::new(());
/// if let Some(reason) = response.extensions().get::<RejectionReason>() {
///     println!("rejected: {}", reason.as_str());
/// }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RejectionReason {
    /// No `Conneqt-Instant-Access-Token` header: 401.
    MissingToken,
    /// The header is empty, repeated, too long, has bad characters or is not a UUID: 400.
    MalformedToken,
    /// The upstream answered 400 about the token: 401.
    TokenNotAccepted,
    /// The upstream answered 410: the token is not valid any more: 410.
    TokenGone,
    /// The upstream could not give a verdict (down, slow, 5xx, garbage): 503.
    UpstreamUnavailable,
    /// The upstream refused our own `ApiKey` (401 or 403): a server misconfiguration, 500.
    UpstreamRejectedApiKey,
}

impl RejectionReason {
    /// A stable, short, snake_case name, for metrics labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MissingToken => "missing_token",
            Self::MalformedToken => "malformed_token",
            Self::TokenNotAccepted => "token_not_accepted",
            Self::TokenGone => "token_gone",
            Self::UpstreamUnavailable => "upstream_unavailable",
            Self::UpstreamRejectedApiKey => "upstream_rejected_api_key",
        }
    }

    /// The HTTP status of the problem+json response.
    pub fn http_status(self) -> StatusCode {
        match self {
            Self::MissingToken | Self::TokenNotAccepted => StatusCode::UNAUTHORIZED,
            Self::MalformedToken => StatusCode::BAD_REQUEST,
            Self::TokenGone => StatusCode::GONE,
            Self::UpstreamUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamRejectedApiKey => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// A decision to turn a request away, with what the client is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Rejection {
    reason: RejectionReason,
    /// Client-facing explanation. Never contains the token or the API key.
    detail: String,
    /// For malformed tokens: what is wrong with the header (RFC 9457 extension member
    /// `invalidParameters`, in the vendor's shape).
    invalid_parameter: Option<&'static str>,
    /// For 503s: when to try again, when known better than the default.
    retry_after: Option<Duration>,
}

impl Rejection {
    pub(crate) fn token_problem(problem: TokenProblem) -> Self {
        match problem {
            TokenProblem::Missing => Self::new(RejectionReason::MissingToken, problem.reason()),
            _ => Self {
                invalid_parameter: Some(problem.reason()),
                ..Self::new(
                    RejectionReason::MalformedToken,
                    "The Conneqt-Instant-Access-Token header is not valid.",
                )
            },
        }
    }

    pub(crate) fn not_accepted(reasons: &[String]) -> Self {
        let detail = if reasons.is_empty() {
            "Conneqt did not accept the access token.".to_owned()
        } else {
            format!(
                "Conneqt did not accept the access token: {}",
                reasons.join("; ")
            )
        };
        Self::new(RejectionReason::TokenNotAccepted, detail)
    }

    pub(crate) fn gone() -> Self {
        Self::new(
            RejectionReason::TokenGone,
            "The access token is no longer valid. Obtain a new one from Conneqt.",
        )
    }

    pub(crate) fn upstream_unavailable(retry_after: Option<Duration>) -> Self {
        Self {
            retry_after,
            ..Self::new(
                RejectionReason::UpstreamUnavailable,
                "The access token could not be verified because Conneqt is unavailable. Try again shortly.",
            )
        }
    }

    pub(crate) fn upstream_rejected_api_key() -> Self {
        Self::new(
            RejectionReason::UpstreamRejectedApiKey,
            "The access token could not be verified because of a server configuration problem. \
             This is not a problem with the request.",
        )
    }

    fn new(reason: RejectionReason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
            invalid_parameter: None,
            retry_after: None,
        }
    }

    pub(crate) fn reason(&self) -> RejectionReason {
        self.reason
    }

    /// Renders the rejection in the format the client speaks.
    pub(crate) fn into_response(self, format: ResponseFormat) -> Response<Full<Bytes>> {
        let reason = self.reason;
        let mut response = match format {
            ResponseFormat::Problem => problem::render(&self),
            ResponseFormat::Grpc => grpc::render(&self),
        };
        response.extensions_mut().insert(reason);
        response
    }
}

/// The wire format of a rejection, chosen from the request before it moves on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ResponseFormat {
    /// RFC 9457 `application/problem+json`.
    Problem,
    /// A gRPC status (`grpc-status`, `grpc-message`) in a trailers-only response.
    Grpc,
}

impl ResponseFormat {
    pub(crate) fn of<B>(request: &Request<B>) -> Self {
        let is_grpc = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"));
        if is_grpc { Self::Grpc } else { Self::Problem }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_is_grpc_for_every_grpc_content_type_and_problem_otherwise() {
        for (content_type, expected) in [
            (Some("application/grpc"), ResponseFormat::Grpc),
            (Some("application/grpc+proto"), ResponseFormat::Grpc),
            (Some("application/grpc-web"), ResponseFormat::Grpc),
            (Some("application/json"), ResponseFormat::Problem),
            (None, ResponseFormat::Problem),
        ] {
            let mut request = Request::new(());
            if let Some(value) = content_type {
                request
                    .headers_mut()
                    .insert(http::header::CONTENT_TYPE, value.parse().unwrap());
            }
            assert_eq!(ResponseFormat::of(&request), expected, "{content_type:?}");
        }
    }

    #[test]
    fn reasons_have_distinct_names_and_the_documented_statuses() {
        use RejectionReason::*;
        let all = [
            (MissingToken, 401),
            (MalformedToken, 400),
            (TokenNotAccepted, 401),
            (TokenGone, 410),
            (UpstreamUnavailable, 503),
            (UpstreamRejectedApiKey, 500),
        ];
        let names: std::collections::HashSet<_> = all.iter().map(|(r, _)| r.as_str()).collect();
        assert_eq!(names.len(), all.len());
        for (reason, status) in all {
            assert_eq!(reason.http_status().as_u16(), status, "{reason:?}");
        }
    }

    #[test]
    fn the_reason_rides_in_the_response_extensions() {
        let response = Rejection::gone().into_response(ResponseFormat::Problem);
        assert_eq!(
            response.extensions().get::<RejectionReason>(),
            Some(&RejectionReason::TokenGone)
        );
        let response = Rejection::gone().into_response(ResponseFormat::Grpc);
        assert_eq!(
            response.extensions().get::<RejectionReason>(),
            Some(&RejectionReason::TokenGone)
        );
    }
}
