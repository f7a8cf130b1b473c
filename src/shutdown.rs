//! Signals: the first SIGTERM or SIGINT starts a graceful shutdown (cancel, drain with a
//! deadline, settle); a second one exits at once, and the broker requeues whatever is
//! unacked when the connection drops.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Exit code of the forced exit on a second signal (128 + SIGINT, as shells report it).
pub const FORCED_EXIT_CODE: i32 = 130;

/// Cancels `token` on the first SIGTERM/SIGINT and exits the process on the second.
///
/// # Errors
/// When the signal handlers cannot be installed.
pub fn install(token: CancellationToken) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutting down gracefully; send it again to exit at once"),
            _ = int.recv() => tracing::info!(signal = "SIGINT", "shutting down gracefully; send it again to exit at once"),
        }
        token.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("second signal: exiting now; the broker requeues unacked deliveries");
        std::process::exit(FORCED_EXIT_CODE);
    });
    Ok(())
}
