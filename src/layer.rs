//! [`AccessTokenLayer`]: what users add to their axum router or tonic server.

use std::fmt;
use std::sync::Arc;

use tower_layer::Layer;

use crate::builder::AccessTokenLayerBuilder;
use std::future::Future;

use http::{Request, Response};

use crate::body::RejectionBody;
use crate::guard::{self, Admission, Guard, Pending};
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

    pub(crate) fn from_guard(guard: Guard) -> Self {
        Self {
            guard: Arc::new(guard),
        }
    }

    /// Asks the guard about one request without an inner service, the way tower-http's
    /// `AsyncAuthorizeRequest` does: the same skip rules, token checks, cache, upstream,
    /// metrics and tracing as the layer.
    ///
    /// Resolves to the request back (with a [`VerifiedToken`](crate::VerifiedToken) in its
    /// extensions unless a skip rule let it through, and the token header concealed or
    /// stripped exactly as the layer does), or to the rejection the layer would send
    /// (problem+json, or a gRPC status), with its [`RejectionReason`](crate::RejectionReason)
    /// in the response's extensions.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let conneqt = conneqt_guard::simulator::Simulator::start().await?;
    /// use conneqt_guard::{AccessTokenLayer, RejectionReason};
    ///
    /// let guard = AccessTokenLayer::builder()
    ///     .base_url(conneqt.base_url())
    ///     .api_key(conneqt.api_key())
    ///     .build()?;
    /// let request = http::Request::get("/messages").body(())?;
    /// let rejection = guard.authorize(request).await.unwrap_err();
    /// assert_eq!(rejection.status(), 401);
    /// assert_eq!(
    ///     rejection.extensions().get::<RejectionReason>(),
    ///     Some(&RejectionReason::MissingToken)
    /// );
    /// # Ok(())
    /// # }
    /// ```
    pub fn authorize<B>(
        &self,
        request: Request<B>,
    ) -> impl Future<Output = Result<Request<B>, Response<RejectionBody>>> + Send + 'static
    where
        B: Send + 'static,
    {
        // The guard is cloned only when the verdict must be awaited; the hit path takes none.
        let admission = match self.guard.admit(request) {
            Admission::Check(pending) => Err((self.guard.clone(), pending)),
            done => Ok(done),
        };
        async move {
            let outcome = match admission {
                Ok(Admission::Forward(request)) => Ok(request),
                Ok(Admission::Reject(response)) => Err(response),
                Ok(Admission::Check(_)) => unreachable!("checked above"),
                Err((guard, pending)) => {
                    let Pending {
                        request,
                        presented,
                        format,
                    } = pending;
                    guard::check(guard, presented).await.apply(request, format)
                }
            };
            outcome.map_err(|response| response.map(RejectionBody::new))
        }
    }

    /// Forgets the cached verdict for `token` (for example when the application learns the
    /// user logged out), so its next request is verified again. Affects every clone.
    pub async fn invalidate(&self, token: &str) {
        let key = self.guard.hasher.hash(token.as_bytes());
        self.guard.cache.invalidate(&key).await;
    }

    /// Forgets every cached verdict. Affects every clone.
    pub fn invalidate_all(&self) {
        self.guard.cache.invalidate_all();
    }

    /// Checks the API key and the connection with `GET /api/v1/test`, without spending a
    /// token. Call it at start-up to fail fast on a wrong key or an unreachable upstream.
    pub async fn check_connection(&self) -> ConnectionStatus {
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
        }
    }
}
