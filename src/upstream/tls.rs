//! TLS to Conneqt: rustls with the *ring* crypto provider and the operating system's trust
//! store (the same verifier reqwest uses by default).
//!
//! Why ring rather than reqwest's default, aws-lc-rs: it builds in seconds from Rust and a
//! little C, where aws-lc-sys compiles a C library on every cold build (the largest share of a
//! newcomer's first `cargo run`); both are maintained providers of the rustls project, and a
//! verify call's handshake is rare (connections are pooled). The provider is handed to this
//! client only, never installed process-wide, so it does not change which provider the rest
//! of an application's rustls users get.

use std::sync::Arc;

use rustls::ClientConfig;
use rustls_platform_verifier::BuilderVerifierExt;

/// The client configuration for the verify and connection-check calls: TLS 1.2 and 1.3,
/// certificates checked against the platform's roots, and ALPN offering HTTP/2 then HTTP/1.1.
pub(crate) fn client_config() -> Result<ClientConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_platform_verifier()?
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_offers_http2_then_http1_over_tls_1_2_or_1_3_with_ring() {
        let config = client_config().unwrap();
        assert_eq!(
            config.alpn_protocols,
            [b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        assert!(config.enable_sni);
        let ring = rustls::crypto::ring::default_provider();
        let suites = |provider: &rustls::crypto::CryptoProvider| {
            (provider.cipher_suites.iter())
                .map(|suite| suite.suite())
                .collect::<Vec<_>>()
        };
        assert_eq!(suites(config.crypto_provider()), suites(&ring));
    }
}
