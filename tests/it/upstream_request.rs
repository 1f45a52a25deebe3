//! The exact request the guard sends to Conneqt's verify endpoint.

use crate::support;
use crate::support::start;

#[tokio::test]
async fn verify_request_is_a_bodyless_get_with_exactly_the_vendors_headers() {
    let h = start().await;
    let token = h.simulator.issue_token();
    assert_eq!(h.get(Some(&token)).await.status(), 200);

    let requests = h.simulator.recorded_requests();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(request.method, http::Method::GET);
    assert_eq!(request.path, "/api/v1/messages/instant/access/token/verify");
    assert_eq!(request.headers["apikey"], h.simulator.api_key());
    assert_eq!(
        request.headers["content-type"],
        "application/json; charset=utf-8"
    );
    assert_eq!(
        request.headers["conneqt-instant-access-token"],
        token.as_str()
    );
    assert_eq!(
        request
            .headers
            .get_all("conneqt-instant-access-token")
            .iter()
            .count(),
        1
    );
    assert!(request.body.is_empty());
    assert!(
        request
            .headers
            .get("content-length")
            .is_none_or(|v| v == "0")
    );
    // Nothing of the client's request leaks through to the upstream.
    assert!(request.headers.get("cookie").is_none());
    assert!(request.headers.get("authorization").is_none());
}

#[tokio::test]
async fn client_headers_are_not_forwarded_upstream() {
    let h = start().await;
    let token = h.simulator.issue_token();
    let response = h
        .client
        .get(h.app.url("/messages"))
        .header(support::TOKEN_HEADER, &token)
        .header("cookie", "session=abc")
        .header("authorization", "Bearer xyz")
        .header("x-forwarded-for", "10.0.0.1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let headers = &h.simulator.recorded_requests()[0].headers;
    for name in ["cookie", "authorization", "x-forwarded-for"] {
        assert!(headers.get(name).is_none(), "{name} leaked upstream");
    }
}

#[tokio::test]
async fn a_configured_verify_path_is_used() {
    // The simulator only serves the documented path, so a wrong path shows as a 404 there,
    // which the guard must treat as an upstream failure (503), not as a verdict.
    let h = support::start_with(|b| b.verify_path("/api/v1/messages/instant/access/token")).await;
    let token = h.simulator.issue_token();
    support::problem(h.get(Some(&token)).await, 503).await;
    let requests = h.simulator.recorded_requests();
    assert!(
        requests
            .iter()
            .all(|r| r.path == "/api/v1/messages/instant/access/token")
    );
    assert_eq!(h.inner_calls(), 0);
}
