//! [`AccessTokenLayer`]: what users add to their axum router or tonic server.

use std::fmt;
use std::sync::Arc;

use tower_layer::Layer;

use crate::builder::AccessTokenLayerBuilder;
use crate::cache::VerdictCache;
use crate::service::AccessTokenService;
use crate::skip::SkipRules;
use crate::token::{TokenFormat, TokenHasher};
use crate::upstream::{KeyCheck, Upstream, UpstreamError};

/// A tower layer that lets a request through only with a `Conneqt-Instant-Access-Token`
/// that Conneqt has verified.
///
/// Build one with [`AccessTokenLayer::builder`]. Cloning is cheap: clones share one verdict
/// cache and one HTTP connection pool, so build it once and clone it wherever it is needed.
/// See the [crate documentation](crate) for the behaviour and an example.
#[derive(Clone)]
pub struct AccessTokenLayer {
    shared: Arc<Shared>,
}

/// State shared by the layer, its clones, and every service and future they make.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) token_format: TokenFormat,
    pub(crate) hasher: TokenHasher,
    pub(crate) cache: VerdictCache,
    pub(crate) upstream: Arc<Upstream>,
    pub(crate) skip: SkipRules,
    pub(crate) strip_token_header: bool,
}

impl AccessTokenLayer {
    /// Starts configuring a layer.
    pub fn builder() -> AccessTokenLayerBuilder {
        AccessTokenLayerBuilder::default()
    }

    pub(crate) fn from_shared(shared: Shared) -> Self {
        Self {
            shared: Arc::new(shared),
        }
    }

    /// Forgets the cached verdict for `token` (for example when the application learns the
    /// user logged out), so its next request is verified again. Affects every clone.
    pub async fn invalidate(&self, token: &str) {
        let key = self.shared.hasher.hash(token.as_bytes());
        self.shared.cache.invalidate(&key).await;
    }

    /// Forgets every cached verdict. Affects every clone.
    pub fn invalidate_all(&self) {
        self.shared.cache.invalidate_all();
    }

    /// Checks the API key and the connection with `GET /api/v1/test`, without spending a
    /// token. Call it at start-up to fail fast on a wrong key or an unreachable upstream.
    pub async fn check_connection(&self) -> ConnectionStatus {
        match self.shared.upstream.check_key().await {
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
        AccessTokenService::new(inner, self.shared.clone())
    }
}

impl fmt::Debug for AccessTokenLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessTokenLayer")
            .field("shared", &self.shared)
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
