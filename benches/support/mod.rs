//! What the benches share: the runtimes, the simulator, a trivial inner service, requests.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::task::{Context, Poll};

use bytes::Bytes;
use conneqt_guard::AccessTokenLayer;
use conneqt_guard_simulator::Simulator;
use http::{Request, Response, StatusCode};
use http_body_util::{Empty, Full};
use tokio::runtime::Runtime;
use tower::Service;

/// The header (and gRPC metadata key) that carries the access token.
pub(crate) const TOKEN_HEADER: &str = "conneqt-instant-access-token";

/// The request body every bench sends.
pub(crate) type Body = Empty<Bytes>;

/// The smallest useful service: answers `200 OK` with a short body, immediately.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ok200;

impl Service<Request<Body>> for Ok200 {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _request: Request<Body>) -> Self::Future {
        ready(Ok(Response::new(Full::new(Bytes::from_static(b"ok")))))
    }
}

/// A `GET /messages` request carrying `token`.
pub(crate) fn request(token: &str) -> Request<Body> {
    Request::get("/messages")
        .header(TOKEN_HEADER, token)
        .body(Body::new())
        .expect("a valid request")
}

/// Sends `request` through `service` (consumed, as `oneshot` does) and checks it got `200`.
pub(crate) async fn call<S, B>(service: S, request: Request<Body>) -> Response<B>
where
    S: Service<Request<Body>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
{
    use tower::ServiceExt as _;
    let response = service
        .oneshot(request)
        .await
        .expect("the service never fails");
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "the request should be let through"
    );
    response
}

/// The simulator, on a runtime and thread of its own (as a real upstream would be another
/// process), plus the current-thread runtime the services under test run on.
pub(crate) struct Fixture {
    simulator: Option<Simulator>,
    simulator_runtime: Runtime,
    /// Drives the services under test, as criterion's `to_async` executor and for the
    /// hand-timed comparison.
    pub(crate) runtime: Runtime,
}

impl Fixture {
    pub(crate) fn start() -> Self {
        let simulator_runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("simulator")
            .enable_all()
            .build()
            .expect("simulator runtime");
        let simulator = simulator_runtime
            .block_on(Simulator::start())
            .expect("simulator starts");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("bench runtime");
        Self {
            simulator: Some(simulator),
            simulator_runtime,
            runtime,
        }
    }

    pub(crate) fn simulator(&self) -> &Simulator {
        self.simulator.as_ref().expect("present until drop")
    }

    /// A guard against the simulator, with its own (empty) cache. Default settings, except a
    /// TTL that outlives the run so a warmed token stays a hit.
    pub(crate) fn guard(&self) -> AccessTokenLayer {
        AccessTokenLayer::builder()
            .base_url(self.simulator().base_url())
            .api_key(self.simulator().api_key())
            .cache_ttl(std::time::Duration::from_secs(3600))
            .build()
            .expect("guard settings are valid")
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Stop the simulator from inside its own runtime.
        let _entered = self.simulator_runtime.enter();
        drop(self.simulator.take());
    }
}

/// The `p` quantile (0 to 1) of `sorted`, nearest rank.
pub(crate) fn percentile(sorted: &[std::time::Duration], p: f64) -> std::time::Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}
