//! The `amqp-sidecar` binary: CLI, tracing setup, config loading, signals and exit codes.
//!
//! Exit codes: 0 after a clean shutdown; 78 (EX_CONFIG) for a configuration error;
//! 1 when the sidecar cannot start (e.g. the queue exists with other arguments);
//! 130 on a forced exit (second signal).

use std::{path::PathBuf, process::ExitCode};

use amqp_sidecar::{Config, EXIT_CONFIG, Sidecar, config::LogFormat};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// RabbitMQ consumer-side sidecar: forwards deliveries to local HTTP workers by shortest
/// queue, and acks, requeues or dead-letters them by outcome.
#[derive(Debug, Parser)]
#[command(name = "amqp-sidecar", version, about)]
struct Cli {
    /// YAML config file (also AMQP_SIDECAR_CONFIG). Environment variables
    /// AMQP_SIDECAR_<SECTION>__<KEY> override it.
    #[arg(long, short, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the sidecar (the default).
    Run,
    /// Print the effective config (password redacted) and exit 0, or 78 if it is invalid.
    CheckConfig,
    /// Run the demo on the local broker: three in-process workers, a published batch,
    /// and a summary of what happened.
    Demo(amqp_sidecar::demo::DemoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Demo(args)) => {
            init_tracing(LogFormat::Text, "error");
            return run_async(async move {
                match amqp_sidecar::demo::run(args).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("demo failed: {e:#}");
                        ExitCode::FAILURE
                    }
                }
            });
        }
        Some(Command::CheckConfig) => {
            return match Config::load(cli.config.as_deref()) {
                Ok(cfg) => {
                    println!("{}", cfg.redacted_json());
                    ExitCode::SUCCESS
                }
                Err(e) => config_error(&e),
            };
        }
        Some(Command::Run) | None => {}
    }
    let cfg = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    init_tracing(cfg.log.format, &cfg.log.level);
    raise_open_files_limit();
    run_async(async move {
        let shutdown = CancellationToken::new();
        if let Err(e) = amqp_sidecar::shutdown::install(shutdown.clone()) {
            tracing::error!(error = %e, "cannot install signal handlers");
            return ExitCode::FAILURE;
        }
        let sidecar = match Sidecar::bind(cfg).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(admin = %sidecar.admin_addr(), "admin server listening");
        match sidecar.run(shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "stopping");
                eprintln!("amqp-sidecar: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

fn config_error(e: &amqp_sidecar::config::ConfigError) -> ExitCode {
    eprint!("amqp-sidecar: {e}");
    ExitCode::from(EXIT_CONFIG as u8)
}

fn run_async<F: Future<Output = ExitCode>>(f: F) -> ExitCode {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(f),
        Err(e) => {
            eprintln!("amqp-sidecar: cannot start the tokio runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, as servers commonly do: the default
/// soft limit (1,024) is low for a process that holds broker, backend and admin connections.
fn raise_open_files_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(limit = n, "open-files soft limit raised to the hard limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-files soft limit"),
    }
}

/// Targets capped at `debug`, whatever `RUST_LOG` asks for: at `trace`, lapin and
/// amq-protocol log whole frames, and Connection.StartOk's SASL response holds the broker
/// password. Their `debug` level has no frame contents.
const CAPPED_TARGETS: [&str; 2] = ["lapin", "amq_protocol"];

fn init_tracing(format: LogFormat, level: &str) {
    use tracing_subscriber::{
        filter::{LevelFilter, Targets},
        prelude::*,
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    // A second, intersecting filter: it can only lower what `filter` lets through.
    let caps = CAPPED_TARGETS.iter().fold(
        Targets::new().with_default(LevelFilter::TRACE),
        |t, target| t.with_target(*target, LevelFilter::DEBUG),
    );
    let registry = tracing_subscriber::registry().with(filter).with(caps);
    // Colours only on a terminal: a pod's stderr goes to a log file, where escape codes
    // break grep and log pipelines.
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Json => registry.with(layer.json()).init(),
        LogFormat::Text => registry.with(layer).init(),
    }
}
