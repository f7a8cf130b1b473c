//! `validate()`: the checks of values that parse but make no sense, all reported at once.

use std::collections::HashSet;

use super::{Config, ConfigError, ConfigIssue, HealthOverride, redact_url};

/// Most delay queues `retry.mode: delay_queue` may declare.
pub const MAX_DELAY_TIERS: usize = 32;

impl Config {
    /// Checks values that parse but make no sense, and reports all of them at once.
    ///
    /// # Errors
    /// A [`ConfigError`] naming each bad key (the source is given as `config`).
    pub fn validate(self) -> Result<Config, ConfigError> {
        self.validate_with(&|_| "config".to_owned())
    }

    /// [`Config::validate`], with the source of each issue given by `source_of` for the
    /// dotted path of the value found wrong (`backends.1.health.interval_ms`).
    pub(super) fn validate_with(
        self,
        source_of: &dyn Fn(&str) -> String,
    ) -> Result<Config, ConfigError> {
        let mut issues = Vec::new();
        let mut bad = |key: String, lookup: &str, message: String| {
            let issue = ConfigIssue {
                key,
                source: source_of(lookup),
                message,
            };
            // A top-level `health:` problem is found once per backend that uses it.
            if !issues.contains(&issue) {
                issues.push(issue);
            }
        };
        let a = &self.amqp;
        match url::Url::parse(&a.url) {
            Ok(u) if u.scheme() == "amqp" || u.scheme() == "amqps" => {
                if u.host_str().is_none_or(str::is_empty) {
                    bad("amqp.url".into(), "amqp.url", "the URL has no host".into());
                }
            }
            Ok(u) => bad(
                "amqp.url".into(),
                "amqp.url",
                format!("scheme must be amqp or amqps, not {:?}", u.scheme()),
            ),
            Err(e) => bad(
                "amqp.url".into(),
                "amqp.url",
                format!("not a valid URL ({e}): {}", redact_url(&a.url)),
            ),
        }
        if a.queue.trim().is_empty() {
            bad(
                "amqp.queue".into(),
                "amqp.queue",
                "is required: the queue to consume from (env AMQP_SIDECAR_AMQP__QUEUE)".into(),
            );
        }
        if a.prefetch == 0 {
            bad(
                "amqp.prefetch".into(),
                "amqp.prefetch",
                "must be at least 1 (0 would mean unlimited, and the sidecar would hoard the queue)"
                    .into(),
            );
        }
        if a.reconnect_initial_ms == 0 || a.reconnect_initial_ms > a.reconnect_max_ms {
            bad(
                "amqp.reconnect_initial_ms".into(),
                "amqp.reconnect_initial_ms",
                format!(
                    "must be between 1 and amqp.reconnect_max_ms ({})",
                    a.reconnect_max_ms
                ),
            );
        }
        if self.backends.is_empty() {
            bad(
                "backends".into(),
                "backends",
                "at least one backend is required (or set AMQP_SIDECAR_BACKENDS=http://host:port/path,...)"
                    .into(),
            );
        }
        let mut labels = HashSet::new();
        for (i, b) in self.backends.iter().enumerate() {
            let key = |field: &str| format!("backends[{i}].{field}");
            let lookup = |field: &str| format!("backends.{i}.{field}");
            match url::Url::parse(&b.url) {
                Ok(u)
                    if (u.scheme() == "http" || u.scheme() == "https")
                        && u.host_str().is_some() => {}
                Ok(u) => bad(
                    key("url"),
                    &lookup("url"),
                    format!(
                        "must be an http:// or https:// URL with a host, got scheme {:?}",
                        u.scheme()
                    ),
                ),
                Err(e) => bad(
                    key("url"),
                    &lookup("url"),
                    format!("{:?} is not a valid URL: {e}", b.url),
                ),
            }
            if b.max_in_flight == super::MaxInFlight::Fixed(0) {
                bad(
                    key("max_in_flight"),
                    &lookup("max_in_flight"),
                    "must be at least 1 (or auto)".into(),
                );
            }
            if b.min_in_flight == 0 {
                bad(
                    key("min_in_flight"),
                    &lookup("min_in_flight"),
                    "must be at least 1".into(),
                );
            }
            if b.max_in_flight_limit < b.min_in_flight {
                bad(
                    key("max_in_flight_limit"),
                    &lookup("max_in_flight_limit"),
                    format!("must be at least min_in_flight ({})", b.min_in_flight),
                );
            }
            if b.weight == 0 {
                bad(
                    key("weight"),
                    &lookup("weight"),
                    "must be at least 1".into(),
                );
            }
            if b.timeout_ms == 0 {
                bad(
                    key("timeout_ms"),
                    &lookup("timeout_ms"),
                    "must be at least 1 ms".into(),
                );
            }
            if !labels.insert(b.label()) {
                // The label is the name, or derived from the URL when there is none.
                let from = if b.name.is_some() { "name" } else { "url" };
                bad(
                    key("name"),
                    &lookup(from),
                    format!(
                        "two backends share the label {:?}; give them distinct `name`s",
                        b.label()
                    ),
                );
            }
        }
        let r = &self.retry;
        if r.max_attempts == 0 {
            bad(
                "retry.max_attempts".into(),
                "retry.max_attempts",
                "must be at least 1".into(),
            );
        }
        if !(r.backoff_multiplier.is_finite() && r.backoff_multiplier >= 1.0) {
            bad(
                "retry.backoff_multiplier".into(),
                "retry.backoff_multiplier",
                "must be a number ≥ 1".into(),
            );
        }
        if r.backoff_initial_ms > r.backoff_max_ms {
            bad(
                "retry.backoff_initial_ms".into(),
                "retry.backoff_initial_ms",
                format!(
                    "must not exceed retry.backoff_max_ms ({})",
                    r.backoff_max_ms
                ),
            );
        }
        if r.mode == super::RetryMode::DelayQueue
            && let Some(tiers) = crate::amqp::delay::DelayTiers::new(&self)
            && tiers.tiers().len() > MAX_DELAY_TIERS
        {
            bad(
                "retry.mode".into(),
                "retry.mode",
                format!(
                    "delay_queue would declare {} delay queues (one per backoff step up to retry.max_attempts ({}) and \
                     retry.backoff_max_ms); at most {MAX_DELAY_TIERS}. Raise retry.backoff_multiplier or lower \
                     retry.backoff_max_ms so the steps reach the cap sooner",
                    tiers.tiers().len(),
                    r.max_attempts
                ),
            );
        }
        if r.attempt_cache_size == 0 {
            bad(
                "retry.attempt_cache_size".into(),
                "retry.attempt_cache_size",
                "must be at least 1".into(),
            );
        }
        let longest_timeout = self
            .backends
            .iter()
            .map(|b| b.timeout_ms)
            .max()
            .unwrap_or(0);
        let worst = longest_timeout.saturating_add(r.backoff_max_ms);
        if worst >= a.delivery_deadline_ms {
            bad(
                "amqp.delivery_deadline_ms".into(),
                "amqp.delivery_deadline_ms",
                format!(
                    "the longest backend timeout_ms ({longest_timeout}) plus retry.backoff_max_ms ({}) is {worst} ms, \
                     which must stay below amqp.delivery_deadline_ms ({}); otherwise the broker's consumer_timeout \
                     may close the channel under a delivery. Lower them, or raise the deadline (and the broker's consumer_timeout)",
                    r.backoff_max_ms, a.delivery_deadline_ms
                ),
            );
        }
        if let Some(budget) = self.memory_budget()
            && self.backend.max_body_bytes as u64 > budget.bytes
        {
            let (key, lookup) = match budget.source {
                crate::memory::LimitSource::Config => ("memory.limit_bytes", "memory.limit_bytes"),
                _ => ("backend.max_body_bytes", "backend.max_body_bytes"),
            };
            bad(
                key.into(),
                lookup,
                format!(
                    "backend.max_body_bytes ({}) is larger than the memory budget memory.limit_bytes ({} bytes{}): \
                     a message that size could never be held. Lower backend.max_body_bytes or raise the budget",
                    self.backend.max_body_bytes,
                    budget.bytes,
                    match budget.source {
                        crate::memory::LimitSource::Config => String::new(),
                        _ => " from the container's cgroup memory limit, less 48 MiB".to_owned(),
                    }
                ),
            );
        }
        if self.dead_letter.confirm_timeout_ms == 0 {
            bad(
                "dead_letter.confirm_timeout_ms".into(),
                "dead_letter.confirm_timeout_ms",
                "must be at least 1 ms".into(),
            );
        }
        for i in 0..self.backends.len() {
            let Some(h) = self.health_check(i) else {
                continue;
            };
            let over = self.backends[i].health.as_ref();
            let prefix = if over.is_some() {
                format!("backends[{i}].health")
            } else {
                "health".to_owned()
            };
            // The source of a check is that of the value it found wrong: the backend's
            // override when it sets one of `fields` (the first), else the top-level key.
            let lookup = |fields: &[&str]| match fields.iter().find(|f| overrides(over, f)) {
                Some(field) => format!("backends.{i}.health.{field}"),
                None => format!("health.{}", fields[0]),
            };
            if !h.path.starts_with('/') {
                bad(
                    format!("{prefix}.path"),
                    &lookup(&["path"]),
                    format!("must start with '/', got {:?}", h.path),
                );
            }
            if h.interval_ms == 0 || h.timeout_ms == 0 || h.timeout_ms > h.interval_ms {
                let wrong: &[&str] = match (h.interval_ms, h.timeout_ms) {
                    (0, 0) => &["timeout_ms", "interval_ms"],
                    (0, _) => &["interval_ms"],
                    (_, 0) => &["timeout_ms"],
                    _ => &["timeout_ms", "interval_ms"],
                };
                bad(
                    format!("{prefix}.timeout_ms"),
                    &lookup(wrong),
                    format!(
                        "interval_ms ({}) and timeout_ms ({}) must be ≥ 1, with timeout_ms ≤ interval_ms",
                        h.interval_ms, h.timeout_ms
                    ),
                );
            }
            if h.unhealthy_threshold == 0 || h.healthy_threshold == 0 {
                let wrong: &[&str] = match (h.unhealthy_threshold, h.healthy_threshold) {
                    (0, 0) => &["unhealthy_threshold", "healthy_threshold"],
                    (0, _) => &["unhealthy_threshold"],
                    _ => &["healthy_threshold"],
                };
                bad(
                    format!("{prefix}.unhealthy_threshold"),
                    &lookup(wrong),
                    "unhealthy_threshold and healthy_threshold must be ≥ 1".into(),
                );
            }
        }
        if self.ejection.max_percent > 100 {
            bad(
                "ejection.max_percent".into(),
                "ejection.max_percent",
                "must be between 0 and 100".into(),
            );
        }
        if self.ejection.base_ms > self.ejection.max_ms {
            bad(
                "ejection.base_ms".into(),
                "ejection.base_ms",
                format!("must not exceed ejection.max_ms ({})", self.ejection.max_ms),
            );
        }
        if self.backend.max_body_bytes == 0 {
            bad(
                "backend.max_body_bytes".into(),
                "backend.max_body_bytes",
                "must be at least 1".into(),
            );
        }
        if let Some(path) = &self.backend.ca_file
            && let Err(e) = crate::tls::load_roots(path)
        {
            bad("backend.ca_file".into(), "backend.ca_file", e.to_string());
        }
        match (
            &self.backend.client_cert_file,
            &self.backend.client_key_file,
        ) {
            (Some(cert), Some(key)) => {
                if let Err(e) = crate::tls::load_identity(cert, key) {
                    let key_name = if matches!(e, crate::tls::TlsFileError::Key { .. }) {
                        "backend.client_key_file"
                    } else {
                        "backend.client_cert_file"
                    };
                    bad(key_name.into(), key_name, e.to_string());
                }
            }
            (Some(_), None) => bad(
                "backend.client_key_file".into(),
                "backend.client_key_file",
                "must be set when backend.client_cert_file is".into(),
            ),
            (None, Some(_)) => bad(
                "backend.client_cert_file".into(),
                "backend.client_cert_file",
                "must be set when backend.client_key_file is".into(),
            ),
            (None, None) => {}
        }
        if let Err(e) = self.log.level.parse::<tracing_subscriber::EnvFilter>() {
            bad(
                "log.level".into(),
                "log.level",
                format!("not a valid filter: {e}"),
            );
        }
        if issues.is_empty() {
            Ok(self)
        } else {
            Err(ConfigError { issues })
        }
    }
}

/// Whether a backend's `health:` override sets `field`.
fn overrides(over: Option<&HealthOverride>, field: &str) -> bool {
    over.is_some_and(|o| match field {
        "path" => o.path.is_some(),
        "interval_ms" => o.interval_ms.is_some(),
        "timeout_ms" => o.timeout_ms.is_some(),
        "unhealthy_threshold" => o.unhealthy_threshold.is_some(),
        "healthy_threshold" => o.healthy_threshold.is_some(),
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{
        BackendConfig,
        tests::{temp_yaml, valid},
    };

    fn keys(c: Config) -> Vec<String> {
        c.validate()
            .expect_err("should be rejected")
            .issues
            .into_iter()
            .map(|i| i.key)
            .collect()
    }

    #[test]
    fn default_with_queue_and_backend_is_valid() {
        assert!(valid().validate().is_ok());
    }

    #[test]
    fn rejects_each_bad_value() {
        // (what to break, the keys that must be reported)
        type Case = (fn(&mut Config), &'static [&'static str]);
        let cases: &[Case] = &[
            (|c| c.amqp.queue = String::new(), &["amqp.queue"]),
            (|c| c.amqp.prefetch = 0, &["amqp.prefetch"]),
            (|c| c.amqp.url = "http://x".into(), &["amqp.url"]),
            (|c| c.backends.clear(), &["backends"]),
            (
                |c| c.backends[0].max_in_flight = 0.into(),
                &["backends[0].max_in_flight"],
            ),
            (
                |c| c.backends[0].url = "ftp://x/".into(),
                &["backends[0].url"],
            ),
            (|c| c.backends[0].weight = 0, &["backends[0].weight"]),
            (|c| c.retry.max_attempts = 0, &["retry.max_attempts"]),
            (
                |c| c.backends[0].min_in_flight = 0,
                &["backends[0].min_in_flight"],
            ),
            (
                |c| c.backends[0].max_in_flight_limit = 0,
                &["backends[0].max_in_flight_limit"],
            ),
            (
                |c| {
                    c.retry.mode = super::super::RetryMode::DelayQueue;
                    c.retry.max_attempts = 100;
                    c.retry.backoff_multiplier = 1.01;
                },
                &["retry.mode"],
            ),
            (
                |c| c.retry.backoff_multiplier = 0.5,
                &["retry.backoff_multiplier"],
            ),
            (
                |c| c.retry.backoff_initial_ms = 100_000,
                &["retry.backoff_initial_ms"],
            ),
            (
                |c| c.backends[0].timeout_ms = 900_000,
                &["amqp.delivery_deadline_ms"],
            ),
            (|c| c.ejection.max_percent = 101, &["ejection.max_percent"]),
            (
                |c| c.ejection.base_ms = c.ejection.max_ms + 1,
                &["ejection.base_ms"],
            ),
            (
                |c| c.dead_letter.confirm_timeout_ms = 0,
                &["dead_letter.confirm_timeout_ms"],
            ),
            (
                |c| c.backend.max_body_bytes = 0,
                &["backend.max_body_bytes"],
            ),
            (|c| c.log.level = "amqp_sidecar=loud".into(), &["log.level"]),
            (
                |c| c.amqp.reconnect_initial_ms = 0,
                &["amqp.reconnect_initial_ms"],
            ),
            (
                |c| {
                    c.backends
                        .push(BackendConfig::new("http://127.0.0.1:8080/other"))
                },
                &["backends[1].name"],
            ),
        ];
        for (i, (break_it, want)) in cases.iter().enumerate() {
            let mut c = valid();
            break_it(&mut c);
            assert_eq!(keys(c), *want, "case {i}");
        }
    }

    #[test]
    fn health_checks_merge_per_backend_overrides() {
        let mut c = valid();
        assert_eq!(c.health_check(0), None, "off without a path");
        c.health.path = Some("/healthz".into());
        c.backends.push(BackendConfig {
            health: Some(HealthOverride {
                path: Some("/ready".into()),
                interval_ms: Some(500),
                timeout_ms: Some(200),
                ..HealthOverride::default()
            }),
            ..BackendConfig::new("http://127.0.0.1:8081/")
        });
        let h0 = c.health_check(0).expect("on");
        assert_eq!(
            (h0.path.as_str(), h0.interval_ms, h0.unhealthy_threshold),
            ("/healthz", 5_000, 3)
        );
        let h1 = c.health_check(1).expect("on");
        assert_eq!(
            (h1.path.as_str(), h1.interval_ms, h1.timeout_ms),
            ("/ready", 500, 200)
        );
        assert_eq!(
            h1.healthy_threshold, 2,
            "unset fields come from the top level"
        );
        c.health.path = Some("healthz".into());
        assert_eq!(keys(c.clone()), ["health.path"]);
        c.backends
            .push(BackendConfig::new("http://127.0.0.1:8082/"));
        assert_eq!(
            keys(c),
            ["health.path"],
            "reported once, not once per backend"
        );
    }

    /// `(key, source)` of each issue of a configuration loaded from `yaml` and `env`, and
    /// the file's source name.
    fn sources(yaml: &str, env: &[(&str, &str)]) -> (String, Vec<(String, String)>) {
        let file = temp_yaml(yaml);
        let err = Config::load_with(Some(&file), env.iter().copied()).expect_err("rejected");
        let _ = std::fs::remove_dir_all(file.parent().expect("dir"));
        let issues = err.issues.into_iter().map(|i| (i.key, i.source)).collect();
        (format!("file {}", file.display()), issues)
    }

    /// A bad per-backend `health:` override written in the file names the file as its
    /// source, although the top-level `health:` comes from the defaults. (Each was looked
    /// up at the top-level key, and reported `default`.)
    #[test]
    fn a_bad_health_override_names_the_file_it_came_from() {
        let (file, got) = sources(
            "amqp:\n  queue: orders\nbackends:\n  - url: http://127.0.0.1:8080/\n    health:\n      path: ready\n      timeout_ms: 0\n      unhealthy_threshold: 0\n",
            &[],
        );
        let want: Vec<(String, String)> = ["path", "timeout_ms", "unhealthy_threshold"]
            .into_iter()
            .map(|k| (format!("backends[0].health.{k}"), file.clone()))
            .collect();
        assert_eq!(got, want);
    }

    /// A health check's source is that of the value found wrong: the override when it sets
    /// it, else the top-level key (here from the environment).
    #[test]
    fn a_health_issue_names_the_source_of_the_wrong_value() {
        let yaml = "amqp:\n  queue: orders\nbackends:\n  - url: http://127.0.0.1:8080/\n    health:\n      path: /ready\n";
        let (_, got) = sources(yaml, &[("AMQP_SIDECAR_HEALTH__TIMEOUT_MS", "9000")]);
        let env = "env AMQP_SIDECAR_HEALTH__TIMEOUT_MS".to_owned();
        assert_eq!(got, [("backends[0].health.timeout_ms".to_owned(), env)]);

        let yaml = format!("{yaml}      interval_ms: 0\n");
        let (file, got) = sources(&yaml, &[("AMQP_SIDECAR_HEALTH__TIMEOUT_MS", "500")]);
        assert_eq!(got, [("backends[0].health.timeout_ms".to_owned(), file)]);
    }
}
