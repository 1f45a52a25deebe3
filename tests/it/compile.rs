//! Compile-time guarantees: the layer and its service and future are thread-safe, and the layer
//! fits where users put it.

use std::convert::Infallible;

use axum::body::Body;
use conneqt_guard::future::ResponseFuture;
use conneqt_guard::{AccessTokenLayer, AccessTokenService, BuildError, VerifiedToken};
use http::{Request, Response};

fn assert_send<T: Send>() {}
fn assert_sync<T: Sync>() {}
fn assert_clone<T: Clone>() {}
fn assert_static<T: 'static>() {}

type Inner = tower::util::BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>;

#[test]
fn public_types_are_send_sync_and_clone_where_users_need_them() {
    assert_send::<AccessTokenLayer>();
    assert_sync::<AccessTokenLayer>();
    assert_clone::<AccessTokenLayer>();
    assert_static::<AccessTokenLayer>();
    assert_send::<AccessTokenService<Inner>>();
    assert_sync::<AccessTokenService<Inner>>();
    assert_clone::<AccessTokenService<Inner>>();
    assert_send::<ResponseFuture<Inner, Body>>();
    assert_send::<VerifiedToken>();
    assert_sync::<VerifiedToken>();
    assert_clone::<VerifiedToken>();
    assert_send::<BuildError>();
    assert_sync::<BuildError>();
}

#[test]
fn the_layer_fits_axum_router_layer_and_route_layer() {
    // Built but never served: this test is about types. A build error would fail the test.
    let guard = AccessTokenLayer::builder()
        .base_url("https://int.conneqt.health")
        .api_key("key")
        .build()
        .unwrap();
    let _router: axum::Router = axum::Router::new()
        .route("/messages", axum::routing::get(|| async { "ok" }))
        .layer(guard.clone());
    let _router: axum::Router = axum::Router::new()
        .route("/messages", axum::routing::get(|| async { "ok" }))
        .route_layer(guard.clone());
    let _stacked = tower::ServiceBuilder::new()
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .layer(guard)
        .service(tower::service_fn(|_: Request<Body>| async {
            Ok::<_, Infallible>(Response::new(Body::empty()))
        }));
}
