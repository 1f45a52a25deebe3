//! Message bodies on the relay: where a response body ends (`Content-Length`, chunked or
//! the backend's close), checked as it passes, and relayed as it arrives.

use std::io;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::http1::MAX_CONTENT_LENGTH;

use super::{BUFFER, MAX_RESPONSE_HEAD, MAX_RESPONSE_HEADERS, invalid};

/// How a response body ends.
pub(super) enum Framing {
    /// After this many bytes.
    Length(u64),
    /// After the last chunk and the trailers.
    Chunked(Chunked),
    /// When the backend closes the connection.
    UntilClose,
}

/// Where a chunked body is.
#[derive(Clone, Copy)]
pub(super) enum Chunked {
    /// At a chunk-size line.
    Size,
    /// Inside a chunk's data, this much left.
    Data(u64),
    /// After a chunk's data: its CRLF, this many bytes of it seen.
    DataEnd(u8),
    /// After the last chunk: the trailer section.
    Trailers,
}

impl Framing {
    /// How many of `bytes` (the start of what is left of the body) belong to the body, and
    /// whether the body ends there.
    pub(super) fn scan(&mut self, bytes: &[u8]) -> io::Result<(usize, bool)> {
        match self {
            Framing::Length(left) => {
                let take = (*left).min(bytes.len() as u64);
                *left -= take;
                Ok((take as usize, *left == 0))
            }
            Framing::UntilClose => Ok((bytes.len(), false)),
            Framing::Chunked(state) => scan_chunked(state, bytes),
        }
    }
}

/// [`Framing::scan`] for a chunked body: walks chunk-size lines, data and trailers, checking
/// each, so the body is passed on as it is and its end is known.
fn scan_chunked(state: &mut Chunked, bytes: &[u8]) -> io::Result<(usize, bool)> {
    let mut at = 0;
    loop {
        let rest = &bytes[at..];
        match *state {
            Chunked::Size => match httparse::parse_chunk_size(rest) {
                Ok(httparse::Status::Complete((line, 0))) => {
                    at += line;
                    *state = Chunked::Trailers;
                }
                Ok(httparse::Status::Complete((_, size))) if size > MAX_CONTENT_LENGTH => {
                    return Err(invalid("a chunk size over 2^53 - 1 from the backend"));
                }
                Ok(httparse::Status::Complete((line, size))) => {
                    at += line;
                    *state = Chunked::Data(size);
                }
                Ok(httparse::Status::Partial) if rest.len() < 1024 => return Ok((at, false)),
                Ok(httparse::Status::Partial) | Err(_) => {
                    return Err(invalid("bad chunk size line from the backend"));
                }
            },
            Chunked::Data(left) => {
                let take = left.min(rest.len() as u64);
                at += take as usize;
                if take < left {
                    *state = Chunked::Data(left - take);
                    return Ok((at, false));
                }
                *state = Chunked::DataEnd(0);
            }
            Chunked::DataEnd(seen) => {
                let Some(&byte) = rest.first() else {
                    return Ok((at, false));
                };
                if byte != b"\r\n"[usize::from(seen)] {
                    return Err(invalid("chunk data not followed by CRLF"));
                }
                at += 1;
                *state = if seen == 0 {
                    Chunked::DataEnd(1)
                } else {
                    Chunked::Size
                };
            }
            Chunked::Trailers => {
                let mut fields = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
                return match httparse::parse_headers(rest, &mut fields) {
                    Ok(httparse::Status::Complete((length, _))) => Ok((at + length, true)),
                    Ok(httparse::Status::Partial) if rest.len() < MAX_RESPONSE_HEAD => {
                        Ok((at, false))
                    }
                    Ok(httparse::Status::Partial) | Err(_) => {
                        Err(invalid("bad trailer section from the backend"))
                    }
                };
            }
        }
    }
}

/// Writes `head`, then the body from `source` as it arrives, until `framing` says it ended.
/// The first write carries the head and the body bytes already read. A `source` that sends
/// nothing for `idle` is an error ([`io::ErrorKind::TimedOut`]).
pub(super) async fn relay_body(
    mut framing: Framing,
    source: &mut (impl AsyncRead + Unpin),
    buffer: &mut BytesMut,
    sink: &mut (impl AsyncWrite + Unpin),
    mut head: Vec<u8>,
    idle: Duration,
) -> io::Result<()> {
    loop {
        let (used, done) = framing.scan(buffer)?;
        if head.is_empty() {
            if used > 0 {
                sink.write_all(&buffer[..used]).await?;
            }
        } else {
            head.extend_from_slice(&buffer[..used]);
            sink.write_all(&head).await?;
            head = Vec::new();
        }
        buffer.advance(used);
        if done {
            return Ok(());
        }
        if read_within(idle, source, buffer).await? == 0 {
            return match framing {
                Framing::UntilClose => Ok(()),
                _ => Err(io::ErrorKind::UnexpectedEof.into()),
            };
        }
    }
}

/// Reads more into `buffer`, waiting at most `idle` for it. `Ok(0)`: the peer closed.
pub(super) async fn read_within(
    idle: Duration,
    source: &mut (impl AsyncRead + Unpin),
    buffer: &mut BytesMut,
) -> io::Result<usize> {
    buffer.reserve(BUFFER);
    match tokio::time::timeout(idle, source.read_buf(buffer)).await {
        Ok(read) => read,
        Err(_) => Err(io::ErrorKind::TimedOut.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scans `body` fed in pieces of `step` bytes, as reads would bring it.
    fn scan_in_pieces(body: &[u8], step: usize) -> io::Result<usize> {
        let mut framing = Framing::Chunked(Chunked::Size);
        let mut buffer = Vec::new();
        let mut passed = 0;
        for piece in body.chunks(step) {
            buffer.extend_from_slice(piece);
            let (used, done) = framing.scan(&buffer)?;
            buffer.drain(..used);
            passed += used;
            if done {
                return Ok(passed);
            }
        }
        Err(io::ErrorKind::UnexpectedEof.into())
    }

    #[test]
    fn chunked_bodies_end_after_the_last_chunk_and_trailers_whatever_the_reads() {
        let body =
            b"5;ext=1\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Trailer: 1\r\n\r\n";
        let mut with_more = body.to_vec();
        with_more.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        for step in [1, 2, 3, 7, body.len()] {
            assert_eq!(
                scan_in_pieces(&with_more, step).unwrap(),
                body.len(),
                "{step}"
            );
        }
        assert_eq!(scan_in_pieces(b"0\r\n\r\n", 1).unwrap(), 5);
        for bad in [
            &b"zz\r\n"[..],
            b"3\r\nabcX\r\n",
            b"3\r\nabc\r\n0\r\nbad trailer\r\n\r\n",
        ] {
            assert!(
                scan_in_pieces(bad, 1).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
