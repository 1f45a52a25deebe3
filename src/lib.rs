//! A tower layer that lets a request reach your messaging code only when it carries a
//! Quicksilva Conneqt instant-messaging access token that Conneqt has verified.
//!
//! Placeholder crate docs; see README.md.

mod layer;
mod builder;
mod service;
// The request's path, in order.
mod token;
mod cache;
mod upstream;
mod verdict;
mod reject;
// Plumbing.
pub mod future;
pub mod body;

#[cfg(feature = "simulator")]
pub mod simulator;

pub use builder::{
    AccessTokenLayerBuilder, BuildError, DEFAULT_CACHE_CAPACITY, DEFAULT_CACHE_TTL,
    DEFAULT_GONE_CAPACITY, DEFAULT_GONE_TTL, DEFAULT_UPSTREAM_TIMEOUT, DEFAULT_VERIFY_PATH,
};
pub use layer::{AccessTokenLayer, ConnectionStatus};
pub use reject::RejectionReason;
pub use service::AccessTokenService;
pub use token::Fingerprint;
pub use verdict::VerifiedToken;
