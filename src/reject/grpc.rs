//! Rejections as gRPC statuses: HTTP 200 with `grpc-status` and a percent-encoded
//! `grpc-message` in a headers-only ("trailers-only") response, which every gRPC client reads
//! as the call's final status.

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderName, HeaderValue, Response};
use http_body_util::Full;
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};

use super::{Rejection, RejectionReason};

const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
const APPLICATION_GRPC: HeaderValue = HeaderValue::from_static("application/grpc");

/// The gRPC spec: bytes outside 0x20..=0x7E, and `%` itself, are percent-encoded.
const GRPC_MESSAGE_ENCODE: &AsciiSet = &CONTROLS.add(b'%');

/// gRPC status codes we answer with.
pub(crate) const INTERNAL: u8 = 13;
pub(crate) const UNAVAILABLE: u8 = 14;
pub(crate) const UNAUTHENTICATED: u8 = 16;

pub(crate) fn code(reason: RejectionReason) -> u8 {
    match reason {
        RejectionReason::MissingToken
        | RejectionReason::MalformedToken
        | RejectionReason::TokenNotAccepted
        | RejectionReason::TokenGone => UNAUTHENTICATED,
        RejectionReason::UpstreamUnavailable => UNAVAILABLE,
        RejectionReason::UpstreamRejectedApiKey => INTERNAL,
    }
}

pub(crate) fn render(rejection: &Rejection) -> Response<Full<Bytes>> {
    let message = match rejection.invalid_parameter {
        Some(reason) => format!("{} {reason}", rejection.detail),
        None => rejection.detail.clone(),
    };
    let encoded = utf8_percent_encode(&message, GRPC_MESSAGE_ENCODE).to_string();
    let mut response = Response::new(Full::new(Bytes::new()));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, APPLICATION_GRPC);
    headers.insert(
        GRPC_STATUS,
        HeaderValue::from(u16::from(code(rejection.reason))),
    );
    // Percent-encoding leaves only visible ASCII and spaces, which are always a valid value.
    if let Ok(value) = HeaderValue::from_str(&encoded) {
        headers.insert(GRPC_MESSAGE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::TokenProblem;
    use http_body::Body;

    #[test]
    fn gone_token_is_unauthenticated_in_an_empty_headers_only_response() {
        let response = render(&Rejection::gone());
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()[CONTENT_TYPE], "application/grpc");
        assert_eq!(response.headers()[GRPC_STATUS], "16");
        assert!(response.body().is_end_stream());
    }

    #[test]
    fn upstream_trouble_is_unavailable_and_key_trouble_is_internal() {
        assert_eq!(
            render(&Rejection::upstream_unavailable(None)).headers()[GRPC_STATUS],
            "14"
        );
        assert_eq!(
            render(&Rejection::upstream_rejected_api_key()).headers()[GRPC_STATUS],
            "13"
        );
    }

    #[test]
    fn message_is_percent_encoded_per_the_grpc_spec() {
        let rejection = Rejection::not_accepted(&["100% wrong\nnaïve".into()]);
        let response = render(&rejection);
        let message = response.headers()[GRPC_MESSAGE].to_str().unwrap();
        assert!(message.contains("100%25 wrong%0Ana%C3%AFve"), "{message}");
    }

    #[test]
    fn malformed_token_message_says_what_is_wrong() {
        let response = render(&Rejection::token_problem(TokenProblem::Duplicated));
        let message = response.headers()[GRPC_MESSAGE].to_str().unwrap();
        assert!(message.contains("exactly once"), "{message}");
    }
}
