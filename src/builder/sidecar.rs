//! The settings table as the `conneqt-guard` sidecar's flags: each row becomes `--kebab-name`
//! with its `CONNEQT_*` variable, its default and its doc line, and the values go back through
//! [`AccessTokenLayerBuilder::from_lookup`], so the flags read values with the library's
//! grammar. For the binary only (re-exported hidden as `__sidecar`).

use std::fmt;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches};

use super::AccessTokenLayerBuilder;
use super::env::Source;
use super::settings::{self, Initial, Kind, ROWS, Row};

/// One flag per setting. Values are checked by `build()`, row by row as for `from_env`, so a
/// bad one is the library's error naming the setting (and never quoting a secret, which a
/// clap usage error would).
pub fn args() -> Vec<Arg> {
    ROWS.iter().map(arg).collect()
}

fn arg(row: &'static Row) -> Arg {
    let mut arg = Arg::new(row.name)
        .long(row.name.replace('_', "-"))
        .env(row.variable)
        .hide_env_values(row.is_secret());
    let mut doc = row.doc.to_owned();
    doc[..1].make_ascii_uppercase();
    arg = match row.initial {
        Initial::Value(text) => arg.default_value(text).help(doc),
        Initial::Unset("required") => arg.help(format!("{doc} [required, unless --simulator]")),
        Initial::Unset(what) => arg.help(format!("{doc} [default: {what}]")),
    };
    match row.kind {
        Kind::Duration { .. } => arg.value_name("DURATION"),
        Kind::Number { .. } => arg.value_name("N"),
        Kind::Share => arg.value_name("SHARE"),
        // `--strip-token-header` alone means `true`; `--strip-token-header=false` is allowed.
        Kind::Flag => arg
            .value_name("BOOL")
            .num_args(0..=1)
            .require_equals(true)
            .default_missing_value("true"),
        Kind::Prefixes => arg.value_name("PREFIX").action(ArgAction::Append),
        Kind::Text { .. } => arg.value_name(row.name.to_uppercase()),
    }
}

/// The library settings given on the command line or in the environment.
#[derive(Clone, Default)]
pub struct Values(Vec<(&'static str, String)>);

/// Collects the values of [`args`] (those left at their default are left out).
pub fn values(matches: &ArgMatches) -> Values {
    let values = ROWS
        .iter()
        .filter(|row| matches.value_source(row.name) != Some(ValueSource::DefaultValue))
        .filter_map(|row| {
            // A repeated flag (`--skip-path-prefix`) joins as its variable would be written.
            let given: Vec<&str> = matches
                .get_many::<String>(row.name)?
                .map(String::as_str)
                .collect();
            Some((row.variable, given.join(",")))
        })
        .collect();
    Values(values)
}

impl Values {
    /// The library builder with these values, read as `from_env` reads variables; a bad one
    /// is an error naming the setting (the flag's name), not the variable.
    pub fn builder(&self) -> AccessTokenLayerBuilder {
        let lookup = |variable: &str| {
            self.0
                .iter()
                .find(|(name, _)| *name == variable)
                .map(|(_, value)| value.clone())
        };
        AccessTokenLayerBuilder::read(lookup, Source::Flags)
    }
}

/// Names only: values may be secret.
impl fmt::Debug for Values {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(name, _)| name))
            .finish()
    }
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

/// Each setting's builder method and variable, in the table's order (for the docs-drift test).
pub fn names() -> impl Iterator<Item = (&'static str, &'static str)> {
    ROWS.iter().map(|row| (row.name, row.variable))
}
