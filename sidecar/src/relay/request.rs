//! Request admission: what the relay does with a request head it has parsed. It takes the
//! plain requests, hands the rest of the connection to hyper at anything else, and refuses
//! what no reading makes safe, before the guard or the backend see it.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri};

use crate::http1;

/// The most header fields a request may have (hyper's limit too): more is `431`.
pub(super) const MAX_REQUEST_HEADERS: usize = 100;

/// What the relay does with a request.
// Made and moved once per request: boxing the large variant would add an allocation to every
// request for nothing.
#[allow(clippy::large_enum_variant)]
pub(super) enum Admission {
    /// Relay it.
    Take(RequestHead),
    /// Give the connection, this request included, to hyper: HTTP/1.0, a chunked body,
    /// `Expect`, gRPC, an absolute-form or `*` target.
    HandOff,
    /// Answer with this problem and close.
    Refuse(Refusal),
}

/// A request the relay takes, parsed.
pub(super) struct RequestHead {
    /// Method, target and the fields to forward: no `Content-Length` (restated from
    /// `body_length`), no aliases ([`http1::is_alias`]), no `Upgrade` but a WebSocket one.
    pub(super) request: Request<()>,
    /// The `Content-Length`, if the request had one.
    pub(super) body_length: Option<u64>,
    /// The client asked to close after this request.
    pub(super) close: bool,
    /// A WebSocket handshake (`GET`, `Upgrade: websocket`, `Connection: upgrade`, no body):
    /// the `Upgrade` value, passed to the backend.
    pub(super) upgrade: Option<HeaderValue>,
}

impl RequestHead {
    pub(super) fn has_body(&self) -> bool {
        self.body_length.is_some_and(|length| length > 0)
    }
}

/// Why the proxy itself refuses a request: rendered as problem+json
/// ([`crate::proxy::problem`]), and the connection closes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) status: StatusCode,
    /// The problem `type`'s last part, such as `malformed-request`.
    pub(crate) kind: &'static str,
    pub(crate) detail: &'static str,
}

impl Refusal {
    /// `400`: the request cannot be read one way only.
    pub(crate) const fn malformed(detail: &'static str) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "malformed-request",
            detail,
        }
    }

    /// `431`: the head is over the limit.
    pub(super) const HEAD_TOO_LARGE: Self = Self {
        status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        kind: "request-head-too-large",
        detail: "The request head is over 64 KiB or 100 header fields.",
    };

    /// `405` for `CONNECT`: the proxy opens no tunnels on request.
    pub(crate) const CONNECT: Self = Self {
        status: StatusCode::METHOD_NOT_ALLOWED,
        kind: "method-not-allowed",
        detail: "CONNECT is not forwarded.",
    };
}

/// Decides what to do with `parsed`, a complete request head.
pub(super) fn admit(parsed: &httparse::Request<'_, '_>) -> Admission {
    match admit_or_refuse(parsed) {
        Ok(admission) => admission,
        Err(refusal) => Admission::Refuse(refusal),
    }
}

fn admit_or_refuse(parsed: &httparse::Request<'_, '_>) -> Result<Admission, Refusal> {
    let method = parsed
        .method
        .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
        .ok_or(Refusal::malformed("The request method is not a token."))?;
    if method == Method::CONNECT {
        return Err(Refusal::CONNECT);
    }
    let http_1_0 = parsed.version == Some(0);
    let mut headers = HeaderMap::with_capacity(parsed.headers.len());
    let mut body_length = None;
    let mut chunked = false;
    let mut hand_off = http_1_0;
    let mut close = false;
    let mut connection_upgrade = false;
    let mut upgrade: Option<HeaderValue> = None;
    for field in parsed.headers.iter() {
        if http1::is_alias(field.name.as_bytes()) {
            continue;
        }
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| Refusal::malformed("A header name is not a token."))?;
        let value = HeaderValue::from_bytes(field.value)
            .map_err(|_| Refusal::malformed("A header value has a control character."))?;
        match name {
            header::CONTENT_LENGTH => {
                let length = http1::content_length(field.value).ok_or(Refusal::malformed(
                    "Content-Length must be plain digits, at most 2^53 - 1.",
                ))?;
                if body_length.replace(length).is_some() {
                    return Err(Refusal::malformed("Content-Length must appear once."));
                }
                // Restated by the relay from what it sends.
                continue;
            }
            header::TRANSFER_ENCODING => {
                if chunked || !http1::is_chunked_only(field.value) {
                    return Err(Refusal::malformed(
                        "Transfer-Encoding must appear once, as exactly `chunked`.",
                    ));
                }
                chunked = true;
                hand_off = true;
            }
            header::EXPECT => hand_off = true,
            header::CONTENT_TYPE if field.value.starts_with(b"application/grpc") => {
                hand_off = true;
            }
            header::UPGRADE if upgrade.is_some() => {
                return Err(Refusal::malformed("Upgrade must appear once."));
            }
            header::UPGRADE => upgrade = Some(value.clone()),
            header::CONNECTION => {
                close |= http1::has_token(field.value, b"close");
                connection_upgrade |= http1::has_token(field.value, b"upgrade");
            }
            _ => {}
        }
        headers.append(name, value);
    }
    if chunked && body_length.is_some() {
        return Err(Refusal::malformed(
            "A request must not have both Content-Length and Transfer-Encoding.",
        ));
    }
    if chunked && http_1_0 {
        return Err(Refusal::malformed(
            "An HTTP/1.0 request cannot have Transfer-Encoding.",
        ));
    }
    let target = parsed.path.unwrap_or_default();
    let uri = if target.starts_with('/') {
        Uri::try_from(target)
            .map_err(|_| Refusal::malformed("The request target is not a URI path."))?
    } else if (target == "*" && method == Method::OPTIONS)
        || target.starts_with("http://")
        || target.starts_with("https://")
    {
        return Ok(Admission::HandOff);
    } else {
        return Err(Refusal::malformed("The request target is not a path."));
    };
    if hand_off {
        return Ok(Admission::HandOff);
    }
    // Only a WebSocket handshake is forwarded as an upgrade; any other `Upgrade` is dropped
    // (it is hop-by-hop) and the request forwarded as a plain one.
    let upgrade = upgrade.filter(|protocol| {
        connection_upgrade
            && method == Method::GET
            && body_length.unwrap_or(0) == 0
            && protocol.as_bytes().eq_ignore_ascii_case(b"websocket")
    });
    if upgrade.is_none() {
        headers.remove(header::UPGRADE);
    }
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    Ok(Admission::Take(RequestHead {
        request,
        body_length,
        close,
        upgrade,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admit_raw(raw: &[u8]) -> Admission {
        let mut headers = [httparse::EMPTY_HEADER; MAX_REQUEST_HEADERS];
        let mut parsed = httparse::Request::new(&mut headers);
        assert!(parsed.parse(raw).unwrap().is_complete());
        admit(&parsed)
    }

    fn taken(raw: &[u8]) -> RequestHead {
        match admit_raw(raw) {
            Admission::Take(head) => head,
            _ => panic!("not taken: {}", String::from_utf8_lossy(raw)),
        }
    }

    #[test]
    fn plain_requests_are_taken_without_their_framing_or_aliases() {
        let head = taken(
            b"POST /m?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nConnection: close, Content-Length\r\n\
              Content_Length: 9\r\nConneqt_Instant_Access_Token: t\r\n\r\n",
        );
        assert_eq!(head.body_length, Some(5));
        assert!(head.close && head.has_body());
        assert_eq!(head.request.uri(), "/m?x=1");
        assert_eq!(head.request.headers()["host"], "a");
        let mut names: Vec<&str> = head.request.headers().keys().map(|n| n.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["connection", "host"]);
        assert!(head.upgrade.is_none());

        let handshake =
            taken(b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: WebSocket\r\n\r\n");
        assert_eq!(handshake.upgrade.unwrap(), "WebSocket");
        assert!(handshake.request.headers().contains_key("upgrade"));
    }

    #[test]
    fn an_upgrade_that_is_not_a_websocket_handshake_is_dropped() {
        for raw in [
            &b"GET / HTTP/1.1\r\nConnection: upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
        ] {
            let head = taken(raw);
            assert!(head.upgrade.is_none());
            assert!(!head.request.headers().contains_key("upgrade"));
        }
    }

    #[test]
    fn what_hyper_serves_is_handed_off() {
        for raw in [
            &b"GET / HTTP/1.0\r\n\r\n"[..],
            b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding:  CHUNKED \r\n\r\n",
            b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Type: application/grpc\r\n\r\n",
        ] {
            assert!(
                matches!(admit_raw(raw), Admission::HandOff),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn ambiguous_framing_and_connect_are_refused() {
        for (raw, status) in [
            (&b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n"[..], 405),
            (b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nContent-Length: 9007199254740992\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, identity\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: xchunked\r\n\r\n", 400),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                400,
            ),
            (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nUpgrade: a\r\nUpgrade: b\r\n\r\n", 400),
            (b"GET a HTTP/1.1\r\n\r\n", 400),
        ] {
            match admit_raw(raw) {
                Admission::Refuse(refusal) => assert_eq!(
                    refusal.status.as_u16(),
                    status,
                    "{}",
                    String::from_utf8_lossy(raw)
                ),
                _ => panic!("not refused: {}", String::from_utf8_lossy(raw)),
            }
        }
    }
}
