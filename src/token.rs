//! Step 1: find the access token in the request and check its form.
//!
//! Nothing here touches the network. A request whose token is missing or malformed is turned
//! away before the cache or the upstream are asked anything, so junk never costs an upstream
//! call. The raw token only ever lives in [`PresentedToken`] (and, once verified, in
//! [`VerifiedToken`](crate::VerifiedToken)); both print a fingerprint in `Debug`, never the value.

use std::fmt;
use std::sync::OnceLock;

use http::{HeaderMap, HeaderName, HeaderValue};

/// The header (HTTP) or metadata key (gRPC) that carries the token.
pub(crate) const TOKEN_HEADER: HeaderName = HeaderName::from_static("conneqt-instant-access-token");

/// The longest token accepted in opaque mode. UUIDs are 36 characters; anything far longer is
/// junk or an attack on our hashing and logging, and is refused before it costs anything.
pub(crate) const MAX_TOKEN_LEN: usize = 256;

/// Which tokens are well-formed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TokenFormat {
    /// A hyphenated UUID, as the vendor documents (`ea4f820e-f352-4515-af73-630220045ef0`),
    /// in either case.
    Uuid,
    /// Any non-empty run of visible ASCII up to [`MAX_TOKEN_LEN`] bytes.
    Opaque,
}

/// Why a request's token was refused before verification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TokenProblem {
    Missing,
    Duplicated,
    Empty,
    TooLong,
    InvalidCharacters,
    NotUuid,
}

impl TokenProblem {
    /// The reason given to the client. It never quotes the token.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Self::Missing => "The Conneqt-Instant-Access-Token header is required.",
            Self::Duplicated => "The Conneqt-Instant-Access-Token header must appear exactly once.",
            Self::Empty => "The access token is empty.",
            Self::TooLong => "The access token is longer than 256 characters.",
            Self::InvalidCharacters => {
                "The access token may contain only visible ASCII characters (no spaces or control characters)."
            }
            Self::NotUuid => {
                "The access token must be a UUID such as 123e4567-e89b-12d3-a456-426614174000."
            }
        }
    }
}

/// Finds exactly one token in `headers`, checks its form, and, once it is taken, conceals the
/// header as [`conceal`] does (stripped when `strip`, else marked sensitive), all in one
/// lookup of the header map: this runs on every guarded request.
pub(crate) fn extract(
    headers: &mut HeaderMap,
    format: TokenFormat,
    strip: bool,
) -> Result<HeaderValue, TokenProblem> {
    let http::header::Entry::Occupied(mut entry) = headers.entry(TOKEN_HEADER) else {
        return Err(TokenProblem::Missing);
    };
    if entry.iter().nth(1).is_some() {
        return Err(TokenProblem::Duplicated);
    }
    check_form(entry.get().as_bytes(), format)?;
    let mut value = entry.get().clone();
    value.set_sensitive(true);
    if strip {
        entry.remove();
    } else {
        entry.get_mut().set_sensitive(true);
    }
    Ok(value)
}

/// Keeps the token header from whatever runs further in: removes it when `strip` is set
/// ([`strip_token_header`](crate::AccessTokenLayerBuilder::strip_token_header); the value
/// already lives in [`PresentedToken`] by then), otherwise marks every value sensitive so
/// tracing and logging layers do not print it.
pub(crate) fn conceal(headers: &mut HeaderMap, strip: bool) {
    if strip {
        headers.remove(TOKEN_HEADER);
    } else if let http::header::Entry::Occupied(mut entry) = headers.entry(TOKEN_HEADER) {
        entry.iter_mut().for_each(|value| value.set_sensitive(true));
    }
}

/// The syntax rules, as a pure function.
pub(crate) fn check_form(token: &[u8], format: TokenFormat) -> Result<(), TokenProblem> {
    if token.is_empty() {
        return Err(TokenProblem::Empty);
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenProblem::TooLong);
    }
    if !token.iter().all(u8::is_ascii_graphic) {
        return Err(TokenProblem::InvalidCharacters);
    }
    if format == TokenFormat::Uuid && !is_hyphenated_uuid(token) {
        return Err(TokenProblem::NotUuid);
    }
    Ok(())
}

/// `8-4-4-4-12` hex digits. Written out rather than parsed with `uuid`, which also accepts
/// the braced, URN and un-hyphenated forms that the vendor never issues.
fn is_hyphenated_uuid(token: &[u8]) -> bool {
    token.len() == 36
        && token.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// A token as the client presented it, syntax-checked but not yet verified.
///
/// Holds the raw value (the upstream needs it) and its keyed hash (the cache key).
#[derive(Clone)]
pub(crate) struct PresentedToken {
    value: HeaderValue,
    hash: TokenHash,
}

impl PresentedToken {
    pub(crate) fn new(value: HeaderValue, hasher: &TokenHasher) -> Self {
        let hash = hasher.hash(value.as_bytes());
        Self { value, hash }
    }

    pub(crate) fn header_value(&self) -> &HeaderValue {
        &self.value
    }

    pub(crate) fn hash(&self) -> TokenHash {
        self.hash
    }

    pub(crate) fn into_value(self) -> HeaderValue {
        self.value
    }
}

impl fmt::Debug for PresentedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PresentedToken")
            .field("fingerprint", &self.hash.fingerprint())
            .finish_non_exhaustive()
    }
}

/// The keyed BLAKE3 hash of a token: what the cache is keyed on, so the raw token is never
/// stored there and a memory dump cannot be matched against a list of tokens.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct TokenHash([u8; 32]);

/// Feeds a hash table 64 bits of the (already uniformly random) keyed hash; see
/// [`crate::cache`]'s pass-through hasher.
impl std::hash::Hash for TokenHash {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let [a, b, c, d, e, f, g, h, ..] = self.0;
        state.write_u64(u64::from_le_bytes([a, b, c, d, e, f, g, h]));
    }
}

impl TokenHash {
    pub(crate) fn fingerprint(&self) -> Fingerprint {
        let [a, b, c, d, ..] = self.0;
        Fingerprint(u32::from_be_bytes([a, b, c, d]))
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash({})", self.fingerprint())
    }
}

/// A short, non-reversible label for a token, safe to log.
///
/// It is the first 32 bits of the token's keyed hash, printed as 8 hex digits. The hash key is
/// drawn at random once per process, so a fingerprint identifies a token within one process
/// (enough to follow one client through the logs) but cannot be computed from the token by
/// anyone else, nor compared across restarts or replicas.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(u32);

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08x}", self.0)
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// Hashes tokens with the process's secret key.
#[derive(Clone, Copy)]
pub(crate) struct TokenHasher {
    key: &'static [u8; 32],
}

static PROCESS_KEY: OnceLock<[u8; 32]> = OnceLock::new();

impl TokenHasher {
    /// The hasher with this process's key, drawing the 256-bit key from the operating
    /// system's random source the first time.
    pub(crate) fn for_process() -> Result<Self, getrandom::Error> {
        if let Some(key) = PROCESS_KEY.get() {
            return Ok(Self { key });
        }
        let mut fresh = [0u8; 32];
        getrandom::fill(&mut fresh)?;
        // If another thread won the race, its key is used and ours is dropped.
        Ok(Self {
            key: PROCESS_KEY.get_or_init(|| fresh),
        })
    }

    pub(crate) fn hash(&self, token: &[u8]) -> TokenHash {
        TokenHash(*blake3::keyed_hash(self.key, token).as_bytes())
    }
}

impl fmt::Debug for TokenHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenHasher { key: <redacted> }")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "ea4f820e-f352-4515-af73-630220045ef0";

    fn headers(values: &[&[u8]]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for v in values {
            map.append(TOKEN_HEADER, HeaderValue::from_bytes(v).unwrap());
        }
        map
    }

    #[test]
    fn one_uuid_token_is_extracted_and_marked_sensitive() {
        let value = extract(&mut headers(&[GOOD.as_bytes()]), TokenFormat::Uuid, false).unwrap();
        assert_eq!(value.as_bytes(), GOOD.as_bytes());
        assert!(value.is_sensitive());
    }

    #[test]
    fn concealing_strips_every_token_header_or_marks_each_sensitive() {
        let mut map = headers(&[GOOD.as_bytes(), b"second"]);
        map.insert("other", HeaderValue::from_static("kept"));
        conceal(&mut map, false);
        assert!(
            map.get_all(TOKEN_HEADER)
                .iter()
                .all(HeaderValue::is_sensitive)
        );
        assert_eq!(map.get_all(TOKEN_HEADER).iter().count(), 2);
        conceal(&mut map, true);
        assert!(!map.contains_key(TOKEN_HEADER));
        assert_eq!(map["other"], "kept");
        let mut empty = HeaderMap::new();
        conceal(&mut empty, false);
        assert!(empty.is_empty());
    }

    #[test]
    fn upper_case_uuid_is_accepted() {
        assert_eq!(
            check_form(GOOD.to_uppercase().as_bytes(), TokenFormat::Uuid),
            Ok(())
        );
    }

    #[test]
    fn missing_header_is_missing() {
        assert_eq!(
            extract(&mut HeaderMap::new(), TokenFormat::Uuid, false),
            Err(TokenProblem::Missing)
        );
    }

    #[test]
    fn two_headers_are_refused_even_when_both_are_good() {
        let mut map = headers(&[GOOD.as_bytes(), GOOD.as_bytes()]);
        assert_eq!(
            extract(&mut map, TokenFormat::Uuid, false),
            Err(TokenProblem::Duplicated)
        );
    }

    #[test]
    fn malformed_tokens_name_their_problem() {
        let cases: &[(&[u8], TokenProblem)] = &[
            (b"", TokenProblem::Empty),
            (&[b'a'; MAX_TOKEN_LEN + 1], TokenProblem::TooLong),
            (b"ea4f820e f352", TokenProblem::InvalidCharacters),
            (b"ea4f820e\tf352", TokenProblem::InvalidCharacters),
            (
                b"ea4f820e-f352-4515-af73-630220045ef\xc3\xa9",
                TokenProblem::InvalidCharacters,
            ),
            (b"not-a-uuid", TokenProblem::NotUuid),
            (b"ea4f820ef3524515af73630220045ef0", TokenProblem::NotUuid),
            (
                b"{ea4f820e-f352-4515-af73-630220045ef0}",
                TokenProblem::NotUuid,
            ),
            (
                b"ga4f820e-f352-4515-af73-630220045ef0",
                TokenProblem::NotUuid,
            ),
            (
                b"ea4f820e-f352-4515-af73-630220045ef0,",
                TokenProblem::NotUuid,
            ),
        ];
        for (token, problem) in cases {
            assert_eq!(
                check_form(token, TokenFormat::Uuid),
                Err(*problem),
                "{token:?}"
            );
        }
    }

    #[test]
    fn opaque_mode_accepts_visible_ascii_but_not_junk() {
        assert_eq!(check_form(b"abc.DEF_123~", TokenFormat::Opaque), Ok(()));
        assert_eq!(
            check_form(b"a b", TokenFormat::Opaque),
            Err(TokenProblem::InvalidCharacters)
        );
        assert_eq!(
            check_form(b"", TokenFormat::Opaque),
            Err(TokenProblem::Empty)
        );
    }

    #[test]
    fn no_reason_quotes_the_token() {
        for problem in [
            TokenProblem::Missing,
            TokenProblem::Duplicated,
            TokenProblem::Empty,
            TokenProblem::TooLong,
            TokenProblem::InvalidCharacters,
            TokenProblem::NotUuid,
        ] {
            assert!(!problem.reason().contains("ea4f820e-f352"));
        }
    }

    #[test]
    fn hashes_are_keyed_stable_within_the_process_and_distinct_per_token() {
        let hasher = TokenHasher::for_process().unwrap();
        let again = TokenHasher::for_process().unwrap();
        assert_eq!(hasher.hash(GOOD.as_bytes()), again.hash(GOOD.as_bytes()));
        assert_ne!(
            hasher.hash(GOOD.as_bytes()),
            hasher.hash(b"ea4f820e-f352-4515-af73-630220045ef1")
        );
        // Keyed: not the plain BLAKE3 of the token, which anyone could compute.
        assert_ne!(
            hasher.hash(GOOD.as_bytes()).0,
            *blake3::hash(GOOD.as_bytes()).as_bytes()
        );
    }

    #[test]
    fn debug_output_never_shows_the_token() {
        let hasher = TokenHasher::for_process().unwrap();
        let presented = PresentedToken::new(HeaderValue::from_static(GOOD), &hasher);
        let shown = format!("{presented:?} {hasher:?}");
        assert!(!shown.contains(GOOD), "{shown}");
        assert!(shown.contains(&presented.hash().fingerprint().to_string()));
    }
}
