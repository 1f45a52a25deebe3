//! What verification concludes, and what a handler receives when it passes.

use std::fmt;

use http::HeaderValue;

use crate::token::{Fingerprint, PresentedToken};

/// The upstream's answer about one token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// `200 OK`: the token is valid. Cached for `cache_ttl`.
    Valid,
    /// `410 Gone`: the token is not valid any more. Cached for `gone_ttl`.
    Gone,
    /// `400 Bad Request`: the upstream refused to judge the token, with its reasons.
    /// Never cached: the upstream is asked again next time.
    NotAccepted {
        /// Human-readable reasons from the upstream's `invalidParameters`, with the token
        /// itself removed.
        reasons: Vec<String>,
    },
}

/// A token the upstream has confirmed, put in the request's extensions for the handler.
///
/// Every request that reaches the inner service carries one, so a handler can take it with
/// axum's `Extension<VerifiedToken>` (or `request.extensions().get::<VerifiedToken>()` in
/// tonic) and be sure the token was verified. `Debug` prints only the [`Fingerprint`].
///
/// ```
/// # use conneqt_guard::VerifiedToken;
/// async fn send_message(axum::Extension(token): axum::Extension<VerifiedToken>) -> String {
///     // The fingerprint is safe to log; the token itself is for further Conneqt calls.
///     tracing::info!(token = %token.fingerprint(), "message accepted");
///     format!("sent for {}", token.fingerprint())
/// }
/// ```
#[derive(Clone)]
pub struct VerifiedToken {
    value: Value,
    fingerprint: Fingerprint,
}

/// The token's bytes: copied inline when they fit (every UUID does), so a cache hit neither
/// clones the header value (which allocates for a value not parsed from a shared buffer) nor
/// moves it out of the request.
#[derive(Clone)]
enum Value {
    Inline { len: u8, bytes: [u8; INLINE] },
    Header(HeaderValue),
}

/// A hyphenated UUID's length.
const INLINE: usize = 36;

impl VerifiedToken {
    pub(crate) fn new(presented: PresentedToken) -> Self {
        let fingerprint = presented.hash().fingerprint();
        Self {
            value: Value::Header(presented.into_value()),
            fingerprint,
        }
    }

    /// A token found valid in the cache, copied from the request's header.
    pub(crate) fn copied(value: &HeaderValue, fingerprint: Fingerprint) -> Self {
        let token = value.as_bytes();
        let value = match u8::try_from(token.len()) {
            Ok(len) if token.len() <= INLINE => {
                let mut bytes = [0; INLINE];
                bytes[..token.len()].copy_from_slice(token);
                Value::Inline { len, bytes }
            }
            _ => {
                let mut value = value.clone();
                value.set_sensitive(true);
                Value::Header(value)
            }
        };
        Self { value, fingerprint }
    }

    /// The token itself, for calls the handler makes to Conneqt on the user's behalf.
    ///
    /// Treat it as a secret: do not log it or put it in responses.
    pub fn as_str(&self) -> &str {
        // The token passed the visible-ASCII check before verification, so this never fails.
        match &self.value {
            Value::Inline { len, bytes } => {
                std::str::from_utf8(&bytes[..usize::from(*len)]).unwrap_or_default()
            }
            Value::Header(value) => value.to_str().unwrap_or_default(),
        }
    }

    /// A short label for logs that does not reveal the token (see [`Fingerprint`]).
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }
}

impl fmt::Debug for VerifiedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifiedToken")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}
