//! The table of settings: one row per setting, read by the setters' storage, `build()`'s
//! checks, `from_env`, the sidecar's flags and the docs-drift test.
//!
//! A row names the builder method and its `CONNEQT_*` variable, says what kind of value it
//! takes (with its range), gives the default as text in the one grammar of its kind, and a
//! one-line doc. [`Settings::default`] is the rows' defaults parsed by that grammar, so a
//! default is written once, here.

use std::fmt;
use std::time::Duration;

use crate::skip;

/// The values of every setting in the table, as the setters and `from_env` leave them.
#[derive(Clone, Default)]
pub(crate) struct Settings {
    pub(crate) base_url: Option<String>,
    pub(crate) api_key: Option<String>,
    pub(crate) verify_path: Option<String>,
    pub(crate) cache_ttl: Duration,
    pub(crate) gone_ttl: Duration,
    pub(crate) upstream_timeout: Duration,
    pub(crate) cache_capacity: u64,
    pub(crate) gone_capacity: u64,
    pub(crate) accept_opaque_tokens: bool,
    pub(crate) upstream_proxy: Option<String>,
    pub(crate) refresh_ahead: bool,
    pub(crate) refresh_ahead_share: f64,
    pub(crate) stale_if_error: Option<Duration>,
    pub(crate) max_concurrent_verifications: u64,
    pub(crate) upstream_retry: bool,
    pub(crate) circuit_breaker_threshold: u64,
    pub(crate) circuit_breaker_cool_down: Duration,
    pub(crate) skip_path_prefixes: Vec<String>,
    pub(crate) strip_token_header: bool,
    pub(crate) redis_url: Option<String>,
    pub(crate) cluster_key: Option<String>,
    pub(crate) redis_timeout: Duration,
    pub(crate) redis_lease: Duration,
}

impl Settings {
    /// Every row's default.
    pub(crate) fn with_defaults() -> Self {
        let mut settings = Self::default();
        for row in ROWS {
            if let Initial::Value(text) = row.initial {
                let value = row
                    .parse(text)
                    .unwrap_or_else(|problem| unreachable!("default of {}: {problem}", row.name));
                row.set(&mut settings, value);
            }
        }
        settings
    }
}

/// Secrets show only as `<redacted>`.
impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut copy = self.clone();
        let mut map = f.debug_struct("Settings");
        for row in ROWS {
            map.field(row.name, &Shown(row.show(&mut copy)));
        }
        map.finish()
    }
}

struct Shown(String);

impl fmt::Debug for Shown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One setting.
#[derive(Debug)]
pub(crate) struct Row {
    /// The builder method, e.g. `cache_ttl` (the sidecar's flag is `--cache-ttl`).
    pub(crate) name: &'static str,
    /// The environment variable, e.g. `CONNEQT_CACHE_TTL`.
    pub(crate) variable: &'static str,
    pub(crate) kind: Kind,
    pub(crate) initial: Initial,
    /// One line for `--help` and the docs.
    pub(crate) doc: &'static str,
    /// Where the value lives in [`Settings`].
    slot: fn(&mut Settings) -> Slot<'_>,
}

/// What a row's value is, with its range; each kind has one grammar.
#[derive(Debug)]
pub(crate) enum Kind {
    /// `30s`, `1m30s`, `1s500ms`, `500ms`, `2h`: see [`parse_duration`].
    Duration { min: Duration, max: Duration },
    /// A whole number, e.g. `100000`.
    Number { min: u64, max: u64 },
    /// `true`, `false`, `1` or `0`.
    Flag,
    /// A number strictly between 0 and 1, e.g. `0.8`.
    Share,
    /// Text checked by `check`; `secret` text is never quoted or shown.
    Text {
        check: fn(&str) -> Result<(), String>,
        secret: bool,
        /// The problem when it is unset, for a required setting.
        required: Option<&'static str>,
    },
    /// Comma-separated path prefixes, e.g. `/health,/metrics`.
    Prefixes,
}

/// A row's value before any setter: a default in its kind's grammar, or what unset means.
#[derive(Debug)]
pub(crate) enum Initial {
    Value(&'static str),
    Unset(&'static str),
}

/// A parsed value, ready to be stored.
#[derive(Clone, Debug)]
pub(crate) enum Value {
    Duration(Duration),
    Number(u64),
    Flag(bool),
    Share(f64),
    Text(String),
    Prefixes(Vec<String>),
}

enum Slot<'a> {
    Duration(&'a mut Duration),
    OptionalDuration(&'a mut Option<Duration>),
    Number(&'a mut u64),
    Flag(&'a mut bool),
    Share(&'a mut f64),
    Text(&'a mut Option<String>),
    Prefixes(&'a mut Vec<String>),
}

const MS: Duration = Duration::from_millis(1);
/// The longest a verdict may be trusted or remembered (7 days). Longer is almost certainly a
/// unit mistake.
const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 60 * 60);
const TTL: Kind = Kind::Duration {
    min: MS,
    max: MAX_TTL,
};
const CAPACITY: Kind = Kind::Number {
    min: 1,
    max: u64::MAX,
};

/// Every setting, in the order `build()` checks them.
pub(crate) const ROWS: &[Row] = &[
    Row {
        name: "base_url",
        variable: "CONNEQT_BASE_URL",
        kind: Kind::Text {
            check: super::check_base_url,
            secret: false,
            required: Some("is required (e.g. https://int.conneqt.health)"),
        },
        initial: Initial::Unset("required"),
        doc: "Conneqt's base URL, e.g. `https://int.conneqt.health`; `http`/`https`, no credentials, query or fragment; a path prefix is kept",
        slot: |s| Slot::Text(&mut s.base_url),
    },
    Row {
        name: "api_key",
        variable: "CONNEQT_API_KEY",
        kind: Kind::Text {
            check: super::check_api_key,
            secret: true,
            required: Some("is required"),
        },
        initial: Initial::Unset("required"),
        doc: "the key Quicksilva issued to your system, sent as `ApiKey`; never printed or logged",
        slot: |s| Slot::Text(&mut s.api_key),
    },
    Row {
        name: "verify_path",
        variable: "CONNEQT_VERIFY_PATH",
        kind: Kind::Text {
            check: super::check_path,
            secret: false,
            required: None,
        },
        initial: Initial::Value("/api/v1/messages/instant/access/token/verify"),
        doc: "the verify endpoint's path, appended to the base URL",
        slot: |s| Slot::Text(&mut s.verify_path),
    },
    Row {
        name: "cache_ttl",
        variable: "CONNEQT_CACHE_TTL",
        kind: TTL,
        initial: Initial::Value("30s"),
        doc: "how long a valid verdict is trusted; also the longest a revoked token goes on working",
        slot: |s| Slot::Duration(&mut s.cache_ttl),
    },
    Row {
        name: "gone_ttl",
        variable: "CONNEQT_GONE_TTL",
        kind: TTL,
        initial: Initial::Value("10m"),
        doc: "how long a revoked (`410`) verdict is remembered",
        slot: |s| Slot::Duration(&mut s.gone_ttl),
    },
    Row {
        name: "upstream_timeout",
        variable: "CONNEQT_UPSTREAM_TIMEOUT",
        kind: Kind::Duration {
            min: MS,
            max: Duration::from_secs(5 * 60),
        },
        initial: Initial::Value("2s"),
        doc: "the deadline for one whole upstream verify call: connect, send, read",
        slot: |s| Slot::Duration(&mut s.upstream_timeout),
    },
    Row {
        name: "cache_capacity",
        variable: "CONNEQT_CACHE_CAPACITY",
        kind: CAPACITY,
        initial: Initial::Value("100000"),
        doc: "valid tokens remembered at once",
        slot: |s| Slot::Number(&mut s.cache_capacity),
    },
    Row {
        name: "gone_capacity",
        variable: "CONNEQT_GONE_CAPACITY",
        kind: CAPACITY,
        initial: Initial::Value("100000"),
        doc: "revoked tokens remembered at once, apart from the valid ones",
        slot: |s| Slot::Number(&mut s.gone_capacity),
    },
    Row {
        name: "accept_opaque_tokens",
        variable: "CONNEQT_ACCEPT_OPAQUE_TOKENS",
        kind: Kind::Flag,
        initial: Initial::Value("false"),
        doc: "accept any 1-256 visible-ASCII token instead of only UUIDs",
        slot: |s| Slot::Flag(&mut s.accept_opaque_tokens),
    },
    Row {
        name: "upstream_proxy",
        variable: "CONNEQT_UPSTREAM_PROXY",
        kind: Kind::Text {
            check: super::check_proxy,
            secret: true,
            required: None,
        },
        initial: Initial::Unset("none"),
        doc: "an HTTP(S) proxy for upstream calls (`HTTP_PROXY` is ignored); may hold credentials, so never printed",
        slot: |s| Slot::Text(&mut s.upstream_proxy),
    },
    Row {
        name: "skip_path_prefix",
        variable: "CONNEQT_SKIP_PATH_PREFIXES",
        kind: Kind::Prefixes,
        initial: Initial::Unset("none"),
        doc: "requests whose path starts with it, on whole segments, pass unverified; repeat, or separate with commas",
        slot: |s| Slot::Prefixes(&mut s.skip_path_prefixes),
    },
    Row {
        name: "strip_token_header",
        variable: "CONNEQT_STRIP_TOKEN_HEADER",
        kind: Kind::Flag,
        initial: Initial::Value("false"),
        doc: "remove the token header before the inner service (the backend) sees the request",
        slot: |s| Slot::Flag(&mut s.strip_token_header),
    },
    Row {
        name: "refresh_ahead",
        variable: "CONNEQT_REFRESH_AHEAD",
        kind: Kind::Flag,
        initial: Initial::Value("true"),
        doc: "re-verify a used verdict in the background once older than `refresh_ahead_share` of `cache_ttl`",
        slot: |s| Slot::Flag(&mut s.refresh_ahead),
    },
    Row {
        name: "refresh_ahead_share",
        variable: "CONNEQT_REFRESH_AHEAD_SHARE",
        kind: Kind::Share,
        initial: Initial::Value("0.8"),
        doc: "when refresh-ahead starts, as a share of `cache_ttl` (0 < share < 1)",
        slot: |s| Slot::Share(&mut s.refresh_ahead_share),
    },
    Row {
        name: "stale_if_error",
        variable: "CONNEQT_STALE_IF_ERROR",
        kind: TTL,
        initial: Initial::Unset("off"),
        doc: "opt-in grace: while the upstream is unavailable, a verdict expired less than this long ago still passes",
        slot: |s| Slot::OptionalDuration(&mut s.stale_if_error),
    },
    Row {
        name: "max_concurrent_verifications",
        variable: "CONNEQT_MAX_CONCURRENT_VERIFICATIONS",
        kind: Kind::Number {
            min: 1,
            max: tokio::sync::Semaphore::MAX_PERMITS as u64,
        },
        initial: Initial::Value("64"),
        doc: "upstream verify calls in flight at once",
        slot: |s| Slot::Number(&mut s.max_concurrent_verifications),
    },
    Row {
        name: "upstream_retry",
        variable: "CONNEQT_UPSTREAM_RETRY",
        kind: Kind::Flag,
        initial: Initial::Value("true"),
        doc: "retry once on a connection error or `502`/`503`/`504` if time remains before the deadline",
        slot: |s| Slot::Flag(&mut s.upstream_retry),
    },
    Row {
        name: "circuit_breaker_threshold",
        variable: "CONNEQT_CIRCUIT_BREAKER_THRESHOLD",
        kind: Kind::Number {
            min: 1,
            max: u32::MAX as u64,
        },
        initial: Initial::Value("5"),
        doc: "consecutive upstream failures that open the circuit breaker",
        slot: |s| Slot::Number(&mut s.circuit_breaker_threshold),
    },
    Row {
        name: "circuit_breaker_cool_down",
        variable: "CONNEQT_CIRCUIT_BREAKER_COOL_DOWN",
        kind: Kind::Duration {
            min: MS,
            max: Duration::from_secs(60 * 60),
        },
        initial: Initial::Value("5s"),
        doc: "how long an open circuit fails fast before one probe is let through",
        slot: |s| Slot::Duration(&mut s.circuit_breaker_cool_down),
    },
    Row {
        name: "redis_url",
        variable: "CONNEQT_REDIS_URL",
        kind: Kind::Text {
            check: check_redis_url,
            secret: true,
            required: None,
        },
        initial: Initial::Unset("none (each replica caches alone)"),
        doc: "share verdicts and revocations with other replicas through this Redis: `redis://` or `rediss://`, user and password in the URL, one endpoint (no Cluster or Sentinel); never printed",
        slot: |s| Slot::Text(&mut s.redis_url),
    },
    Row {
        name: "cluster_key",
        variable: "CONNEQT_CLUSTER_KEY",
        kind: Kind::Text {
            check: check_cluster_key,
            secret: true,
            required: None,
        },
        initial: Initial::Unset("derived from `api_key` and `base_url`"),
        doc: "the secret all replicas share, which keys the token hashes in Redis and names their namespace; never printed",
        slot: |s| Slot::Text(&mut s.cluster_key),
    },
    Row {
        name: "redis_timeout",
        variable: "CONNEQT_REDIS_TIMEOUT",
        kind: Kind::Duration {
            min: MS,
            max: Duration::from_secs(10),
        },
        initial: Initial::Value("50ms"),
        doc: "the deadline of one Redis round trip; past it the replica verifies locally until Redis answers again",
        slot: |s| Slot::Duration(&mut s.redis_timeout),
    },
    Row {
        name: "redis_lease",
        variable: "CONNEQT_REDIS_LEASE",
        kind: Kind::Duration {
            min: MS,
            max: Duration::from_secs(5 * 60),
        },
        initial: Initial::Value("2s"),
        doc: "how long one replica may verify a token while the others wait for its verdict (about `upstream_timeout`)",
        slot: |s| Slot::Duration(&mut s.redis_lease),
    },
];

/// `redis_url`: a URL the shared tier can use; needs the `redis` feature. Never quotes it.
fn check_redis_url(raw: &str) -> Result<(), String> {
    #[cfg(feature = "redis")]
    {
        crate::shared::check_url(raw)
    }
    #[cfg(not(feature = "redis"))]
    {
        let _ = raw;
        Err(
            "needs conneqt-guard's `redis` cargo feature (this build has no shared tier)"
                .to_owned(),
        )
    }
}

/// `cluster_key`: never quoted.
fn check_cluster_key(key: &str) -> Result<(), String> {
    if key.len() < 16 {
        return Err(
            "is shorter than 16 bytes (use a long random secret, the same on every replica)"
                .to_owned(),
        );
    }
    if key.trim() != key {
        return Err("has leading or trailing whitespace (a copy-paste mistake?)".to_owned());
    }
    Ok(())
}

impl Row {
    /// Reads `raw` in the grammar of the row's kind (no range check: see [`check`](Self::check)).
    pub(crate) fn parse(&self, raw: &str) -> Result<Value, String> {
        match self.kind {
            Kind::Duration { .. } => parse_duration(raw)
                .map(Value::Duration)
                .ok_or_else(|| format!("{raw:?} is not a duration (use e.g. 30s, 500ms, 10m)")),
            Kind::Number { .. } => raw
                .parse()
                .map(Value::Number)
                .map_err(|_| format!("{raw:?} is not a whole number (e.g. 100000)")),
            Kind::Flag => parse_flag(raw)
                .map(Value::Flag)
                .ok_or_else(|| format!("{raw:?} is not a boolean (use true, false, 1 or 0)")),
            Kind::Share => raw.parse().map(Value::Share).map_err(|_| {
                format!("{raw:?} is not a number between 0 and 1, exclusive (e.g. 0.8)")
            }),
            Kind::Text { .. } => Ok(Value::Text(raw.to_owned())),
            Kind::Prefixes => Ok(Value::Prefixes(
                raw.split(',')
                    .map(str::trim)
                    .filter(|prefix| !prefix.is_empty())
                    .map(str::to_owned)
                    .collect(),
            )),
        }
    }

    /// Reads `raw` and checks it alone, with problems worded for a value given as text (a
    /// variable or a flag): they quote `raw`, unless the row is secret.
    pub(crate) fn parse_checked(&self, raw: &str) -> Result<Value, String> {
        let value = self.parse(raw)?;
        let mut alone = Settings::default();
        self.set(&mut alone, value.clone());
        self.check(&mut alone).map_err(|problem| match self.kind {
            Kind::Duration { .. } | Kind::Number { .. } | Kind::Share => {
                format!("{raw:?} is out of range: {problem}")
            }
            Kind::Flag | Kind::Text { .. } | Kind::Prefixes => problem,
        })?;
        Ok(value)
    }

    /// Stores `value`; prefixes add to those already there.
    pub(crate) fn set(&self, settings: &mut Settings, value: Value) {
        match ((self.slot)(settings), value) {
            (Slot::Duration(slot), Value::Duration(value)) => *slot = value,
            (Slot::OptionalDuration(slot), Value::Duration(value)) => *slot = Some(value),
            (Slot::Number(slot), Value::Number(value)) => *slot = value,
            (Slot::Flag(slot), Value::Flag(value)) => *slot = value,
            (Slot::Share(slot), Value::Share(value)) => *slot = value,
            (Slot::Text(slot), Value::Text(value)) => *slot = Some(value),
            (Slot::Prefixes(slot), Value::Prefixes(value)) => slot.extend(value),
            (_, value) => unreachable!("{} cannot hold {value:?}", self.name),
        }
    }

    /// The problem with the row's value in `settings`, worded to follow the setting's name.
    pub(crate) fn check(&self, settings: &mut Settings) -> Result<(), String> {
        match ((self.slot)(settings), &self.kind) {
            (Slot::Duration(value), Kind::Duration { min, max }) => {
                check_duration(*value, *min, *max)
            }
            (Slot::OptionalDuration(value), Kind::Duration { min, max }) => {
                value.map_or(Ok(()), |value| check_duration(value, *min, *max))
            }
            (Slot::Number(value), Kind::Number { min, max }) => {
                if *value < *min {
                    Err(format!("must be at least {min}, got {value}"))
                } else if *value > *max {
                    Err(format!("must be at most {max}, got {value}"))
                } else {
                    Ok(())
                }
            }
            (Slot::Flag(_), Kind::Flag) => Ok(()),
            (Slot::Share(value), Kind::Share) => {
                if *value > 0.0 && *value < 1.0 {
                    Ok(())
                } else {
                    Err(format!("must be between 0 and 1, exclusive, got {value}"))
                }
            }
            (
                Slot::Text(value),
                Kind::Text {
                    check, required, ..
                },
            ) => match (value.as_deref(), required) {
                (Some(text), _) => check(text),
                (None, Some(problem)) => Err((*problem).to_owned()),
                (None, None) => Ok(()),
            },
            (Slot::Prefixes(prefixes), Kind::Prefixes) => prefixes
                .iter()
                .try_for_each(|prefix| skip::check_prefix(prefix)),
            _ => unreachable!("{}'s kind does not fit its value", self.name),
        }
    }

    /// The row's value in `settings` for `Debug`: secrets only as `<redacted>`.
    fn show(&self, settings: &mut Settings) -> String {
        match ((self.slot)(settings), &self.kind) {
            (Slot::Text(Some(_)), Kind::Text { secret: true, .. }) => "<redacted>".to_owned(),
            (Slot::Text(value), _) => format!("{value:?}"),
            (Slot::Duration(value), _) => format!("{value:?}"),
            (Slot::OptionalDuration(value), _) => format!("{value:?}"),
            (Slot::Number(value), _) => value.to_string(),
            (Slot::Flag(value), _) => value.to_string(),
            (Slot::Share(value), _) => value.to_string(),
            (Slot::Prefixes(value), _) => format!("{value:?}"),
        }
    }

    /// Whether the value must never be quoted or shown.
    pub(crate) fn is_secret(&self) -> bool {
        matches!(self.kind, Kind::Text { secret: true, .. })
    }
}

fn check_duration(value: Duration, min: Duration, max: Duration) -> Result<(), String> {
    if value < min {
        return Err(format!(
            "must be at least {}, got {value:?}",
            format_duration(min)
        ));
    }
    if value > max {
        return Err(format!(
            "must be at most {}, got {value:?}",
            format_duration(max)
        ));
    }
    Ok(())
}

/// The one boolean grammar: `true`, `false`, `1` or `0`.
fn parse_flag(raw: &str) -> Option<bool> {
    match raw {
        "true" | "1" => Some(true),
        "false" | "0" => Some(false),
        _ => None,
    }
}

/// The one duration grammar: `30s`, `500ms`, `10m`, `1h` and combinations such as `1h30m` or
/// `1m30s500ms`: whole numbers, each with a unit, units largest first and at most once. No
/// spaces, signs, fractions or bare numbers; `None` for anything else, or beyond `u64`
/// milliseconds.
pub(crate) fn parse_duration(text: &str) -> Option<Duration> {
    const UNITS: [(&str, u64); 4] = [("h", 3_600_000), ("ms", 1), ("m", 60_000), ("s", 1_000)];
    let mut rest = text;
    let mut total_ms: u64 = 0;
    let mut previous_ms = u64::MAX;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let number: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        // `ms` is tried before `m`, so `5ms` is never read as minutes followed by junk.
        let (unit, unit_ms) = UNITS.into_iter().find(|(unit, _)| rest.starts_with(unit))?;
        if unit_ms >= previous_ms {
            return None;
        }
        previous_ms = unit_ms;
        rest = &rest[unit.len()..];
        total_ms = total_ms.checked_add(number.checked_mul(unit_ms)?)?;
    }
    Some(Duration::from_millis(total_ms))
}

/// A duration in the grammar of [`parse_duration`], e.g. `1m30s`; below a millisecond is
/// dropped (`0s` for none at all).
pub(crate) fn format_duration(duration: Duration) -> String {
    let mut ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    if ms == 0 {
        return "0s".to_owned();
    }
    let mut text = String::new();
    for (unit, unit_ms) in [("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)] {
        if ms >= unit_ms {
            text.push_str(&format!("{}{unit}", ms / unit_ms));
            ms %= unit_ms;
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_default_parses_in_its_grammar_and_passes_its_check() {
        let mut settings = Settings::with_defaults();
        for row in ROWS {
            let required = matches!(
                row.kind,
                Kind::Text {
                    required: Some(_),
                    ..
                }
            );
            assert_eq!(row.check(&mut settings).is_err(), required, "{}", row.name);
        }
        assert_eq!(settings.cache_ttl, Duration::from_secs(30));
        assert_eq!(settings.max_concurrent_verifications, 64);
        assert!(settings.upstream_retry && !settings.strip_token_header);
    }

    #[test]
    fn names_and_variables_are_unique_and_match() {
        for (i, row) in ROWS.iter().enumerate() {
            assert!(row.variable.starts_with("CONNEQT_"), "{}", row.variable);
            assert!(
                row.variable
                    .to_ascii_lowercase()
                    .starts_with(&format!("conneqt_{}", row.name)),
                "{} feeds {}",
                row.variable,
                row.name
            );
            assert!(ROWS[..i].iter().all(|other| other.name != row.name));
        }
    }

    #[test]
    fn durations_format_in_the_grammar_and_round_trip() {
        for (duration, shown) in [
            (Duration::from_secs(30), "30s"),
            (Duration::from_secs(600), "10m"),
            (Duration::from_millis(1500), "1s500ms"),
            (Duration::from_secs(5400), "1h30m"),
            (Duration::from_secs(7 * 24 * 3600), "168h"),
            (Duration::from_millis(1), "1ms"),
        ] {
            assert_eq!(format_duration(duration), shown);
            assert_eq!(parse_duration(shown), Some(duration));
        }
        assert_eq!(format_duration(Duration::ZERO), "0s");
    }

    #[test]
    fn secret_values_are_never_shown() {
        let mut settings = Settings::with_defaults();
        settings.api_key = Some("sekrit-key".to_owned());
        settings.upstream_proxy = Some("http://user:sekrit@proxy".to_owned());
        settings.redis_url = Some("redis://user:sekrit@redis.internal".to_owned());
        settings.cluster_key = Some("sekrit-cluster-key-of-some-length".to_owned());
        let shown = format!("{settings:?}");
        assert!(!shown.contains("sekrit"), "{shown}");
        assert!(shown.contains("api_key: <redacted>"), "{shown}");
        assert!(shown.contains("redis_url: <redacted>"), "{shown}");
        assert!(shown.contains("cluster_key: <redacted>"), "{shown}");
    }

    #[test]
    fn redis_settings_problems_never_quote_the_value() {
        let row = |name: &str| ROWS.iter().find(|row| row.name == name).unwrap();
        for raw in [
            "http://user:sekrit@redis.internal",
            "redis://:sekrit@host/notadb",
            "sekrit",
        ] {
            let problem = row("redis_url").parse_checked(raw).unwrap_err();
            assert!(!problem.contains("sekrit"), "{problem}");
        }
        let problem = row("cluster_key").parse_checked("sekrit").unwrap_err();
        assert!(!problem.contains("sekrit"), "{problem}");
        let url = row("redis_url").parse_checked("redis://:sekrit@redis.internal:6379");
        if cfg!(feature = "redis") {
            assert!(url.is_ok());
        } else {
            let problem = url.unwrap_err();
            assert!(problem.contains("`redis` cargo feature") && !problem.contains("sekrit"));
        }
        assert!(
            row("cluster_key")
                .parse_checked("a-long-enough-cluster-secret")
                .is_ok()
        );
        let settings = Settings::with_defaults();
        assert_eq!(settings.redis_timeout, Duration::from_millis(50));
        assert_eq!(settings.redis_lease, settings.upstream_timeout);
        assert!(settings.redis_url.is_none() && settings.cluster_key.is_none());
    }

    /// The first backticked word of each cell of the table rows (`| ... |`) after `heading`,
    /// up to the next heading.
    fn table(text: &str, heading: &str) -> Vec<Vec<String>> {
        let section = text
            .split(heading)
            .nth(1)
            .unwrap_or_else(|| panic!("{heading} missing"));
        let section = section.split("\n## ").next().unwrap();
        section
            .lines()
            .map(|line| line.trim().trim_start_matches("///").trim())
            .filter(|line| line.starts_with("| `"))
            .map(|line| {
                line.split('|')
                    .map(|cell| cell.split('`').nth(1).unwrap_or("").to_owned())
                    .skip(1)
                    .collect()
            })
            .collect()
    }

    /// Builder methods that are not settings of the table (no variable, no flag).
    const NOT_IN_THE_TABLE: [&str; 3] =
        ["skip_if", "skip_grpc_health_checks", "skip_cors_preflight"];

    #[test]
    fn the_readme_configuration_table_lists_exactly_the_settings() {
        let readme = include_str!("../../README.md");
        let mut listed: Vec<String> = table(readme, "\n## Configuration\n")
            .into_iter()
            .map(|cells| cells[0].clone())
            .filter(|name| !NOT_IN_THE_TABLE.contains(&name.as_str()))
            .collect();
        listed.sort();
        let mut names: Vec<&str> = ROWS.iter().map(|row| row.name).collect();
        names.sort_unstable();
        assert_eq!(listed, names, "README.md `## Configuration`");
    }

    #[test]
    fn the_readme_configuration_table_shows_each_settings_default() {
        let readme = include_str!("../../README.md");
        let section = readme.split("\n## Configuration\n").nth(1).unwrap();
        let section = section.split("\n## ").next().unwrap();
        for row in ROWS {
            let start = format!("| `{}` | ", row.name);
            let line = section
                .lines()
                .find(|line| line.starts_with(&start))
                .unwrap_or_else(|| panic!("{} missing", row.name));
            let shown = line[start.len()..].split(" | ").next().unwrap();
            let expected = match row.initial {
                Initial::Value(text) => format!("`{text}`"),
                Initial::Unset(what) => what.to_owned(),
            };
            assert_eq!(shown, expected, "README.md default of {}", row.name);
        }
    }

    #[test]
    fn the_environment_tables_list_exactly_the_variables_and_their_settings() {
        let expected: Vec<Vec<String>> = ROWS
            .iter()
            .map(|row| vec![row.variable.to_owned(), row.name.to_owned()])
            .collect();
        for (file, text, heading) in [
            (
                "README.md",
                include_str!("../../README.md"),
                "\n## Environment variables\n",
            ),
            (
                "src/builder/env.rs",
                include_str!("env.rs"),
                "/// | variable | setting | format |",
            ),
        ] {
            let listed: Vec<Vec<String>> = table(text, heading)
                .into_iter()
                .map(|cells| cells[..2].to_vec())
                .collect();
            assert_eq!(listed, expected, "{file}: {heading}");
        }
    }
}
