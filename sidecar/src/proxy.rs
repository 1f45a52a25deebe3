//! `conneqt-guard proxy`: the forwarding service the guard wraps. Streams bodies both ways,
//! drops hop-by-hop headers in both directions, adds `X-Forwarded-*`, and turns an unreachable
//! backend into `502` problem+json that does not name the backend.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Frame;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::oneshot;
use tower_service::Service;

use crate::http1;
use crate::relay::Refusal;
use crate::server::ClientAddr;

/// What the proxy answers with: the backend's body, streamed, or one it wrote itself.
pub(crate) type ProxyBody = Either<Watched<Incoming>, Full<Bytes>>;

/// Forwards each request to the backend. Cheap to clone: clones share the connection pools.
#[derive(Clone, Debug)]
pub(crate) struct Forwarder {
    backend: Arc<Backend>,
    timeouts: Timeouts,
    /// HTTP/1.1 to the backend, for everything but gRPC.
    http1: Client<HttpConnector, Watched<Incoming>>,
    /// HTTP/2 with prior knowledge (h2c), for gRPC.
    http2: Client<HttpConnector, Watched<Incoming>>,
}

/// How long the proxy waits for a peer before giving up on it. A stalled peer holds only its
/// own connection: every connection is a task of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Timeouts {
    /// Between two requests on a connection, and to receive a whole request head.
    pub(crate) request_head: Duration,
    /// Between two reads of a request body (the client stalls: `408`, or a close once the
    /// answer has started).
    pub(crate) request_body: Duration,
    /// To connect to the backend (`504`).
    pub(crate) backend_connect: Duration,
    /// From the end of the request to the backend's response head (`504`).
    pub(crate) backend_response: Duration,
    /// Between two reads of a response body (the answer has started: a close).
    pub(crate) backend_body: Duration,
}

impl Default for Timeouts {
    /// 60 s each, as nginx's equivalents (`client_header_timeout`, `client_body_timeout`,
    /// `proxy_connect_timeout`, `proxy_read_timeout`).
    fn default() -> Self {
        let minute = Duration::from_secs(60);
        Self {
            request_head: minute,
            request_body: minute,
            backend_connect: minute,
            backend_response: minute,
            backend_body: minute,
        }
    }
}

/// Where requests go: scheme, host and port, and an optional path prefix.
#[derive(Debug)]
pub(crate) struct Backend {
    scheme: Scheme,
    authority: Authority,
    /// `host:port`, with port 80 when the URL gives none.
    address: String,
    /// The backend URL's path without its trailing `/` (empty for none).
    prefix: String,
}

impl Forwarder {
    /// A forwarder to `backend`.
    pub(crate) fn new(backend: Arc<Backend>, timeouts: Timeouts) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeouts.backend_connect));
        let http1 = Client::builder(TokioExecutor::new()).build(connector.clone());
        let http2 = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build(connector);
        Self {
            backend,
            timeouts,
            http1,
            http2,
        }
    }
}

/// Checks `--backend` (`http://host[:port][/prefix]`).
pub(crate) fn parse_backend(raw: &str) -> Result<Backend, String> {
    let uri: Uri = raw
        .parse()
        .map_err(|error| format!("--backend {raw:?} is not a URL ({error})"))?;
    let scheme = uri.scheme().cloned();
    if scheme != Some(Scheme::HTTP) {
        return Err(format!(
            "--backend {raw:?} must start with http:// (the backend is reached over plain HTTP)"
        ));
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("--backend {raw:?} has no host"))?;
    if authority.as_str().contains('@') {
        return Err("--backend must not contain credentials".to_owned());
    }
    if uri.query().is_some() {
        return Err(format!("--backend {raw:?} must not have a query"));
    }
    let address = match authority.port_u16() {
        Some(_) => authority.as_str().to_owned(),
        None => format!("{}:80", authority.as_str()),
    };
    Ok(Backend {
        scheme: Scheme::HTTP,
        authority,
        address,
        prefix: uri.path().trim_end_matches('/').to_owned(),
    })
}

impl Backend {
    /// `host[:port]` as the URL gave it: the `Host` the backend is sent.
    pub(crate) fn authority(&self) -> &str {
        self.authority.as_str()
    }

    /// `host:port`, to connect to.
    pub(crate) fn address(&self) -> &str {
        &self.address
    }

    /// The path prefix, without a trailing `/` (empty for none).
    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    fn uri_for(&self, path_and_query: Option<&PathAndQuery>) -> Result<Uri, http::Error> {
        let path = path_and_query.map_or("/", PathAndQuery::as_str);
        let path_and_query = if self.prefix.is_empty() {
            PathAndQuery::try_from(path)?
        } else {
            PathAndQuery::try_from(format!("{}{path}", self.prefix))?
        };
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
    }
}

impl Service<Request<Incoming>> for Forwarder {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        let grpc = http1::is_grpc(request.headers());
        if let Err(refusal) = admit(&request) {
            return Box::pin(std::future::ready(Ok(problem(
                refusal.status,
                refusal.kind,
                refusal.detail,
            ))));
        }
        let (mut parts, body) = request.into_parts();
        let original_host = parts.headers.get(header::HOST).cloned().or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        http1::remove_aliases(&mut parts.headers);
        http1::remove_hop_by_hop(&mut parts.headers);
        // The backend's own authority goes in `Host` (set by the client from the URI).
        parts.headers.remove(header::HOST);
        let client = parts.extensions.get::<ClientAddr>().map(|c| c.0.ip());
        add_forwarded(
            &mut parts.headers,
            client.map(forwarded_for).as_ref(),
            original_host,
        );
        parts.uri = match self.backend.uri_for(parts.uri.path_and_query()) {
            Ok(uri) => uri,
            Err(error) => {
                tracing::warn!(%error, "cannot build the backend URI");
                return Box::pin(std::future::ready(Ok(bad_gateway(grpc))));
            }
        };
        // gRPC needs HTTP/2 to the backend; everything else goes over HTTP/1.1, whatever the
        // client spoke to us.
        parts.version = if grpc {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        parts.extensions.clear();
        let client = if grpc {
            self.http2.clone()
        } else {
            self.http1.clone()
        };
        let timeouts = self.timeouts;
        let (body, body_sent) = Watched::request(body, timeouts.request_body);
        let request = Request::from_parts(parts, body);
        Box::pin(async move {
            // `backend_response` runs from the end of the request body to the response head.
            let answer_due = async {
                let _ = body_sent.await;
                tokio::time::sleep(timeouts.backend_response).await;
            };
            let response = tokio::select! {
                response = client.request(request) => response,
                () = answer_due => {
                    tracing::warn!("the backend did not answer in time: 504");
                    return Ok(backend_timeout(grpc));
                }
            };
            match response {
                Ok(response) => Ok(checked_response(response, grpc, timeouts.backend_body)),
                Err(error) if timed_out(&error) => {
                    tracing::warn!("the backend did not connect in time: 504");
                    Ok(backend_timeout(grpc))
                }
                Err(error) if caused_by::<Stalled>(&error) => {
                    tracing::debug!("the client stalled sending the request body: 408");
                    Ok(request_timeout(grpc))
                }
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), "backend unreachable: answering 502");
                    Ok(bad_gateway(grpc))
                }
            }
        })
    }
}

/// What the hyper path refuses before forwarding (hyper itself refuses ambiguous framing):
/// `CONNECT`, and a `Content-Length` beyond [`http1::MAX_CONTENT_LENGTH`].
fn admit<B>(request: &Request<B>) -> Result<(), Refusal> {
    if request.method() == Method::CONNECT {
        return Err(Refusal::CONNECT);
    }
    if request
        .headers()
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .any(|value| http1::content_length(value.as_bytes()).is_none())
    {
        return Err(Refusal::malformed(
            "Content-Length must be plain digits, at most 2^53 - 1.",
        ));
    }
    Ok(())
}

/// The backend's response as the client may see it: hop-by-hop fields dropped, the body
/// watched for stalls. `502` for what cannot be relayed truthfully: a `101` (the hyper path
/// forwards no upgrade), a transfer coding other than `chunked`, a `Content-Length` that is
/// not one plain number up to 2^53 − 1.
fn checked_response(
    response: Response<Incoming>,
    grpc: bool,
    idle: Duration,
) -> Response<ProxyBody> {
    let headers = response.headers();
    let refused = if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        Some("the backend switched protocols unasked")
    } else if headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .any(|value| !http1::is_chunked_only(value.as_bytes()))
    {
        Some("a transfer coding other than chunked from the backend")
    } else if headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .any(|value| http1::content_length(value.as_bytes()).is_none())
    {
        Some("bad Content-Length from the backend")
    } else {
        None
    };
    if let Some(problem) = refused {
        tracing::warn!(problem, "the backend's answer cannot be relayed: 502");
        return bad_gateway(grpc);
    }
    let (mut parts, body) = response.into_parts();
    http1::remove_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, Either::Left(Watched::response(body, idle)))
}

pin_project_lite::pin_project! {
    /// A body the hyper path relays: each frame must come within `idle` of the last (else
    /// the body fails with [`Stalled`]); a request body's trailers are cleaned
    /// ([`http1::clean_request_trailers`]) and its end is told to `ended`.
    pub(crate) struct Watched<B> {
        #[pin]
        inner: B,
        // Boxed so the body is `Unpin`, as hyper's client wants.
        deadline: Pin<Box<tokio::time::Sleep>>,
        idle: Duration,
        request: bool,
        ended: Option<oneshot::Sender<()>>,
    }
}

impl<B: http_body::Body> Watched<B> {
    /// A request body, and what resolves when it has all been read.
    fn request(inner: B, idle: Duration) -> (Self, oneshot::Receiver<()>) {
        let (ended, body_sent) = oneshot::channel();
        let mut body = Self::new(inner, idle, true);
        if body.inner.is_end_stream() {
            let _ = ended.send(());
        } else {
            body.ended = Some(ended);
        }
        (body, body_sent)
    }

    fn response(inner: B, idle: Duration) -> Self {
        Self::new(inner, idle, false)
    }

    fn new(inner: B, idle: Duration, request: bool) -> Self {
        Self {
            inner,
            deadline: Box::pin(tokio::time::sleep(idle)),
            idle,
            request,
            ended: None,
        }
    }
}

impl<B> http_body::Body for Watched<B>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(frame) => {
                this.deadline
                    .as_mut()
                    .reset(tokio::time::Instant::now() + *this.idle);
                if (frame.is_none() || this.inner.is_end_stream())
                    && let Some(ended) = this.ended.take()
                {
                    let _ = ended.send(());
                }
                Poll::Ready(frame.map(|frame| {
                    let mut frame = frame.map_err(Into::into)?;
                    if *this.request
                        && let Some(trailers) = frame.trailers_mut()
                    {
                        http1::clean_request_trailers(trailers);
                    }
                    Ok(frame)
                }))
            }
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(Stalled)))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A peer sent nothing for longer than its timeout allows.
#[derive(Debug)]
pub(crate) struct Stalled;

impl std::fmt::Display for Stalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the peer stalled")
    }
}

impl std::error::Error for Stalled {}

/// Whether `error` comes of an I/O time-out (the backend connect timeout).
fn timed_out(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if error
            .downcast_ref::<std::io::Error>()
            .is_some_and(|error| error.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        cause = error.source();
    }
    false
}

/// Whether `error` or one of its causes is an `E`.
fn caused_by<E: std::error::Error + 'static>(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if error.is::<E>() {
            return true;
        }
        cause = error.source();
    }
    false
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The client's address as an `X-Forwarded-For` entry.
pub(crate) fn forwarded_for(client: std::net::IpAddr) -> HeaderValue {
    HeaderValue::from_str(&client.to_string()).expect("an IP address is a valid header value")
}

/// Appends the client (from [`forwarded_for`]) to `X-Forwarded-For`, and sets
/// `X-Forwarded-Proto` and `X-Forwarded-Host` to what the client used.
pub(crate) fn add_forwarded(
    headers: &mut HeaderMap,
    client: Option<&HeaderValue>,
    host: Option<HeaderValue>,
) {
    if let Some(client) = client {
        let chain: Vec<&str> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .collect();
        if chain.is_empty() {
            headers.insert(X_FORWARDED_FOR, client.clone());
        } else {
            let mut joined = chain.join(", ");
            joined.push_str(", ");
            joined.push_str(client.to_str().unwrap_or_default());
            if let Ok(value) = HeaderValue::from_str(&joined) {
                headers.insert(X_FORWARDED_FOR, value);
            }
        }
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    match host {
        Some(host) => headers.insert(X_FORWARDED_HOST, host),
        None => headers.remove(X_FORWARDED_HOST),
    };
}

/// A response the proxy makes itself: RFC 9457 problem+json with type
/// `tag:conneqt-guard,2026:{kind}`, the status's own title, and `detail`; never cached.
pub(crate) fn problem(status: StatusCode, kind: &str, detail: &str) -> Response<ProxyBody> {
    problem_json(status, kind, detail).map(Either::Right)
}

/// [`problem`], for any service's body type.
pub(crate) fn problem_json(status: StatusCode, kind: &str, detail: &str) -> Response<Full<Bytes>> {
    let problem = serde_json::json!({
        "type": format!("tag:conneqt-guard,2026:{kind}"),
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
        "instance": format!("urn:uuid:{}", uuid::Uuid::new_v4()),
    });
    let mut response = Response::new(Full::new(Bytes::from(problem.to_string())));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The answer when the backend cannot be reached or gave an answer that cannot be relayed:
/// `502` problem+json for HTTP, `UNAVAILABLE` for gRPC. Neither names the backend.
pub(crate) fn bad_gateway(grpc: bool) -> Response<ProxyBody> {
    if grpc {
        return grpc_status("14", "backend%20unavailable");
    }
    problem(
        StatusCode::BAD_GATEWAY,
        "backend-unavailable",
        "The service behind conneqt-guard could not be reached. Try again later.",
    )
}

/// The answer when the backend did not connect or answer within its timeout: `504`
/// problem+json for HTTP, `DEADLINE_EXCEEDED` for gRPC.
pub(crate) fn backend_timeout(grpc: bool) -> Response<ProxyBody> {
    if grpc {
        return grpc_status("4", "backend%20timeout");
    }
    problem(
        StatusCode::GATEWAY_TIMEOUT,
        "backend-timeout",
        "The service behind conneqt-guard did not answer in time. Try again later.",
    )
}

/// The answer when the client stopped sending its request body: `408` problem+json for
/// HTTP, `CANCELLED` for gRPC.
pub(crate) fn request_timeout(grpc: bool) -> Response<ProxyBody> {
    if grpc {
        return grpc_status("1", "request%20body%20stalled");
    }
    problem(
        StatusCode::REQUEST_TIMEOUT,
        "request-timeout",
        "The request body stopped arriving.",
    )
}

/// A trailers-only gRPC answer with `status` and the percent-encoded `message`.
fn grpc_status(status: &'static str, message: &'static str) -> Response<ProxyBody> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::new())));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", HeaderValue::from_static(status));
    headers.insert("grpc-message", HeaderValue::from_static(message));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// An error and its causes on one line, for the log.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http1::tests::headers;

    #[test]
    fn forwarded_for_is_appended_and_proto_and_host_are_set() {
        let mut map = headers(&[
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-proto", "https"),
        ]);
        add_forwarded(
            &mut map,
            Some(&forwarded_for("127.0.0.1".parse().unwrap())),
            Some(HeaderValue::from_static("example.org")),
        );
        assert_eq!(map["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(map["x-forwarded-proto"], "http");
        assert_eq!(map["x-forwarded-host"], "example.org");

        let mut first = HeaderMap::new();
        add_forwarded(
            &mut first,
            Some(&forwarded_for("::1".parse().unwrap())),
            None,
        );
        assert_eq!(first["x-forwarded-for"], "::1");
        assert!(first.get("x-forwarded-host").is_none());
    }

    #[test]
    fn backend_urls_are_checked_and_keep_a_path_prefix() {
        let backend = parse_backend("http://127.0.0.1:3000/app/").unwrap();
        let pq = PathAndQuery::from_static("/messages?x=1");
        assert_eq!(
            backend.uri_for(Some(&pq)).unwrap(),
            "http://127.0.0.1:3000/app/messages?x=1"
        );
        for bad in ["127.0.0.1:3000", "https://h", "http://u:p@h", "http://h/?q"] {
            assert!(
                parse_backend(bad).unwrap_err().contains("--backend"),
                "{bad}"
            );
        }
    }
}
