//! Configuration errors: exit 78 naming the key and its source; check-config redacts the
//! password; topology mismatches stop the sidecar with a message that says how to fix them.

mod support;

use std::process::Command;

use amqp_sidecar::{SidecarError, amqp::topology::TopologyError, config::QueueType};
use support::*;

fn sidecar_cmd() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_amqp-sidecar"));
    for (k, _) in std::env::vars() {
        if k.starts_with("AMQP_SIDECAR_") {
            c.env_remove(k);
        }
    }
    c
}

#[test]
fn bad_env_value_exits_78_naming_key_and_variable() {
    let out = sidecar_cmd()
        .arg("check-config")
        .env("AMQP_SIDECAR_AMQP__QUEUE", "orders")
        .env("AMQP_SIDECAR_AMQP__PREFETCH", "0")
        .env("AMQP_SIDECAR_BACKENDS", "http://127.0.0.1:8080/")
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("amqp.prefetch"), "{stderr}");
    assert!(stderr.contains("AMQP_SIDECAR_AMQP__PREFETCH"), "{stderr}");
}

/// Runs the sidecar (the `run` command) with `yaml` as its config file; asserts exit 78 and
/// returns stderr.
fn run_with_config_exits_78(file: &std::path::Path, yaml: &str) -> String {
    std::fs::write(file, yaml).expect("write");
    let out = sidecar_cmd()
        .arg("--config")
        .arg(file)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    stderr
}

#[test]
fn run_with_bad_config_exits_78_before_connecting() {
    let dir = std::env::temp_dir().join(support::unique("cfg"));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("sidecar.yaml");
    let stderr = run_with_config_exits_78(
        &file,
        "amqp:\n  queue: orders\n  prefetch_count: 3\nbackends:\n  - url: ftp://127.0.0.1/\n    max_in_flight: 0\n",
    );
    assert!(
        stderr.contains("amqp.prefetch_count"),
        "unknown key named: {stderr}"
    );
    assert!(
        stderr.contains(&file.display().to_string()),
        "source named: {stderr}"
    );

    let stderr = run_with_config_exits_78(
        &file,
        "amqp:\n  queue: orders\nbackends:\n  - url: ftp://127.0.0.1/\n    max_in_flight: 0\n",
    );
    assert!(stderr.contains("backends[0].url"), "{stderr}");
    assert!(stderr.contains("backends[0].max_in_flight"), "{stderr}");

    let out = sidecar_cmd()
        .env("AMQP_SIDECAR_BACKENDS", "http://127.0.0.1:8080/")
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("amqp.queue"),
        "missing queue named: {stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Issue 18: every wrong type and unknown key is reported, not only the first, each with
/// its source (file or environment variable).
#[test]
fn every_type_error_is_reported_with_its_source() {
    let dir = std::env::temp_dir().join(support::unique("cfg-types"));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("sidecar.yaml");
    std::fs::write(
        &file,
        "amqp:\n  queue: orders\n  prefetch: lots\n  consumers: -3\n  colour: blue\nbackends:\n  - url: http://127.0.0.1:8080/\n    max_in_flight: many\n",
    )
    .expect("write");
    let out = sidecar_cmd()
        .arg("check-config")
        .arg("--config")
        .arg(&file)
        .env("AMQP_SIDECAR_RETRY__MAX_ATTEMPTS", "five")
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    let from_file = format!("(from file {})", file.display());
    for key in [
        "amqp.prefetch",
        "amqp.consumers",
        "amqp.colour",
        "backends[0].max_in_flight",
    ] {
        assert!(
            stderr.contains(&format!("{key} {from_file}")),
            "{key} reported with its file: {stderr}"
        );
    }
    assert!(
        stderr.contains("retry.max_attempts (from env AMQP_SIDECAR_RETRY__MAX_ATTEMPTS)"),
        "{stderr}"
    );
    assert!(stderr.contains("(5 problem(s))"), "{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Issue 11: the TLS files are read and parsed at validation; a missing or unusable file
/// exits 78 naming its key.
#[test]
fn bad_tls_files_exit_78_naming_the_key() {
    let dir = std::env::temp_dir().join(support::unique("cfg-tls"));
    std::fs::create_dir_all(&dir).expect("dir");
    let not_pem = dir.join("not.pem");
    std::fs::write(&not_pem, "this is not a certificate\n").expect("write");
    let run = |env: &[(&str, &str)]| {
        let out = sidecar_cmd()
            .arg("check-config")
            .env("AMQP_SIDECAR_AMQP__QUEUE", "orders")
            .env("AMQP_SIDECAR_BACKENDS", "https://127.0.0.1:8443/")
            .envs(env.iter().copied())
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(78), "{stderr}");
        stderr
    };
    let missing = dir.join("missing.pem");
    let stderr = run(&[(
        "AMQP_SIDECAR_BACKEND__CA_FILE",
        missing.to_str().expect("utf-8"),
    )]);
    assert!(
        stderr.contains("backend.ca_file (from env AMQP_SIDECAR_BACKEND__CA_FILE)"),
        "{stderr}"
    );
    let stderr = run(&[(
        "AMQP_SIDECAR_BACKEND__CA_FILE",
        not_pem.to_str().expect("utf-8"),
    )]);
    assert!(
        stderr.contains("backend.ca_file") && stderr.contains("no PEM certificate"),
        "{stderr}"
    );
    let stderr = run(&[(
        "AMQP_SIDECAR_BACKEND__CLIENT_CERT_FILE",
        not_pem.to_str().expect("utf-8"),
    )]);
    assert!(
        stderr.contains("backend.client_key_file") && stderr.contains("must be set"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn check_config_prints_effective_config_without_the_password() {
    let out = sidecar_cmd()
        .arg("check-config")
        .env(
            "AMQP_SIDECAR_AMQP__URL",
            "amqps://app:hunter2-secret@rabbit.example:5671/prod",
        )
        .env("AMQP_SIDECAR_AMQP__QUEUE", "12345")
        .env(
            "AMQP_SIDECAR_BACKENDS",
            "http://127.0.0.1:8080/a, http://worker:backend-pw-secret@127.0.0.1:8081/b",
        )
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains("backend-pw-secret"),
        "backend password leaked: {stdout}"
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stdout.contains("hunter2"), "password leaked: {stdout}");
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(v["amqp"]["url"], "amqps://app:***@rabbit.example:5671/prod");
    assert_eq!(
        v["amqp"]["queue"], "12345",
        "a numeric env value is accepted for a string key"
    );
    assert_eq!(v["backends"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        v["backends"][1]["url"],
        "http://worker:***@127.0.0.1:8081/b"
    );
    assert_eq!(
        v["backends"][1]["max_in_flight"], "auto",
        "the default: learned"
    );
}

#[tokio::test]
async fn a_queue_declared_with_other_arguments_stops_with_a_fix() {
    let conn = broker().await;
    let queue = unique("mismatch");
    let worker = Worker::builder().spawn().await;
    let mut classic = config(&queue, vec![backend(&worker, 1)]);
    classic.amqp.queue_type = QueueType::Classic;
    declare(&conn, &classic).await;
    let mut quorum = classic.clone();
    quorum.amqp.queue_type = QueueType::Quorum;
    let err = start_unready(quorum.clone()).await.stop_result_soon().await;
    match &err {
        Err(SidecarError::Topology(TopologyError::Mismatch { name, argument, .. })) => {
            assert_eq!(name, &queue);
            assert_eq!(argument, "x-queue-type");
        }
        other => panic!("expected a mismatch error, got {other:?}"),
    }
    let text = err.expect_err("error").to_string();
    assert!(
        text.contains(&queue)
            && text.contains("x-queue-type")
            && text.contains("amqp.declare: false"),
        "{text}"
    );
    cleanup(&conn, &classic).await;
}

#[tokio::test]
async fn declare_false_and_a_missing_queue_stops_with_a_fix() {
    let queue = unique("missing");
    let worker = Worker::builder().spawn().await;
    let mut cfg = config(&queue, vec![backend(&worker, 1)]);
    cfg.amqp.declare = false;
    let _ = broker().await;
    let err = start_unready(cfg).await.stop_result_soon().await;
    match err {
        Err(SidecarError::Topology(e @ TopologyError::Missing { .. })) => {
            let text = e.to_string();
            assert!(
                text.contains(&queue) && text.contains("amqp.declare: true"),
                "{text}"
            );
        }
        other => panic!("expected a missing-queue error, got {other:?}"),
    }
}

#[test]
fn the_example_config_is_valid() {
    let out = sidecar_cmd()
        .arg("--config")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.yaml"))
        .arg("check-config")
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["amqp"]["queue"], "orders");
    assert_eq!(v["backends"][0]["max_in_flight"], "auto");
    assert_eq!(v["backends"][1]["max_in_flight"], 2);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("guest:guest"),
        "password redacted"
    );
}

#[tokio::test]
async fn the_password_never_appears_in_logs() {
    let worker = Worker::builder().spawn().await;
    let mut cfg = config(&unique("secret-logs"), vec![backend(&worker, 1)]);
    // Nothing listens there: the sidecar logs its failed connection attempts, with the URL.
    cfg.amqp.url = format!("amqp://guest:Very-Secret-Pw@127.0.0.1:{}/%2f", free_port());
    cfg.amqp.reconnect_initial_ms = 50;
    cfg.amqp.reconnect_max_ms = 100;
    cfg.log.format = amqp_sidecar::config::LogFormat::Json;
    let mut sidecar = spawn_binary(&cfg);
    wait_until(
        "a failed attempt logged",
        std::time::Duration::from_secs(10),
        || async { sidecar.log().matches("cannot connect").count() >= 2 },
    )
    .await;
    sidecar.signal("TERM");
    assert_eq!(
        sidecar
            .wait(std::time::Duration::from_secs(10))
            .await
            .code(),
        Some(0)
    );
    let log = sidecar.log();
    assert!(
        !log.contains("Very-Secret-Pw"),
        "password in the logs:\n{log}"
    );
    assert!(
        log.contains("guest:***@127.0.0.1"),
        "the URL is logged, redacted:\n{log}"
    );
    assert!(
        !log.contains("lapin::"),
        "the cap on the AMQP client's log level never raises it:\n{log}"
    );
    for line in log.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
    }
}

/// Issue 18: at `RUST_LOG=trace` the AMQP client logs whole frames, and Connection.StartOk's
/// SASL response holds the password. The sidecar caps those targets, so a real connection
/// at trace level never logs the password, as text or as bytes.
#[tokio::test]
async fn the_password_never_appears_in_logs_at_trace_level() {
    let user = unique("trace-user");
    let password = format!("Trace-Secret-{}", std::process::id());
    rabbitmqctl(&["add_user", &user, &password]);
    rabbitmqctl(&["set_permissions", "-p", "/", &user, ".*", ".*", ".*"]);
    let worker = Worker::builder().spawn().await;
    let mut cfg = config(&unique("secret-trace"), vec![backend(&worker, 1)]);
    let mut url = url::Url::parse(&amqp_url()).expect("AMQP_URL");
    url.set_username(&user).expect("user");
    url.set_password(Some(&password)).expect("password");
    cfg.amqp.url = url.to_string();
    let mut sidecar = spawn_binary_with_env(&cfg, &[("RUST_LOG", "trace")]);
    let ready =
        tokio::time::timeout(std::time::Duration::from_secs(30), sidecar.wait_ready()).await;
    sidecar.signal("TERM");
    let _ = sidecar.wait(std::time::Duration::from_secs(15)).await;
    rabbitmqctl(&["delete_user", &user]);
    let _ = rabbitmqctl(&["-q", "delete_queue", &cfg.amqp.queue]);
    assert!(ready.is_ok(), "the sidecar connected with the test user");
    let log = sidecar.log();
    assert!(
        log.contains("lapin::"),
        "the AMQP client's own lines are logged (so the test can fail):\n{}",
        &log[..log.len().min(3000)]
    );
    let as_bytes = password
        .bytes()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    assert!(!log.contains(&password), "password in the trace log");
    assert!(!log.contains(&as_bytes), "password bytes in the trace log");
}
