//! The scrape works end to end: a real Prometheus server (Debian's `prometheus` package)
//! scrapes a running sidecar that has processed N messages, and its HTTP API reads
//! `amqp_sidecar_acks_total` = N. `promtool check metrics` accepts a real scrape.
//!
//! Needs `prometheus` and `promtool` on PATH (`apt-get install prometheus`; `.ci/run`
//! installs it). Without them this test fails and says so: it never skips.

mod support;

use std::{process::Stdio, time::Duration};

use support::*;

fn tool(name: &str) -> String {
    let found = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    assert!(
        !found.is_empty(),
        "{name} is not installed. Install Debian's prometheus package (apt-get install prometheus), \
         or run .ci/run, which does"
    );
    found
}

#[tokio::test]
async fn a_real_prometheus_scrapes_the_acks() {
    let prometheus = tool("prometheus");
    let promtool = tool("promtool");
    let conn = broker().await;
    let queue = unique("prometheus");
    let worker = Worker::builder().spawn().await;
    let cfg = config(&queue, vec![backend(&worker, 2)]);
    declare(&conn, &cfg).await;
    const N: usize = 25;
    publish_n(&conn, &queue, N).await;
    let sidecar = start(cfg.clone()).await;
    wait_until("processed", Duration::from_secs(30), || async {
        sidecar
            .metric("amqp_sidecar_acks_total", &[("queue", &queue)])
            .await
            == N as f64
    })
    .await;

    // promtool check metrics on a real scrape: no problems reported.
    let scrape = sidecar.metrics().await;
    let mut check = tokio::process::Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = check.stdin.take().expect("stdin");
        stdin
            .write_all(scrape.as_bytes())
            .await
            .expect("write scrape");
    }
    let out = check.wait_with_output().await.expect("promtool output");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics: {report}"
    );

    // A real Prometheus server scraping the sidecar every second.
    let dir = TempDir(std::env::temp_dir().join(unique("prometheus")));
    std::fs::create_dir_all(dir.0.join("data")).expect("dir");
    let config = dir.0.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: amqp-sidecar\n    static_configs:\n      - targets: ['{}']\n",
            sidecar.admin
        ),
    )
    .expect("write config");
    let port = free_port();
    let mut server = tokio::process::Command::new(&prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.0.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start prometheus");
    let promql = format!("amqp_sidecar_acks_total{{queue=\"{queue}\"}}");
    let query = url::Url::parse_with_params(
        &format!("http://127.0.0.1:{port}/api/v1/query"),
        &[("query", promql.as_str())],
    )
    .expect("url");
    wait_until(
        "Prometheus reads amqp_sidecar_acks_total = N",
        Duration::from_secs(60),
        || async {
            let Ok(r) = http().get(query.clone()).send().await else {
                return false;
            };
            let Ok(body) = r.text().await else {
                return false;
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) else {
                return false;
            };
            v["data"]["result"][0]["value"][1].as_str() == Some(&N.to_string())
        },
    )
    .await;
    let _ = server.kill().await;
    sidecar.stop().await.expect("clean stop");
    cleanup(&conn, &cfg).await;
}
