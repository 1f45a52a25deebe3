//! `conneqt-guard proxy`: the forwarding service the guard wraps. Streams bodies both ways,
//! drops hop-by-hop headers in both directions, adds `X-Forwarded-*`, and turns an unreachable
//! backend into `502` problem+json that does not name the backend.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower_service::Service;

use crate::server::ClientAddr;

/// What the proxy answers with: the backend's body, streamed, or one it wrote itself.
pub(crate) type ProxyBody = Either<Incoming, Full<Bytes>>;

/// Forwards each request to the backend. Cheap to clone: clones share the connection pools.
#[derive(Clone, Debug)]
pub(crate) struct Forwarder {
    backend: Arc<Backend>,
    /// HTTP/1.1 to the backend, for everything but gRPC.
    http1: Client<HttpConnector, Incoming>,
    /// HTTP/2 with prior knowledge (h2c), for gRPC.
    http2: Client<HttpConnector, Incoming>,
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
    pub(crate) fn new(backend: Arc<Backend>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let http1 = Client::builder(TokioExecutor::new()).build(connector.clone());
        let http2 = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build(connector);
        Self {
            backend,
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
        let grpc = is_grpc(request.headers());
        let (mut parts, body) = request.into_parts();
        let original_host = parts.headers.get(header::HOST).cloned().or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        remove_hop_by_hop(&mut parts.headers);
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
        let request = Request::from_parts(parts, body);
        Box::pin(async move {
            match client.request(request).await {
                Ok(response) => {
                    let (mut parts, body) = response.into_parts();
                    remove_hop_by_hop(&mut parts.headers);
                    Ok(Response::from_parts(parts, Either::Left(body)))
                }
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), "backend unreachable: answering 502");
                    Ok(bad_gateway(grpc))
                }
            }
        })
    }
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// Headers that describe one connection and must not be passed on (RFC 9110 §7.6.1), plus the
/// proxy credentials meant for us.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

/// Removes hop-by-hop headers: those above, the ones `Connection` names, and `TE` unless it is
/// exactly `trailers` (which gRPC needs end to end).
pub(crate) fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .filter(|name| name != header::TE)
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    let te_is_trailers = headers
        .get_all(header::TE)
        .iter()
        .all(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !te_is_trailers {
        headers.remove(header::TE);
    }
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

/// The answer when the backend cannot be reached: `502` problem+json for HTTP, `UNAVAILABLE`
/// for gRPC. Neither names the backend.
pub(crate) fn bad_gateway(grpc: bool) -> Response<ProxyBody> {
    let mut response = if grpc {
        let mut response = Response::new(Either::Right(Full::new(Bytes::new())));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", HeaderValue::from_static("14"));
        headers.insert(
            "grpc-message",
            HeaderValue::from_static("backend%20unavailable"),
        );
        response
    } else {
        let problem = serde_json::json!({
            "type": "tag:conneqt-guard,2026:backend-unavailable",
            "title": "Bad Gateway",
            "status": 502,
            "detail": "The service behind conneqt-guard could not be reached. Try again later.",
            "instance": format!("urn:uuid:{}", uuid::Uuid::new_v4()),
        });
        let mut response =
            Response::new(Either::Right(Full::new(Bytes::from(problem.to_string()))));
        *response.status_mut() = StatusCode::BAD_GATEWAY;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        response
    };
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
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

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_removed() {
        let mut map = headers(&[
            ("connection", "keep-alive, X-Hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic eA=="),
            ("proxy-authenticate", "Basic"),
            ("te", "gzip"),
            ("conneqt-instant-access-token", "t"),
            ("x-end-to-end", "kept"),
        ]);
        remove_hop_by_hop(&mut map);
        let mut left: Vec<&str> = map.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["conneqt-instant-access-token", "x-end-to-end"]);
    }

    #[test]
    fn te_trailers_is_kept_for_grpc() {
        let mut map = headers(&[("te", "trailers"), ("connection", "te")]);
        remove_hop_by_hop(&mut map);
        assert_eq!(map.get("te").unwrap(), "trailers");
    }

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
