//! The HTTP/1 rules both of the proxy's paths follow, the relay ([`crate::relay`]) and hyper
//! ([`crate::proxy`]): which fields are hop-by-hop, which a `Connection` header may remove,
//! which names are dropped as aliases, what a `Content-Length` may be, what is gRPC.
//!
//! The smuggling rules, each with the tests that pin it: in `sidecar/tests/it/security.rs`
//! (a raw client through the real proxy to a recording raw backend), in
//! `relay::tests` (the connection loop over in-memory pipes), and beside each rule's code.
//!
//! 1. **The backend parses exactly the requests the guard checked.** The proxy never copies
//!    framing: it drops `Content-Length` and `Transfer-Encoding` as received and states the
//!    framing of what it sends itself, on requests and responses. A `Connection` header
//!    cannot remove `Content-Length`, `Transfer-Encoding`, `Host` or the token header
//!    ([`END_TO_END`]); such names in `Connection` are ignored, not refused. Ambiguous framing
//!    is refused with `400` before the guard sees it (`relay::request`). Tests:
//!    `a_connection_field_naming_end_to_end_fields_is_ignored`,
//!    `request_framing_and_head_syntax_are_strict`,
//!    `a_rejected_request_in_a_pipeline_lets_nothing_through`,
//!    `generated_request_streams_smuggle_nothing_past_the_guard`;
//!    `relay::tests::connection_naming_content_length_smuggles_nothing_the_backend_gets_the_framing_we_state`.
//! 2. **A header name with `_` is dropped** ([`is_alias`]), as nginx does by default
//!    (`underscores_in_headers off`): CGI-style backends read `Content_Length` or
//!    `Conneqt_Instant_Access_Token` as the real thing. Forward-auth, which cannot drop a
//!    header from what the proxy forwards, refuses a token alias ([`aliases_token`]). Tests:
//!    `header_names_with_underscores_are_not_forwarded`,
//!    `over_h2c_underscore_names_and_missing_tokens_are_handled_the_same`;
//!    `sidecar/tests/it/forward_auth.rs` `unusable_x_forwarded_headers_get_400_without_asking_the_upstream`.
//! 3. **The token header the backend sees is the verified one**: exactly one in the head (the
//!    guard refuses two), none in request trailers ([`clean_request_trailers`]), none at all
//!    with `--strip-token-header`. Tests: `the_token_the_backend_sees_is_the_one_verified`,
//!    `with_strip_token_header_the_backend_sees_no_token_at_all`.
//! 4. **A `101` is relayed only for the WebSocket upgrade the proxy forwarded**, with the same
//!    protocol in `Upgrade`; anything else is `502`, and any other `Upgrade` is dropped from
//!    the request. Tests: `only_websocket_upgrades_become_tunnels`;
//!    `relay::tests::a_101_for_another_protocol_than_the_one_asked_is_502_and_nothing_of_it_is_relayed`.
//! 5. **A response with both `Content-Length` and `Transfer-Encoding` is relayed chunked**,
//!    without the length; a transfer coding other than `chunked` alone is refused with `502`,
//!    never relabelled. Test: `backend_responses_with_bad_framing_are_refused_never_relabelled`.
//! 6. **Numbers are bounded**: a `Content-Length` is one field of at most
//!    [`MAX_CONTENT_LENGTH`] in plain digits, or the request is `400` and the response `502`
//!    ([`content_length`]); so is a backend's chunk size. Tests: the `Content-Length` cases of
//!    `request_framing_and_head_syntax_are_strict` and of
//!    `backend_responses_with_bad_framing_are_refused_never_relabelled`.
//! 7. **`CONNECT` is `405`**, and a head over 64 KiB or 100 fields `431`. Tests:
//!    `connect_is_405_and_reaches_nobody`, `oversized_request_heads_are_refused`.
//!
//! The skip rules' ambiguous paths are the library's (`src/skip.rs`; through the proxy:
//! `ambiguous_paths_under_a_skipped_prefix_need_a_token`), and the timeouts are
//! [`crate::proxy::Timeouts`] (`relay::tests`, and `sidecar/tests/it/relay.rs` for the hyper
//! path).

use http::header::{self, HeaderMap, HeaderName};

/// The largest `Content-Length` the proxy carries: 2^53 − 1, the largest integer every
/// backend's number type reads exactly (JavaScript's included).
pub(crate) const MAX_CONTENT_LENGTH: u64 = (1 << 53) - 1;

/// Fields that describe one connection (RFC 9110 §7.6.1), never passed on in either
/// direction, plus the proxy credentials meant for us; `TE` too, unless it is exactly
/// `trailers` (see [`remove_hop_by_hop`]). The framing is restated by whoever writes the
/// message.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

/// The token header, as the guard reads it.
pub(crate) const TOKEN_HEADER: HeaderName = HeaderName::from_static("conneqt-instant-access-token");

/// Fields a `Connection` header can never remove: the framing, `Host`, and the token.
const END_TO_END: [HeaderName; 4] = [
    header::CONTENT_LENGTH,
    header::TRANSFER_ENCODING,
    header::HOST,
    TOKEN_HEADER,
];

fn listed(names: &[HeaderName], name: &[u8]) -> bool {
    names
        .iter()
        .any(|listed| listed.as_str().as_bytes().eq_ignore_ascii_case(name))
}

/// Whether `name` (any case) is hop-by-hop: in [`HOP_BY_HOP`], or `TE`.
pub(crate) fn is_hop_by_hop(name: &[u8]) -> bool {
    listed(&HOP_BY_HOP, name) || name.eq_ignore_ascii_case(b"te")
}

/// The field names a `Connection` value lists that must be dropped with it: all of them but
/// [`END_TO_END`] and `TE` (handled by [`remove_hop_by_hop`]).
pub(crate) fn named_by_connection(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|name| {
            !name.is_empty() && !name.eq_ignore_ascii_case(b"te") && !listed(&END_TO_END, name)
        })
}

/// Whether a comma-separated value lists `token` (any case).
pub(crate) fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|item| item.trim_ascii().eq_ignore_ascii_case(token))
}

/// Whether `name` has an `_`: such fields are dropped, never forwarded (rule 2).
pub(crate) fn is_alias(name: &[u8]) -> bool {
    name.contains(&b'_')
}

/// Whether `name` is the token header spelt with `_` for some `-` (any case): what a
/// CGI-style backend reads as the token itself.
pub(crate) fn aliases_token(name: &[u8]) -> bool {
    let header = TOKEN_HEADER;
    let token = header.as_str().as_bytes();
    is_alias(name)
        && name.len() == token.len()
        && name
            .iter()
            .zip(token)
            .all(|(&b, &t)| b.eq_ignore_ascii_case(&t) || (b == b'_' && t == b'-'))
}

/// A `Content-Length` value: ASCII digits only (no sign, space or list), at most
/// [`MAX_CONTENT_LENGTH`]. `None` for anything else.
pub(crate) fn content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 16 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let length = value
        .iter()
        .fold(0_u64, |n, digit| n * 10 + u64::from(digit - b'0'));
    (length <= MAX_CONTENT_LENGTH).then_some(length)
}

/// Whether a `Transfer-Encoding` value is exactly `chunked` (any case, optional spaces
/// around it): the one transfer coding the proxy carries.
pub(crate) fn is_chunked_only(value: &[u8]) -> bool {
    value.trim_ascii().eq_ignore_ascii_case(b"chunked")
}

/// Whether the request is gRPC (which needs HTTP/2 to the backend).
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Removes hop-by-hop fields: [`HOP_BY_HOP`], those `Connection` names (but never
/// [`END_TO_END`] ones), and `TE` unless it is exactly `trailers` (which gRPC needs end to
/// end).
pub(crate) fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|value| named_by_connection(value.as_bytes()))
        .filter_map(|name| HeaderName::from_bytes(name).ok())
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

/// Removes every field whose name has an `_` (rule 2). Costs one scan of the names, and
/// nothing more when there is none (the usual case).
pub(crate) fn remove_aliases(headers: &mut HeaderMap) {
    if !headers
        .keys()
        .any(|name| is_alias(name.as_str().as_bytes()))
    {
        return;
    }
    let aliases: Vec<HeaderName> = headers
        .keys()
        .filter(|name| is_alias(name.as_str().as_bytes()))
        .cloned()
        .collect();
    for name in aliases {
        headers.remove(name);
    }
}

/// Request trailers as the backend may see them: no token header (the verified one is in
/// the head), no aliases, nothing hop-by-hop, no framing, no `Host` (rule 3).
pub(crate) fn clean_request_trailers(trailers: &mut HeaderMap) {
    remove_aliases(trailers);
    remove_hop_by_hop(trailers);
    for name in &END_TO_END {
        trailers.remove(name);
    }
    trailers.remove(header::TE);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use http::HeaderValue;

    /// A header map of `pairs`, in order.
    pub(crate) fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn names(map: &HeaderMap) -> Vec<&str> {
        let mut names: Vec<&str> = map.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        names
    }

    #[test]
    fn hop_by_hop_fields_and_those_connection_names_are_removed_but_never_end_to_end_ones() {
        let mut map = headers(&[
            (
                "connection",
                "keep-alive, X-Hop, Content-Length, HOST, conneqt-instant-access-token",
            ),
            ("connection", "transfer-encoding"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic eA=="),
            ("proxy-authenticate", "Basic"),
            ("te", "gzip"),
            ("content-length", "3"),
            ("host", "a"),
            ("conneqt-instant-access-token", "t"),
            ("x-end-to-end", "kept"),
        ]);
        remove_hop_by_hop(&mut map);
        assert_eq!(
            names(&map),
            [
                "conneqt-instant-access-token",
                "content-length",
                "host",
                "x-end-to-end"
            ]
        );
    }

    #[test]
    fn te_trailers_is_kept_for_grpc_even_when_connection_names_it() {
        let mut map = headers(&[("te", "trailers"), ("connection", "te")]);
        remove_hop_by_hop(&mut map);
        assert_eq!(map.get("te").unwrap(), "trailers");
    }

    #[test]
    fn names_with_underscores_are_aliases_and_dropped() {
        let mut map = headers(&[
            ("conneqt_instant_access_token", "t"),
            ("content_length", "3"),
            ("transfer_encoding", "chunked"),
            ("x-fine", "1"),
        ]);
        remove_aliases(&mut map);
        assert_eq!(names(&map), ["x-fine"]);
        assert!(aliases_token(b"Conneqt_Instant_Access_Token"));
        assert!(aliases_token(b"conneqt-instant_access-token"));
        assert!(!aliases_token(b"conneqt-instant-access-token"));
        assert!(!aliases_token(b"content_length"));
    }

    #[test]
    fn request_trailers_lose_the_token_framing_and_aliases() {
        let mut map = headers(&[
            ("conneqt-instant-access-token", "other"),
            ("conneqt_instant_access_token", "other"),
            ("content-length", "1"),
            ("host", "evil"),
            ("x-checksum", "abc"),
        ]);
        clean_request_trailers(&mut map);
        assert_eq!(names(&map), ["x-checksum"]);
    }

    #[test]
    fn content_length_is_plain_digits_up_to_2_pow_53_minus_1() {
        assert_eq!(content_length(b"0"), Some(0));
        assert_eq!(content_length(b"1234"), Some(1234));
        assert_eq!(content_length(b"007"), Some(7));
        assert_eq!(
            content_length(b"9007199254740991"),
            Some(MAX_CONTENT_LENGTH)
        );
        for bad in [
            &b""[..],
            b"+1",
            b"-1",
            b" 1",
            b"1 ",
            b"0x1",
            b"5, 5",
            b"9007199254740992",
            b"99999999999999999999",
        ] {
            assert_eq!(
                content_length(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn only_chunked_alone_is_a_transfer_coding_we_carry() {
        for good in [&b"chunked"[..], b"Chunked", b" chunked\t"] {
            assert!(is_chunked_only(good));
        }
        for bad in [
            &b"gzip, chunked"[..],
            b"chunked, identity",
            b"xchunked",
            b"identity",
            b"",
        ] {
            assert!(!is_chunked_only(bad), "{}", String::from_utf8_lossy(bad));
        }
    }
}
