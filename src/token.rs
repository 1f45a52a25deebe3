//! Step 1: find the access token in the request and check its form.
//!
//! Nothing here touches the network. A request whose token is missing or malformed is turned
//! away before the cache or the upstream are asked anything, so junk never costs an upstream
//! call. The raw token only ever lives in [`PresentedToken`] (and, once verified, in
//! [`VerifiedToken`](crate::VerifiedToken)); both print a fingerprint in `Debug`, never the value.
//!
//! # The cache key
//!
//! The cache is keyed on a [`TokenHash`]: a 128-bit keyed hash of the token under a secret
//! drawn at random once per process (or, for a verdict tier shared by replicas, derived from
//! their cluster key: [`TokenHasher::from_cluster_key`]), so the raw token is never a cache
//! key and a memory dump cannot be matched against a list of tokens. 128 bits is enough to treat equal keys as
//! equal tokens (two of a million tokens collide with a chance of about 2^-88, and the key is
//! secret, so collisions cannot be sought either).
//!
//! A hyphenated UUID, what the vendor issues, is checked and parsed in one pass over its 36
//! bytes into its 16 bytes plus a 32-bit mask of which hex digits were upper case (so
//! `ABC…` and `abc…` stay different tokens, as the bytes differ), and those 20 bytes are
//! hashed with SipHash-2-4-128: three message words, far cheaper than BLAKE3's setup and
//! finalisation. Any other token (opaque mode) is hashed whole with keyed BLAKE3, truncated to
//! 128 bits. Both functions are keyed PRFs under independent keys derived from the process
//! secret.

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

/// What [`take`] did with a request's token.
pub(crate) enum Taken<T> {
    /// `on_key` answered from the token's key alone (a cached verdict): the token stays where
    /// it was (concealed), nothing was copied.
    Answered(T),
    /// `on_key` had no answer: the token, for verifying.
    Presented(PresentedToken),
}

/// Finds exactly one token in `headers`, checks its form and computes its key, asks `on_key`
/// (with the header value and the key) whether it can answer at once, and conceals the header
/// as [`conceal`] does (stripped when `strip`, else marked sensitive), all in one lookup of
/// the header map: this runs on every guarded request. The value is only copied (or moved out
/// of the map, when stripping) when `on_key` has no answer.
pub(crate) fn take<T>(
    headers: &mut HeaderMap,
    format: TokenFormat,
    strip: bool,
    hasher: &TokenHasher,
    on_key: impl FnOnce(&HeaderValue, TokenHash) -> Option<T>,
) -> Result<Taken<T>, TokenProblem> {
    let http::header::Entry::Occupied(mut entry) = headers.entry(TOKEN_HEADER) else {
        return Err(TokenProblem::Missing);
    };
    if entry.iter().nth(1).is_some() {
        return Err(TokenProblem::Duplicated);
    }
    let hash = hasher.checked_hash(entry.get().as_bytes(), format)?;
    if let Some(answer) = on_key(entry.get(), hash) {
        if strip {
            entry.remove();
        } else {
            entry.get_mut().set_sensitive(true);
        }
        return Ok(Taken::Answered(answer));
    }
    let mut value = if strip {
        entry.remove()
    } else {
        entry.get_mut().set_sensitive(true);
        entry.get().clone()
    };
    value.set_sensitive(true);
    Ok(Taken::Presented(PresentedToken { value, hash }))
}

/// [`take`] without the early answer: the token, checked and concealed.
#[cfg(test)]
pub(crate) fn extract(
    headers: &mut HeaderMap,
    format: TokenFormat,
    strip: bool,
) -> Result<HeaderValue, TokenProblem> {
    let hasher = TokenHasher::for_process().expect("a random key");
    match take(headers, format, strip, &hasher, |_, _| None::<()>)? {
        Taken::Presented(presented) => Ok(presented.into_value()),
        Taken::Answered(()) => unreachable!("never answered"),
    }
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
#[cfg(test)]
pub(crate) fn check_form(token: &[u8], format: TokenFormat) -> Result<(), TokenProblem> {
    if format == TokenFormat::Uuid && parse_uuid(token).is_some() {
        return Ok(());
    }
    check_form_slowly(token, format)
}

/// The rules one by one, naming the first that fails: for tokens that are not a well-formed
/// UUID, which the one-pass [`parse_uuid`] accepts at once.
fn check_form_slowly(token: &[u8], format: TokenFormat) -> Result<(), TokenProblem> {
    if token.is_empty() {
        return Err(TokenProblem::Empty);
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenProblem::TooLong);
    }
    if !token.iter().all(u8::is_ascii_graphic) {
        return Err(TokenProblem::InvalidCharacters);
    }
    if format == TokenFormat::Uuid && parse_uuid(token).is_none() {
        return Err(TokenProblem::NotUuid);
    }
    Ok(())
}

/// A hyphenated UUID's 16 bytes, and which of its 32 hex digits were upper case (bit 31 for
/// the first digit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ParsedUuid {
    bytes: [u8; 16],
    upper: u32,
}

/// Where the 32 hex digits of `8-4-4-4-12` sit.
const DIGITS: [usize; 32] = [
    0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 14, 15, 16, 17, 19, 20, 21, 22, 24, 25, 26, 27, 28, 29,
    30, 31, 32, 33, 34, 35,
];

/// Per byte: its hex value, `| UPPER` for `A`-`F`, or `BAD` when it is not a hex digit.
const UPPER: u8 = 0x10;
const BAD: u8 = 0x80;
const HEX: [u8; 256] = {
    let mut table = [BAD; 256];
    let mut i = 0;
    while i < 10 {
        table[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        table[b'a' as usize + i] = 10 + i as u8;
        table[b'A' as usize + i] = (10 + i as u8) | UPPER;
        i += 1;
    }
    table
};

/// `8-4-4-4-12` hex digits, in either case, checked and decoded in one pass. Written out
/// rather than parsed with `uuid`, which also accepts the braced, URN and un-hyphenated forms
/// that the vendor never issues (and would lose the case).
fn parse_uuid(token: &[u8]) -> Option<ParsedUuid> {
    let token: &[u8; 36] = token.try_into().ok()?;
    if token[8] != b'-' || token[13] != b'-' || token[18] != b'-' || token[23] != b'-' {
        return None;
    }
    let mut bytes = [0u8; 16];
    let mut upper = 0u32;
    let mut seen = 0u8;
    for (i, byte) in bytes.iter_mut().enumerate() {
        let high = HEX[usize::from(token[DIGITS[2 * i]])];
        let low = HEX[usize::from(token[DIGITS[2 * i + 1]])];
        seen |= high | low;
        upper = (upper << 2) | u32::from((high & UPPER) >> 3) | u32::from((low & UPPER) >> 4);
        *byte = (high << 4) | (low & 0x0f);
    }
    (seen & BAD == 0).then_some(ParsedUuid { bytes, upper })
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
    #[cfg(test)]
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

/// The 128-bit keyed hash of a token (see the [module documentation](self)): what the cache is
/// keyed on, so the raw token is never stored there and a memory dump cannot be matched
/// against a list of tokens.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct TokenHash([u64; 2]);

/// Feeds a hash table the first 64 bits of the (already uniformly random) keyed hash; see
/// [`crate::cache`]'s pass-through hasher.
impl std::hash::Hash for TokenHash {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.0[0]);
    }
}

impl TokenHash {
    pub(crate) fn fingerprint(&self) -> Fingerprint {
        Fingerprint((self.0[1] >> 32) as u32)
    }

    /// Bits independent of those [`Hash`](std::hash::Hash) feeds a table, for choosing a shard.
    pub(crate) fn shard_bits(&self) -> u64 {
        self.0[1]
    }

    /// The hash as 32 lowercase hex digits (what the shared tier's keys and messages carry).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn to_hex(self) -> String {
        format!("{:016x}{:016x}", self.0[0], self.0[1])
    }

    /// The hash [`to_hex`](Self::to_hex) wrote: exactly 32 lowercase hex digits, else `None`.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn from_hex(hex: &str) -> Option<Self> {
        if hex.len() != 32 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        let word = |part: &str| u64::from_str_radix(part, 16).ok();
        Some(Self([word(&hex[..16])?, word(&hex[16..])?]))
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
/// anyone else, nor compared across restarts or replicas. (With a verdict tier shared by
/// replicas, the key is derived from the cluster key instead: then fingerprints agree across
/// the replicas and restarts of one cluster, and still cannot be computed without its key.)
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

/// Hashes tokens with the process's secret keys, or with keys derived from a secret shared
/// by a cluster of replicas ([`from_cluster_key`](Self::from_cluster_key)).
///
/// The keys are held inline (48 bytes, `Copy`): the hasher lives in the layer's shared state,
/// so a hash reads its key from there, with no pointer to follow to a static.
#[derive(Clone, Copy)]
pub(crate) struct TokenHasher {
    keys: HashKeys,
}

/// A BLAKE3 key and a SipHash key (independent, so the two functions never share key material).
#[derive(Clone, Copy)]
struct HashKeys {
    blake3: [u8; 32],
    sip: [u64; 2],
}

impl HashKeys {
    /// The SipHash key derived from `secret` under `context`.
    fn sip_from(context: &str, secret: &[u8]) -> [u64; 2] {
        let derived = blake3::derive_key(context, secret);
        let word = |i: usize| {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&derived[i * 8..i * 8 + 8]);
            u64::from_le_bytes(bytes)
        };
        [word(0), word(1)]
    }
}

static PROCESS_KEYS: OnceLock<HashKeys> = OnceLock::new();

impl TokenHasher {
    /// The hasher with this process's keys, drawing the 256-bit secret from the operating
    /// system's random source the first time.
    pub(crate) fn for_process() -> Result<Self, getrandom::Error> {
        if let Some(keys) = PROCESS_KEYS.get() {
            return Ok(Self { keys: *keys });
        }
        let mut fresh = [0u8; 32];
        getrandom::fill(&mut fresh)?;
        let keys = HashKeys {
            blake3: fresh,
            sip: HashKeys::sip_from("conneqt-guard 2025 token siphash key", &fresh),
        };
        // If another thread won the race, its keys are used and ours are dropped.
        Ok(Self {
            keys: *PROCESS_KEYS.get_or_init(|| keys),
        })
    }

    /// The hasher every replica holding `secret` (the cluster key) computes alike, so that
    /// replicas sharing verdicts agree on a token's [`TokenHash`] and can name it to each
    /// other. Both keys are derived from `secret` with BLAKE3's `derive_key` under contexts of
    /// their own (and apart from the process hasher's), so a hash is still a keyed PRF: a dump
    /// of the shared tier cannot be matched against a list of tokens without the secret.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn from_cluster_key(secret: &[u8]) -> Self {
        Self {
            keys: HashKeys {
                blake3: blake3::derive_key("conneqt-guard 2026 cluster token blake3 key", secret),
                sip: HashKeys::sip_from("conneqt-guard 2026 cluster token siphash key", secret),
            },
        }
    }

    /// The key of any token, well-formed or not (as [`AccessTokenLayer::invalidate`]
    /// (crate::AccessTokenLayer::invalidate) is handed it): the same key [`take`] computes.
    pub(crate) fn hash(&self, token: &[u8]) -> TokenHash {
        match parse_uuid(token) {
            Some(uuid) => self.hash_uuid(uuid),
            None => self.hash_opaque(token),
        }
    }

    /// Checks the form and computes the key, in one pass over a UUID.
    fn checked_hash(&self, token: &[u8], format: TokenFormat) -> Result<TokenHash, TokenProblem> {
        if let Some(uuid) = parse_uuid(token) {
            return Ok(self.hash_uuid(uuid));
        }
        check_form_slowly(token, format)?;
        Ok(self.hash_opaque(token))
    }

    fn hash_uuid(&self, uuid: ParsedUuid) -> TokenHash {
        let [a, b] = [&uuid.bytes[..8], &uuid.bytes[8..]].map(|half| {
            let mut word = [0u8; 8];
            word.copy_from_slice(half);
            u64::from_le_bytes(word)
        });
        // The 20-byte message `bytes || upper (little-endian)`: its last block is the 4-byte
        // tail and the length, as SipHash pads it.
        let last = u64::from(uuid.upper) | (20 << 56);
        TokenHash(siphash_2_4_128(self.keys.sip, &[a, b], last))
    }

    fn hash_opaque(&self, token: &[u8]) -> TokenHash {
        let hash = blake3::keyed_hash(&self.keys.blake3, token);
        let bytes = hash.as_bytes();
        let word = |i: usize| {
            let mut word = [0u8; 8];
            word.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            u64::from_le_bytes(word)
        };
        TokenHash([word(0), word(1)])
    }
}

/// SipHash-2-4 with 128-bit output (Aumasson and Bernstein's reference `siphash.c` with
/// `cROUNDS = 2, dROUNDS = 4` and a 16-byte output), over a message given as its whole
/// little-endian 64-bit words and its last block (the tail bytes, with the message length
/// modulo 256 in the top byte).
fn siphash_2_4_128(key: [u64; 2], words: &[u64], last: u64) -> [u64; 2] {
    #[inline(always)]
    fn round(v: &mut [u64; 4]) {
        v[0] = v[0].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(13) ^ v[0];
        v[0] = v[0].rotate_left(32);
        v[2] = v[2].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(16) ^ v[2];
        v[0] = v[0].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(21) ^ v[0];
        v[2] = v[2].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(17) ^ v[2];
        v[2] = v[2].rotate_left(32);
    }
    let [k0, k1] = key;
    let mut v = [
        k0 ^ 0x736f_6d65_7073_6575,
        k1 ^ 0x646f_7261_6e64_6f6d ^ 0xee,
        k0 ^ 0x6c79_6765_6e65_7261,
        k1 ^ 0x7465_6462_7974_6573,
    ];
    for &m in words.iter().chain(std::iter::once(&last)) {
        v[3] ^= m;
        round(&mut v);
        round(&mut v);
        v[0] ^= m;
    }
    v[2] ^= 0xee;
    for _ in 0..4 {
        round(&mut v);
    }
    let first = v[0] ^ v[1] ^ v[2] ^ v[3];
    v[1] ^= 0xdd;
    for _ in 0..4 {
        round(&mut v);
    }
    [first, v[0] ^ v[1] ^ v[2] ^ v[3]]
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
        // Keyed: not the SipHash of the token under a known key, which anyone could compute.
        let parsed = parse_uuid(GOOD.as_bytes()).unwrap();
        let mut message = parsed.bytes.to_vec();
        message.extend_from_slice(&parsed.upper.to_le_bytes());
        assert_ne!(hasher.hash(GOOD.as_bytes()).0, sip_bytes([0, 0], &message));
        // Opaque tokens: keyed BLAKE3, not the plain one.
        let plain = blake3::hash(b"opaque-token");
        assert_ne!(
            hasher.hash(b"opaque-token").0[0].to_le_bytes(),
            plain.as_bytes()[..8]
        );
    }

    /// SipHash-2-4-128 of a byte string, through the word interface.
    fn sip_bytes(key: [u64; 2], message: &[u8]) -> [u64; 2] {
        let chunks = message.chunks_exact(8);
        let tail = chunks.remainder();
        let words: Vec<u64> = chunks
            .map(|chunk| u64::from_le_bytes(chunk.try_into().unwrap()))
            .collect();
        let mut last = (message.len() as u64 & 0xff) << 56;
        for (i, byte) in tail.iter().enumerate() {
            last |= u64::from(*byte) << (8 * i);
        }
        siphash_2_4_128(key, &words, last)
    }

    #[test]
    fn siphash_matches_the_reference_vectors() {
        // `vectors_sip128` of the reference implementation (github.com/veorq/SipHash):
        // key 00..0f, message 00..(len-1).
        let key = [0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908];
        let cases: [(usize, [u8; 16]); 4] = [
            (
                0,
                [
                    0xa3, 0x81, 0x7f, 0x04, 0xba, 0x25, 0xa8, 0xe6, 0x6d, 0xf6, 0x72, 0x14, 0xc7,
                    0x55, 0x02, 0x93,
                ],
            ),
            (
                1,
                [
                    0xda, 0x87, 0xc1, 0xd8, 0x6b, 0x99, 0xaf, 0x44, 0x34, 0x76, 0x59, 0x11, 0x9b,
                    0x22, 0xfc, 0x45,
                ],
            ),
            (
                15,
                [
                    0x54, 0x93, 0xe9, 0x99, 0x33, 0xb0, 0xa8, 0x11, 0x7e, 0x08, 0xec, 0x0f, 0x97,
                    0xcf, 0xc3, 0xd9,
                ],
            ),
            (
                20,
                [
                    0x9e, 0x25, 0xfc, 0x83, 0x3f, 0x22, 0x90, 0x73, 0x3e, 0x93, 0x44, 0xa5, 0xe8,
                    0x38, 0x39, 0xeb,
                ],
            ),
        ];
        for (len, expected) in cases {
            let message: Vec<u8> = (0..len as u8).collect();
            let [a, b] = sip_bytes(key, &message);
            let mut out = a.to_le_bytes().to_vec();
            out.extend_from_slice(&b.to_le_bytes());
            assert_eq!(out, expected, "length {len}");
        }
    }

    #[test]
    fn the_one_pass_parse_agrees_with_uuid_and_keeps_the_case() {
        let parsed = parse_uuid(GOOD.as_bytes()).unwrap();
        assert_eq!(
            parsed.bytes,
            *uuid::Uuid::parse_str(GOOD).unwrap().as_bytes()
        );
        assert_eq!(parsed.upper, 0);
        let upper = GOOD.to_uppercase();
        let parsed_upper = parse_uuid(upper.as_bytes()).unwrap();
        assert_eq!(parsed_upper.bytes, parsed.bytes);
        // One bit per letter digit: e a f e f a f e f (the hex letters of GOOD).
        let letters = GOOD.bytes().filter(u8::is_ascii_alphabetic).count();
        assert_eq!(parsed_upper.upper.count_ones() as usize, letters);
        // Case matters to the key, as the bytes differ.
        let hasher = TokenHasher::for_process().unwrap();
        assert_ne!(hasher.hash(GOOD.as_bytes()), hasher.hash(upper.as_bytes()));
        for bad in [
            "ea4f820e-f352-4515-af73-630220045efg",
            "ea4f820e-f352-4515-af73_630220045ef0",
            "ea4f820e-f352-4515-af7-3630220045ef0",
            "ea4f820e-f352-4515-af73-630220045ef",
            "ea4f820e-f352-4515-af73-630220045ef0 ",
        ] {
            assert_eq!(parse_uuid(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn take_answers_from_the_key_or_presents_the_token_and_conceals_it_either_way() {
        let hasher = TokenHasher::for_process().unwrap();
        for strip in [false, true] {
            let mut map = headers(&[GOOD.as_bytes()]);
            let taken = take(
                &mut map,
                TokenFormat::Uuid,
                strip,
                &hasher,
                |value, hash| {
                    assert_eq!(value.as_bytes(), GOOD.as_bytes());
                    (hash == hasher.hash(GOOD.as_bytes())).then_some(7)
                },
            );
            assert!(matches!(taken, Ok(Taken::Answered(7))));
            assert_eq!(map.contains_key(TOKEN_HEADER), !strip);
            assert!(
                map.get_all(TOKEN_HEADER)
                    .iter()
                    .all(HeaderValue::is_sensitive)
            );

            let mut map = headers(&[GOOD.as_bytes()]);
            let taken = take(
                &mut map,
                TokenFormat::Uuid,
                strip,
                &hasher,
                |_, _| None::<()>,
            );
            let Ok(Taken::Presented(presented)) = taken else {
                panic!("presented")
            };
            assert_eq!(presented.header_value().as_bytes(), GOOD.as_bytes());
            assert!(presented.header_value().is_sensitive());
            assert_eq!(presented.hash(), hasher.hash(GOOD.as_bytes()));
            assert_eq!(map.contains_key(TOKEN_HEADER), !strip);
        }
    }

    #[test]
    fn debug_output_never_shows_the_token() {
        let hasher = TokenHasher::for_process().unwrap();
        let presented = PresentedToken::new(HeaderValue::from_static(GOOD), &hasher);
        let shown = format!("{presented:?} {hasher:?}");
        assert!(!shown.contains(GOOD), "{shown}");
        assert!(shown.contains(&presented.hash().fingerprint().to_string()));
    }

    #[test]
    fn cluster_hashers_agree_on_one_secret_and_differ_across_secrets() {
        let opaque = b"not-a-uuid-token";
        let one = TokenHasher::from_cluster_key(b"cluster secret one");
        let again = TokenHasher::from_cluster_key(b"cluster secret one");
        let other = TokenHasher::from_cluster_key(b"cluster secret two");
        for token in [GOOD.as_bytes(), opaque] {
            assert!(
                one.hash(token) == again.hash(token),
                "same secret, same key"
            );
            assert!(
                one.hash(token) != other.hash(token),
                "other secret, other key"
            );
        }
        // The process hasher is unchanged: stable within the process, apart from any cluster.
        let process = TokenHasher::for_process().unwrap();
        assert!(
            process.hash(GOOD.as_bytes())
                == TokenHasher::for_process().unwrap().hash(GOOD.as_bytes())
        );
        assert!(process.hash(GOOD.as_bytes()) != one.hash(GOOD.as_bytes()));
    }

    #[test]
    fn token_hashes_round_trip_through_32_lowercase_hex_digits() {
        let hash = TokenHasher::from_cluster_key(b"k").hash(GOOD.as_bytes());
        let hex = hash.to_hex();
        assert_eq!(hex.len(), 32);
        assert!(
            hex.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "{hex}"
        );
        assert!(TokenHash::from_hex(&hex) == Some(hash));
        for bad in [
            "",
            "*",
            "0123456789ABCDEF0123456789abcdef",
            &hex[..31],
            &format!("{hex}0"),
            &format!("+{}", &hex[1..]),
            &format!("g{}", &hex[1..]),
        ] {
            assert!(TokenHash::from_hex(bad).is_none(), "{bad:?}");
        }
    }
}
