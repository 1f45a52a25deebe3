//! The admin listener: `/healthz`, `/readyz` and `/metrics`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use conneqt_guard::{AccessTokenLayer, ConnectionStatus};
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use metrics_exporter_prometheus::PrometheusHandle;
use tower_service::Service;

/// Answers the admin endpoints. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Admin {
    guard: AccessTokenLayer,
    metrics: PrometheusHandle,
}

impl Admin {
    pub(crate) fn new(guard: AccessTokenLayer, metrics: PrometheusHandle) -> Self {
        Self { guard, metrics }
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

const PLAIN: &str = "text/plain; charset=utf-8";

impl<B> Service<Request<B>> for Admin {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            let response = text(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "GET only\n".into());
            return Box::pin(std::future::ready(Ok(response)));
        }
        let response = match request.uri().path() {
            "/healthz" => text(StatusCode::OK, PLAIN, "alive\n".into()),
            "/metrics" => {
                self.metrics.run_upkeep();
                text(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    self.metrics.render(),
                )
            }
            "/readyz" => {
                let guard = self.guard.clone();
                return Box::pin(async move {
                    Ok(match guard.check_connection().await {
                        ConnectionStatus::Ok => text(StatusCode::OK, PLAIN, "ready\n".into()),
                        status => text(
                            StatusCode::SERVICE_UNAVAILABLE,
                            PLAIN,
                            format!("not ready: {status}\n"),
                        ),
                    })
                });
            }
            _ => text(
                StatusCode::NOT_FOUND,
                PLAIN,
                "not found; try /healthz, /readyz or /metrics\n".into(),
            ),
        };
        Box::pin(std::future::ready(Ok(response)))
    }
}
