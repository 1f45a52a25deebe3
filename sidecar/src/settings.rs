//! The library's settings table as the sidecar's flags: each row becomes `--kebab-name` with its
//! `CONNEQT_*` variable, its default and its doc line, and the values go back through the
//! library's own reading of them, so the flags read values with the library's grammar.

use std::fmt;

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches};
use conneqt_guard::__sidecar::{DefaultValue, Setting, SettingKind, settings};
pub(crate) use conneqt_guard::__sidecar::{format_duration, parse_duration};
use conneqt_guard::AccessTokenLayerBuilder;

/// One flag per setting. Values are checked by `build()`, row by row as for `from_env`, so a
/// bad one is the library's error naming the setting (and never quoting a secret, which a
/// clap usage error would).
pub(crate) fn args() -> Vec<Arg> {
    settings().map(arg).collect()
}

fn arg(row: Setting) -> Arg {
    let mut arg = Arg::new(row.name)
        .long(row.name.replace('_', "-"))
        .env(row.variable)
        .hide_env_values(row.secret);
    let mut doc = row.doc.to_owned();
    doc[..1].make_ascii_uppercase();
    arg = match row.default {
        DefaultValue::Given(text) => arg.default_value(text).help(doc),
        DefaultValue::Unset("required") => {
            arg.help(format!("{doc} [required, unless --simulator]"))
        }
        DefaultValue::Unset(what) => arg.help(format!("{doc} [default: {what}]")),
    };
    match row.kind {
        SettingKind::Duration => arg.value_name("DURATION"),
        SettingKind::Number => arg.value_name("N"),
        SettingKind::Share => arg.value_name("SHARE"),
        // `--strip-token-header` alone means `true`; `--strip-token-header=false` is allowed.
        SettingKind::Flag => arg
            .value_name("BOOL")
            .num_args(0..=1)
            .require_equals(true)
            .default_missing_value("true"),
        SettingKind::Prefixes => arg.value_name("PREFIX").action(ArgAction::Append),
        SettingKind::Text => arg.value_name(row.name.to_uppercase()),
    }
}

/// The library settings given on the command line or in the environment.
#[derive(Clone, Default)]
pub(crate) struct Values(Vec<(&'static str, String)>);

/// Collects the values of [`args`] (those left at their default are left out).
pub(crate) fn values(matches: &ArgMatches) -> Values {
    let values = settings()
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
    pub(crate) fn builder(&self) -> AccessTokenLayerBuilder {
        let lookup = |variable: &str| {
            self.0
                .iter()
                .find(|(name, _)| *name == variable)
                .map(|(_, value)| value.clone())
        };
        conneqt_guard::__sidecar::builder(lookup)
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

/// Each setting's builder method and variable, in the table's order (for the docs-drift test).
#[cfg(test)]
pub(crate) fn names() -> impl Iterator<Item = (&'static str, &'static str)> {
    settings().map(|row| (row.name, row.variable))
}
