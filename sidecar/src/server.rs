//! Accepting connections and serving them: HTTP/1.1 and h2c (prior knowledge) on one port,
//! the proxy's relay first where there is one, and a graceful stop that lets in-flight
//! requests finish.

use std::convert::Infallible;
use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tower_service::Service;

use crate::relay::{self, Relay};

/// The address of the client that opened the connection, in every request's extensions.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ClientAddr(pub(crate) SocketAddr);

/// Pause before accepting again after a failed `accept` (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// A tower service as hyper needs it, for [`Connections`].
pub(crate) trait HttpService<B>:
    Service<Request<Incoming>, Response = Response<B>, Error = Infallible, Future: Send + 'static>
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S, B> HttpService<B> for S where
    S: Service<
            Request<Incoming>,
            Response = Response<B>,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + Sync
        + 'static
{
}

/// A response body hyper can write.
pub(crate) trait HttpBody:
    http_body::Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
    + Send
    + 'static
{
}

impl<B> HttpBody for B where
    B: http_body::Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
        + Send
        + 'static
{
}

/// The connections one runtime serves: each in a task of its own, with HTTP/1.1 and h2c
/// (prior knowledge) on one port, and a graceful stop.
pub(crate) struct Connections<S> {
    service: S,
    /// The proxy's fast path: each connection starts there, and goes to hyper and `service`
    /// at the first request it does not take.
    relay: Option<Relay>,
    builder: auto::Builder<TokioExecutor>,
    /// Hyper's connections.
    graceful: GracefulShutdown,
    /// Each relay connection holds a clone; `recv` on `all_closed` returns `None` once all are
    /// gone.
    open: mpsc::Sender<Infallible>,
    all_closed: mpsc::Receiver<Infallible>,
    shutdown: watch::Receiver<bool>,
}

impl<S> Connections<S> {
    pub(crate) fn new(service: S, relay: Option<Relay>, shutdown: watch::Receiver<bool>) -> Self {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder.http1().timer(TokioTimer::new());
        builder.http2().timer(TokioTimer::new());
        let (open, all_closed) = mpsc::channel(1);
        Self {
            service,
            relay,
            builder,
            graceful: GracefulShutdown::new(),
            open,
            all_closed,
            shutdown,
        }
    }

    /// Serves `stream` in a task of its own.
    pub(crate) fn serve<B>(&self, stream: TcpStream, peer: SocketAddr)
    where
        S: HttpService<B>,
        B: HttpBody,
    {
        let _ = stream.set_nodelay(true);
        let per_request = per_request(self.service.clone(), peer);
        let Some(relay) = &self.relay else {
            let connection = self
                .builder
                .serve_connection(TokioIo::new(stream), per_request)
                .into_owned();
            tokio::spawn(log_end(self.graceful.watch(connection)));
            return;
        };
        let (relay, builder) = (relay.clone(), self.builder.clone());
        let (watcher, open, shutdown) = (
            self.graceful.watcher(),
            self.open.clone(),
            self.shutdown.clone(),
        );
        tokio::spawn(async move {
            let _open = open;
            if let relay::Ended::HandOff(io) = relay::serve(&relay, stream, peer, shutdown).await {
                let connection = builder
                    .serve_connection(TokioIo::new(io), per_request)
                    .into_owned();
                log_end(watcher.watch(connection)).await;
            }
        });
    }

    /// Waits up to `grace` for every connection to finish its request in flight (they stop
    /// taking new ones once `shutdown` is true). Returns `false` if the grace period ran out.
    pub(crate) async fn finish(self, grace: Duration) -> bool {
        let Self {
            graceful,
            open,
            mut all_closed,
            ..
        } = self;
        drop(open);
        let finished = async {
            graceful.shutdown().await;
            let _ = all_closed.recv().await;
        };
        tokio::time::timeout(grace, finished).await.is_ok()
    }
}

/// Accepts on `listener` until `shutdown` turns true, passing each connection to `serve`; then
/// closes the listener and prints `stopped accepting on ADDR`.
pub(crate) async fn accept(
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
    mut serve: impl FnMut(TcpStream, SocketAddr),
) {
    let addr = listener.local_addr().ok();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => serve(stream, peer),
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
}

/// Serves `service` on `listener` in this runtime until `shutdown` turns true, then waits up to
/// `grace` for open connections to finish their requests. Returns `false` if the grace period
/// ran out.
pub(crate) async fn serve<S, B>(
    listener: TcpListener,
    service: S,
    shutdown: watch::Receiver<bool>,
    grace: Duration,
) -> bool
where
    S: HttpService<B>,
    B: HttpBody,
{
    let connections = Connections::new(service, None, shutdown.clone());
    accept(listener, shutdown, |stream, peer| {
        connections.serve(stream, peer)
    })
    .await;
    connections.finish(grace).await
}

/// A connection accepted on one thread, on its way to a worker.
pub(crate) type Handed = (std::net::TcpStream, SocketAddr);

/// Serves the connections `handed` brings, in this runtime, until it closes; then waits up to
/// `grace` for them to finish. Returns `false` if the grace period ran out.
pub(crate) async fn serve_handed<S, B>(
    mut handed: mpsc::UnboundedReceiver<Handed>,
    connections: Connections<S>,
    grace: Duration,
) -> bool
where
    S: HttpService<B>,
    B: HttpBody,
{
    while let Some((stream, peer)) = handed.recv().await {
        match TcpStream::from_std(stream) {
            Ok(stream) => connections.serve(stream, peer),
            Err(error) => tracing::warn!(%error, "cannot take over a connection"),
        }
    }
    connections.finish(grace).await
}

/// `service` as hyper calls it: one request at a time, with the client's address added.
fn per_request<S, B>(
    service: S,
    peer: SocketAddr,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<B>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
> + Clone
+ Send
+ 'static
where
    S: HttpService<B>,
    B: HttpBody,
{
    hyper::service::service_fn(move |mut request: Request<Incoming>| {
        request.extensions_mut().insert(ClientAddr(peer));
        let mut service = service.clone();
        async move {
            poll_fn(|cx| service.poll_ready(cx)).await?;
            service.call(request).await
        }
    })
}

async fn log_end<E: std::fmt::Display>(connection: impl Future<Output = Result<(), E>>) {
    if let Err(error) = connection.await {
        tracing::debug!(%error, "connection ended with an error");
    }
}

/// Listens for SIGTERM and SIGINT (Ctrl-C) from the moment it is called, so call it before
/// announcing anything: a signal that arrives before the returned future is awaited is kept,
/// not fatal. The future resolves on the first of them.
pub(crate) fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{Signal, SignalKind, signal};
        let listen = |kind: SignalKind, name: &'static str| match signal(kind) {
            Ok(stream) => Some(stream),
            Err(error) => {
                tracing::warn!(%error, "cannot listen for {name}");
                None
            }
        };
        let terminate = listen(SignalKind::terminate(), "SIGTERM");
        let interrupt = listen(SignalKind::interrupt(), "SIGINT");
        async fn next(stream: Option<Signal>) {
            match stream {
                Some(mut stream) => {
                    stream.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        async move {
            tokio::select! {
                () = next(terminate) => {}
                () = next(interrupt) => {}
            }
        }
    }
    #[cfg(not(unix))]
    {
        let ctrl_c = tokio::signal::ctrl_c();
        async move {
            let _ = ctrl_c.await;
        }
    }
}
