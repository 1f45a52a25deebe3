//! The guard in front of a real tonic server, called by a real tonic client over HTTP/2 on
//! 127.0.0.1, with the simulator as the upstream.
//!
//! The behaviour table itself ([`crate::behaviour::CASES`]) runs through it in the `behaviour`
//! module at the end; the tests here check what the table does not (status messages, a real
//! wrong API key, a shared cache, the types).
//!
//! Each test starts its own simulator and server on free ports. A counting layer sits *inside*
//! the guard, so every test can say whether the inner service ran and, when it did, whether it
//! was handed a [`VerifiedToken`]; the simulator counts the upstream calls.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use conneqt_guard::{AccessTokenLayer, AccessTokenService, VerifiedToken};
use conneqt_guard_simulator::{Fault, Simulator};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic::{Code, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tower::util::MapRequestLayer;

const TOKEN_KEY: &str = "conneqt-instant-access-token";

/// How often the service inside the guard ran, and how many of those requests carried a
/// `VerifiedToken`.
#[derive(Clone, Debug, Default)]
struct InnerCalls {
    calls: Arc<AtomicUsize>,
    verified: Arc<AtomicUsize>,
}

impl InnerCalls {
    fn layer(
        &self,
    ) -> MapRequestLayer<
        impl Fn(http::Request<tonic::body::Body>) -> http::Request<tonic::body::Body> + Clone + use<>,
    > {
        let counts = self.clone();
        MapRequestLayer::new(move |request: http::Request<tonic::body::Body>| {
            counts.calls.fetch_add(1, Ordering::SeqCst);
            if request.extensions().get::<VerifiedToken>().is_some() {
                counts.verified.fetch_add(1, Ordering::SeqCst);
            }
            request
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn verified(&self) -> usize {
        self.verified.load(Ordering::SeqCst)
    }
}

/// A guarded tonic health server on 127.0.0.1, stopped on drop.
struct GuardedServer {
    addr: SocketAddr,
    inner: InnerCalls,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl GuardedServer {
    async fn start(guard: AccessTokenLayer) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let inner = InnerCalls::default();
        let (_reporter, health) = tonic_health::server::health_reporter();
        let router = Server::builder()
            .layer(guard)
            .layer(inner.layer())
            .add_service(health);
        let task = tokio::spawn(router.serve_with_incoming(TcpIncoming::from(listener)));
        Self { addr, inner, task }
    }

    async fn client(&self) -> HealthClient<Channel> {
        let channel = Channel::from_shared(format!("http://{}", self.addr))
            .expect("a valid URI")
            .connect()
            .await
            .expect("connect to the guarded server");
        HealthClient::new(channel)
    }
}

impl Drop for GuardedServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn guard_for(sim: &Simulator) -> AccessTokenLayer {
    guard_with_key(sim, sim.api_key())
}

fn guard_with_key(sim: &Simulator, api_key: &str) -> AccessTokenLayer {
    AccessTokenLayer::builder()
        .base_url(sim.base_url())
        .api_key(api_key)
        .upstream_timeout(Duration::from_secs(2))
        .build()
        .expect("guard settings are valid")
}

/// A simulator and a server guarded against it.
async fn start() -> (Simulator, GuardedServer) {
    let sim = Simulator::start().await.expect("simulator starts");
    let server = GuardedServer::start(guard_for(&sim)).await;
    (sim, server)
}

/// One `Health/Check` for the whole server, with each of `tokens` as an access-token entry.
async fn check_with(
    client: &mut HealthClient<Channel>,
    tokens: &[&str],
) -> Result<ServingStatus, Status> {
    let mut request = tonic::Request::new(HealthCheckRequest::default());
    for token in tokens {
        let value = token.parse().expect("token is valid ASCII metadata");
        request.metadata_mut().append(TOKEN_KEY, value);
    }
    client
        .check(request)
        .await
        .map(|response| response.into_inner().status())
}

async fn check(
    client: &mut HealthClient<Channel>,
    token: Option<&str>,
) -> Result<ServingStatus, Status> {
    check_with(client, token.as_slice()).await
}

#[track_caller]
fn assert_code(result: &Result<ServingStatus, Status>, expected: Code) {
    match result {
        Err(status) => assert_eq!(status.code(), expected, "{status:?}"),
        Ok(serving) => panic!("expected {expected:?}, got OK {serving:?}"),
    }
}

#[tokio::test]
async fn a_token_the_upstream_does_not_accept_is_unauthenticated_with_its_reason() {
    let (sim, server) = start().await;
    let token = sim.issue_token();
    sim.set_fault(Fault::Status(400));
    let mut client = server.client().await;

    let result = check(&mut client, Some(&token)).await;

    assert_code(&result, Code::Unauthenticated);
    let message = result.unwrap_err().message().to_owned();
    assert!(
        message.contains("Conneqt did not accept the access token"),
        "{message}"
    );
    assert_eq!(server.inner.calls(), 0);
    assert_eq!(sim.verify_calls(), 1);
}

#[tokio::test]
async fn an_upstream_that_is_down_is_unavailable() {
    let sim = Simulator::start().await.expect("simulator starts");
    let token = sim.issue_token();
    let server = GuardedServer::start(guard_for(&sim)).await;
    drop(sim); // Its port now refuses connections.
    let mut client = server.client().await;

    let result = check(&mut client, Some(&token)).await;

    assert_code(&result, Code::Unavailable);
    let message = result.unwrap_err().message().to_owned();
    assert!(message.contains("Conneqt is unavailable"), "{message}");
    assert_eq!(server.inner.calls(), 0);
}

#[tokio::test]
async fn an_api_key_the_upstream_refuses_is_internal_not_the_callers_fault() {
    let sim = Simulator::start().await.expect("simulator starts");
    let token = sim.issue_token();
    let unauthorised = sim.unauthorised_api_key().to_owned();

    for key in ["bogus-api-key", unauthorised.as_str()] {
        let before = sim.verify_calls();
        let server = GuardedServer::start(guard_with_key(&sim, key)).await;
        let mut client = server.client().await;

        let result = check(&mut client, Some(&token)).await;

        assert_code(&result, Code::Internal);
        let message = result.unwrap_err().message().to_owned();
        assert!(
            message.contains("server configuration problem"),
            "{key}: {message}"
        );
        assert_eq!(server.inner.calls(), 0, "{key}");
        assert_eq!(sim.verify_calls(), before + 1, "{key}");
    }
}

#[tokio::test]
async fn status_messages_are_readable_sentences_that_never_quote_the_token() {
    let (sim, server) = start().await;
    let gone = sim.issue_token();
    sim.revoke(&gone);
    let mut client = server.client().await;

    let missing = check(&mut client, None).await.unwrap_err();
    assert_eq!(
        missing.message(),
        "The Conneqt-Instant-Access-Token header is required."
    );

    let malformed = check(&mut client, Some("not-a-uuid")).await.unwrap_err();
    assert!(
        malformed.message().contains("must be a UUID")
            && !malformed.message().contains("not-a-uuid"),
        "{}",
        malformed.message()
    );

    let revoked = check(&mut client, Some(&gone)).await.unwrap_err();
    assert!(
        revoked.message().contains("no longer valid"),
        "{}",
        revoked.message()
    );
    assert!(!revoked.message().contains(&gone), "{}", revoked.message());
}

#[tokio::test]
async fn clones_of_the_layer_share_one_cache_across_servers() {
    let sim = Simulator::start().await.expect("simulator starts");
    let guard = guard_for(&sim);
    let first = GuardedServer::start(guard.clone()).await;
    let second = GuardedServer::start(guard).await;
    let token = sim.issue_token();

    for server in [&first, &second] {
        let result = check(&mut server.client().await, Some(&token)).await;
        assert_eq!(result.expect("call succeeds"), ServingStatus::Serving);
        assert_eq!(server.inner.verified(), 1);
    }

    assert_eq!(sim.verify_calls_for(&token), 1);
}

fn assert_send<T: Send>() {}
fn assert_sync<T: Sync>() {}
fn assert_send_value<T: Send>(_: &T) {}

/// Compile-time guarantees: if this test builds, the guard fits tonic's server builder and
/// its parts can cross threads the way tonic and hyper need.
#[test]
fn the_layer_fits_a_tonic_server_and_its_parts_are_send_and_sync() {
    type Inner = tonic::service::Routes;
    type Guarded = AccessTokenService<Inner>;

    assert_send::<AccessTokenLayer>();
    assert_sync::<AccessTokenLayer>();
    assert_send::<Guarded>();
    assert_sync::<Guarded>();
    // Futures only need to be Send (hyper spawns them); they are polled from one task at a time.
    assert_send::<conneqt_guard::future::ResponseFuture<Inner, tonic::body::Body>>();
    assert_send::<conneqt_guard::body::ResponseBody<tonic::body::Body>>();

    // The whole server future, with the guard as a layer, can be spawned. Type-checked only.
    fn serve(guard: AccessTokenLayer, incoming: TcpIncoming) {
        let (_reporter, health) = tonic_health::server::health_reporter();
        let server = Server::builder()
            .layer(guard)
            .add_service(health)
            .serve_with_incoming(incoming);
        assert_send_value(&server);
    }
    let _type_checked: fn(AccessTokenLayer, TcpIncoming) = serve;
}

/// The README's behaviour table ([`crate::behaviour::CASES`]) through the layer in tonic: a
/// skipped request is a health `Watch`, every other one a health `Check`.
mod behaviour {
    use tonic::metadata::MetadataMap;

    use super::{GuardedServer, HealthCheckRequest, HealthClient};
    use crate::behaviour::{GRPC_SKIP_PREFIX, Outcome, Request, Runs, Transport, UPSTREAM_TIMEOUT};

    struct Tonic {
        server: GuardedServer,
        client: HealthClient<tonic::transport::Channel>,
    }

    impl Transport for Tonic {
        async fn send(&self, request: &Request) -> Outcome {
            let metadata = MetadataMap::from_headers(request.headers());
            let message = tonic::Request::from_parts(
                metadata,
                tonic::Extensions::default(),
                HealthCheckRequest::default(),
            );
            let mut client = self.client.clone();
            let result = if request.skipped {
                client.watch(message).await.map(drop)
            } else {
                client.check(message).await.map(drop)
            };
            Outcome::Grpc(result)
        }

        fn service_runs(&self) -> Runs {
            Runs {
                total: self.server.inner.calls(),
                verified: Some(self.server.inner.verified()),
            }
        }
    }

    #[tokio::test]
    async fn the_table_over_tonic() {
        crate::behaviour::run_table("tonic", async |sim, base_url| {
            let guard = conneqt_guard::AccessTokenLayer::builder()
                .base_url(base_url)
                .api_key(sim.api_key())
                .upstream_timeout(UPSTREAM_TIMEOUT)
                .skip_path_prefix(GRPC_SKIP_PREFIX)
                .build()
                .expect("guard builds");
            let server = GuardedServer::start(guard).await;
            let client = server.client().await;
            Tonic { server, client }
        })
        .await;
    }
}
