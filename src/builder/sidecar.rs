//! The settings table for the `conneqt-guard` sidecar (the `conneqt-guard-sidecar` crate), which
//! makes each row a flag with its `CONNEQT_*` variable, so the flags read values with the
//! library's grammar. Re-exported hidden as `__sidecar`: not part of the library's API.

use std::time::Duration;

use super::AccessTokenLayerBuilder;
use super::env::Source;
use super::settings::{self, Initial, Kind, ROWS};

/// One setting as a flag.
#[derive(Clone, Copy, Debug)]
pub struct Setting {
    /// The builder method, e.g. `cache_ttl` (the flag is `--cache-ttl`).
    pub name: &'static str,
    /// The environment variable, e.g. `CONNEQT_CACHE_TTL`.
    pub variable: &'static str,
    /// One line for `--help`, lower-case first letter.
    pub doc: &'static str,
    /// What the value is.
    pub kind: SettingKind,
    /// The default in the setting's grammar, or what leaving it unset means.
    pub default: DefaultValue,
    /// Whether the value must never be shown.
    pub secret: bool,
}

/// What a setting's value is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SettingKind {
    /// The library's duration grammar: see [`parse_duration`].
    Duration,
    /// A whole number.
    Number,
    /// A number strictly between 0 and 1.
    Share,
    /// `true`, `false`, `1` or `0`.
    Flag,
    /// Path prefixes: comma-separated in the variable, one per flag.
    Prefixes,
    /// Text.
    Text,
}

/// A setting's value before any flag.
#[derive(Clone, Copy, Debug)]
pub enum DefaultValue {
    /// This value.
    Given(&'static str),
    /// Unset; the text says what that means (`"required"` for a required setting).
    Unset(&'static str),
}

/// Every setting, in the table's order.
pub fn settings() -> impl Iterator<Item = Setting> {
    ROWS.iter().map(|row| Setting {
        name: row.name,
        variable: row.variable,
        doc: row.doc,
        kind: match row.kind {
            Kind::Duration { .. } => SettingKind::Duration,
            Kind::Number { .. } => SettingKind::Number,
            Kind::Share => SettingKind::Share,
            Kind::Flag => SettingKind::Flag,
            Kind::Prefixes => SettingKind::Prefixes,
            Kind::Text { .. } => SettingKind::Text,
        },
        default: match row.initial {
            Initial::Value(text) => DefaultValue::Given(text),
            Initial::Unset(what) => DefaultValue::Unset(what),
        },
        secret: row.is_secret(),
    })
}

/// The builder from the flags' values, looked up by variable name and read as `from_env`
/// reads variables; a bad value is an error naming the setting (the flag), not the variable.
pub fn builder(lookup: impl Fn(&str) -> Option<String>) -> AccessTokenLayerBuilder {
    AccessTokenLayerBuilder::read(lookup, Source::Flags)
}

/// The library's duration grammar (`30s`, `1m30s`, `1s500ms`, `500ms`, `2h`), for the
/// sidecar's own flags.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    settings::parse_duration(text)
        .ok_or_else(|| format!("{text:?} is not a duration (use e.g. 30s, 500ms, 10m)"))
}

/// A duration as [`parse_duration`] reads it, e.g. `1m30s`.
pub fn format_duration(duration: Duration) -> String {
    settings::format_duration(duration)
}
