//! Loading: the figment stack (defaults, YAML file, environment), the source of each
//! value, the extraction that reports every type error, and the redaction helpers.

use std::{fmt, path::Path};

use figment::{
    Figment, Metadata, Profile, Provider,
    providers::{Format, Serialized, Yaml},
    util::nest,
    value::{Dict, Map, Value},
};
use serde::{Deserialize, Deserializer};

use super::{Config, ConfigError, ConfigIssue, ENV_BACKENDS, ENV_CONFIG_FILE, ENV_PREFIX};

/// A figment provider for the `AMQP_SIDECAR_BACKENDS=url,url` shorthand.
///
/// Written by hand because figment's `Env` parses `a,b` as a map, not a list.
struct BackendsShorthand(String);

impl Provider for BackendsShorthand {
    fn metadata(&self) -> Metadata {
        Metadata::named(format!("env {ENV_BACKENDS}"))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let list: Vec<Value> = self
            .0
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|url| {
                let mut d = Dict::new();
                d.insert("url".into(), Value::from(url.to_owned()));
                Value::from(d)
            })
            .collect();
        let mut dict = Dict::new();
        dict.insert("backends".into(), Value::from(list));
        Ok(Profile::Default.collect(dict))
    }
}

/// The environment a configuration is loaded from: `(name, value)` pairs, in order.
struct Environment(Vec<(String, String)>);

impl Environment {
    /// The process environment. Names and values that are not UTF-8 are converted lossily,
    /// as figment's `Env` does, except the values of `AMQP_SIDECAR_CONFIG` and
    /// `AMQP_SIDECAR_BACKENDS`, which count as unset then (as with `std::env::var`).
    fn from_process() -> Self {
        let vars = std::env::vars_os().filter_map(|(name, value)| {
            let name = name.to_string_lossy().into_owned();
            let value = if name == ENV_CONFIG_FILE || name == ENV_BACKENDS {
                value.into_string().ok()?
            } else {
                value.to_string_lossy().into_owned()
            };
            Some((name, value))
        });
        Self(vars.collect())
    }

    /// The value of the variable named exactly `name` (the last one if it repeats).
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The `AMQP_SIDECAR_<SECTION>__<KEY>` variables of an [`Environment`], as a figment
/// provider. It gives what `Env::prefixed(ENV_PREFIX).split("__").ignore(&["CONFIG",
/// "BACKENDS"])` gives (with the same metadata), but figment's `Env` can only read the
/// process environment.
struct PrefixedEnv<'a>(&'a Environment);

impl Provider for PrefixedEnv<'_> {
    fn metadata(&self) -> Metadata {
        Metadata::named(format!("`{ENV_PREFIX}` environment variable(s)")).interpolater(
            |_: &Profile, k: &[&str]| {
                let keys: Vec<_> = k.iter().map(|k| k.to_ascii_uppercase()).collect();
                keys.join(".")
            },
        )
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut dict = Dict::new();
        for (name, value) in &self.0.0 {
            // As `Env`: the prefix and the ignored names match in any case.
            let name = name.trim();
            let Some(rest) = name
                .get(..ENV_PREFIX.len())
                .filter(|p| p.eq_ignore_ascii_case(ENV_PREFIX))
                .map(|_| &name[ENV_PREFIX.len()..])
            else {
                continue;
            };
            let key = rest.replace("__", ".");
            if ["CONFIG", "BACKENDS"]
                .iter()
                .any(|k| k.eq_ignore_ascii_case(&key))
            {
                continue;
            }
            let key = key.trim();
            if key.split('.').any(str::is_empty) {
                continue;
            }
            let Ok(value) = value.parse::<Value>();
            merge_dict(
                &mut dict,
                nest(&key.to_ascii_lowercase(), value)
                    .into_dict()
                    .expect("a non-empty key nests into a dict"),
            );
        }
        Ok(Profile::Default.collect(dict))
    }
}

/// Merges `from` into `into`, as figment merges: dicts key by key, anything else replaced.
fn merge_dict(into: &mut Dict, from: Dict) {
    for (key, value) in from {
        let value = match (into.get_mut(&key), value) {
            (Some(Value::Dict(_, a)), Value::Dict(_, b)) => {
                merge_dict(a, b);
                continue;
            }
            (_, value) => value,
        };
        into.insert(key, value);
    }
}

/// The figment stack: defaults, then the YAML file (if any), then the environment.
fn figment(file: Option<&Path>, env: &Environment) -> Figment {
    let mut fig = Figment::from(Serialized::defaults(Config::default()));
    if let Some(path) = file {
        fig = fig.merge(Yaml::file_exact(path));
    }
    fig = fig.merge(PrefixedEnv(env));
    if let Some(list) = env.get(ENV_BACKENDS) {
        fig = fig.merge(BackendsShorthand(list.to_owned()));
    }
    fig
}

/// Human-readable source of a value, from figment's metadata.
fn describe_source(md: Option<&Metadata>, path: &[String]) -> String {
    let Some(md) = md else {
        return "unknown source".to_owned();
    };
    if let Some(file) = md.source.as_ref().and_then(|s| s.file_path()) {
        return format!("file {}", file.display());
    }
    if md.name.contains(ENV_BACKENDS) {
        return format!("env {ENV_BACKENDS}");
    }
    if md.name.contains("environment") {
        let var: Vec<String> = path.iter().map(|p| p.to_ascii_uppercase()).collect();
        return format!("env {ENV_PREFIX}{}", var.join("__"));
    }
    if md.name.contains("Serialized")
        || md
            .source
            .as_ref()
            .is_some_and(|s| s.code_location().is_some())
    {
        return "default".to_owned();
    }
    md.name.to_string()
}

/// Formats a key path such as `["backends", "1", "url"]` as `backends[1].url`.
fn format_key(path: &[String]) -> String {
    let mut out = String::new();
    for part in path {
        if part.chars().all(|c| c.is_ascii_digit()) && !out.is_empty() {
            out.push_str(&format!("[{part}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(part);
        }
    }
    if out.is_empty() {
        "(root)".to_owned()
    } else {
        out
    }
}

/// Most type errors reported from one configuration; a guard against a loop, far above
/// what a real file has.
const MAX_TYPE_ERRORS: usize = 64;

/// Where each value of a figment came from.
struct Sources<'a> {
    fig: &'a Figment,
    /// The merged values, each tagged with its provider; `None` when there are none (a
    /// file that cannot be read or parsed).
    values: Option<Value>,
}

impl<'a> Sources<'a> {
    fn new(fig: &'a Figment) -> Self {
        Self {
            fig,
            values: fig.find_value("").ok(),
        }
    }

    /// The source of the value at `path`, exactly (list elements included, such as
    /// `backends.1.health.interval_ms`, which figment's `find_metadata` does not reach),
    /// or else of its nearest parent that has a value.
    fn of(&self, path: &[String]) -> String {
        let md = (1..=path.len()).rev().find_map(|n| {
            let value = find(self.values.as_ref()?, &path[..n])?;
            self.fig.get_metadata(value.tag())
        });
        describe_source(md, path)
    }
}

/// The value at `path` (dict keys and list indices).
fn find<'v>(value: &'v Value, path: &[String]) -> Option<&'v Value> {
    path.iter().try_fold(value, |at, part| match at {
        Value::Dict(_, dict) => dict.get(part),
        Value::Array(_, list) => list.get(part.parse::<usize>().ok()?),
        _ => None,
    })
}

/// Extracts the configuration, reporting every wrong type and unknown key, not only the
/// first. serde stops at the first error, so after each one the offending key is removed
/// from the merged values (it falls back to its default) and extraction runs again; each
/// error's source comes from the original figment's metadata.
fn extract_all(fig: &Figment, sources: &Sources<'_>) -> Result<Config, ConfigError> {
    let first = match fig.extract::<Config>() {
        Ok(config) => return Ok(config),
        Err(e) => e,
    };
    let issue = |e: &figment::error::Error, path: &[String]| {
        let message = match &e.kind {
            figment::error::Kind::Message(m)
                if m.contains("No such file") || m.contains("os error") =>
            {
                format!("cannot read config file: {m}")
            }
            kind => kind.to_string(),
        };
        ConfigIssue {
            key: format_key(path),
            source: sources.of(path),
            message,
        }
    };
    let mut issues = Vec::new();
    // A file that cannot be read or parsed gives no values to go on with.
    let Ok(mut values) = fig.extract::<Value>() else {
        issues.extend(first.into_iter().map(|e| issue(&e, &e.path)));
        return Err(ConfigError { issues });
    };
    let mut errors = first;
    for _ in 0..MAX_TYPE_ERRORS {
        let mut removed = false;
        for e in errors {
            // figment's path names the key itself, unknown keys included.
            issues.push(issue(&e, &e.path));
            removed |= remove_path(&mut values, &e.path);
        }
        if !removed {
            break;
        }
        match values.deserialize::<Config>() {
            Ok(_) => break,
            Err(e) => errors = e,
        }
    }
    Err(ConfigError { issues })
}

/// Removes the value at `path` (dict keys and list indices); true if there was one.
fn remove_path(value: &mut Value, path: &[String]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut at = value;
    for part in parents {
        at = match at {
            Value::Dict(_, dict) => match dict.get_mut(part) {
                Some(v) => v,
                None => return false,
            },
            Value::Array(_, list) => match part.parse::<usize>().ok().and_then(|i| list.get_mut(i))
            {
                Some(v) => v,
                None => return false,
            },
            _ => return false,
        };
    }
    match at {
        Value::Dict(_, dict) => dict.remove(last).is_some(),
        Value::Array(_, list) => match last.parse::<usize>() {
            // Replaced, not removed, so the later indices keep their meaning.
            Ok(i) if i < list.len() => {
                list[i] = Value::from(Dict::new());
                true
            }
            _ => false,
        },
        _ => false,
    }
}

impl Config {
    /// Loads the configuration from its sources and validates it.
    ///
    /// `file` is the YAML file (from `--config`); when `None`, `AMQP_SIDECAR_CONFIG` is used
    /// if set. The environment is read from the process.
    ///
    /// # Errors
    /// A [`ConfigError`] listing every problem: unreadable file, bad YAML, unknown keys,
    /// wrong types, and everything [`Config::validate`] rejects.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_from(file, &Environment::from_process())
    }

    /// [`Config::load`] with the environment given as `(name, value)` pairs instead of read
    /// from the process: `AMQP_SIDECAR_CONFIG`, `AMQP_SIDECAR_BACKENDS` and every
    /// `AMQP_SIDECAR_<SECTION>__<KEY>` variable come from `env` alone.
    ///
    /// ```
    /// use amqp_sidecar::config::Config;
    /// let config = Config::load_with(
    ///     None,
    ///     [
    ///         ("AMQP_SIDECAR_AMQP__QUEUE", "orders"),
    ///         ("AMQP_SIDECAR_BACKENDS", "http://127.0.0.1:8080/"),
    ///     ],
    /// )
    /// .expect("valid");
    /// assert_eq!(config.amqp.queue, "orders");
    /// ```
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn load_with<K: Into<String>, V: Into<String>>(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Config, ConfigError> {
        let vars = env.into_iter().map(|(k, v)| (k.into(), v.into()));
        Self::load_from(file, &Environment(vars.collect()))
    }

    fn load_from(file: Option<&Path>, env: &Environment) -> Result<Config, ConfigError> {
        let env_file = env.get(ENV_CONFIG_FILE).filter(|s| !s.is_empty());
        let (file, named_by) = match (file, env_file) {
            (Some(f), _) => (Some(f.to_path_buf()), "--config"),
            (None, Some(f)) => (Some(f.into()), ENV_CONFIG_FILE),
            (None, None) => (None, ""),
        };
        if let Some(path) = &file
            && !path.is_file()
        {
            return Err(ConfigError {
                issues: vec![ConfigIssue {
                    key: named_by.to_owned(),
                    source: if named_by == "--config" {
                        "command line".into()
                    } else {
                        format!("env {ENV_CONFIG_FILE}")
                    },
                    message: format!(
                        "config file {} does not exist or is not a file",
                        path.display()
                    ),
                }],
            });
        }
        let fig = figment(file.as_deref(), env);
        let sources = Sources::new(&fig);
        let config = extract_all(&fig, &sources)?;
        config.validate_with(&|key: &str| {
            let path: Vec<String> = key.split('.').map(str::to_owned).collect();
            sources.of(&path)
        })
    }

    /// The effective configuration as JSON, with the broker password and every backend
    /// URL's password replaced by `***`.
    #[must_use]
    pub fn redacted_json(&self) -> String {
        let mut copy = self.clone();
        copy.amqp.url = redact_url(&copy.amqp.url);
        for b in &mut copy.backends {
            b.url = redact_url(&b.url);
        }
        serde_json::to_string_pretty(&copy).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }
}

/// Returns `url` with its password (if any) replaced by `***`. Never fails: a string that
/// does not parse as a URL is replaced entirely, since it could hold anything.
///
/// ```
/// use amqp_sidecar::config::redact_url;
/// assert_eq!(redact_url("amqp://app:s3cret@rabbit:5672/%2f"), "amqp://app:***@rabbit:5672/%2f");
/// assert_eq!(redact_url("amqp://rabbit/%2f"), "amqp://rabbit/%2f");
/// assert_eq!(redact_url("not a url"), "<unparseable URL, redacted>");
/// ```
#[must_use]
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "<unparseable URL, redacted>".to_owned(),
    }
}

/// Accepts a string, or a number or boolean (figment parses env values such as `12345` as
/// numbers), for a `String` field.
pub(super) fn string_like<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }
        fn visit_string<E: serde::de::Error>(self, v: String) -> Result<String, E> {
            Ok(v)
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_char<E: serde::de::Error>(self, v: char) -> Result<String, E> {
            Ok(v.to_string())
        }
    }
    d.deserialize_any(V)
}

/// [`string_like`] for an optional field.
pub(super) fn opt_string_like<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    struct Wrap(#[serde(deserialize_with = "string_like")] String);
    Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{
        MaxInFlight,
        tests::{temp_yaml, valid},
    };

    #[test]
    fn redacts_password() {
        let r = redact_url("amqp://user:s3cret@host:5672/%2f");
        assert!(!r.contains("s3cret"), "{r}");
        assert!(r.contains("***"), "{r}");
        let mut c = valid();
        c.amqp.url = "amqps://u:topsecret@h/%2f".into();
        assert!(!c.redacted_json().contains("topsecret"));
        assert!(!format!("{c:?}").contains("topsecret"));
    }

    /// `(key, source)` of each issue.
    fn issues(e: &ConfigError) -> Vec<(&str, &str)> {
        e.issues
            .iter()
            .map(|i| (i.key.as_str(), i.source.as_str()))
            .collect()
    }

    const QUEUE: (&str, &str) = ("AMQP_SIDECAR_AMQP__QUEUE", "orders");
    const BACKENDS: (&str, &str) = ("AMQP_SIDECAR_BACKENDS", "http://127.0.0.1:8080/");

    #[test]
    fn the_injected_environment_is_the_whole_environment() {
        let config = Config::load_with(None, [QUEUE, BACKENDS]).expect("valid");
        assert_eq!(config.amqp.queue, "orders");
        let none: [(&str, &str); 0] = [];
        let err = Config::load_with(None, none).expect_err("no queue, no backends");
        assert_eq!(
            issues(&err),
            [("amqp.queue", "default"), ("backends", "default")]
        );
    }

    #[test]
    fn a_bad_env_value_names_the_key_and_the_variable() {
        let err = Config::load_with(
            None,
            [QUEUE, BACKENDS, ("AMQP_SIDECAR_AMQP__PREFETCH", "0")],
        )
        .expect_err("prefetch 0");
        assert_eq!(
            issues(&err),
            [("amqp.prefetch", "env AMQP_SIDECAR_AMQP__PREFETCH")]
        );
        assert!(
            err.to_string().contains(
                "amqp.prefetch (from env AMQP_SIDECAR_AMQP__PREFETCH): must be at least 1"
            ),
            "{err}"
        );
    }

    #[test]
    fn env_type_errors_and_unknown_keys_are_all_reported() {
        let err = Config::load_with(
            None,
            [
                QUEUE,
                BACKENDS,
                ("AMQP_SIDECAR_RETRY__MAX_ATTEMPTS", "five"),
                ("AMQP_SIDECAR_AMQP__COLOUR", "blue"),
            ],
        )
        .expect_err("rejected");
        assert_eq!(
            issues(&err),
            [
                ("amqp.colour", "env AMQP_SIDECAR_AMQP__COLOUR"),
                ("retry.max_attempts", "env AMQP_SIDECAR_RETRY__MAX_ATTEMPTS"),
            ]
        );
        assert!(err.issues[1].message.contains("invalid type"), "{err}");
    }

    #[test]
    fn env_names_match_figment_env() {
        let config = Config::load_with(
            None,
            [
                ("amqp_sidecar_amqp__queue", "12345"),
                ("AMQP_SIDECAR_AMQP__PREFETCH", "7"),
                ("AMQP_SIDECAR_RETRY__BACKOFF_MULTIPLIER", "1.5"),
                ("AMQP_SIDECAR_AMQP____DECLARE", "false"),
                ("OTHER_AMQP__PREFETCH", "9"),
                BACKENDS,
            ],
        )
        .expect("valid");
        assert_eq!(
            config.amqp.queue, "12345",
            "any case; a number for a string"
        );
        assert_eq!(config.amqp.prefetch, 7);
        assert_eq!(config.retry.backoff_multiplier, 1.5);
        assert!(config.amqp.declare, "an empty key segment is skipped");
    }

    #[test]
    fn the_backends_shorthand_replaces_the_files_backends() {
        let file = temp_yaml(
            "amqp:\n  queue: orders\n  prefetch: 4\nbackends:\n  - url: http://127.0.0.1:9000/\n    max_in_flight: 8\n",
        );
        let config = Config::load_with(
            Some(&file),
            [(
                "AMQP_SIDECAR_BACKENDS",
                "http://127.0.0.1:8080/a, ,http://worker:pw@127.0.0.1:8081/b",
            )],
        )
        .expect("valid");
        let urls: Vec<_> = config.backends.iter().map(|b| b.url.as_str()).collect();
        assert_eq!(
            urls,
            [
                "http://127.0.0.1:8080/a",
                "http://worker:pw@127.0.0.1:8081/b"
            ]
        );
        assert_eq!(
            config.backends[0].max_in_flight,
            MaxInFlight::Auto,
            "each gets the defaults"
        );
        assert_eq!(
            config.amqp.prefetch, 4,
            "the rest of the file still applies"
        );

        let err = Config::load_with(
            Some(&file),
            [
                ("AMQP_SIDECAR_BACKENDS", "ftp://127.0.0.1/"),
                ("AMQP_SIDECAR_AMQP__PREFETCH", "0"),
            ],
        )
        .expect_err("rejected");
        assert_eq!(
            issues(&err),
            [
                ("amqp.prefetch", "env AMQP_SIDECAR_AMQP__PREFETCH"),
                ("backends[0].url", "env AMQP_SIDECAR_BACKENDS"),
            ]
        );
        let _ = std::fs::remove_dir_all(file.parent().expect("dir"));
    }

    #[test]
    fn the_config_file_can_be_named_by_the_injected_environment() {
        let file = temp_yaml("amqp:\n  queue: from-file\n");
        let path = file.display().to_string();
        let config = Config::load_with(None, [("AMQP_SIDECAR_CONFIG", path.as_str()), BACKENDS])
            .expect("valid");
        assert_eq!(config.amqp.queue, "from-file");
        let _ = std::fs::remove_dir_all(file.parent().expect("dir"));
        let err =
            Config::load_with(None, [("AMQP_SIDECAR_CONFIG", path.as_str())]).expect_err("gone");
        assert_eq!(
            issues(&err),
            [("AMQP_SIDECAR_CONFIG", "env AMQP_SIDECAR_CONFIG")]
        );
    }
}
