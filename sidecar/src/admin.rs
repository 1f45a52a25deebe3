//! The admin listener: `GET /healthz`, `/readyz` and `/metrics`; `POST /invalidate` (the token
//! in the `Conneqt-Instant-Access-Token` header) and `POST /invalidate-all`, which forget
//! cached verdicts (every replica's, with the shared tier), answering `204`.
//!
//! Only operators may reach this listener: it binds to loopback unless told otherwise.

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

use crate::http1::TOKEN_HEADER;

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
        if request.method() == Method::POST {
            return self.invalidate(&request);
        }
        if request.method() != Method::GET && request.method() != Method::HEAD {
            let response = text(
                StatusCode::METHOD_NOT_ALLOWED,
                PLAIN,
                "GET, or POST to /invalidate and /invalidate-all\n".into(),
            );
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

impl Admin {
    /// `POST /invalidate` and `POST /invalidate-all`. The token is read from its one header,
    /// as the guard reads it; it is never echoed or logged.
    fn invalidate<B>(&self, request: &Request<B>) -> <Self as Service<Request<B>>>::Future {
        let guard = self.guard.clone();
        let answer = |status, body: &str| text(status, PLAIN, body.to_owned());
        match request.uri().path() {
            "/invalidate-all" => Box::pin(async move {
                guard.invalidate_all().await;
                tracing::info!("admin: every cached verdict invalidated");
                Ok(answer(StatusCode::NO_CONTENT, ""))
            }),
            "/invalidate" => {
                let mut tokens = request.headers().get_all(TOKEN_HEADER).iter();
                let token = match (tokens.next(), tokens.next()) {
                    (Some(token), None) if !token.is_empty() => token.as_bytes().to_vec(),
                    _ => {
                        let response = answer(
                            StatusCode::BAD_REQUEST,
                            "send the token in one Conneqt-Instant-Access-Token header\n",
                        );
                        return Box::pin(std::future::ready(Ok(response)));
                    }
                };
                Box::pin(async move {
                    let token = String::from_utf8_lossy(&token);
                    guard.invalidate(&token).await;
                    tracing::info!("admin: a token's cached verdict invalidated");
                    Ok(answer(StatusCode::NO_CONTENT, ""))
                })
            }
            _ => Box::pin(std::future::ready(Ok(answer(
                StatusCode::NOT_FOUND,
                "not found; POST to /invalidate or /invalidate-all\n",
            )))),
        }
    }
}
