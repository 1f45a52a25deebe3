//! The HTTP behaviour table through the layer in axum: the table itself
//! ([`crate::behaviour::CASES`], the `behaviour` module below), plus what it does not check:
//! the `VerifiedToken` the handler gets, the reasons of a malformed token, the upstream's
//! reasons for a `400`, and a real wrong or unauthorised API key. All over real HTTP on
//! 127.0.0.1.

use crate::support;

use crate::support::{Seen, TOKEN_HEADER, problem, start, start_with};
use conneqt_guard_simulator::Simulator;

#[tokio::test]
async fn valid_token_reaches_the_handler_with_a_verified_token_after_one_upstream_call() {
    let h = start().await;
    let token = h.simulator.issue_token();

    let response = h.get(Some(&token)).await;

    assert_eq!(response.status(), 200);
    let seen: Seen = response.json().await.unwrap();
    assert!(
        seen.token_matches_header,
        "VerifiedToken::as_str is the presented token"
    );
    assert_eq!(seen.fingerprint.len(), 8);
    assert_eq!(h.inner_calls(), 1);
    assert_eq!(h.simulator.verify_calls_for(&token), 1);
}

#[tokio::test]
async fn malformed_tokens_are_400_naming_the_header_and_neither_inner_nor_upstream_is_called() {
    let h = start().await;
    let too_long = "a".repeat(300);
    let good = h.simulator.issue_token();
    let cases: Vec<(&str, Vec<&[u8]>, &str)> = vec![
        ("empty", vec![b""], "empty"),
        ("not a uuid", vec![b"hello-world"], "UUID"),
        (
            "uuid without hyphens",
            vec![b"ea4f820ef3524515af73630220045ef0"],
            "UUID",
        ),
        ("too long", vec![too_long.as_bytes()], "longer than 256"),
        (
            "tab inside",
            vec![b"ea4f820e-f352\t4515-af73-630220045ef0"],
            "visible ASCII",
        ),
        (
            "non-ASCII",
            vec![b"ea4f820e-f352-4515-af73-630220045\xe9f0"],
            "visible ASCII",
        ),
        (
            "two headers",
            vec![good.as_bytes(), good.as_bytes()],
            "exactly once",
        ),
    ];
    for (case, values, reason) in cases {
        let mut request = h.client.get(h.app.url("/messages"));
        for value in values {
            request = request.header(TOKEN_HEADER, http::HeaderValue::from_bytes(value).unwrap());
        }
        let response = request.send().await.unwrap();
        assert!(
            response.headers().get("www-authenticate").is_none(),
            "{case}"
        );
        let body = problem(response, 400).await;
        assert_eq!(
            body["type"], "tag:conneqt-guard,2026:malformed-token",
            "{case}"
        );
        let parameter = &body["invalidParameters"][0];
        assert_eq!(parameter["name"], "Conneqt-Instant-Access-Token", "{case}");
        assert!(
            parameter["reason"].as_str().unwrap().contains(reason),
            "{case}: {body}"
        );
    }
    assert_eq!(h.inner_calls(), 0);
    assert_eq!(h.upstream_calls(), 0);
}

#[tokio::test]
async fn upstream_400_is_401_with_the_upstreams_reasons_and_is_asked_every_time() {
    // In opaque mode a non-UUID token reaches the upstream, which refuses it with a 400.
    let h = start_with(|b| b.accept_opaque_tokens(true)).await;
    let token = "opaque-token-not-a-uuid";

    let first = h.get(Some(token)).await;
    assert!(first.headers().contains_key("www-authenticate"));
    let body = problem(first, 401).await;
    problem(h.get(Some(token)).await, 401).await;

    assert_eq!(body["type"], "tag:conneqt-guard,2026:token-not-accepted");
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("AccessToken"), "{detail}");
    assert!(
        !detail.contains(token),
        "the token is never echoed: {detail}"
    );
    assert_eq!(h.inner_calls(), 0);
    assert_eq!(
        h.simulator.verify_calls_for(token),
        2,
        "400 answers are not cached"
    );
}

async fn assert_key_problem_is_500_every_time(pick_key: impl FnOnce(&Simulator) -> String) {
    let simulator = Simulator::start().await.unwrap();
    let guard = conneqt_guard::AccessTokenLayer::builder()
        .base_url(simulator.base_url())
        .api_key(pick_key(&simulator))
        .build()
        .unwrap();
    let app = support::serve(guard).await;
    let token = simulator.issue_token();
    let client = support::client();
    for _ in 0..2 {
        let response = client
            .get(app.url("/messages"))
            .header(TOKEN_HEADER, &token)
            .send()
            .await
            .unwrap();
        assert!(response.headers().get("www-authenticate").is_none());
        let body = problem(response, 500).await;
        assert_eq!(
            body["type"],
            "tag:conneqt-guard,2026:verification-misconfigured"
        );
        assert!(
            body["detail"]
                .as_str()
                .unwrap()
                .contains("not a problem with the request")
        );
    }
    assert_eq!(app.inner_calls(), 0);
    assert_eq!(simulator.verify_calls_for(&token), 2, "never cached");
}

#[tokio::test]
async fn upstream_401_for_our_key_is_500_that_does_not_blame_the_client_and_is_never_cached() {
    assert_key_problem_is_500_every_time(|_| "not-the-simulators-key".to_owned()).await;
}

#[tokio::test]
async fn upstream_403_for_our_key_is_500_that_does_not_blame_the_client_and_is_never_cached() {
    assert_key_problem_is_500_every_time(|sim| sim.unauthorised_api_key().to_owned()).await;
}

/// The README's behaviour table ([`crate::behaviour::CASES`]) through the layer in axum.
mod behaviour {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use crate::behaviour::{Outcome, Request, Runs, SKIP_PREFIX, Transport, UPSTREAM_TIMEOUT};
    use crate::support::{self, App, Probe};

    /// The layer in an axum app whose inner service is the probe, which counts its runs and
    /// echoes whether it was handed a `VerifiedToken`.
    struct Axum {
        app: App,
        verified: AtomicUsize,
    }

    impl Transport for Axum {
        async fn send(&self, request: &Request) -> Outcome {
            let answer = request.send_http(&self.app.url("")).await;
            if answer.status == 200 {
                let probe: Probe = serde_json::from_str(&answer.body).expect("a probe answer");
                if probe.verified_token.is_some() {
                    self.verified.fetch_add(1, Ordering::SeqCst);
                }
            }
            Outcome::Http(answer)
        }

        fn service_runs(&self) -> Runs {
            Runs {
                total: self.app.inner_calls(),
                verified: Some(self.verified.load(Ordering::SeqCst)),
            }
        }
    }

    #[tokio::test]
    async fn the_table_over_axum() {
        crate::behaviour::run_table("axum", async |sim, base_url| {
            let guard = conneqt_guard::AccessTokenLayer::builder()
                .base_url(base_url)
                .api_key(sim.api_key())
                .upstream_timeout(UPSTREAM_TIMEOUT)
                .skip_path_prefix(SKIP_PREFIX)
                .build()
                .expect("guard builds");
            Axum {
                app: support::serve_probe(guard).await,
                verified: AtomicUsize::new(0),
            }
        })
        .await;
    }
}
