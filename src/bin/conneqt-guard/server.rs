//! Serving a tower service on a listener: HTTP/1.1 and h2c (prior knowledge) on one port, and a
//! graceful stop that lets in-flight requests finish.

use std::convert::Infallible;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower_service::Service;

/// The address of the client that opened the connection, in every request's extensions.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ClientAddr(pub(crate) SocketAddr);

/// Pause before accepting again after a failed `accept` (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Serves `service` on `listener` until `shutdown` turns true; then stops accepting, prints
/// `stopped accepting on ADDR`, and waits up to `grace` for open connections to finish their
/// requests. Returns `false` if the grace period ran out.
pub(crate) async fn serve<S, B>(
    listener: TcpListener,
    service: S,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) -> bool
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let addr = listener.local_addr().ok();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let service = service.clone();
                    let per_request = hyper::service::service_fn(move |mut request: Request<Incoming>| {
                        request.extensions_mut().insert(ClientAddr(peer));
                        let mut service = service.clone();
                        async move {
                            poll_fn(|cx| service.poll_ready(cx)).await?;
                            service.call(request).await
                        }
                    });
                    let connection = builder
                        .serve_connection(TokioIo::new(stream), per_request)
                        .into_owned();
                    let connection = graceful.watch(connection);
                    tokio::spawn(async move {
                        if let Err(error) = connection.await {
                            tracing::debug!(%error, "connection ended with an error");
                        }
                    });
                }
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            // Only `true` is ever sent; a dropped sender also means stop.
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    if let Some(addr) = addr {
        println!("stopped accepting on {addr}");
    }
    tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_ok()
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub(crate) async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = terminate.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                return;
            }
            Err(error) => tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops"),
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
