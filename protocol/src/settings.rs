//! Layered configuration shared by both programs: a TOML file, then
//! environment variables, then command-line flags, each overriding the one
//! before. Values are read through a [`Reader`] that collects every invalid
//! or unknown field, so a bad configuration is reported whole, with each
//! field's name and where its value came from.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

/// Where a value came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    File(String),
    Env(String),
    Flag(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(path) => write!(f, "file {path}"),
            Origin::Env(var) => write!(f, "environment variable {var}"),
            Origin::Flag(flag) => write!(f, "flag --{flag}"),
        }
    }
}

/// One field that could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub origin: Option<Origin>,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.origin {
            Some(origin) => write!(f, "`{}` (from {origin}): {}", self.field, self.message),
            None => write!(f, "`{}`: {}", self.field, self.message),
        }
    }
}

/// Every field that could not be used, reported together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct FieldErrors(pub Vec<FieldError>);

impl fmt::Display for FieldErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problem(s)):", self.0.len())?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

/// Configuration values by dotted key (`section.key`), last layer wins.
#[derive(Debug, Clone, Default)]
pub struct Layers {
    values: BTreeMap<String, (String, Origin)>,
    errors: Vec<FieldError>,
}

impl Layers {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a TOML document. Scalars become strings; arrays of scalars are
    /// joined with commas; tables nest keys with dots. A document that does
    /// not parse is recorded as an error of the pseudo-field `<file>`.
    pub fn add_toml(&mut self, text: &str, path: &str) {
        match text.parse::<toml::Table>() {
            Ok(table) => self.flatten("", &table, path),
            Err(e) => self.errors.push(FieldError {
                field: "<file>".into(),
                origin: Some(Origin::File(path.into())),
                message: e.to_string().trim().to_string(),
            }),
        }
    }

    fn flatten(&mut self, prefix: &str, table: &toml::Table, path: &str) {
        for (k, v) in table {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            let text = match v {
                toml::Value::Table(t) => {
                    self.flatten(&key, t, path);
                    continue;
                }
                toml::Value::String(s) => s.clone(),
                toml::Value::Array(items) => {
                    let mut parts = Vec::with_capacity(items.len());
                    for item in items {
                        match item {
                            toml::Value::String(s) => parts.push(s.clone()),
                            toml::Value::Table(_) | toml::Value::Array(_) => {
                                self.errors.push(FieldError {
                                    field: key.clone(),
                                    origin: Some(Origin::File(path.into())),
                                    message: "expected a list of plain values".into(),
                                });
                                break;
                            }
                            other => parts.push(other.to_string()),
                        }
                    }
                    parts.join(",")
                }
                other => other.to_string(),
            };
            self.values.insert(key, (text, Origin::File(path.into())));
        }
    }

    /// Sets one value (an environment variable or a flag).
    pub fn set(&mut self, key: &str, value: impl Into<String>, origin: Origin) {
        self.values.insert(key.to_string(), (value.into(), origin));
    }

    /// Takes `PREFIX_KEY` variables for the given keys (dots become `__`):
    /// `heartbeat_interval` ← `KIWI_AGENT_HEARTBEAT_INTERVAL`.
    pub fn add_env<I>(&mut self, prefix: &str, keys: &[&str], env: I)
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let wanted: BTreeMap<String, &str> =
            keys.iter().map(|k| (env_name(prefix, k), *k)).collect();
        for (name, value) in env {
            if let Some(key) = wanted.get(&name) {
                self.set(key, value, Origin::Env(name.clone()));
            }
        }
    }

    /// Starts reading typed values.
    pub fn reader(&self) -> Reader<'_> {
        Reader {
            layers: self,
            read: BTreeSet::new(),
            errors: self.errors.clone(),
        }
    }
}

/// The environment variable that sets `key` for programs using `prefix`.
pub fn env_name(prefix: &str, key: &str) -> String {
    format!("{prefix}{}", key.to_ascii_uppercase().replace('.', "__"))
}

/// Reads typed values out of [`Layers`], collecting every error.
#[derive(Debug)]
pub struct Reader<'a> {
    layers: &'a Layers,
    read: BTreeSet<String>,
    errors: Vec<FieldError>,
}

impl Reader<'_> {
    /// The raw text of `key`, if set.
    pub fn raw(&mut self, key: &str) -> Option<&str> {
        self.read.insert(key.to_string());
        self.layers.values.get(key).map(|(v, _)| v.as_str())
    }

    /// Parses `key` with `parse`, recording an error (and returning `None`)
    /// when it fails.
    pub fn parse_with<T>(
        &mut self,
        key: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        self.read.insert(key.to_string());
        let (text, origin) = self.layers.values.get(key)?;
        match parse(text) {
            Ok(v) => Some(v),
            Err(message) => {
                self.errors.push(FieldError {
                    field: key.to_string(),
                    origin: Some(origin.clone()),
                    message,
                });
                None
            }
        }
    }

    /// Parses `key` with its `FromStr`.
    pub fn get<T>(&mut self, key: &str) -> Option<T>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        self.parse_with(key, |s| {
            s.trim()
                .parse::<T>()
                .map_err(|e| format!("invalid value {s:?}: {e}"))
        })
    }

    /// Parses `key`, or gives `default` when it is unset or invalid (the
    /// error is still recorded).
    pub fn get_or<T>(&mut self, key: &str, default: T) -> T
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        self.get(key).unwrap_or(default)
    }

    /// Records a problem found while validating fields together.
    pub fn error(&mut self, field: &str, message: impl Into<String>) {
        let origin = self.layers.values.get(field).map(|(_, o)| o.clone());
        self.errors.push(FieldError {
            field: field.into(),
            origin,
            message: message.into(),
        });
    }

    /// Finishes: unknown keys are errors too.
    pub fn finish(mut self) -> Result<(), FieldErrors> {
        for (key, (_, origin)) in &self.layers.values {
            if !self.read.contains(key) {
                self.errors.push(FieldError {
                    field: key.clone(),
                    origin: Some(origin.clone()),
                    message: "unknown setting".into(),
                });
            }
        }
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(FieldErrors(self.errors))
        }
    }
}

/// Parses a duration written as `250ms`, `30s`, `5m`, `1h` or a bare number
/// of seconds.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?} (expected e.g. 250ms, 30s, 5m)"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        other => return Err(format!("unknown duration unit {other:?} in {text:?}")),
    };
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("duration {text:?} out of range"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn later_layers_win_and_all_errors_are_reported() {
        let mut layers = Layers::new();
        layers.add_toml(
            "port = 1\nname = \"a\"\nbogus = 3\n[db]\nhost = \"h\"\nlist = [\"x\", \"y\"]\n",
            "c.toml",
        );
        layers.add_env(
            "APP_",
            &["port", "db.host"],
            vec![
                ("APP_PORT".to_string(), "notanumber".to_string()),
                ("APP_DB__HOST".to_string(), "envhost".to_string()),
                ("OTHER".to_string(), "x".to_string()),
            ],
        );
        layers.set("name", "flagname", Origin::Flag("name".into()));
        let mut r = layers.reader();
        assert_eq!(r.get::<u16>("port"), None);
        assert_eq!(r.raw("name"), Some("flagname"));
        assert_eq!(r.raw("db.host"), Some("envhost"));
        assert_eq!(r.raw("db.list"), Some("x,y"));
        let errors = r.finish().unwrap_err();
        let fields: Vec<&str> = errors.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, vec!["port", "bogus"]);
        let text = errors.to_string();
        assert!(text.contains("APP_PORT"), "{text}");
        assert!(text.contains("unknown setting"), "{text}");
    }

    #[test]
    fn broken_file_is_an_error() {
        let mut layers = Layers::new();
        layers.add_toml("port = = 1", "bad.toml");
        let err = layers.reader().finish().unwrap_err();
        assert_eq!(err.0[0].field, "<file>");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("3 weeks").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
