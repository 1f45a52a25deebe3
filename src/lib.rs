//! A tower layer that lets a request reach your messaging code only when it carries a
//! Quicksilva Conneqt instant-messaging access token that Conneqt has verified.
//!
//! [`AccessTokenLayer`] reads the `Conneqt-Instant-Access-Token` header (gRPC metadata
//! `conneqt-instant-access-token`), checks its form, asks Conneqt's verify endpoint about it,
//! remembers the answer for a while, and either calls your service, with a [`VerifiedToken`]
//! in the request's extensions, or answers for it: RFC 9457 `application/problem+json` for
//! HTTP, a gRPC status for gRPC. It works unchanged with axum's `Router::layer` and tonic's
//! `Server::builder().layer`, for any request body, which streams through untouched.
//!
//! # Quick start (axum)
//!
//! ```
//! use axum::{Extension, Router, routing::post};
//! use conneqt_guard::{AccessTokenLayer, VerifiedToken};
//! # use axum::body::Body;
//! # use http::Request;
//! # use tower::ServiceExt;
//!
//! async fn send(Extension(token): Extension<VerifiedToken>) -> String {
//!     format!("sent by {}", token.fingerprint())
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # // Stands in for Conneqt: the simulator crate, a dev-dependency of this one.
//! # let conneqt = conneqt_guard_simulator::Simulator::start().await?;
//! # let (base_url, api_key) = (conneqt.base_url(), conneqt.api_key().to_owned());
//! let guard = AccessTokenLayer::builder()
//!     .base_url(base_url) // e.g. "https://int.conneqt.health"
//!     .api_key(api_key)
//!     .build()?;
//! let app = Router::new().route("/messages", post(send)).layer(guard.clone());
//!
//! // A token Conneqt issued passes; the handler receives it as `VerifiedToken`.
//! let token = conneqt.issue_token();
//! let request = Request::post("/messages")
//!     .header("Conneqt-Instant-Access-Token", &token)
//!     .body(Body::empty())?;
//! assert_eq!(app.clone().oneshot(request).await?.status(), 200);
//!
//! // No token: 401 problem+json, and `send` never runs.
//! let request = Request::post("/messages").body(Body::empty())?;
//! assert_eq!(app.clone().oneshot(request).await?.status(), 401);
//!
//! // Revoked at Conneqt: once the cached verdict lapses (after `cache_ttl`, or at once with
//! // `invalidate`), the token gets 410.
//! conneqt.revoke(&token);
//! guard.invalidate(&token).await;
//! let request = Request::post("/messages")
//!     .header("Conneqt-Instant-Access-Token", &token)
//!     .body(Body::empty())?;
//! assert_eq!(app.oneshot(request).await?.status(), 410);
//! # Ok(())
//! # }
//! ```
//!
//! # Quick start (tonic)
//!
//! ```no_run
//! # async fn run(guard: conneqt_guard::AccessTokenLayer) -> Result<(), Box<dyn std::error::Error>> {
//! let (_reporter, health) = tonic_health::server::health_reporter();
//! tonic::transport::Server::builder()
//!     .layer(guard) // the same layer
//!     .add_service(health)
//!     .serve("127.0.0.1:50051".parse()?)
//!     .await?;
//! # Ok(())
//! # }
//! ```
//!
//! In a tonic handler, the token is `request.extensions().get::<VerifiedToken>()`.
//!
//! # What the client gets
//!
//! | situation | HTTP | gRPC | upstream called | your service runs |
//! |---|---|---|---|---|
//! | a skip rule matches ([`skip_path_prefix`](AccessTokenLayerBuilder::skip_path_prefix) and friends; none by default) | your response, no [`VerifiedToken`] | your response | no | yes |
//! | no token | 401 + `WWW-Authenticate` | `UNAUTHENTICATED` | no | no |
//! | empty, not a UUID, over 256 chars, bad characters, header twice | 400 with `invalidParameters` | `UNAUTHENTICATED` | no | no |
//! | Conneqt says 200 | your response | your response | once per token per `cache_ttl` | yes |
//! | Conneqt says 410 | 410 | `UNAUTHENTICATED` | once per token per `gone_ttl` | no |
//! | Conneqt says 400 | 401, its reasons in `detail` | `UNAUTHENTICATED` | every time | no |
//! | Conneqt refuses our `ApiKey` (401/403) | 500, logged at error level | `INTERNAL` | every time | no |
//! | Conneqt down, slow, 5xx, other status, garbage | 503 + `Retry-After: 1` | `UNAVAILABLE` | every time | no |
//!
//! Concurrent requests with the same unverified token make one upstream call between them.
//! Every response the guard writes itself carries a [`RejectionReason`] in its extensions.
//!
//! # Security properties
//!
//! * Fails closed: no verdict, no entry.
//! * The token is never logged, never put in an error or a response, and never stored in
//!   the cache, which is keyed on a 128-bit keyed hash with a random per-process key (with
//!   the shared tier, a key derived from the cluster key, and only the hash goes to Redis). Logs
//!   carry a [`Fingerprint`] instead.
//! * The API key never appears in `Debug` output, logs or errors.
//!
//! # Crates
//!
//! By default this crate pulls only what the layer needs. Its one cargo feature, `redis`
//! (off by default; on in the sidecar), adds the shared verdict tier: replicas share verdicts
//! and revocations through one Redis
//! ([`redis_url`](AccessTokenLayerBuilder::redis_url); redis-rs; single endpoint, no Cluster
//! or Sentinel). The rest of the
//! workspace lives beside it: the `conneqt-guard` sidecar binary (crate
//! `conneqt-guard-sidecar`, `cargo install --path sidecar`) and the Conneqt simulator the tests,
//! examples and benches run against (crate `conneqt-guard-simulator`).
//!
//! The verdict check runs on the tokio runtime your server already uses (a cache miss spawns
//! a task so that a client hanging up cannot cancel a verification others wait on).

mod builder;
mod layer;
mod service;
// The request's path in one place, and its steps in order: skip → token → cache → (shared
// tier) → upstream → verdict → rejection.
mod guard;
mod skip;
mod token;
mod cache;
#[cfg(feature = "redis")]
mod shared;
mod upstream;
mod verdict;
mod reject;
// What operators see of it.
mod telemetry;
// The plumbing that sequences the steps.
pub mod future;
pub mod body;

/// The library's settings as the `conneqt-guard` sidecar's flags. For that binary only: not a
/// public API, and not covered by semver.
#[doc(hidden)]
pub use builder::sidecar as __sidecar;
pub use builder::{AccessTokenLayerBuilder, BuildError};
pub use layer::{AccessTokenLayer, ConnectionStatus};
pub use reject::RejectionReason;
pub use service::AccessTokenService;
pub use token::Fingerprint;
pub use verdict::VerifiedToken;
