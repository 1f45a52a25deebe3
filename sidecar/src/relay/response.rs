//! Response heads on the relay: the backend's head, read and checked, rewritten for the
//! client, with the framing the relay decided (RFC 9112 §6.3) stated by the relay itself.

use std::io;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::body::{Chunked, Framing};
use super::{BUFFER, MAX_RESPONSE_HEAD, MAX_RESPONSE_HEADERS, invalid};
use crate::http1;

/// What the response answers: what the relay needs of the request to read it.
#[derive(Clone, Copy)]
pub(super) struct Asked<'a> {
    /// The request was `HEAD`: no body follows, whatever the head says.
    pub(super) head: bool,
    /// The WebSocket upgrade the relay forwarded, if any: its `Upgrade` value.
    pub(super) upgrade: Option<&'a [u8]>,
}

/// The backend's response head, rewritten for the client, and how its body is framed.
pub(super) struct ResponseHead {
    /// Status line and end-to-end headers, without framing fields, `Connection` or the blank
    /// line: [`finish`](Self::finish) adds them.
    pub(super) head: Vec<u8>,
    pub(super) framing: Framing,
    /// The `Content-Length` to state: the body's for a length-framed body, the backend's for
    /// a `HEAD` or `304` answer (the length a `GET` would have), none otherwise.
    length: Option<u64>,
    /// The backend lets us send another request on this connection.
    pub(super) backend_keep_alive: bool,
    /// A `1xx` head other than `101`: passed on, and the final one follows.
    pub(super) informational: bool,
    /// `101 Switching Protocols` to the WebSocket handshake: the connection becomes a tunnel.
    pub(super) switching: bool,
}

impl ResponseHead {
    /// Adds the framing the relay decided, `Connection` and the blank line.
    pub(super) fn finish(&mut self, keep_alive: bool) {
        if matches!(self.framing, Framing::Chunked(_)) {
            push_header(&mut self.head, b"transfer-encoding", b"chunked");
        } else if let Some(length) = self.length {
            push_header(
                &mut self.head,
                b"content-length",
                length.to_string().as_bytes(),
            );
        }
        if !keep_alive {
            push_header(&mut self.head, b"connection", b"close");
        }
        self.head.extend_from_slice(b"\r\n");
    }
}

/// The client's view of a backend response head. An error is a response the relay refuses
/// to pass on (`502`): a `101` nobody asked for, a transfer coding other than `chunked`, a
/// `Content-Length` that is not one plain number up to 2^53 − 1.
fn response_head(
    parsed: &httparse::Response<'_, '_>,
    asked: Asked<'_>,
) -> io::Result<ResponseHead> {
    let (Some(code), Some(version)) = (parsed.code, parsed.version) else {
        return Err(invalid("incomplete status line from the backend"));
    };
    let switching = code == 101;
    let mut backend_keep_alive = version == 1;
    let mut named: Vec<&[u8]> = Vec::new();
    let mut length = None;
    let mut chunked = false;
    let mut upgrade = None;
    for field in parsed.headers.iter() {
        let name = field.name.as_bytes();
        if name.eq_ignore_ascii_case(b"connection") {
            if http1::has_token(field.value, b"close") {
                backend_keep_alive = false;
            } else if http1::has_token(field.value, b"keep-alive") {
                backend_keep_alive |= version == 0;
            }
            named.extend(http1::named_by_connection(field.value));
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            if chunked || !http1::is_chunked_only(field.value) {
                return Err(invalid(
                    "a transfer coding other than chunked from the backend",
                ));
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case(b"content-length") {
            let value = http1::content_length(field.value)
                .ok_or_else(|| invalid("bad Content-Length from the backend"))?;
            if length.replace(value).is_some_and(|before| before != value) {
                return Err(invalid("conflicting Content-Length from the backend"));
            }
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            upgrade = Some(field.value);
        }
    }
    if switching {
        match (asked.upgrade, upgrade) {
            (Some(asked), Some(given)) if asked.eq_ignore_ascii_case(given) => {}
            (Some(_), _) => return Err(invalid("the backend switched to another protocol")),
            (None, _) => return Err(invalid("the backend switched protocols unasked")),
        }
    }
    let informational = (100..200).contains(&code) && !switching;
    let (framing, length) = if informational || switching || code == 204 {
        (Framing::Length(0), None)
    } else if asked.head || code == 304 {
        (Framing::Length(0), length)
    } else if chunked {
        (Framing::Chunked(Chunked::Size), None)
    } else if let Some(length) = length {
        (Framing::Length(length), Some(length))
    } else {
        (Framing::UntilClose, None)
    };
    if matches!(framing, Framing::UntilClose) {
        backend_keep_alive = false;
    }
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(code.to_string().as_bytes());
    head.push(b' ');
    head.extend_from_slice(parsed.reason.unwrap_or_default().as_bytes());
    head.extend_from_slice(b"\r\n");
    for field in parsed.headers.iter() {
        let name = field.name.as_bytes();
        let dropped = http1::is_hop_by_hop(name)
            || name.eq_ignore_ascii_case(b"content-length")
            || named.iter().any(|hop| hop.eq_ignore_ascii_case(name));
        if !dropped {
            push_header(&mut head, name, field.value);
        }
    }
    if let (true, Some(protocol)) = (switching, upgrade) {
        // The upgrade is this hop's, so its fields are restated for the client.
        push_header(&mut head, b"connection", b"upgrade");
        push_header(&mut head, b"upgrade", protocol);
    }
    Ok(ResponseHead {
        head,
        framing,
        length,
        backend_keep_alive,
        informational,
        switching,
    })
}

pub(super) fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Reads the backend's final response head, writing any `1xx` heads before it to `client`.
/// `Ok(None)`: the backend closed the connection before sending anything.
pub(super) async fn read_final_head(
    backend: &mut (impl AsyncRead + Unpin),
    buffer: &mut BytesMut,
    client: &mut (impl AsyncWrite + Unpin),
    asked: Asked<'_>,
) -> io::Result<Option<ResponseHead>> {
    loop {
        let Some(response) = read_response_head(backend, buffer, asked).await? else {
            return Ok(None);
        };
        if !response.informational {
            return Ok(Some(response));
        }
        let mut head = response.head;
        head.extend_from_slice(b"\r\n");
        client.write_all(&head).await?;
    }
}

/// Reads the backend's next response head. `Ok(None)`: the backend closed the connection
/// before sending anything.
async fn read_response_head(
    stream: &mut (impl AsyncRead + Unpin),
    buffer: &mut BytesMut,
    asked: Asked<'_>,
) -> io::Result<Option<ResponseHead>> {
    loop {
        if !buffer.is_empty() {
            let mut fields = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
            let mut parsed = httparse::Response::new(&mut fields);
            match parsed.parse(buffer) {
                Ok(httparse::Status::Complete(length)) => {
                    let head = response_head(&parsed, asked)?;
                    buffer.advance(length);
                    return Ok(Some(head));
                }
                Ok(httparse::Status::Partial) if buffer.len() < MAX_RESPONSE_HEAD => {}
                Ok(httparse::Status::Partial) => {
                    return Err(invalid("response head from the backend too long"));
                }
                Err(_) => return Err(invalid("the backend's answer is not HTTP/1.x")),
            }
        }
        buffer.reserve(BUFFER);
        if stream.read_buf(buffer).await? == 0 {
            return if buffer.is_empty() {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAIN: Asked<'static> = Asked {
        head: false,
        upgrade: None,
    };

    fn parse_response(raw: &[u8], asked: Asked<'_>) -> io::Result<ResponseHead> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
        let mut parsed = httparse::Response::new(&mut headers);
        assert!(parsed.parse(raw).unwrap().is_complete());
        response_head(&parsed, asked)
    }

    fn finished(raw: &[u8], asked: Asked<'_>, keep_alive: bool) -> String {
        let mut head = parse_response(raw, asked).unwrap();
        head.finish(keep_alive);
        String::from_utf8(head.head).unwrap()
    }

    #[test]
    fn response_heads_lose_hop_by_hop_fields_and_state_the_framing_the_relay_decided() {
        let head = parse_response(
            b"HTTP/1.1 200 OK\r\nConnection: X-Hop, keep-alive\r\nX-Hop: 1\r\nKeep-Alive: 5\r\n\
              Proxy-Authenticate: Basic\r\nX-End: 1\r\nContent-Length: 12\r\n\r\n",
            PLAIN,
        )
        .unwrap();
        assert!(matches!(head.framing, Framing::Length(12)));
        assert!(head.backend_keep_alive);
        assert_eq!(
            finished(
                b"HTTP/1.1 200 OK\r\nConnection: X-Hop\r\nX-Hop: 1\r\nX-End: 1\r\nContent-Length: 12\r\n\r\n",
                PLAIN,
                true
            ),
            "HTTP/1.1 200 OK\r\nX-End: 1\r\ncontent-length: 12\r\n\r\n"
        );
        // `Connection` cannot take the framing away: it is restated.
        assert_eq!(
            finished(
                b"HTTP/1.1 200 OK\r\nConnection: Content-Length, Transfer-Encoding\r\nContent-Length: 5\r\n\r\n",
                PLAIN,
                true
            ),
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"
        );
        // Both: chunked wins, the length goes.
        assert_eq!(
            finished(
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                PLAIN,
                false
            ),
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        );
        let closing = parse_response(b"HTTP/1.0 200 OK\r\n\r\n", PLAIN).unwrap();
        assert!(matches!(closing.framing, Framing::UntilClose));
        assert!(!closing.backend_keep_alive);
        let close = parse_response(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            PLAIN,
        );
        assert!(!close.unwrap().backend_keep_alive);
        assert!(
            parse_response(b"HTTP/1.1 103 Early Hints\r\n\r\n", PLAIN)
                .unwrap()
                .informational
        );
    }

    #[test]
    fn no_body_follows_a_head_204_or_304_answer_but_the_length_a_get_would_have_is_kept() {
        let head = Asked {
            head: true,
            upgrade: None,
        };
        let to_head =
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", head).unwrap();
        assert!(matches!(to_head.framing, Framing::Length(0)));
        assert_eq!(
            finished(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", head, true),
            "HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n"
        );
        assert_eq!(
            finished(
                b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
                PLAIN,
                true
            ),
            "HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n"
        );
        assert_eq!(
            finished(
                b"HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n",
                PLAIN,
                true
            ),
            "HTTP/1.1 204 No Content\r\n\r\n"
        );
    }

    #[test]
    fn a_101_is_passed_on_only_for_the_upgrade_that_was_forwarded() {
        let websocket = Asked {
            head: false,
            upgrade: Some(b"websocket"),
        };
        let switching = parse_response(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: WebSocket\r\nConnection: Upgrade\r\nX: 1\r\n\r\n",
            websocket,
        )
        .unwrap();
        assert!(switching.switching && !switching.informational);
        assert_eq!(
            String::from_utf8(switching.head).unwrap(),
            "HTTP/1.1 101 Switching Protocols\r\nX: 1\r\nconnection: upgrade\r\nupgrade: WebSocket\r\n"
        );
        for (raw, asked) in [
            (
                &b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"[..],
                PLAIN,
            ),
            (
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n",
                websocket,
            ),
            (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", websocket),
        ] {
            assert!(
                parse_response(raw, asked).is_err(),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn responses_with_framing_the_relay_cannot_state_truthfully_are_refused() {
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 9007199254740992\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert!(
                parse_response(bad, PLAIN).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // The same length twice is one length.
        let twice = parse_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n",
            PLAIN,
        );
        assert!(matches!(twice.unwrap().framing, Framing::Length(2)));
    }
}
