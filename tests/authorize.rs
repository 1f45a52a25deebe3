//! `AccessTokenLayer::authorize`: the guard asked about a request head, with no inner service.

mod support;

use conneqt_guard::simulator::Simulator;
use conneqt_guard::{RejectionReason, VerifiedToken};
use support::{TOKEN_HEADER, builder_for};

fn request(token: Option<&str>, path: &str) -> http::Request<()> {
    let mut builder = http::Request::get(path);
    if let Some(token) = token {
        builder = builder.header(TOKEN_HEADER, token);
    }
    builder.body(()).unwrap()
}

#[tokio::test]
async fn authorize_gives_the_request_back_or_the_rejection_the_layer_would_send() {
    let simulator = Simulator::start().await.unwrap();
    let guard = builder_for(&simulator)
        .skip_path_prefix("/health")
        .build()
        .unwrap();

    // A valid token: the request back with its `VerifiedToken`.
    let token = simulator.issue_token();
    let passed = guard
        .authorize(request(Some(&token), "/messages"))
        .await
        .unwrap();
    assert!(passed.extensions().get::<VerifiedToken>().is_some());
    assert_eq!(simulator.verify_calls(), 1);

    // No token: 401, and the upstream is not called.
    let rejection = guard
        .authorize(request(None, "/messages"))
        .await
        .unwrap_err();
    assert_eq!(rejection.status(), 401);
    assert_eq!(
        rejection.extensions().get::<RejectionReason>(),
        Some(&RejectionReason::MissingToken)
    );
    assert_eq!(simulator.verify_calls(), 1);

    // Revoked: 410 once the cached verdict is forgotten.
    simulator.revoke(&token);
    guard.invalidate(&token).await;
    let rejection = guard
        .authorize(request(Some(&token), "/messages"))
        .await
        .unwrap_err();
    assert_eq!(rejection.status(), 410);
    assert_eq!(
        rejection.extensions().get::<RejectionReason>(),
        Some(&RejectionReason::TokenGone)
    );

    // A skip rule: the request back without a `VerifiedToken`.
    let passed = guard.authorize(request(None, "/health")).await.unwrap();
    assert!(passed.extensions().get::<VerifiedToken>().is_none());
}
