//! [`AccessTokenLayer`]: what users add to their axum router or tonic server.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use tower_layer::Layer;

use crate::builder::AccessTokenLayerBuilder;
use crate::guard::{Decision, Guard, Start};
use crate::reject::ResponseFormat;
use crate::service::AccessTokenService;
use crate::upstream::{KeyCheck, UpstreamError};

/// A tower layer that lets a request through only with a `Conneqt-Instant-Access-Token`
/// that Conneqt has verified.
///
/// Build one with [`AccessTokenLayer::builder`]. Cloning is cheap: clones share one verdict
/// cache and one HTTP connection pool, so build it once and clone it wherever it is needed.
/// See the [crate documentation](crate) for the behaviour and an example.
#[derive(Clone)]
pub struct AccessTokenLayer {
    guard: Arc<Guard>,
}

impl AccessTokenLayer {
    /// Starts configuring a layer.
    pub fn builder() -> AccessTokenLayerBuilder {
        AccessTokenLayerBuilder::default()
    }

    pub(crate) fn new(guard: Guard) -> Self {
        Self {
            guard: Arc::new(guard),
        }
    }

    /// Asks the guard about one request without an inner service: the request back, ready to
    /// hand on, or the response the guard answers instead. For proxies and auth sub-requests
    /// (the `conneqt-guard` sidecar uses it), in the shape of tower-http's
    /// `AsyncAuthorizeRequest`.
    ///
    /// The request comes back as [`AccessTokenService`] would pass it to its inner service:
    /// with a [`VerifiedToken`](crate::VerifiedToken) in its extensions (none when a skip rule
    /// let it through) and the token header concealed or stripped. A rejection is the same
    /// problem+json or gRPC response the service sends, with its
    /// [`RejectionReason`](crate::RejectionReason) in the extensions.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let conneqt = conneqt_guard_simulator::Simulator::start().await?;
    /// # let guard = conneqt_guard::AccessTokenLayer::builder()
    /// #     .base_url(conneqt.base_url())
    /// #     .api_key(conneqt.api_key())
    /// #     .build()?;
    /// use conneqt_guard::{RejectionReason, VerifiedToken};
    ///
    /// let request = http::Request::get("/messages")
    ///     .header("Conneqt-Instant-Access-Token", conneqt.issue_token())
    ///     .body(())?;
    /// let request = guard.authorize(request).await.expect("a token Conneqt issued passes");
    /// assert!(request.extensions().get::<VerifiedToken>().is_some());
    ///
    /// let rejection = guard.authorize(http::Request::get("/messages").body(())?).await.unwrap_err();
    /// assert_eq!(rejection.status(), 401);
    /// assert_eq!(rejection.extensions().get(), Some(&RejectionReason::MissingToken));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn authorize<B>(
        &self,
        mut request: Request<B>,
    ) -> Result<Request<B>, Response<Full<Bytes>>> {
        let decision = match self.guard.start(&mut request) {
            Start::Forward => return Ok(request),
            Start::Reject(rejection) => Decision::Reject(rejection),
            Start::Verify(presented) => self.guard.clone().verify(presented).await,
        };
        match decision {
            Decision::Forward(token) => {
                request.extensions_mut().insert(token);
                Ok(request)
            }
            Decision::Reject(rejection) => {
                Err(rejection.into_response(ResponseFormat::of(&request)))
            }
        }
    }

    /// Forgets the cached verdict for `token` (for example when the application learns the
    /// user logged out), so its next request is verified again. Affects every clone and, with
    /// the shared tier (`redis_url`), every replica: their next request with the token is
    /// verified again too. When Redis cannot be reached, it holds here at once and is sent on
    /// in the background once Redis answers.
    pub async fn invalidate(&self, token: &str) {
        let key = self.guard.hasher.hash(token.as_bytes());
        self.guard.invalidate(key).await;
    }

    /// Forgets every cached verdict. Affects every clone and, with the shared tier, every
    /// replica, as [`invalidate`](Self::invalidate) does.
    pub async fn invalidate_all(&self) {
        self.guard.invalidate_all().await;
    }

    /// Checks the API key and the connection with `GET /api/v1/test`, without spending a
    /// token. Call it at start-up to fail fast on a wrong key or an unreachable upstream.
    ///
    /// With the shared tier it also connects to Redis and waits (up to 2 s) until the tier is
    /// up: credentials Redis refuses are [`ConnectionStatus::RedisRefused`], a configuration
    /// error; a Redis that is down or slow is only logged (the replica verifies on its own
    /// until Redis answers).
    pub async fn check_connection(&self) -> ConnectionStatus {
        #[cfg(feature = "redis")]
        if let Some(shared) = &self.guard.shared {
            match shared.verdicts.check().await {
                Ok(()) => {}
                Err(crate::shared::SharedProblem::AuthRefused(reason)) => {
                    return ConnectionStatus::RedisRefused { reason };
                }
                Err(problem) => tracing::warn!(
                    %problem,
                    "conneqt-guard: the shared tier is down; verifying on this replica's own until Redis answers"
                ),
            }
        }
        match self.guard.upstream.check_key().await {
            KeyCheck::Ok => ConnectionStatus::Ok,
            KeyCheck::Failed(UpstreamError::KeyRejected) => ConnectionStatus::KeyRejected,
            KeyCheck::Failed(UpstreamError::KeyNotAuthorised) => ConnectionStatus::KeyNotAuthorised,
            KeyCheck::Failed(error) => ConnectionStatus::Unreachable {
                reason: error.to_string(),
            },
        }
    }
}

impl<S> Layer<S> for AccessTokenLayer {
    type Service = AccessTokenService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AccessTokenService::new(inner, self.guard.clone())
    }
}

impl fmt::Debug for AccessTokenLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessTokenLayer")
            .field("guard", &self.guard)
            .finish()
    }
}

/// What [`AccessTokenLayer::check_connection`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionStatus {
    /// The upstream answered and accepts our API key.
    Ok,
    /// The upstream answered `401`: the API key is wrong or missing.
    KeyRejected,
    /// The upstream answered `403`: the key is valid but this system is not authorised.
    KeyNotAuthorised,
    /// No usable answer: unreachable, too slow, or an unexpected status.
    Unreachable {
        /// What went wrong, without URL or key.
        reason: String,
    },
    /// Redis (the shared tier, `redis_url`) refused our credentials or their permissions.
    RedisRefused {
        /// What Redis said, without URL or password.
        reason: String,
    },
}

impl ConnectionStatus {
    /// True for [`ConnectionStatus::Ok`].
    pub fn is_ok(&self) -> bool {
        matches!(self, Self::Ok)
    }
}

impl fmt::Display for ConnectionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ok => f.write_str("Conneqt is reachable and accepts the API key"),
            Self::KeyRejected => {
                f.write_str("Conneqt rejected the API key (401): check CONNEQT_API_KEY")
            }
            Self::KeyNotAuthorised => f.write_str(
                "Conneqt knows the API key but this system is not authorised (403): ask Quicksilva",
            ),
            Self::Unreachable { reason } => write!(f, "Conneqt could not be checked: {reason}"),
            Self::RedisRefused { reason } => {
                write!(f, "Redis refused the credentials in redis_url: {reason}")
            }
        }
    }
}
